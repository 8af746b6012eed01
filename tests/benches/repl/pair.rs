//! A primary and a backup watchd on loopback (two listen ports on 127.0.0.1), each with its own
//! data directory and fileset directory in the benchmark's scratch directory and the fileset's
//! ring in a private tmpfs directory; their `repl_status` answers, and "the replica has caught
//! up" as an observation (a marker file written last appears on the replica, then every
//! counter agrees).
//!
//! Owns the watchd configuration of the benchmark (written once, here) and starting, watching
//! and stopping the two daemons. It never changes a fileset's contents except through
//! replicated calls (ft::fs), so primary and replica never diverge behind replication's back.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::harness;

/// How long watchd may take to answer on its control socket after it was started.
const CONTROL_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the pump may take to reach `streaming` to the backup (greeting + initial resync).
const STREAMING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the replica may take to catch up with everything written.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long watchd may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two status polls while waiting for a state.
const STATE_POLL: Duration = Duration::from_millis(20);
/// Pause between two looks at the marker on the replica.
pub const MARKER_POLL: Duration = Duration::from_millis(2);
/// A fileset error that stays this long is a failure to start, not a transient state.
const ERROR_GRACE: Duration = Duration::from_secs(3);
/// Bytes of a watchd log shown when it fails.
const LOG_TAIL: usize = 3000;
/// The name of the one fileset of the benchmark.
pub const FILESET: &str = "data";
/// The cluster secret (both nodes read the same file).
const SECRET: &str = "ftkit replication benchmark secret\n";

/// How a fileset's changes are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Operation ring (libft API, shim), replayed on the backup.
    Replay,
    /// Copy mode: the directory is watched and files copied after `quiet`.
    Copy { quiet: Duration },
}

/// The fileset settings a pair runs with.
#[derive(Debug, Clone, Copy)]
pub struct PairSpec {
    pub source: Source,
    pub sync: bool,
    /// Ring size in bytes (replay mode).
    pub ring_size: u64,
}

impl PairSpec {
    /// The `[[fileset]]` settings that differ between runs, as written into the configuration.
    pub fn describe(&self) -> String {
        match self.source {
            Source::Replay => format!(
                "mode = \"replay\", sync = {}, ring_size = \"{}MiB\"",
                self.sync,
                self.ring_size >> 20
            ),
            Source::Copy { quiet } => format!(
                "mode = \"copy\", sync = {}, quiet = \"{}ms\"",
                self.sync,
                quiet.as_millis()
            ),
        }
    }
}

/// Where the private binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    pub fn watchd(&self) -> PathBuf {
        self.dir.join("watchd")
    }
    pub fn shim(&self) -> PathBuf {
        self.dir.join("libftrepl.so")
    }
}

#[derive(Debug)]
struct Node {
    child: Option<Child>,
    control: PathBuf,
    log: PathBuf,
}

