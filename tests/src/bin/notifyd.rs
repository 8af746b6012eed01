//! notifyd: a test service that speaks sd_notify to `$NOTIFY_SOCKET` (plain datagrams): READY=1
//! after `--ready-after-ms` (default 0), then WATCHDOG=1 every `--interval-ms` (default 100; 0
//! sends none). SIGUSR2 stops the WATCHDOG=1 messages while the process keeps running, which is
//! what a hung sd_notify service looks like to its supervisor.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ftkit_tests::{arg_u64, helper_args, say, signal_flag};

const NAME: &str = "notifyd";
/// How long the main loop sleeps when it sends no watchdog messages.
const IDLE_NAP: Duration = Duration::from_millis(50);

fn send(sock: &UnixDatagram, socket: &str, message: &str) {
    let sent = if let Some(abstract_name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|addr| sock.send_to_addr(message.as_bytes(), &addr))
    } else {
        sock.send_to(message.as_bytes(), socket)
    };
    if let Err(e) = sent {
        say(
            NAME,
            &format!("sending {message:?} to {socket} failed: {e}"),
        );
    }
}

fn main() {
    let args = helper_args(&["interval-ms", "ready-after-ms"]);
    let interval = arg_u64(&args, "interval-ms", 100);
    let ready_after = arg_u64(&args, "ready-after-ms", 0);
    let hang = signal_flag(libc::SIGUSR2);
    let Ok(socket) = std::env::var("NOTIFY_SOCKET") else {
        say(NAME, "NOTIFY_SOCKET is not set");
        std::process::exit(2);
    };
    let sock = UnixDatagram::unbound().expect("create a datagram socket");
    say(
        NAME,
        &format!(
            "WATCHDOG_USEC={:?}, READY in {ready_after} ms",
            std::env::var("WATCHDOG_USEC").ok()
        ),
    );
    if ready_after > 0 {
        std::thread::sleep(Duration::from_millis(ready_after));
    }
    send(&sock, &socket, "READY=1\nSTATUS=notifyd up");
    say(NAME, "sent READY=1");
    let mut announced = false;
    loop {
        if hang.load(Ordering::SeqCst) {
            if !announced {
                say(NAME, "SIGUSR2: no more WATCHDOG=1");
                announced = true;
            }
            std::thread::sleep(IDLE_NAP);
            continue;
        }
        if interval == 0 {
            std::thread::sleep(IDLE_NAP);
            continue;
        }
        send(&sock, &socket, "WATCHDOG=1");
        std::thread::sleep(Duration::from_millis(interval));
    }
}
