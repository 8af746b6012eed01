//! Checkpoints and watchd: a program registered with ft_reg_watch reports every committed
//! image (Checkpointed), and takes a checkpoint of the stream watchd asks for (CheckpointNow,
//! `ftctl checkpoint`) at its next t_safe_point. The test plays watchd on a datagram socket.

mod critical_support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use critical_support::{ROLE_ENV, describe, heap_addr, unique};
use ft::capi::{FT_OK, ft_reg_watch, t_checkpoint_sync, t_checkpoint_wait, t_safe_point};
use ft::proto::{AppMessage, ENV_SOCKET, MAX_DATAGRAM, WatchdMessage};

const ENTRY: &str = "child_role";
/// How long either side waits for the other.
const PATIENCE: Duration = Duration::from_secs(10);
/// The stream the fake watchd asks for.
const REQUESTED_STREAM: u32 = 5;

#[test]
fn child_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "app");
    assert_eq!(ft_reg_watch(), FT_OK);
    let heap = ft::critical::global().expect("critical memory").heap();
    let block = heap.alloc(10_000, 16).expect("alloc").as_ptr();
    // SAFETY: inside the block.
    unsafe { block.write(1) };
    assert_eq!(t_checkpoint_sync(0), FT_OK);
    // Serve requests until watchd's one has produced an image of its stream.
    let store = std::path::PathBuf::from(std::env::var("FT_CKPT_DIR").expect("dir"))
        .join(REQUESTED_STREAM.to_string());
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        assert_eq!(t_safe_point(), FT_OK);
        if store.is_dir() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(t_checkpoint_wait(REQUESTED_STREAM), FT_OK);
    assert!(store.is_dir(), "no checkpoint of the requested stream");
}

/// The next message from the app that is not a heartbeat-like one we do not care about.
fn next_checkpointed(sock: &UnixDatagram) -> (AppMessage, std::os::unix::net::SocketAddr) {
    let mut buf = [0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = sock
            .recv_from(&mut buf)
            .expect("a datagram from the app in time");
        let msg = AppMessage::decode(&buf[..n]).expect("valid datagram");
        if matches!(msg, AppMessage::Checkpointed { .. }) {
            return (msg, from);
        }
    }
}

#[test]
fn checkpoints_are_reported_and_requests_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("watchd.sock");
    let sock = UnixDatagram::bind(&path).expect("bind");
    sock.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let exe = std::env::current_exe().expect("test binary");
    let child = std::process::Command::new(exe)
        .args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, "app")
        .env(ENV_SOCKET, &path)
        .env("FT_SERVICE", unique("crit-watchd"))
        .env("FT_HEAP_ADDR", format!("{:#x}", heap_addr(90)))
        .env("FT_HEAP_SIZE", "16MiB")
        .env("FT_CKPT_DIR", dir.path().join("ckpt"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the app");

    let (first, app) = next_checkpointed(&sock);
    let AppMessage::Checkpointed {
        stream, seq, bytes, ..
    } = first
    else {
        unreachable!("next_checkpointed returns Checkpointed");
    };
    assert_eq!((stream, seq), (0, 1));
    assert!(bytes > 10_000, "the image size: {bytes}");

    let mut buf = [0u8; MAX_DATAGRAM];
    let n = WatchdMessage::CheckpointNow {
        stream: REQUESTED_STREAM,
    }
    .encode(&mut buf);
    sock.send_to_addr(&buf[..n], &app)
        .expect("send the request");
    let (second, _) = next_checkpointed(&sock);
    assert!(
        matches!(
            second,
            AppMessage::Checkpointed {
                stream: REQUESTED_STREAM,
                seq: 1,
                ..
            }
        ),
        "{second:?}"
    );
    let out = child.wait_with_output().expect("app exits");
    assert!(out.status.success(), "{}", describe(&out));
}
