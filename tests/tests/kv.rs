//! The `kv` example server and its client end to end: acknowledged writes survive kill -9 of
//! the server (standalone, and under watchd with its log in a replicated fileset), a torn last
//! log record is ignored and cut, bad protocol lines get `ERR` on a connection that stays
//! usable, and a standby answers only `PING`. Every check goes through the real binaries:
//! `kvclient` writes and verifies, and raw TCP looks at the replies.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use ftkit_tests::{
    Scratch, Watchd, binary, free_port, pid_of, q, q_list, read_or_empty, signal, wait_gone,
    wait_until,
};
use nix::sys::signal::Signal;

/// How long a (re)started server may take to answer `PONG primary`.
const UP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the client may take for its whole run, faults included.
const WRITE_TIMEOUT: Duration = Duration::from_secs(40);
/// The client's `--deadline`: how long one write may stay unacknowledged.
const CLIENT_DEADLINE_SECS: &str = "30";
/// Writes of the kill -9 tests.
const WRITES: u64 = 200;
/// The server is killed once the client has this many acknowledged writes.
const KILL_AFTER: usize = 60;
/// How long one reply may take on the raw test connections.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `kv` server started by the test, killed when dropped.
struct Server {
    child: Option<Child>,
    out: PathBuf,
}

impl Server {
    /// Starts `kv --listen 127.0.0.1:PORT --data DIR ARGS`, its output going to `out`
    /// (appended, so that restarts keep the earlier runs' lines).
    fn start(data: &Path, port: u16, out: &Path, args: &[&str], role: Option<&str>) -> Server {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(out)
            .expect("open the server's output file");
        let err = log.try_clone().expect("dup the output file");
        let mut cmd = Command::new(binary("kv"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data")
            .arg(data)
            .args(args)
            .env_remove("FT_SOCKET")
            .env_remove("FT_CKPT_DIR")
            .env_remove("FT_CKPT_EVERY")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        match role {
            Some(r) => cmd.env("FT_ROLE", r),
            None => cmd.env_remove("FT_ROLE"),
        };
        let child = cmd.spawn().expect("spawn kv");
        Server {
            child: Some(child),
            out: out.to_owned(),
        }
    }

    fn output(&self) -> String {
        read_or_empty(&self.out)
    }

    /// SIGKILL, and reaps it.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- kv output ({}) ---\n{}",
                self.out.display(),
                self.output()
            );
        }
        self.kill9();
    }
}

fn kvclient(port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("kvclient"));
    cmd.arg("--addr")
        .arg(format!("127.0.0.1:{port}"))
        .args(args);
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run kvclient")
}

