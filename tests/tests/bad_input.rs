//! Bad input: malformed configurations are refused with file, line and field; garbage,
//! oversized and forged datagrams are dropped and counted, and watchd keeps working.

use std::process::Command;
use std::time::Duration;

use ftkit_tests::{Scratch, Watchd, binary, q, send_datagram, signal, wait_until};
use nix::sys::signal::Signal;

/// (name, config text, line of the error, field the error must name).
fn bad_configs() -> Vec<(&'static str, String, usize, &'static str)> {
    vec![
        (
            "unknown-field",
            "[[service]]\nname = \"a\"\ncommand = \"/bin/true\"\nrestrat = { policy = \"always\" }\n"
                .into(),
            4,
            "restrat",
        ),
        (
            "bad-type",
            "[[service]]\nname = \"a\"\ncommand = \"/bin/true\"\nautostart = \"yes\"\n".into(),
            4,
            "autostart",
        ),
        (
            "bad-duration",
            "[[service]]\nname = \"a\"\ncommand = \"/bin/true\"\n\nstop = { grace = \"soon\" }\n"
                .into(),
            5,
            "grace",
        ),
        (
            "missing-command",
            "[watchd]\ncgroups = true\n\n[[service]]\nname = \"a\"\nargs = [\"x\"]\n".into(),
            4,
            "command",
        ),
        (
            "duplicate-name",
            "[[service]]\nname = \"a\"\ncommand = \"/bin/true\"\n\n[[service]]\nname = \"a\"\n\
             command = \"/bin/false\"\n"
                .into(),
            6,
            "name",
        ),
        (
            "bad-watchd-type",
            "[watchd]\ncgroups = 3\n".into(),
            2,
            "cgroups",
        ),
    ]
}

#[test]
fn malformed_configs_are_refused_with_file_line_and_field() {
    let scratch = Scratch::new("badcfg");
    for (name, text, line, field) in bad_configs() {
        let path = scratch.write(&format!("{name}.toml"), &text);
        let out = Command::new(binary("watchd"))
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run watchd");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{name}: watchd should exit 2 on a bad config; stderr: {err}"
        );
        let location = format!("{}:{line}", path.display());
        assert!(
            err.contains(&location),
            "{name}: stderr should name {location}: {err}"
        );
        assert!(
            err.contains(&format!("`{field}`")) || err.contains(&format!(".{field}`")),
            "{name}: stderr should name the field `{field}`: {err}"
        );
        // --check agrees.
        let check = Command::new(binary("watchd"))
            .arg("--check")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run watchd --check");
        assert_eq!(check.status.code(), Some(2), "{name}: --check accepted it");
    }
    // And a valid one passes --check, so the refusals above are about the errors.
    let good = scratch.write(
        "good.toml",
        &format!(
            "[watchd]\ndata_dir = {}\n[[service]]\nname = \"a\"\ncommand = \"/bin/true\"\n",
            q(scratch.file("data"))
        ),
    );
    let out = Command::new(binary("watchd"))
        .arg("--check")
        .arg("--config")
        .arg(&good)
        .output()
        .expect("run watchd --check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}: {v}"))
}

#[test]
fn bad_datagrams_are_counted_and_harmless() {
    let services = format!(
        "[[service]]\nname = \"victim\"\ncommand = {}\nargs = [\"1000\"]\n\
         hang = {{ heartbeat = true }}\n",
        q("/bin/sleep")
    );
    let w = Watchd::start("dgram", &services);
    let pid = w.wait_running("victim");
    let base = w.listener_counters();
    let ft = w.ft_socket();
    let notify = w.notify_socket();

    // A heartbeat forged by this process (not a service): well-formed, so it is judged by its
    // sender, and rejected. Likewise an sd_notify WATCHDOG=trigger that would kill the victim.
    let mut heartbeat = Vec::from(*b"FT");
    heartbeat.extend_from_slice(&[1, 2]);
    heartbeat.extend_from_slice(&1u32.to_le_bytes());
    heartbeat.extend_from_slice(&50u32.to_le_bytes());
    send_datagram(&ft, &heartbeat);
    send_datagram(&notify, b"WATCHDOG=trigger");
    send_datagram(&notify, b"READY=1\nSTATUS=forged");
    // Garbage: wrong magic, wrong version, unknown kind, truncated, empty, not sd_notify.
    let garbage_ft: [&[u8]; 5] = [
        b"hello world",
        b"FT\x09\x02abcdefgh",
        b"FT\x01\x63",
        b"FT\x01\x02ab",
        b"",
    ];
    for g in garbage_ft {
        send_datagram(&ft, g);
    }
    let garbage_notify: [&[u8]; 3] = [b"\xff\xfe\xfd", b"just words", b"=1"];
    for g in garbage_notify {
        send_datagram(&notify, g);
    }
    // Oversized: more than 1024 bytes on ft.sock, more than 4096 on notify.sock.
    send_datagram(&ft, &[b'F'; 2000]);
    let mut big = b"STATUS=".to_vec();
    big.extend(std::iter::repeat_n(b'x', 6000));
    send_datagram(&notify, &big);
    // A burst of garbage must not starve or stop the listener.
    for _ in 0..500 {
        send_datagram(&ft, b"burst of nonsense");
    }

    let expect_garbage = counter(&base, "garbage") + 5 + 3 + 500;
    let expect_oversized = counter(&base, "oversized") + 2;
    let expect_rejected = counter(&base, "rejected_sender") + 3;
    let now = wait_until(
        "the listener to count every datagram",
        Duration::from_secs(5),
        || {
            let c = w.listener_counters();
            (counter(&c, "garbage") >= expect_garbage
                && counter(&c, "oversized") >= expect_oversized
                && counter(&c, "rejected_sender") >= expect_rejected)
                .then_some(c)
        },
    );
    assert_eq!(counter(&now, "garbage"), expect_garbage, "{now}");
    assert_eq!(counter(&now, "oversized"), expect_oversized, "{now}");
    assert_eq!(counter(&now, "rejected_sender"), expect_rejected, "{now}");

    // Nothing forged reached the victim: same pid, no hang, no forged status.
    std::thread::sleep(Duration::from_millis(300));
    let s = w.service("victim");
    assert_eq!(ftkit_tests::pid_of(&s), Some(pid), "{s}");
    assert_ne!(s["status_text"], "forged", "{s}");
    assert!(w.events_of_kind("victim", "hang").is_empty());

    // watchd still supervises: kill -9 → restarted.
    signal(pid, Signal::SIGKILL);
    w.wait_new_pid("victim", pid, Duration::from_secs(5));

    // And the control socket survives garbage too.
    let answers = w.control("this is not json");
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["result"], "error", "{answers:?}");
    let answers = w.control(r#"{"op":"no_such_op"}"#);
    assert_eq!(answers[0]["result"], "error", "{answers:?}");
    w.wait_running("victim");
}
