//! Checks that the checked-in `include/ft.h` is what cbindgen generates from the crate today.
//! `FT_BLESS=1 cargo test -p ft --test header` rewrites it instead.

use std::path::Path;

#[test]
fn checked_in_header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("cbindgen writes UTF-8");

    let header = crate_dir.join("include/ft.h");
    if std::env::var_os("FT_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&header, &generated).expect("write include/ft.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&header).unwrap_or_default();
    assert!(
        checked_in == generated,
        "libft/include/ft.h is out of date with the C ABI in libft/src/capi.rs.\n\
         Regenerate it with: FT_BLESS=1 cargo test -p ft --test header\n\
         --- generated ---\n{generated}"
    );
}
