//! `Watch::register` reads `FT_SOCKET`. This file holds the only test that changes the
//! environment, so it runs in its own test binary with no other thread reading it.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use ft::proto::{AppMessage, ENV_SOCKET, MAX_DATAGRAM};
use ft::{Error, Watch};

#[test]
fn register_follows_ft_socket() {
    // SAFETY: this is the only test in this binary, so no other thread reads or writes the
    // environment while it changes.
    unsafe { std::env::remove_var(ENV_SOCKET) };
    assert!(matches!(Watch::register(), Err(Error::NoSocket)));
    assert!(matches!(Watch::register_lenient(), Err(Error::NoSocket)));

    // SAFETY: as above.
    unsafe { std::env::set_var(ENV_SOCKET, "") };
    assert!(matches!(Watch::register(), Err(Error::NoSocket)));

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("watchd.sock");
    let receiver = UnixDatagram::bind(&path).expect("bind");
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // SAFETY: as above.
    unsafe { std::env::set_var(ENV_SOCKET, &path) };
    let watch = Watch::register().expect("register via FT_SOCKET");
    watch.ready().expect("ready");
    let mut buf = [0u8; MAX_DATAGRAM];
    for expected in [AppMessage::Register, AppMessage::Ready] {
        let n = receiver.recv(&mut buf).expect("datagram");
        assert_eq!(AppMessage::decode(&buf[..n]), Ok(expected));
    }
}
