//! tcpd: a test service that listens on 127.0.0.1:`--port`, answers `HTTP/1.0 200 OK` to a GET
//! and closes any other connection. SIGUSR2 closes the listener while the process keeps running,
//! so a TCP or HTTP probe fails although the process looks alive.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ftkit_tests::{arg_u64, helper_args, say, signal_flag};

const NAME: &str = "tcpd";
/// How long binding is retried (the previous instance's socket may still be closing).
const BIND_RETRY: Duration = Duration::from_secs(5);
/// Pause between accept attempts on the non-blocking listener.
const ACCEPT_NAP: Duration = Duration::from_millis(5);
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_millis(500);
const RESPONSE: &[u8] =
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n";

fn bind(port: u16) -> TcpListener {
    let deadline = Instant::now() + BIND_RETRY;
    loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                say(NAME, &format!("bind 127.0.0.1:{port}: {e}; retrying"));
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
        }
    }
}

fn serve(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let mut buf = [0u8; 1024];
    if let Ok(n) = stream.read(&mut buf)
        && buf[..n].starts_with(b"GET ")
    {
        let _ = stream.write_all(RESPONSE);
    }
}

fn main() {
    let args = helper_args(&["port"]);
    let port = u16::try_from(arg_u64(&args, "port", 0)).expect("--port fits in 16 bits");
    let close = signal_flag(libc::SIGUSR2);
    let listener = bind(port);
    listener
        .set_nonblocking(true)
        .expect("make the listener non-blocking");
    say(NAME, &format!("listening on 127.0.0.1:{port}"));
    let mut listener = Some(listener);
    loop {
        if close.load(Ordering::SeqCst) && listener.is_some() {
            listener = None;
            say(NAME, "SIGUSR2: listener closed");
        }
        match &listener {
            Some(l) => match l.accept() {
                Ok((stream, _)) => serve(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_NAP),
                Err(e) => {
                    say(NAME, &format!("accept: {e}"));
                    std::thread::sleep(ACCEPT_NAP);
                }
            },
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
