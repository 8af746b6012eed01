//! The C file API (`ft_create_file` & co.): a C program compiled against the checked-in
//! `include/ft.h` and linked to the freshly built `libft.so` writes into a fileset (the
//! test reads the operations from the fileset's ring) and outside it (no operations); the
//! error codes are checked in-process.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ft::capi::{
    FT_EBADHANDLE, FT_EFILE, FT_EINVAL, FT_OK, ft_close_file, ft_create_file, ft_read_file,
    ft_strerror, ft_sync_file, ft_write_file,
};
use ft::replog::{ConsumerOptions, Op, RelPath, Ring, RingItem, fileset::ENV_FILESETS};

const PROGRAM: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include "ft.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        return 2;
    }
    int h = ft_create_file(argv[1], O_CREAT | O_TRUNC | O_RDWR, 0640);
    printf("create=%d\n", h);
    printf("write=%lld\n", (long long)ft_write_file(h, "hello", 5));
    printf("write_at=%lld\n", (long long)ft_write_file_at(h, "J", 1, 0));
    printf("sync=%d\n", ft_sync_file(h));
    int r = ft_create_file(argv[1], O_RDONLY, 0);
    char buf[16] = {0};
    printf("read=%lld\n", (long long)ft_read_file(r, buf, sizeof buf - 1));
    printf("content=%s\n", buf);
    printf("close=%d\n", ft_close_file(h));
    printf("close_again=%d\n", ft_close_file(h));
    printf("write_closed=%lld\n", (long long)ft_write_file(h, "x", 1));
    printf("close_r=%d\n", ft_close_file(r));
    int o = ft_create_file(argv[2], O_CREAT | O_WRONLY | O_EXCL, 0600);
    printf("outside=%d\n", o);
    printf("outside_write=%lld\n", (long long)ft_write_file(o, "x", 1));
    printf("close_o=%d\n", ft_close_file(o));
    int e = ft_create_file(argv[2], O_CREAT | O_WRONLY | O_EXCL, 0600);
    printf("exists=%d\n", e);
    printf("errno_eexist=%d\n", errno == EEXIST);
    return 0;
}
"#;

/// `<target>/<profile>/deps`, where `cargo test` put the libft.so it just built.
fn artifact_dir() -> PathBuf {
    std::env::current_exe()
        .expect("test binary path")
        .parent()
        .expect("test binary is in <target>/<profile>/deps")
        .to_owned()
}

fn build_program(dir: &Path) -> Option<PathBuf> {
    if Command::new("cc").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no C compiler `cc` on PATH, the C file API test cannot run");
        return None;
    }
    let lib_dir = artifact_dir();
    let lib = lib_dir.join("libft.so");
    assert!(lib.exists(), "{} missing", lib.display());
    let source = dir.join("files.c");
    std::fs::write(&source, PROGRAM).expect("write C source");
    let exe = dir.join("files");
    let out = Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-std=c11", "-I"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
        .arg(&source)
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(exe)
}

fn rp(s: &str) -> RelPath {
    RelPath::new(s.as_bytes()).expect("valid")
}

