//! The C ABI as a C program sees it: a small program compiled with `cc -Wall -Wextra -Werror
//! -std=c11` against the checked-in `include/ft.h`, linked to the `libft.so` (and `libft.a`)
//! that `cargo test -p ft` built, run against a socket this test binds.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ft::proto::{AppMessage, ENV_SOCKET, MAX_DATAGRAM};

/// How long the test waits for a datagram the C program must have sent.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Exercises every exported function. Prints `name=code` lines for the test to check, and
/// `strerror(code)=text` lines for every code.
const PROGRAM: &str = r#"
#include <stdio.h>
#include <string.h>
#include "ft.h"

static void show(const char *name, int code) {
    printf("%s=%d\n", name, code);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (strcmp(mode, "strerror") == 0) {
        for (int code = 0; code >= -8; code--) {
            const char *text = ft_strerror(code);
            printf("strerror(%d)=%s\n", code, text == NULL ? "(null)" : text);
        }
        return 0;
    }
    if (strcmp(mode, "unset") == 0) {
        show("reg", ft_reg_watch());
        show("hbeat", ft_hbeat(1, 100));
        show("hbeat_end", ft_hbeat_end(1));
        show("ready", ft_ready());
        show("status", ft_status("x"));
        show("status_null", ft_status(NULL));
        show("del", ft_del_watch());
        return 0;
    }
    if (strcmp(mode, "unreachable") == 0) {
        show("reg", ft_reg_watch());
        show("hbeat", ft_hbeat(1, 100));
        show("del", ft_del_watch());
        show("hbeat_after_del", ft_hbeat(1, 100));
        return 0;
    }
    /* mode "run": a socket is listening at FT_SOCKET. */
    show("hbeat_before_reg", ft_hbeat(5, 1234));
    show("reg", ft_reg_watch());
    show("hbeat", ft_hbeat(5, 1234));
    show("hbeat_max", ft_hbeat(UINT32_MAX, UINT32_MAX));
    show("hbeat_end", ft_hbeat_end(5));
    show("ready", ft_ready());
    show("status", ft_status("hello from C"));
    show("status_null", ft_status(NULL));
    show("status_not_utf8", ft_status("\xff\xfe"));
    show("reg_again", ft_reg_watch());
    show("del", ft_del_watch());
    show("hbeat_after_del", ft_hbeat(5, 1234));
    show("del_again", ft_del_watch());
    return 0;
}
"#;

/// Where `cargo test` put the libft it just built: `<target>/<profile>/deps`, beside this test
/// binary. (Only `cargo build` copies libft.so up to `<target>/<profile>`, so that copy may be
/// stale while tests run.)
fn artifact_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .expect("test binary is in <target>/<profile>/deps")
        .to_owned()
}

/// Compiles PROGRAM against libft; `None` (with a message) when there is no C compiler.
fn build_program(dir: &Path, link_static: bool) -> Option<PathBuf> {
    if Command::new("cc").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no C compiler `cc` on PATH, the C ABI test cannot run");
        return None;
    }
    let lib_dir = artifact_dir();
    let lib = lib_dir.join(if link_static { "libft.a" } else { "libft.so" });
    assert!(
        lib.exists(),
        "{} missing: `cargo test -p ft` builds it",
        lib.display()
    );
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let source = dir.join("abi.c");
    std::fs::write(&source, PROGRAM).expect("write C source");
    let exe = dir.join(if link_static { "abi-static" } else { "abi" });
    let mut cc = Command::new("cc");
    cc.args(["-Wall", "-Wextra", "-Werror", "-std=c11", "-I"])
        .arg(&include)
        .arg(&source)
        .arg(&lib)
        .arg("-o")
        .arg(&exe);
    if link_static {
        // What `rustc --print native-static-libs` asks for, as documented in ft.h.
        cc.args(["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl"]);
    } else {
        cc.arg(format!("-Wl,-rpath,{}", lib_dir.display()));
    }
    let out = cc.output().expect("run cc");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(exe)
}