impl Node {
    fn start(bins: &Bins, dir: &Path, config_text: &str, data_dir: &Path) -> Result<Node> {
        let config = dir.join("watchd.toml");
        fs::write(&config, config_text).with_context(|| format!("writing {}", config.display()))?;
        let log = dir.join("watchd.log");
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bins.watchd());
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("RUST_LOG", "warn")
            .process_group(0);
        for var in [
            "FT_SOCKET",
            "NOTIFY_SOCKET",
            "FT_REPL_FILESETS",
            "FT_REPL_SYNC_TIMEOUT",
            "LD_PRELOAD",
        ] {
            cmd.env_remove(var);
        }
        let child = cmd.spawn().context("spawning watchd")?;
        let mut node = Node {
            child: Some(child),
            control: data_dir.join("control.sock"),
            log,
        };
        let end = Instant::now() + CONTROL_UP_TIMEOUT;
        loop {
            node.check_alive()?;
            if node.control.exists()
                && harness::control(&node.control, &serde_json::json!({"op": "status"})).is_ok()
            {
                return Ok(node);
            }
            if Instant::now() >= end {
                bail!(
                    "watchd did not answer within {CONTROL_UP_TIMEOUT:?}; its log:\n{}",
                    node.log_tail()
                );
            }
            harness::sleep(STATE_POLL)?;
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            self.child = None;
            bail!("watchd exited with {status}; its log:\n{}", self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(LOG_TAIL);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// This node's one fileset report.
    fn fileset(&self) -> Result<serde_json::Value> {
        let answer = harness::control(&self.control, &serde_json::json!({"op": "repl_status"}))?;
        answer["filesets"]
            .as_array()
            .and_then(|a| a.iter().find(|f| f["name"] == FILESET))
            .cloned()
            .with_context(|| format!("repl_status without fileset {FILESET}: {answer}"))
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Ok(pid) = i32::try_from(child.id()) else {
            let _ = child.kill();
            let _ = child.wait();
            return;
        };
        let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        let end = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < end {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(STATE_POLL);
        }
        eprintln!("bench: watchd {pid} did not stop within {STOP_TIMEOUT:?}; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// What the primary's pump and the backup's bcplog report, the counters the benchmark uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Next seq the pump will read from its source.
    pub next_seq: u64,
    /// Ring released through this seq.
    pub released: u64,
    /// What the backup acknowledged as durable (pump's view).
    pub acked: u64,
    /// The pump's link state is `streaming`.
    pub streaming: bool,
    /// The backup applied / committed through these seqs.
    pub applied: u64,
    pub committed: u64,
    /// Resyncs the pump started for the backup.
    pub resyncs: u64,
}

impl Counters {
    /// Everything read was acknowledged, released, applied and committed.
    pub fn settled(&self) -> bool {
        let last = self.next_seq.saturating_sub(1);
        self.streaming
            && self.acked == last
            && self.released == last
            && self.applied == last
            && self.committed == last
    }
}

/// Two watchds replicating one fileset from `a` (primary) to `b` (backup).
#[derive(Debug)]
pub struct Pair {
    pub spec: PairSpec,
    /// The live directory on the primary (canonical).
    pub primary_root: PathBuf,
    /// The replica on the backup (canonical).
    pub replica_root: PathBuf,
    /// The ring (replay mode): what watchd puts into `FT_REPL_FILESETS`.
    pub ring: PathBuf,
    /// The `[[fileset]]` table of the primary, for the report.
    pub fileset_toml: String,
    primary: Node,
    backup: Node,
    markers: u64,
}

/// Two free TCP ports on 127.0.0.1 (held together while chosen, so they differ).
fn free_ports() -> Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0").context("choosing a port")?;
    let b = TcpListener::bind("127.0.0.1:0").context("choosing a port")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// watchd's instance name for a data directory (watchd/src/daemon.rs `instance_name`:
/// FNV-1a of the canonical path), which names the ring file.
fn instance_name(canonical_data_dir: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canonical_data_dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A TOML basic string.
pub fn q(p: &Path) -> String {
    serde_json::to_string(&p.display().to_string()).expect("a string always serialises")
}

impl Pair {
    /// Starts the backup, then the primary, in `<dir>`, and waits until the pump streams.
    pub fn start(bins: &Bins, dir: &Path, ring_dir: &Path, spec: PairSpec) -> Result<Pair> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = fs::canonicalize(dir)?;
        let secret = dir.join("secret");
        {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&secret)
                .context("writing the secret")?;
            f.write_all(SECRET.as_bytes())?;
        }
        let (pa, pb) = free_ports()?;
        let mut configs = Vec::new();
        for (me, other, port, other_port, root) in
            [("a", "b", pa, pb, "primary"), ("b", "a", pb, pa, "replica")]
        {
            let node_dir = dir.join(me);
            let data_dir = node_dir.join("data");
            fs::create_dir_all(&data_dir)?;
            fs::create_dir_all(dir.join(root))?;
            let data_dir = fs::canonicalize(&data_dir)?;
            let fileset = fileset_table(&spec, &dir.join(root));
            let text = format!(
                "[watchd]\ndata_dir = {}\nnode = \"{me}\"\nring_dir = {}\ncgroups = false\n\n\
                 [cluster]\nname = \"bench\"\nsecret_file = {}\nlisten = [\"127.0.0.1:{port}\"]\n\n\
                 [[node]]\nname = \"{other}\"\naddresses = [\"127.0.0.1:{other_port}\"]\n\n{fileset}",
                q(&data_dir),
                q(ring_dir),
                q(&secret),
            );
            configs.push((node_dir, data_dir, text, fileset));
        }
        let (b_dir, b_data, b_text, _) = &configs[1];
        let backup = Node::start(bins, b_dir, b_text, b_data).context("starting the backup")?;
        let (a_dir, a_data, a_text, a_fileset) = &configs[0];
        let primary = Node::start(bins, a_dir, a_text, a_data).context("starting the primary")?;
        let ring = ring_dir.join(format!("ftkit-{}-{FILESET}.ring", instance_name(a_data)));
        let mut pair = Pair {
            spec,
            primary_root: dir.join("primary"),
            replica_root: dir.join("replica"),
            ring,
            fileset_toml: a_fileset.clone(),
            primary,
            backup,
            markers: 0,
        };
        pair.wait_streaming()?;
        if spec.source == Source::Replay && !pair.ring.exists() {
            bail!(
                "the primary streams but its ring {} does not exist",
                pair.ring.display()
            );
        }
        Ok(pair)
    }

    fn wait_streaming(&mut self) -> Result<()> {
        let end = Instant::now() + STREAMING_TIMEOUT;
        let mut error_since: Option<(String, Instant)> = None;
        loop {
            self.check_alive()?;
            let f = self.primary.fileset()?;
            if let Some(e) = f["error"].as_str() {
                match &error_since {
                    Some((prev, since)) if prev == e => {
                        if since.elapsed() >= ERROR_GRACE {
                            bail!("the primary's fileset does not start: {e}");
                        }
                    }
                    _ => error_since = Some((e.to_owned(), Instant::now())),
                }
            } else {
                error_since = None;
            }
            if let Ok(c) = self.counters()
                && c.streaming
            {
                return Ok(());
            }
            if Instant::now() >= end {
                bail!(
                    "the pump did not reach `streaming` within {STREAMING_TIMEOUT:?}: {f}\n\
                     primary log:\n{}",
                    self.primary.log_tail()
                );
            }
            harness::sleep(STATE_POLL)?;
        }
    }

    /// Fails when either watchd died.
    pub fn check_alive(&mut self) -> Result<()> {
        self.primary.check_alive().context("the primary")?;
        self.backup.check_alive().context("the backup")
    }

    /// utime + stime so far of the primary's and the backup's watchd, in clock ticks.
    pub fn cpu_ticks(&self) -> Result<(u64, u64)> {
        let ticks = |n: &Node| -> Result<u64> {
            let pid = n
                .child
                .as_ref()
                .and_then(|c| i32::try_from(c.id()).ok())
                .context("watchd is not running")?;
            harness::cpu_ticks(pid)
        };
        Ok((ticks(&self.primary)?, ticks(&self.backup)?))
    }

    /// The primary's control socket.
    pub fn primary_control(&self) -> PathBuf {
        self.primary.control.clone()
    }

    /// One reading of both daemons' counters.
    pub fn counters(&self) -> Result<Counters> {
        let p = self.primary.fileset()?;
        let b = self.backup.fileset()?;
        let pump = &p["pump"];
        let link = pump["backups"]
            .as_array()
            .and_then(|a| a.first())
            .with_context(|| format!("the pump reports no backup: {p}"))?;
        let bc = &b["bcplog"];
        let n = |v: &serde_json::Value, what: &str| {
            v.as_u64()
                .with_context(|| format!("repl_status without {what}: {p} / {b}"))
        };
        Ok(Counters {
            next_seq: n(&pump["next_seq"], "pump.next_seq")?,
            released: n(&pump["released"], "pump.released")?,
            acked: n(&link["acked"], "acked")?,
            streaming: link["state"] == "streaming" && link["connected"] == true,
            applied: n(&bc["applied"], "bcplog.applied")?,
            committed: n(&bc["committed"], "bcplog.committed")?,
            resyncs: n(&link["resyncs"], "resyncs")?,
        })
    }

    /// `FT_REPL_FILESETS` for a program writing into the primary's fileset, exactly as watchd
    /// sets it for a service with `filesets = ["data"]`.
    pub fn filesets_env(&self) -> String {
        format!(
            "{FILESET}|{}|{}",
            self.primary_root.display(),
            self.ring.display()
        )
    }

    /// The environment watchd gives a service of this fileset (`shim`: with `repl_shim = true`).
    pub fn service_env(
        &self,
        bins: &Bins,
        shim: bool,
        sync_timeout: Duration,
    ) -> Vec<(String, String)> {
        let mut env = vec![("FT_REPL_FILESETS".to_owned(), self.filesets_env())];
        if self.spec.sync {
            env.push((
                "FT_REPL_SYNC_TIMEOUT".to_owned(),
                format!("{}ms", sync_timeout.as_millis()),
            ));
        }
        if shim {
            env.push(("LD_PRELOAD".to_owned(), bins.shim().display().to_string()));
        }
        env
    }

    /// Makes this benchmark process a producer of the pair's ring (ft::fs), for markers and
    /// replicated removals.
    pub fn adopt_filesets(&self) -> Result<()> {
        let sets = ft::replog::Filesets::parse(self.filesets_env().as_bytes())
            .context("parsing the benchmark's own FT_REPL_FILESETS")?;
        ft::fs::set_filesets(sets);
        Ok(())
    }

    /// Writes a marker file through the replicated API (after everything the caller wrote) and
    /// returns its name and contents. Replay applies in seq order, so once the marker shows on
    /// the replica, everything logged before it is there too.
    pub fn write_marker(&mut self) -> Result<(PathBuf, Vec<u8>)> {
        self.markers += 1;
        let name = format!(".bench-marker-{}", self.markers);
        let body = format!("marker {} {}\n", std::process::id(), self.markers).into_bytes();
        let path = self.primary_root.join(&name);
        let mut f = ft::fs::File::create(&path).context("creating the marker")?;
        f.write_all(&body).context("writing the marker")?;
        drop(f);
        Ok((self.replica_root.join(name), body))
    }

    /// Waits until the marker is on the replica with its contents; returns CLOCK_MONOTONIC
    /// of the first look that saw it.
    pub fn wait_marker(&mut self, replica_marker: &Path, body: &[u8]) -> Result<u64> {
        let end = Instant::now() + CATCH_UP_TIMEOUT;
        let mut polls = 0u32;
        loop {
            if fs::read(replica_marker).is_ok_and(|b| b == body) {
                return Ok(harness::mono_ns());
            }
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(500) {
                self.check_alive()?;
                harness::check_interrupted()?;
            }
            if Instant::now() >= end {
                bail!(
                    "the replica did not catch up within {CATCH_UP_TIMEOUT:?}: {:?}",
                    self.counters()
                );
            }
            std::thread::sleep(MARKER_POLL);
        }
    }

    /// Waits until every counter agrees (nothing in flight, everything committed).
    pub fn wait_settled(&mut self) -> Result<Counters> {
        let end = Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            self.check_alive()?;
            let c = self.counters()?;
            if c.settled() {
                return Ok(c);
            }
            if Instant::now() >= end {
                bail!("replication did not settle within {CATCH_UP_TIMEOUT:?}: {c:?}");
            }
            harness::sleep(STATE_POLL)?;
        }
    }

    /// Writes a marker, waits for it on the replica, removes it again and waits for the
    /// removal on the replica and for every counter to agree: afterwards nothing is in flight
    /// and both trees hold the same files.
    pub fn drain(&mut self) -> Result<Counters> {
        let (marker, body) = self.write_marker()?;
        self.wait_marker(&marker, &body)?;
        self.remove_marker(&marker)?;
        self.wait_settled()
    }

    /// Removes a marker written by [`Pair::write_marker`] (by its replica path) on the primary
    /// and waits until it is gone from the replica.
    pub fn remove_marker(&mut self, replica_marker: &Path) -> Result<()> {
        let name = replica_marker
            .file_name()
            .context("a marker has a file name")?;
        ft::fs::remove_file(self.primary_root.join(name)).context("removing the marker")?;
        let end = Instant::now() + CATCH_UP_TIMEOUT;
        while replica_marker.exists() {
            self.check_alive()?;
            if Instant::now() >= end {
                bail!("the marker's removal did not reach the replica within {CATCH_UP_TIMEOUT:?}");
            }
            harness::sleep(MARKER_POLL)?;
        }
        Ok(())
    }

    /// Removes a directory tree beneath the primary's root through the replicated API, so the
    /// replica removes it too.
    pub fn remove_tree(&self, rel: &str) -> Result<()> {
        remove_tree_replicated(&self.primary_root.join(rel))
    }

    /// The primary's log tail (for failures).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "primary log:\n{}\nbackup log:\n{}",
            self.primary.log_tail(),
            self.backup.log_tail()
        );
        s
    }

    /// Stops both daemons (primary first) and removes the ring file.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.primary.stop();
        self.backup.stop();
        let _ = fs::remove_file(&self.ring);
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn fileset_table(spec: &PairSpec, path: &Path) -> String {
    let mut t = format!(
        "[[fileset]]\nname = \"{FILESET}\"\npath = {}\nprimary = \"a\"\nbackups = [\"b\"]\nsync = {}\n",
        q(path),
        spec.sync
    );
    match spec.source {
        Source::Replay => {
            let _ = writeln!(t, "mode = \"replay\"\nring_size = {}", spec.ring_size);
        }
        Source::Copy { quiet } => {
            let _ = writeln!(t, "mode = \"copy\"\nquiet = \"{}ms\"", quiet.as_millis());
        }
    }
    t
}

/// Deletes a tree with ft::fs calls (children first), so that a fileset's replica follows.
fn remove_tree_replicated(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    };
    if meta.is_dir() {
        for entry in fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
            remove_tree_replicated(&entry?.path())?;
        }
        ft::fs::remove_dir(path).with_context(|| format!("rmdir {}", path.display()))
    } else {
        ft::fs::remove_file(path).with_context(|| format!("unlink {}", path.display()))
    }
}
