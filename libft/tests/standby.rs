//! Warm standby end to end: a primary process takes checkpoints; the test ships them one by
//! one (by rename, as watchd's replication does) into a standby process's store directory; the
//! standby (FT_ROLE=standby) follows them in place, its memory digest equal to the primary's
//! after each apply, skips a corrupt image, is promoted by a fake watchd (`Promote`), and its
//! own next checkpoint continues the sequence. Once through the Rust API, once through the C ABI.

mod critical_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use critical_support::{ROLE_ENV, Rng, describe, heap_addr, report, run_role, unique, values};
use ft::capi::{
    FT_ESTANDBY, FT_OK, FT_ROLE_PRIMARY, FT_ROLE_STANDBY, ft_promoted, ft_reg_watch, ft_role,
    ft_standby_apply, ft_standby_wait, t_checkpoint, t_recover_report,
};
use ft::critical::{self, Checkpointer};
use ft::proto::{AppMessage, ENV_SOCKET, MAX_DATAGRAM, WatchdMessage};
use ft::standby::{self, Follower, Role};

const ENTRY: &str = "child_role";
/// How long either side waits for the other.
const PATIENCE: Duration = Duration::from_secs(20);
/// One wait of the standby's loop, between looks at watchd's messages.
const FOLLOW_SLICE: Duration = Duration::from_millis(50);
/// Checkpoints the primary takes.
const ROUNDS: u64 = 6;
/// The image the test ships corrupt first.
const CORRUPT_SEQ: u64 = 4;
/// Length of the registered region (crosses page boundaries on purpose).
const REGION_LEN: usize = 3 * 4096 + 100;
/// The epoch the fake watchd promotes with.
const EPOCH: u64 = 42;
const ENV_API: &str = "FT_STANDBY_TEST_API";

/// The process-wide critical memory plus one registered region.
fn setup() -> (&'static Checkpointer, &'static mut [u8]) {
    let c = critical::global().expect("critical memory");
    let region: &'static mut [u8] = Box::leak(vec![0u8; REGION_LEN].into_boxed_slice());
    // SAFETY: leaked, so valid for the rest of the process.
    unsafe { c.register(region.as_mut_ptr(), region.len()) }.expect("register the region");
    (c, region)
}

/// xxh3 of the heap's used span and the region: what the primary and a follower must share.
fn digest(c: &Checkpointer, region: &[u8]) -> u64 {
    let heap = c.heap();
    let used = heap.stats().expect("heap stats").used_span;
    // SAFETY: the used span of the heap is mapped and readable.
    let h = unsafe { critical_support::digest(heap.base(), used) };
    h ^ xxhash_rust::xxh3::xxh3_64(region).rotate_left(1)
}

/// Changes the heap and the region the way round `round` does.
fn mutate(c: &Checkpointer, region: &mut [u8], round: u64) {
    let mut rng = Rng::new(round * 7919);
    let len = 20_000 + usize::try_from(round).expect("small") * 3000;
    let block = c.heap().alloc(len, 16).expect("alloc").as_ptr();
    for i in 0..len {
        // SAFETY: inside the block just allocated.
        unsafe { block.add(i).write(rng.byte()) };
    }
    let at = rng.below(REGION_LEN - 64);
    for b in &mut region[at..at + 64] {
        *b = rng.byte();
    }
}

#[test]
fn child_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    match role.as_str() {
        "primary" => primary(),
        "standby" => standby_child(),
        "verify" => verify(),
        other => panic!("unknown role {other}"),
    }
}

fn primary() {
    assert_eq!(ft::role(), Role::Primary);
    let (c, region) = setup();
    for round in 1..=ROUNDS {
        mutate(c, region, round);
        let info = c.checkpoint_sync(0).expect("checkpoint");
        assert_eq!(info.seq, round);
        // Let a compaction finish, so the images the test ships are final.
        c.wait(0).expect("wait");
        report(&format!("digest.{}", info.seq), digest(c, region));
    }
}

/// The standby's operations, through the Rust API or the C ABI.
trait Follow {
    fn wait(&mut self) -> bool;
    fn apply(&mut self) -> Result<Option<u64>, String>;
    fn skipped(&self) -> String;
    fn promoted(&mut self) -> Option<u64>;
}

struct RustFollow {
    follower: Follower<'static>,
    watch: ft::Watch,
}

impl Follow for RustFollow {
    fn wait(&mut self) -> bool {
        self.follower.wait_for_change(FOLLOW_SLICE).expect("wait")
    }
    fn apply(&mut self) -> Result<Option<u64>, String> {
        // SAFETY: this thread is the only one touching critical memory.
        unsafe { self.follower.apply_newest() }.map_err(|e| e.to_string())
    }
    fn skipped(&self) -> String {
        let seqs: Vec<String> = self
            .follower
            .skipped()
            .iter()
            .map(|(s, why)| format!("{s} ({why})"))
            .collect();
        seqs.join(", ")
    }
    fn promoted(&mut self) -> Option<u64> {
        while let Some(m) = self.watch.poll_command().expect("poll") {
            assert!(matches!(m, WatchdMessage::Promote { .. }), "{m:?}");
        }
        standby::promoted()
    }
}