fn run(exe: &Path, mode: &str, socket: Option<&Path>) -> BTreeMap<String, String> {
    let mut cmd = Command::new(exe);
    cmd.arg(mode);
    match socket {
        Some(path) => cmd.env(ENV_SOCKET, path),
        None => cmd.env_remove(ENV_SOCKET),
    };
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run C program");
    assert!(
        status.success(),
        "C program failed: {status}\n{}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8(stdout)
        .expect("UTF-8 output")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn assert_codes(got: &BTreeMap<String, String>, expected: &[(&str, i32)]) {
    for (name, code) in expected {
        assert_eq!(got.get(*name), Some(&code.to_string()), "{name} in {got:?}");
    }
}

fn recv_all(sock: &UnixDatagram) -> Vec<AppMessage> {
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut got = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(AppMessage::decode(&buf[..n]).expect("libft sends valid datagrams"));
    }
    got
}

#[test]
fn c_program_talks_to_watchd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(exe) = build_program(dir.path(), false) else {
        return;
    };
    let path = dir.path().join("watchd.sock");
    let sock = UnixDatagram::bind(&path).expect("bind");
    sock.set_read_timeout(Some(RECV_TIMEOUT)).expect("timeout");

    let got = run(&exe, "run", Some(&path));
    assert_codes(
        &got,
        &[
            ("hbeat_before_reg", -4),
            ("reg", 0),
            ("hbeat", 0),
            ("hbeat_max", 0),
            ("hbeat_end", 0),
            ("ready", 0),
            ("status", 0),
            ("status_null", -5),
            ("status_not_utf8", -5),
            ("reg_again", 0),
            ("del", 0),
            ("hbeat_after_del", -4),
            ("del_again", -4),
        ],
    );
    assert_eq!(
        recv_all(&sock),
        vec![
            AppMessage::Register,
            AppMessage::Heartbeat {
                tid: 5,
                timeout_ms: 1234
            },
            AppMessage::Heartbeat {
                tid: u32::MAX,
                timeout_ms: u32::MAX
            },
            AppMessage::HeartbeatEnd { tid: 5 },
            AppMessage::Ready,
            AppMessage::Status("hello from C".into()),
            AppMessage::Register,
            AppMessage::Unregister,
        ]
    );
}

#[test]
fn c_program_without_watchd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(exe) = build_program(dir.path(), false) else {
        return;
    };

    let unset = run(&exe, "unset", None);
    assert_codes(
        &unset,
        &[
            ("reg", -1),
            ("hbeat", -4),
            ("hbeat_end", -4),
            ("ready", -4),
            ("status", -4),
            ("status_null", -5),
            ("del", -4),
        ],
    );

    // watchd down at registration: the registration is kept, calls stay fast failures.
    let missing = dir.path().join("missing.sock");
    let down = run(&exe, "unreachable", Some(&missing));
    assert_codes(
        &down,
        &[
            ("reg", -2),
            ("hbeat", -2),
            ("del", -2),
            ("hbeat_after_del", -4),
        ],
    );
}

#[test]
fn c_strerror_texts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(exe) = build_program(dir.path(), false) else {
        return;
    };
    let got = run(&exe, "strerror", None);
    let expected = [
        (0, "success"),
        (-1, "FT_SOCKET is not set: not running under watchd"),
        (-2, "watchd is unreachable"),
        (-3, "watchd's queue is full, message dropped"),
        (-4, "not registered: call ft_reg_watch first"),
        (-5, "invalid argument"),
        (-6, "internal error in libft"),
        (-7, "I/O error talking to watchd"),
        (-8, "unknown libft error code"),
    ];
    for (code, text) in expected {
        assert_eq!(
            got.get(&format!("strerror({code})")).map(String::as_str),
            Some(text)
        );
    }
}

#[test]
fn c_program_links_statically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(exe) = build_program(dir.path(), true) else {
        return;
    };
    let path = dir.path().join("watchd.sock");
    let sock = UnixDatagram::bind(&path).expect("bind");
    let got = run(&exe, "run", Some(&path));
    assert_codes(&got, &[("reg", 0), ("hbeat", 0), ("del", 0)]);
    let messages = recv_all(&sock);
    assert_eq!(messages.first(), Some(&AppMessage::Register));
    assert_eq!(messages.last(), Some(&AppMessage::Unregister));
}
