//! Keeps libft's C API out of libftrepl.so's dynamic symbol table: the shim links libft as a
//! Rust library for its ring producer, and its exported `ft_*`/`t_*` functions must not
//! interpose on the real libft.so of a program that uses both.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,--exclude-libs,ALL");
    println!("cargo:rerun-if-changed=build.rs");
}