fn text(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `kvclient wait-up`: the server answers `PONG primary`.
fn wait_up(port: u16) {
    let out = run(kvclient(port, &["wait-up", "--timeout", "15"]));
    assert!(out.status.success(), "kv did not come up: {}", text(&out));
}

fn verify(port: u16, acked: &Path) -> Output {
    run(kvclient(
        port,
        &["verify", "--acked", &acked.display().to_string()],
    ))
}

/// A `kvclient write` running in the background, killed if the test fails.
struct Writer(Option<Child>);

impl Writer {
    fn start(port: u16, count: u64, acked: &Path) -> Writer {
        let child = kvclient(
            port,
            &[
                "write",
                "--count",
                &count.to_string(),
                "--acked",
                &acked.display().to_string(),
                "--deadline",
                CLIENT_DEADLINE_SECS,
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvclient write");
        Writer(Some(child))
    }

    /// Waits for the client to finish; returns its output.
    fn finish(mut self) -> Output {
        let mut child = self.0.take().expect("a running writer");
        wait_until("kvclient write to finish", WRITE_TIMEOUT, || {
            child.try_wait().ok().flatten().map(|_| ())
        });
        child.wait_with_output().expect("collect kvclient's output")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn acked_lines(acked: &Path) -> Vec<String> {
    read_or_empty(acked).lines().map(str::to_owned).collect()
}

fn wait_acked(acked: &Path, n: usize) {
    wait_until(&format!("{n} acknowledged writes"), WRITE_TIMEOUT, || {
        (acked_lines(acked).len() >= n).then_some(())
    });
}

/// A raw protocol connection.
struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to kv");
        s.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
        Raw {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
        }
    }

    /// Sends raw bytes (a newline is not added) and reads one reply line.
    fn send(&mut self, bytes: &[u8]) -> String {
        self.writer.write_all(bytes).expect("send");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read a reply");
        assert!(line.ends_with('\n'), "no whole reply line: {line:?}");
        line.trim_end().to_owned()
    }

    fn call(&mut self, request: &str) -> String {
        self.send(format!("{request}\n").as_bytes())
    }
}

fn count_of(port: u16) -> u64 {
    let reply = Raw::connect(port).call("COUNT");
    reply
        .strip_prefix("COUNT ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a COUNT reply: {reply}"))
}

/// kill -9 in the middle of the client's writes, restart on the same data: the client rides
/// through and every acknowledged key is there.
fn kill9_mid_write(label: &str, checkpoint: &str) {
    let scratch = Scratch::new(label);
    let data = scratch.file("data");
    let out = scratch.file("kv.out");
    let acked = scratch.file("acked");
    let port = free_port();
    let args = ["--checkpoint", checkpoint];
    let mut server = Server::start(&data, port, &out, &args, None);
    wait_up(port);
    let writer = Writer::start(port, WRITES, &acked);
    wait_acked(&acked, KILL_AFTER);
    server.kill9();
    let before_restart = acked_lines(&acked).len();
    let _server = Server::start(&data, port, &out, &args, None);
    wait_up(port);
    let done = writer.finish();
    assert!(done.status.success(), "the client gave up: {}", text(&done));
    // The second run started from a checkpoint, the log, or both (never from nothing).
    let second_run = read_or_empty(&out)
        .split("listening on")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    assert!(
        second_run.contains("recovered seq") || second_run.contains("replayed"),
        "{second_run}"
    );
    if checkpoint == "per-request" {
        assert!(second_run.contains("recovered seq"), "{second_run}");
    }
    assert!(before_restart < usize::try_from(WRITES).expect("small"));
    let ok = verify(port, &acked);
    assert!(ok.status.success(), "verify: {}", text(&ok));
    assert_eq!(
        acked_lines(&acked).len(),
        usize::try_from(WRITES).expect("small")
    );
    assert_eq!(count_of(port), WRITES);
}

#[test]
fn standalone_kill9_keeps_every_acknowledged_write_per_request() {
    kill9_mid_write("kv-kill-pr", "per-request");
}

#[test]
fn standalone_kill9_keeps_every_acknowledged_write_periodic() {
    kill9_mid_write("kv-kill-every", "every=50");
}

/// A torn last record (cut short, or garbage after the last record) is ignored and cut; new
/// writes land after the good records and survive the next crash.
#[test]
fn a_torn_log_tail_is_ignored() {
    let scratch = Scratch::new("kv-torn");
    let data = scratch.file("data");
    let out = scratch.file("kv.out");
    let acked = scratch.file("acked");
    let port = free_port();
    // No periodic checkpoint: the table comes from the log alone, so cutting the log
    // really takes the last write away.
    let args = ["--checkpoint", "every=3600000"];
    let mut server = Server::start(&data, port, &out, &args, None);
    wait_up(port);
    let done = Writer::start(port, 20, &acked).finish();
    assert!(done.status.success(), "{}", text(&done));
    server.kill9();

    // Tear the last record (k19): as if the crash came in the middle of its append.
    let log = data.join("kv.log");
    let len = std::fs::metadata(&log).expect("the log exists").len();
    let file = std::fs::File::options()
        .write(true)
        .open(&log)
        .expect("open the log");
    file.set_len(len - 5).expect("cut the log");
    drop(file);
    let mut server = Server::start(&data, port, &out, &args, None);
    wait_up(port);
    let output = server.output();
    assert!(
        output.contains("ignoring") && output.contains("end of the log"),
        "{output}"
    );
    assert!(output.contains("cut the log"), "{output}");
    let mut raw = Raw::connect(port);
    assert_eq!(raw.call("GET k19"), "NONE");
    assert_eq!(
        raw.call("GET k18"),
        format!("VALUE {}", expected_value("k18"))
    );
    assert_eq!(raw.call("COUNT"), "COUNT 19");
    assert_eq!(raw.call("SET after tear"), "OK 20");
    drop(raw);
    server.kill9();

    // Garbage after the last record.
    let mut file = std::fs::File::options()
        .append(true)
        .open(&log)
        .expect("open the log");
    file.write_all(&[0xa5; 100]).expect("append garbage");
    drop(file);
    let server = Server::start(&data, port, &out, &args, None);
    wait_up(port);
    let output = server.output();
    assert!(
        output.contains("ignoring 100 bytes at the end of the log"),
        "{output}"
    );
    let mut raw = Raw::connect(port);
    assert_eq!(raw.call("GET after"), "VALUE tear");
    assert_eq!(raw.call("COUNT"), "COUNT 20");
    assert_eq!(raw.call("GET k19"), "NONE");
}

/// The value kvclient writes for `key` (see `ftkit_examples::kvproto::value_for`): FNV-1a of
/// the key, computed here independently.
fn expected_value(key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("v-{key}-{h:016x}")
}

#[test]
fn bad_protocol_lines_get_err_and_the_connection_stays_usable() {
    let scratch = Scratch::new("kv-proto");
    let port = free_port();
    let _server = Server::start(
        &scratch.file("data"),
        port,
        &scratch.file("kv.out"),
        &[],
        None,
    );
    wait_up(port);
    let mut raw = Raw::connect(port);
    for bad in [
        "FROB x",
        "SET k1",
        "SET k1 ",
        "GET",
        "GET a b",
        "DEL",
        "COUNT please",
        "",
    ] {
        let reply = raw.call(bad);
        assert!(reply.starts_with("ERR "), "{bad:?} → {reply}");
    }
    assert!(raw.send(b"GET \x00\xff\n").starts_with("ERR bad key"));
    assert!(raw.send(b"SET k v\x01v\n").starts_with("ERR bad value"));
    // An oversized line is refused without buffering it; the connection goes on.
    let mut huge = vec![b'x'; 100 << 10];
    huge.push(b'\n');
    assert!(raw.send(&huge).starts_with("ERR line too long"));
    // The same connection still works, CRLF included.
    assert_eq!(raw.call("SET k1 hello world"), "OK 1");
    assert_eq!(raw.send(b"GET k1\r\n"), "VALUE hello world");
    assert_eq!(raw.call("PING"), "PONG primary");
    assert_eq!(raw.call("COUNT"), "COUNT 1");
    let digest = raw.call("DIGEST");
    assert!(
        digest
            .strip_prefix("DIGEST ")
            .is_some_and(|d| d.len() == 16),
        "{digest}"
    );
    assert_eq!(raw.call("del k1"), "OK 2");
    assert_eq!(raw.call("GET k1"), "NONE");
    assert_eq!(raw.call("DEL k1"), "OK 3");
    assert_eq!(raw.call("COUNT"), "COUNT 0");
    assert_ne!(raw.call("DIGEST"), digest);
    // Many clients at once.
    let clients: Vec<_> = (0..20)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Raw::connect(port);
                for j in 0..10 {
                    assert!(c.call(&format!("SET c{i}-{j} v{j}")).starts_with("OK "));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client thread");
    }
    assert_eq!(raw.call("COUNT"), "COUNT 200");
}

/// FT_ROLE=standby: recovers (the log included) and answers only PING; the log is not
/// touched, even its torn tail.
#[test]
fn a_standby_answers_only_ping() {
    let scratch = Scratch::new("kv-standby");
    let data = scratch.file("data");
    let out = scratch.file("kv.out");
    let port = free_port();
    let mut primary = Server::start(&data, port, &out, &[], None);
    wait_up(port);
    let mut raw = Raw::connect(port);
    assert_eq!(raw.call("SET a 1"), "OK 1");
    assert_eq!(raw.call("SET b 2"), "OK 2");
    let digest = raw.call("DIGEST");
    drop(raw);
    primary.kill9();
    let log = data.join("kv.log");
    let mut file = std::fs::File::options()
        .append(true)
        .open(&log)
        .expect("open the log");
    file.write_all(b"torn").expect("append");
    drop(file);
    let len = std::fs::metadata(&log).expect("log").len();

    let standby = Server::start(&data, port, &out, &[], Some("standby"));
    wait_until("the standby to listen", UP_TIMEOUT, || {
        standby.output().contains("as standby").then_some(())
    });
    let mut raw = Raw::connect(port);
    assert_eq!(raw.call("PING"), "PONG standby");
    assert_eq!(raw.call("SET c 3"), "ERR standby");
    assert_eq!(raw.call("GET a"), "ERR standby");
    assert_eq!(raw.call("DIGEST"), "ERR standby");
    let output = standby.output();
    assert!(output.contains("replayed 2 log records"), "{output}");
    assert_eq!(std::fs::metadata(&log).expect("log").len(), len);
    let out = run(kvclient(port, &["wait-up", "--timeout", "0.3"]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    drop(raw);
    drop(standby);

    // The same data as a primary: the state the standby had.
    let _primary = Server::start(&data, port, &scratch.file("kv2.out"), &[], None);
    wait_up(port);
    let mut raw = Raw::connect(port);
    assert_eq!(raw.call("DIGEST"), digest);
    assert_eq!(std::fs::metadata(&log).expect("log").len(), len - 4);
}

/// Under watchd, with the log in a sync-mode fileset replicated to a second watchd on this
/// host: kill -9 of kv mid-run, watchd restarts it, every acknowledged write is there, and the
/// backup's replica of the log holds them too.
#[test]
fn under_watchd_kill9_is_restarted_and_keeps_every_acknowledged_write() {
    let shared = Scratch::new("kv-watchd");
    let secret = shared.write("secret", "kv test secret 0123456789\n");
    let primary_dir = shared.file("primary");
    let replica_dir = shared.file("replica");
    std::fs::create_dir_all(&primary_dir).expect("mkdir");
    let (port_a, port_b, kv_port) = (free_port(), free_port(), free_port());
    let acked = shared.file("acked");
    // Rings in the scratch directory, not /dev/shm, so nothing outlives the test.
    let rings = shared.file("rings");
    std::fs::create_dir_all(&rings).expect("ring dir");
    let config = |other: &str, listen: u16, peer: u16, dir: &Path, services: &str| {
        format!(
            "[cluster]\nname = \"kv\"\nsecret_file = {}\nlisten = [\"127.0.0.1:{listen}\"]\n\n\
             [[node]]\nname = \"{other}\"\naddresses = [\"127.0.0.1:{peer}\"]\n\n\
             [[fileset]]\nname = \"data\"\npath = {}\nprimary = \"a\"\nbackups = [\"b\"]\n\
             sync = true\n\n{services}",
            q(&secret),
            q(dir),
        )
    };
    let settings = format!("ring_dir = {}", q(&rings));
    let _b = Watchd::start_node(
        None,
        "kv-b",
        Some("b"),
        &settings,
        &config("a", port_b, port_a, &replica_dir, ""),
    );
    let args = [
        "--listen".to_owned(),
        format!("127.0.0.1:{kv_port}"),
        "--data".to_owned(),
        primary_dir.display().to_string(),
        "--checkpoint".to_owned(),
        "per-request".to_owned(),
    ];
    let service = format!(
        "[[service]]\nname = \"kv\"\ncommand = {}\nargs = {}\nfilesets = [\"data\"]\n\
         ready = {{ notify = true, timeout = \"20s\" }}\nhang = {{ heartbeat = true }}\n\
         restart = {{ policy = \"always\", max_restarts = 10, window = \"60s\" }}\n\
         checkpoint = {{ every = \"200ms\" }}\n",
        q(binary("kv")),
        q_list(&args)
    );
    let a = Watchd::start_node(
        None,
        "kv-a",
        Some("a"),
        &settings,
        &config("b", port_a, port_b, &primary_dir, &service),
    );
    let first = a.wait_running("kv");
    wait_up(kv_port);
    let writer = Writer::start(kv_port, WRITES, &acked);
    wait_acked(&acked, KILL_AFTER);
    signal(first, Signal::SIGKILL);
    wait_gone(first, Duration::from_secs(5));
    let second = a.wait_new_pid("kv", first, Duration::from_secs(15));
    let done = writer.finish();
    assert!(done.status.success(), "the client gave up: {}", text(&done));
    let ok = verify(kv_port, &acked);
    assert!(ok.status.success(), "verify: {}", text(&ok));
    let log = a.service_log("kv");
    assert!(log.contains("recovered seq"), "{log}");
    assert!(log.contains("the log is in fileset data"), "{log}");
    let status = a.service("kv");
    assert_eq!(pid_of(&status), Some(second), "{status}");
    // Sync mode: the backup's replica of the log has every acknowledged write already.
    let primary_log = std::fs::read(primary_dir.join("kv.log")).expect("primary log");
    wait_until(
        "the replica of the log to match",
        Duration::from_secs(10),
        || (std::fs::read(replica_dir.join("kv.log")).ok()? == primary_log).then_some(()),
    );
}
