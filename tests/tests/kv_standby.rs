//! Warm standby of the `kv` example: a primary kv (checkpoint per request) and a standby kv
//! (`FT_ROLE=standby`, supervised by watchd) on one host. The test plays the checkpoint
//! shipping: it copies each image of the primary's checkpoint store into the standby's (aside,
//! then renamed into place, as replication does). The standby applies them as they arrive;
//! after the primary is killed, `ftctl promote kv` makes the standby the primary in place: no
//! restart, `PONG primary`, every acknowledged key there, and its own checkpoints continue the
//! sequence.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ftkit_tests::{
    Scratch, Watchd, binary, free_port, pid_of, q, q_list, read_or_empty, wait_until,
};

/// Writes the client makes (keys k0..k{N-1}), each acknowledged after its checkpoint.
const WRITES: u64 = 60;
/// How long the standby may take to apply the last checkpoint shipped.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(20);
/// The shipper copies new images this often.
const SHIP_INTERVAL: Duration = Duration::from_millis(20);
/// How long one reply may take on a raw connection.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The epoch the operator promotes with.
const EPOCH: &str = "3";

/// A process started by the test, killed when dropped.
struct Killed(Option<Child>);

impl Killed {
    fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Copies every committed image of `from` that `to` lacks (or holds another version of: a
/// compaction replaces an increment by its full image) into `to`, aside then by rename.
struct Shipper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Shipper {
    fn start(from: PathBuf, to: PathBuf) -> Shipper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut shipped: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            while !flag.load(Ordering::Acquire) {
                ship_new(&from, &to, &mut shipped);
                std::thread::sleep(SHIP_INTERVAL);
            }
            // One last pass: everything the primary committed before it died.
            ship_new(&from, &to, &mut shipped);
        });
        Shipper {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("the shipper does not panic");
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ship_new(from: &Path, to: &Path, shipped: &mut BTreeMap<String, (u64, u64)>) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    let mut names: Vec<(String, (u64, u64))> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let meta = e.metadata().ok()?;
            name.ends_with(".ckpt")
                .then_some((name, (meta.ino(), meta.len())))
        })
        .collect();
    names.sort();
    for (name, stamp) in names {
        if shipped.get(&name) == Some(&stamp) {
            continue;
        }
        // Retention may delete it under us: the next pass ships what is there then.
        let Ok(bytes) = std::fs::read(from.join(&name)) else {
            continue;
        };
        let aside = to.join(format!("incoming-{name}"));
        std::fs::write(&aside, &bytes).expect("write the shipped image aside");
        std::fs::rename(&aside, to.join(&name)).expect("rename the shipped image into place");
        shipped.insert(name, stamp);
    }
}