#[test]
fn a_c_program_writing_into_a_fileset_produces_the_expected_ops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = std::fs::canonicalize(dir.path()).expect("canonical");
    let Some(exe) = build_program(&base) else {
        return;
    };
    let root = base.join("root");
    std::fs::create_dir(&root).expect("root");
    let ring_path = base.join("ring");
    let ring = Ring::create(&ring_path, 1 << 20, false).expect("ring");
    let mut consumer = ring.consumer(ConsumerOptions::default()).expect("consumer");
    let out = Command::new(&exe)
        .arg(root.join("f"))
        .arg(base.join("outside"))
        .env(
            ENV_FILESETS,
            format!("data|{}|{}", root.display(), ring_path.display()),
        )
        .output()
        .expect("run the C program");
    assert!(
        out.status.success(),
        "C program failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let values: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let v = |k: &str| values.get(k).map_or("missing", String::as_str).to_owned();
    assert_eq!(v("create"), "0");
    assert_eq!(v("write"), "5");
    assert_eq!(v("write_at"), "1");
    assert_eq!(v("sync"), FT_OK.to_string());
    assert_eq!(v("read"), "5");
    assert_eq!(v("content"), "Jello");
    assert_eq!(v("close"), FT_OK.to_string());
    assert_eq!(v("close_again"), FT_EBADHANDLE.to_string());
    assert_eq!(v("write_closed"), FT_EBADHANDLE.to_string());
    assert_eq!(v("close_r"), FT_OK.to_string());
    assert_eq!(v("outside_write"), "1");
    assert_eq!(v("close_o"), FT_OK.to_string());
    assert_eq!(v("exists"), FT_EFILE.to_string());
    assert_eq!(v("errno_eexist"), "1");

    let mut ops = Vec::new();
    while let Some(item) = consumer.next(Duration::from_millis(50)).expect("next") {
        match item {
            RingItem::Op { op, .. } => ops.push(op),
            other => panic!("unexpected {other:?}"),
        }
    }
    let mode = std::fs::metadata(root.join("f"))
        .expect("stat")
        .permissions();
    let mode = std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777;
    assert_eq!(mode & !0o640, 0, "created with at most 0640");
    assert_eq!(
        ops,
        vec![
            Op::Create {
                path: rp("f"),
                mode
            },
            Op::Truncate {
                path: rp("f"),
                len: 0
            },
            Op::Write {
                path: rp("f"),
                offset: 0,
                data: b"hello".to_vec()
            },
            Op::Write {
                path: rp("f"),
                offset: 0,
                data: b"J".to_vec()
            },
            Op::Fsync { path: rp("f") },
        ],
        "the read-only open and the file outside log nothing"
    );
    assert_eq!(std::fs::read(base.join("outside")).expect("outside"), b"x");
}

#[test]
fn invalid_arguments_give_codes_and_errno() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = std::ffi::CString::new(
        dir.path()
            .join("missing")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("no NUL");
    // SAFETY: NULL is allowed and refused.
    let null_path = unsafe { ft_create_file(std::ptr::null(), libc::O_RDONLY, 0) };
    assert_eq!(null_path, FT_EINVAL);
    // SAFETY: a valid C string.
    let bad_access = unsafe { ft_create_file(missing.as_ptr(), libc::O_ACCMODE, 0) };
    assert_eq!(bad_access, FT_EINVAL);
    // SAFETY: a valid C string.
    let bad_mode = unsafe { ft_create_file(missing.as_ptr(), libc::O_WRONLY, -1) };
    assert_eq!(bad_mode, FT_EINVAL);
    // SAFETY: a valid C string.
    let absent = unsafe { ft_create_file(missing.as_ptr(), libc::O_RDONLY, 0) };
    assert_eq!(absent, FT_EFILE);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOENT)
    );
    // SAFETY: a valid C string.
    let h = unsafe { ft_create_file(missing.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o600) };
    assert!(h >= 0, "{h}");
    // SAFETY: NULL with a length is refused before it is touched.
    let null_write = unsafe { ft_write_file(h, std::ptr::null(), 3) };
    assert_eq!(null_write, i64::from(FT_EINVAL));
    // SAFETY: as above.
    let null_read = unsafe { ft_read_file(h, std::ptr::null_mut(), 3) };
    assert_eq!(null_read, i64::from(FT_EINVAL));
    // SAFETY: a zero-length write may pass NULL.
    assert_eq!(unsafe { ft_write_file(h, std::ptr::null(), 0) }, 0);
    assert_eq!(ft_sync_file(h), FT_OK);
    assert_eq!(ft_close_file(h), FT_OK);
    assert_eq!(ft_sync_file(h), FT_EBADHANDLE);
    assert_eq!(ft_close_file(-1), FT_EBADHANDLE);
    for code in [FT_EBADHANDLE, FT_EFILE, -34, -35] {
        // SAFETY: ft_strerror returns static NUL-terminated strings.
        let text = unsafe { CStr::from_ptr(ft_strerror(code)) }.to_string_lossy();
        assert!(!text.contains("unknown"), "{code}: {text}");
    }
}
