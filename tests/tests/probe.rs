//! Probes for programs that speak neither libft nor sd_notify: a port that stops answering is a
//! hang, and the program is restarted.

use std::net::TcpStream;
use std::time::Duration;

use ftkit_tests::{Watchd, binary, free_port, pid_alive, q, signal, wait_gone, wait_until};
use nix::sys::signal::Signal;

fn probe_restarts(label: &str, probe: &str, port: u16) {
    let services = format!(
        "[[service]]\nname = \"web\"\ncommand = {}\nargs = [\"--port\", \"{port}\"]\n\n\
         [[service.probe]]\n{probe}\nperiod = \"100ms\"\ntimeout = \"300ms\"\nfailures = 3\n\
         initial_delay = \"300ms\"\n",
        q(binary("tcpd"))
    );
    let w = Watchd::start(label, &services);
    let old = w.wait_running("web");
    wait_until("tcpd to accept connections", Duration::from_secs(5), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    // Healthy: many probe periods pass without a restart.
    std::thread::sleep(Duration::from_millis(800));
    let s = w.service("web");
    assert_eq!(
        ftkit_tests::pid_of(&s),
        Some(old),
        "restarted while healthy: {s}"
    );
    assert!(w.events_of_kind("web", "hang").is_empty());

    let seq = w.last_seq();
    signal(old, Signal::SIGUSR2);
    let hang = w.wait_event_after(seq, "web", "hang", Duration::from_secs(5));
    assert!(
        hang["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("probe"),
        "{hang}"
    );
    let failed = w.events_of_kind("web", "probe_failed");
    assert!(
        !failed.is_empty(),
        "failures below the threshold should be reported"
    );
    wait_gone(old, Duration::from_secs(3));
    let new = w.wait_new_pid("web", old, Duration::from_secs(5));
    assert!(pid_alive(new));
    wait_until(
        "the new tcpd to accept connections",
        Duration::from_secs(5),
        || TcpStream::connect(("127.0.0.1", port)).ok(),
    );
}

#[test]
fn tcp_probe_failure_restarts() {
    let port = free_port();
    probe_restarts(
        "probe-tcp",
        &format!("kind = \"tcp\"\naddress = \"127.0.0.1:{port}\""),
        port,
    );
}

#[test]
fn http_probe_failure_restarts() {
    let port = free_port();
    probe_restarts(
        "probe-http",
        &format!("kind = \"http\"\nurl = \"http://127.0.0.1:{port}/health\""),
        port,
    );
}
