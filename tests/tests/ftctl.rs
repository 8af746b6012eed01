//! ftctl's contract: exit codes (0 ok, 1 valid negative, 2 error naming the socket) and
//! `logs` showing a service's captured output.

use std::process::Command;
use std::time::Duration;

use ftkit_tests::{Scratch, Watchd, binary, q, wait_until};

#[test]
fn unknown_service_is_exit_1() {
    let services = format!(
        "[[service]]\nname = \"present\"\ncommand = {}\nargs = [\"1000\"]\n",
        q("/bin/sleep")
    );
    let w = Watchd::start("ftctl-neg", &services);
    w.wait_running("present");
    for args in [
        ["stop", "nosuch"],
        ["start", "nosuch"],
        ["restart", "nosuch"],
        ["logs", "nosuch"],
    ] {
        let out = w.ftctl(&args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "ftctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch"));
    }
    // And the present one is untouched by all that.
    assert_eq!(w.service("present")["state"], "running");
    let table = w.ftctl_ok(&["status"]);
    assert!(table.contains("present"), "{table}");
}

#[test]
fn unreachable_watchd_is_exit_2_naming_the_socket() {
    let scratch = Scratch::new("ftctl-down");
    let socket = scratch.file("control.sock");
    let out = Command::new(binary("ftctl"))
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .expect("run ftctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&socket.display().to_string()), "{err}");

    // A stale socket file nobody listens on is the same.
    let _ = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let out = Command::new(binary("ftctl"))
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .expect("run ftctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&socket.display().to_string()), "{err}");

    // --config finds the socket through the data directory.
    let config = scratch.write(
        "watchd.toml",
        &format!("[watchd]\ndata_dir = {}\n", q(scratch.file("data"))),
    );
    let out = Command::new(binary("ftctl"))
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .expect("run ftctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            &scratch
                .file("data")
                .join("control.sock")
                .display()
                .to_string()
        ),
        "{err}"
    );
}

#[test]
fn logs_show_the_service_output_and_its_environment() {
    let script = "echo \"hello from $FT_SERVICE on $FT_NODE as $FT_ROLE\"; \
                  echo \"sockets $FT_SOCKET $NOTIFY_SOCKET\"; echo to-stderr >&2; exec sleep 1000";
    let services = format!(
        "[[service]]\nname = \"talker\"\ncommand = {}\nargs = [\"-c\", {}]\n\
         env = {{ EXTRA = \"x\" }}\n",
        q("/bin/sh"),
        q(script)
    );
    let w = Watchd::start("ftctl-logs", &services);
    w.wait_running("talker");
    let expected = format!("hello from talker on {} as primary", w.node());
    let text = wait_until("the output in `ftctl logs`", Duration::from_secs(5), || {
        let t = w.ftctl_ok(&["logs", "talker"]);
        (t.contains(&expected) && t.contains("to-stderr")).then_some(t)
    });
    let sockets = format!(
        "sockets {} {}",
        w.ft_socket().display(),
        w.notify_socket().display()
    );
    assert!(text.contains(&sockets), "{text}");
    let tail = w.ftctl_ok(&["logs", "talker", "--bytes", "10"]);
    // The last 10 bytes of the log are the last line the script wrote.
    assert_eq!(tail, "to-stderr\n", "--bytes 10");
}