fn kvclient(port: u16, args: &[&str]) -> Output {
    Command::new(binary("kvclient"))
        .arg("--addr")
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kvclient")
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One request on a fresh connection; its reply line.
fn call(port: u16, request: &str) -> String {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to kv");
    s.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
    let mut writer = s.try_clone().expect("clone");
    writer
        .write_all(format!("{request}\n").as_bytes())
        .expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("a reply");
    line.trim_end().to_owned()
}

/// The highest image sequence in a store directory.
fn newest_image(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_suffix(".ckpt")?
                        .parse::<u64>()
                        .ok()
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

#[test]
fn a_warm_standby_follows_checkpoints_and_is_promoted_in_place() {
    let scratch = Scratch::new("kv-warm");
    let primary_data = scratch.file("primary");
    let standby_data = scratch.file("standby");
    let acked = scratch.file("acked");
    let standby_port = free_port();
    // Two calls may hand out the same port: the primary must not find the standby there.
    let primary_port = std::iter::repeat_with(free_port)
        .find(|p| *p != standby_port)
        .expect("an endless supply of ports");

    // The standby, under watchd: it recovers nothing and waits for shipped checkpoints.
    let args = [
        "--listen".to_owned(),
        format!("127.0.0.1:{standby_port}"),
        "--data".to_owned(),
        standby_data.display().to_string(),
        "--checkpoint".to_owned(),
        "per-request".to_owned(),
    ];
    let service = format!(
        "[[service]]\nname = \"kv\"\ncommand = {}\nargs = {}\nenv = {{ FT_ROLE = \"standby\" }}\n\
         ready = {{ notify = true, timeout = \"20s\" }}\nhang = {{ heartbeat = true }}\n",
        q(binary("kv")),
        q_list(&args)
    );
    let w = Watchd::start("kv-warm-standby", &service);
    let standby_pid = w.wait_running("kv");
    wait_until("the standby to listen", FOLLOW_TIMEOUT, || {
        w.service_log("kv").contains("as standby").then_some(())
    });
    assert_eq!(call(standby_port, "PING"), "PONG standby");
    let standby_store = w.data_dir().join("ckpt").join("kv").join("0");
    std::fs::create_dir_all(&standby_store).expect("the standby's store");

    // The primary, standalone, with the same identity (`kv`, so the same heap address).
    let out = std::fs::File::create(scratch.file("primary.out")).expect("output file");
    let err = out.try_clone().expect("dup");
    let mut primary = Killed(Some(
        Command::new(binary("kv"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{primary_port}"))
            .arg("--data")
            .arg(&primary_data)
            .args(["--checkpoint", "per-request"])
            .env("FT_SERVICE", "kv")
            .env_remove("FT_SOCKET")
            .env_remove("FT_CKPT_DIR")
            .env_remove("FT_CKPT_EVERY")
            .env_remove("FT_ROLE")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn the primary kv"),
    ));
    let up = kvclient(primary_port, &["wait-up", "--timeout", "15"]);
    assert!(
        up.status.success(),
        "the primary: {}\n{}",
        text(&up),
        read_or_empty(&scratch.file("primary.out"))
    );
    let shipper = Shipper::start(primary_data.join("ckpt").join("0"), standby_store.clone());

    let written = kvclient(
        primary_port,
        &[
            "write",
            "--count",
            &WRITES.to_string(),
            "--acked",
            &acked.display().to_string(),
        ],
    );
    assert!(written.status.success(), "the client: {}", text(&written));
    let acked_keys = read_or_empty(&acked).lines().count();
    assert_eq!(u64::try_from(acked_keys).expect("small"), WRITES);

    // The standby applies the shipped checkpoints as they arrive, up to the last write.
    let last = format!("seq {WRITES} count {WRITES}");
    wait_until(
        "the standby to apply the last checkpoint",
        FOLLOW_TIMEOUT,
        || w.service_log("kv").contains(&last).then_some(()),
    );
    let log = w.service_log("kv");
    let applied = log.matches("applied checkpoint").count();
    assert!(
        applied >= 2,
        "one apply per shipped checkpoint, or near: {log}"
    );

    // The owner dies; the operator promotes the standby.
    primary.kill9();
    shipper.finish();
    let shipped = newest_image(&standby_store);
    let said = w.ftctl_ok(&["promote", "kv", "--epoch", EPOCH]);
    assert!(said.contains(&format!("epoch {EPOCH}")), "{said}");
    let up = kvclient(standby_port, &["wait-up", "--timeout", "10"]);
    assert!(up.status.success(), "the promoted standby: {}", text(&up));
    assert_eq!(call(standby_port, "PING"), "PONG primary");
    let verified = kvclient(
        standby_port,
        &["verify", "--acked", &acked.display().to_string()],
    );
    assert!(verified.status.success(), "verify: {}", text(&verified));
    assert_eq!(call(standby_port, "COUNT"), format!("COUNT {WRITES}"));
    // In place: the same process, promoted, not restarted.
    assert_eq!(pid_of(&w.service("kv")), Some(standby_pid));
    let log = w.service_log("kv");
    assert!(
        log.contains(&format!("promoted by watchd (epoch {EPOCH})")),
        "{log}"
    );
    assert!(log.contains("serving as primary"), "{log}");

    // A write on the new primary: acknowledged, and checkpointed after the shipped ones.
    assert_eq!(
        call(standby_port, "SET after failover"),
        format!("OK {}", WRITES + 1)
    );
    assert!(
        newest_image(&standby_store) > shipped,
        "the promoted standby's checkpoints continue the sequence after {shipped}"
    );
    // A second promotion changes nothing.
    let again = w.ftctl(&["promote", "kv"]);
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(call(standby_port, "GET after"), "VALUE failover");
}

#[test]
fn promoting_an_unknown_service_is_a_negative_answer() {
    let w = Watchd::start("kv-promote-unknown", "");
    let out = w.ftctl(&["promote", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}