struct CFollow;

impl Follow for CFollow {
    fn wait(&mut self) -> bool {
        let ms = u32::try_from(FOLLOW_SLICE.as_millis()).expect("small");
        let rc = ft_standby_wait(0, ms);
        assert!(rc == 0 || rc == 1, "ft_standby_wait: {rc}");
        rc == 1
    }
    fn apply(&mut self) -> Result<Option<u64>, String> {
        // SAFETY: this thread is the only one touching critical memory.
        let rc = unsafe { ft_standby_apply(0) };
        match rc {
            0 => Ok(None),
            n if n > 0 => Ok(Some(u64::try_from(n).expect("positive"))),
            n => {
                let code = i32::try_from(n).expect("an FT_E* code");
                // SAFETY: ft_strerror returns a static NUL-terminated string.
                let text = unsafe { std::ffi::CStr::from_ptr(ft::capi::ft_strerror(code)) };
                Err(format!("ft_standby_apply: {n}: {}", text.to_string_lossy()))
            }
        }
    }
    fn skipped(&self) -> String {
        // SAFETY: t_recover_report returns a NUL-terminated string valid until the next apply.
        unsafe { std::ffi::CStr::from_ptr(t_recover_report()) }
            .to_string_lossy()
            .into_owned()
    }
    fn promoted(&mut self) -> Option<u64> {
        (ft_promoted() != 0).then(|| standby::promoted().expect("recorded"))
    }
}

fn standby_child() {
    let c_api = std::env::var(ENV_API).is_ok_and(|v| v == "c");
    let (c, region) = setup();
    assert_eq!(ft::role(), Role::Standby);
    assert_eq!(ft_role(), FT_ROLE_STANDBY);
    // A standby writes nothing of its own.
    assert!(matches!(
        c.checkpoint_sync(0),
        Err(critical::Error::Standby)
    ));
    assert_eq!(t_checkpoint(0), FT_ESTANDBY);
    assert_eq!(c.safe_point().expect("safe point"), None);
    let mut api: Box<dyn Follow> = if c_api {
        assert_eq!(ft_reg_watch(), FT_OK);
        Box::new(CFollow)
    } else {
        let path = PathBuf::from(std::env::var_os(ENV_SOCKET).expect("FT_SOCKET"));
        Box::new(RustFollow {
            follower: Follower::new(c, 0).expect("follower"),
            watch: ft::Watch::connect(&path).expect("register"),
        })
    };
    report("ready", 1);
    let start = Instant::now();
    let epoch = loop {
        assert!(start.elapsed() < PATIENCE, "never promoted");
        if let Some(epoch) = api.promoted() {
            break epoch;
        }
        if !api.wait() {
            continue;
        }
        match api.apply().expect("apply") {
            Some(seq) => report("applied", format!("{seq}:{}", digest(c, region))),
            None => report("skipped", api.skipped()),
        }
    };
    report("promoted", epoch);
    assert_eq!(ft::role(), Role::Primary);
    assert_eq!(ft_role(), FT_ROLE_PRIMARY);
    // The last look before writing: nothing new arrived.
    assert_eq!(api.apply().expect("apply after promotion"), None);
    mutate(c, region, ROUNDS + 1);
    let own = c
        .checkpoint_sync(0)
        .expect("a promoted standby checkpoints");
    c.wait(0).expect("wait");
    report(
        "own",
        format!(
            "{}:{}:{}",
            own.seq,
            own.parent.map_or(0, |p| p),
            digest(c, region)
        ),
    );
    // Following ended with the process's own checkpoint.
    let refused = api.apply().expect_err("following after own checkpoints");
    report("refused", refused);
}

fn verify() {
    let (c, region) = setup();
    // SAFETY: nothing else runs in this process.
    let r = unsafe { c.recover(0) }
        .expect("recover")
        .expect("a checkpoint");
    report("recovered", format!("{}:{}", r.seq, digest(c, region)));
}

/// The standby process and the lines it reports, as they come.
struct Standby {
    child: Child,
    lines: mpsc::Receiver<(String, String)>,
}

impl Standby {
    fn next(&self) -> (String, String) {
        self.lines
            .recv_timeout(PATIENCE)
            .expect("the standby reports in time")
    }

    /// The next line reported as `key`, passing over reports of looks that found nothing new
    /// (tolerated: only the images' arrival is scripted, not every wake-up).
    fn expect(&self, key: &str) -> String {
        loop {
            let (k, v) = self.next();
            if k == key {
                return v;
            }
            assert_eq!(k, "skipped", "expected {key}, got {k}={v}");
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_for(dir: &Path, app: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FT_SERVICE", app.to_owned()),
        ("FT_HEAP_ADDR", format!("{:#x}", heap_addr(3))),
        ("FT_HEAP_SIZE", "16MiB".to_owned()),
        ("FT_CKPT_DIR", dir.display().to_string()),
        ("FT_CKPT_KEEP", "100".to_owned()),
        ("FT_CKPT_FULL_EVERY", "2".to_owned()),
    ]
}

fn image(dir: &Path, seq: u64) -> PathBuf {
    dir.join("0").join(format!("{seq:020}.ckpt"))
}

/// Drops image `seq` into the standby's store the way replication does: written aside, then
/// renamed into place. `corrupt` flips a byte in the middle.
fn ship(from: &Path, to: &Path, seq: u64, corrupt: bool) {
    let mut bytes = std::fs::read(image(from, seq)).expect("read the primary's image");
    if corrupt {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
    }
    let aside = to.join("0").join(format!("incoming-{seq}"));
    std::fs::write(&aside, &bytes).expect("write aside");
    std::fs::rename(&aside, image(to, seq)).expect("rename into place");
}

fn scenario(api: &str) {
    let root = tempfile::tempdir().expect("tempdir");
    let (pdir, sdir) = (root.path().join("primary"), root.path().join("standby"));
    std::fs::create_dir_all(sdir.join("0")).expect("mkdir");
    let app = unique("standby-app");

    let out = run_role(ENTRY, "primary", &env_for(&pdir, &app));
    assert!(out.status.success(), "{}", describe(&out));
    let primary: BTreeMap<String, String> = values(&out);
    let digest_of = |seq: u64| primary[&format!("digest.{seq}")].clone();

    let sock_path = root.path().join("watchd.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the fake watchd");
    sock.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, "standby")
        .env(ENV_API, api)
        .env("FT_ROLE", "standby")
        .env(ENV_SOCKET, &sock_path)
        .envs(env_for(&sdir, &app))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("spawn the standby");
    let stdout = child.stdout.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some((k, v)) = line.strip_prefix('@').and_then(|l| l.split_once('=')) {
                let _ = tx.send((k.to_owned(), v.to_owned()));
            }
        }
    });
    let standby = Standby { child, lines };
    assert_eq!(standby.expect("ready"), "1");
    let app_addr = registered(&sock);

    for seq in 1..=ROUNDS {
        if seq == CORRUPT_SEQ {
            ship(&pdir, &sdir, seq, true);
            let why = standby.expect("skipped");
            assert!(why.contains(&CORRUPT_SEQ.to_string()), "{why}");
        }
        ship(&pdir, &sdir, seq, false);
        assert_eq!(
            standby.expect("applied"),
            format!("{seq}:{}", digest_of(seq)),
            "after shipping image {seq}"
        );
    }

    let mut buf = [0u8; MAX_DATAGRAM];
    let n = WatchdMessage::Promote { epoch: EPOCH }.encode(&mut buf);
    sock.send_to_addr(&buf[..n], &app_addr).expect("promote");
    assert_eq!(standby.expect("promoted"), EPOCH.to_string());
    let own = standby.expect("own");
    let parts: Vec<&str> = own.split(':').collect();
    assert_eq!(parts[0], (ROUNDS + 1).to_string(), "the sequence continues");
    assert!(
        parts[1] == ROUNDS.to_string() || parts[1] == "0",
        "an increment on the last applied image, or a full one: {own}"
    );
    assert!(standby.expect("refused").contains("promoted"));
    let mut standby = standby;
    let status = standby.child.wait().expect("standby exits");
    assert!(status.success(), "standby: {status:?}");

    // The promoted standby's own image recovers to the state it reported.
    let out = run_role(ENTRY, "verify", &env_for(&sdir, &app));
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        values(&out)["recovered"],
        format!("{}:{}", ROUNDS + 1, parts[2])
    );
}

/// The address of the app that registered with the fake watchd.
fn registered(sock: &UnixDatagram) -> SocketAddr {
    let mut buf = [0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = sock.recv_from(&mut buf).expect("the app registers in time");
        if AppMessage::decode(&buf[..n]) == Ok(AppMessage::Register) {
            return from;
        }
    }
}

#[test]
fn rust_follower_tracks_the_primary_and_is_promoted() {
    scenario("rust");
}

#[test]
fn c_follower_tracks_the_primary_and_is_promoted() {
    scenario("c");
}

#[test]
fn a_primary_has_nothing_to_follow() {
    // This test process has no FT_ROLE: it is a primary.
    assert_eq!(ft::role(), Role::Primary);
    assert_eq!(ft_role(), FT_ROLE_PRIMARY);
    assert_eq!(ft_standby_wait(0, 1), ft::capi::FT_ENOTSTANDBY);
}
