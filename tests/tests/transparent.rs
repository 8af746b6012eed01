//! Transparent checkpoints taken by watchd (`checkpoint = { transparent = true }`): an
//! unmodified C counter (ckpt/tests/progs/counter.c) is dumped every 200 ms; after kill -9,
//! `restart_from = "checkpoint"` brings it back from the newest dump, so its output goes on from
//! the checkpointed count instead of from 0; `ftctl checkpoint` and `ftctl rollback` work on the
//! live service, whose log is left out of every image (a rollback never cuts it back); bad
//! combinations are refused when the configuration is loaded.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ftkit_tests::{Scratch, Watchd, json_lines, pid_alive, q, repo_root, signal, wait_until};
use nix::sys::signal::Signal;

/// Time for watchd to notice the crash, restore, and for the counter to print again.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(15);
/// Time for the periodic dumps to reach a given sequence.
const DUMPS_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines the counter must print between a checkpoint and a rollback to it (10 ms each).
const LINES_BEFORE_ROLLBACK: u64 = 100;

/// Compiles the counter into a scratch directory that lives as long as the returned `Scratch`.
fn counter() -> (Scratch, PathBuf) {
    let build = Scratch::new("tp-cc");
    let exe = build.file("counter");
    let out = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(&exe)
        .arg(repo_root().join("ckpt/tests/progs/counter.c"))
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc counter.c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (build, exe)
}

fn service(exe: &Path, data: &Path, extra: &str) -> String {
    format!(
        "[[service]]\nname = \"counter\"\ncommand = {}\nargs = [{}]\n\
         checkpoint = {{ transparent = true, every = \"200ms\", keep = 3 }}\n{extra}\n",
        q(exe),
        q(data)
    )
}

/// The counts ("i sum" lines) the counter printed, in order, complete lines only.
fn counts(log: &str) -> Vec<u64> {
    let complete = log.rfind('\n').map_or("", |end| &log[..end]);
    complete
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let i = it.next()?.parse().ok()?;
            it.next()?.parse::<u64>().ok()?;
            Some(i)
        })
        .collect()
}

fn last_count(w: &Watchd) -> Option<u64> {
    counts(&w.service_log("counter")).last().copied()
}

/// Waits until the status shows a transparent checkpoint with a sequence of at least `seq`.
fn wait_dumps(w: &Watchd, seq: u64) -> serde_json::Value {
    w.wait_for(
        "counter",
        &format!("checkpointed up to #{seq}"),
        DUMPS_TIMEOUT,
        |s| s["transparent"]["seq"].as_u64().is_some_and(|n| n >= seq),
    )
}

#[test]
fn kill9_restores_the_newest_checkpoint_and_the_count_goes_on() {
    let (_build, exe) = counter();
    let scratch = Scratch::new("tp-kill");
    let data = scratch.file("counter.data");
    let w = Watchd::start(
        "tp-kill",
        &service(&exe, &data, "restart_from = \"checkpoint\""),
    );
    let pid = w.wait_running("counter");
    let s = wait_dumps(&w, 3);
    assert!(
        s["transparent"]["pause_us"].as_u64().is_some(),
        "status shows the pause: {s}"
    );
    let table = w.ftctl_ok(&["status"]);
    assert!(
        table.contains("T#"),
        "the table shows the checkpoint: {table}"
    );

    // Stopped, it is not dumped any more: the newest checkpoint is at most its count now.
    signal(pid, Signal::SIGSTOP);
    ftkit_tests::wait_stopped(pid, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    let stopped_at = last_count(&w).expect("the counter printed");
    let log_len = w.service_log("counter").len();
    signal(pid, Signal::SIGKILL);

    let s = w.wait_for("counter", "restored and running", RESTORE_TIMEOUT, |s| {
        s["state"] == "running" && s["restarts"] == 1
    });
    let restored = ftkit_tests::pid_of(&s).expect("running has a pid");
    assert!(pid_alive(restored));
    assert_eq!(restored, pid, "the restored process takes its old pid back");
    let ev = w.events_of_kind("counter", "restored");
    assert_eq!(ev.len(), 1, "{:?}", w.events_of("counter"));
    assert!(w.events_of_kind("counter", "restore_failed").is_empty());

    // What it prints now goes on from the checkpoint, not from 0 (no "ready" line either).
    let after = wait_until("output of the restored counter", RESTORE_TIMEOUT, || {
        let log = w.service_log("counter");
        let new = log.get(log_len..).unwrap_or_default().to_owned();
        (counts(&new).len() >= 5).then_some(new)
    });
    let new = counts(&after);
    assert!(!after.contains("ready"), "started from scratch: {after}");
    assert!(
        new[0] > 0 && new[0] <= stopped_at + 1,
        "first count after the restore is {} (stopped at {stopped_at})",
        new[0]
    );
    assert!(
        new.windows(2).all(|p| p[1] == p[0] + 1),
        "counts run on: {new:?}"
    );
    // It is supervised like a spawned one: checkpointed again, and a crash is seen.
    let seq = s["transparent"]["seq"].as_u64().unwrap_or(0);
    wait_dumps(&w, seq + 2);
    if ftkit_tests::cgroup2_mount().is_some() {
        let cg = ftkit_tests::cgroup_of(restored).unwrap_or_default();
        assert!(cg.contains("counter"), "in the service's cgroup: {cg:?}");
    }
    signal(restored, Signal::SIGKILL);
    w.wait_for("counter", "restored a second time", RESTORE_TIMEOUT, |s| {
        s["state"] == "running" && s["restarts"] == 2
    });
    assert_eq!(w.events_of_kind("counter", "restored").len(), 2);
}

#[test]
fn ftctl_checkpoint_and_rollback_round_trip() {
    let (_build, exe) = counter();
    let scratch = Scratch::new("tp-roll");
    let data = scratch.file("counter.data");
    // No period: every checkpoint comes from ftctl.
    let services = format!(
        "[[service]]\nname = \"counter\"\ncommand = {}\nargs = [{}]\n\
         checkpoint = {{ transparent = true }}\n\
         [[service]]\nname = \"plain\"\ncommand = \"/bin/sleep\"\nargs = [\"1000\"]\n",
        q(&exe),
        q(&data)
    );
    let w = Watchd::start("tp-roll", &services);
    let pid = w.wait_running("counter");
    w.wait_running("plain");
    wait_until("the counter printing", DUMPS_TIMEOUT, || {
        last_count(&w).filter(|n| *n > 10)
    });

    // Not checkpointed yet: rollback has nothing to go to (a negative answer).
    let out = w.ftctl(&["rollback", "counter"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    signal(pid, Signal::SIGSTOP);
    ftkit_tests::wait_stopped(pid, Duration::from_secs(5));
    let stopped_at = last_count(&w).expect("the counter printed");
    let first = json_lines(&w.ftctl_ok(&["checkpoint", "counter", "--json"]));
    let seq = first[0]["seq"].as_u64().expect("seq");
    assert!(
        first[0]["pages"].as_u64().is_some_and(|p| p > 0),
        "{first:?}"
    );
    assert!(first[0]["pause_us"].as_u64().is_some(), "{first:?}");
    assert_eq!(first[0]["pid"].as_u64(), Some(u64::from(pid)), "{first:?}");
    let text = w.ftctl_ok(&["checkpoint", "counter"]);
    assert!(
        text.contains(&format!("checkpoint #{} ", seq + 1)) && text.contains("pages"),
        "{text}"
    );
    signal(pid, Signal::SIGCONT);
    let s = w.service("counter");
    assert_eq!(s["transparent"]["seq"].as_u64(), Some(seq + 1), "{s}");
    assert_eq!(w.events_of_kind("counter", "checkpointed").len(), 2);

    let before = wait_until("the counter going on", DUMPS_TIMEOUT, || {
        last_count(&w).filter(|n| *n > stopped_at + LINES_BEFORE_ROLLBACK)
    });
    let log_before = w.service_log("counter");
    let rolled = json_lines(&w.ftctl_ok(&["rollback", "counter", &seq.to_string(), "--json"]));
    assert_eq!(rolled[0]["seq"].as_u64(), Some(seq), "{rolled:?}");
    assert_eq!(
        rolled[0]["pid"].as_u64(),
        Some(u64::from(pid)),
        "{rolled:?}"
    );
    // The log is not cut back: the rolled back process writes on at its end, from the
    // checkpoint's count.
    let replayed = replayed_counts(&w, &log_before, 5);
    assert!(
        (stopped_at..=stopped_at + 1).contains(&replayed[0]),
        "after the rollback the count is {}; checkpointed at {stopped_at}, {before} before",
        replayed[0]
    );
    assert_eq!(pid_of_counter(&w), Some(pid), "rolled back in place");
    assert_eq!(w.events_of_kind("counter", "rolled_back").len(), 1);

    // The newest one when no ID is given; text output names it.
    let text = w.ftctl_ok(&["rollback", "counter"]);
    assert!(text.contains(&format!("checkpoint #{}", seq + 1)), "{text}");

    // Clear answers: unknown service, a service without transparent checkpoints, an image
    // that does not exist.
    let out = w.ftctl(&["rollback", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = w.ftctl(&["rollback", "plain"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no transparent checkpoints"),
        "{out:?}"
    );
    let out = w.ftctl(&["rollback", "counter", "999"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = w.ftctl(&["checkpoint", "nosuch"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// Waits until the service log, which must still start with `log_before` (a rollback never
/// cuts it back), holds at least `n` counts after the count went back (the rollback's replay),
/// and returns those.
fn replayed_counts(w: &Watchd, log_before: &str, n: usize) -> Vec<u64> {
    wait_until(
        "the counter writing on after the rollback",
        DUMPS_TIMEOUT,
        || {
            let log = w.service_log("counter");
            assert!(
                log.starts_with(log_before),
                "the rollback rewrote the log ({} bytes before, {} now)",
                log_before.len(),
                log.len()
            );
            let all = counts(&log);
            let turn = all.windows(2).position(|p| p[1] <= p[0])?;
            let replayed = all[turn + 1..].to_vec();
            assert!(
                replayed.windows(2).all(|p| p[1] == p[0] + 1),
                "counts after the rollback run on: {replayed:?}"
            );
            (replayed.len() >= n).then_some(replayed)
        },
    )
}

/// Bytes appended to the service log between two checkpoints: far more than the memory the
/// counter writes in that time, so an image that kept the log would show it.
const LOG_FILLER: usize = 16 << 20;

#[test]
fn the_log_is_left_out_of_dumps_and_grows_on_across_a_rollback() {
    use std::io::Write;
    let (_build, exe) = counter();
    let scratch = Scratch::new("tp-log");
    let data = scratch.file("counter.data");
    let services = format!(
        "[[service]]\nname = \"counter\"\ncommand = {}\nargs = [{}]\n\
         checkpoint = {{ transparent = true }}\n",
        q(&exe),
        q(&data)
    );
    let w = Watchd::start("tp-log", &services);
    let pid = w.wait_running("counter");
    wait_until("the counter printing", DUMPS_TIMEOUT, || {
        last_count(&w).filter(|n| *n > 10)
    });
    let first = json_lines(&w.ftctl_ok(&["checkpoint", "counter", "--json"]));
    let seq = first[0]["seq"].as_u64().expect("seq");
    let first_bytes = first[0]["image_bytes"].as_u64().expect("image_bytes");
    let at_checkpoint = last_count(&w).expect("the counter printed");

    // The log grows by far more than the counter's memory changes (appended like watchd's
    // own descriptor does, O_APPEND); the next image does not.
    let log_path = w.data_dir().join("logs").join("counter.log");
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .expect("open the service log");
    let line = format!("{}\n", "#".repeat(1023));
    log.write_all(line.repeat(LOG_FILLER / line.len()).as_bytes())
        .expect("append to the service log");
    drop(log);
    let second = json_lines(&w.ftctl_ok(&["checkpoint", "counter", "--json"]));
    let second_bytes = second[0]["image_bytes"].as_u64().expect("image_bytes");
    let filler = u64::try_from(LOG_FILLER).expect("fits");
    assert!(
        second_bytes < filler && second_bytes < first_bytes + filler / 4,
        "the image grew with the log: {first_bytes} then {second_bytes} bytes"
    );

    wait_until("the counter going on", DUMPS_TIMEOUT, || {
        last_count(&w).filter(|n| *n > at_checkpoint + LINES_BEFORE_ROLLBACK)
    });
    let log_before = w.service_log("counter");
    assert!(log_before.len() > LOG_FILLER);
    w.ftctl_ok(&["rollback", "counter", &seq.to_string()]);
    let replayed = replayed_counts(&w, &log_before, 20);
    assert!(
        replayed[0] <= at_checkpoint + 1,
        "the count went back to the checkpoint: {replayed:?} (checkpointed at {at_checkpoint})"
    );
    assert_eq!(pid_of_counter(&w), Some(pid), "rolled back in place");
    assert!(w.service_log("counter").len() > log_before.len());
}

fn pid_of_counter(w: &Watchd) -> Option<u32> {
    ftkit_tests::pid_of(&w.service("counter"))
}

#[test]
fn bad_combinations_are_refused_at_load() {
    let scratch = Scratch::new("tp-config");
    let cases = [
        (
            "checkpoint = { every = \"1s\" }\nrestart_from = \"checkpoint\"",
            "needs transparent checkpoints",
        ),
        (
            "checkpoint = { transparent = true, every = \"50ms\" }",
            "at least 100ms apart",
        ),
        (
            "checkpoint = { transparent = true }\nrestart_from = \"checkpoint\"\nuser = \"nobody\"",
            "credentials",
        ),
        (
            "checkpoint = { transparent = true }\nrestart_from = \"checkpoint\"\nready = { notify = true }",
            "READY",
        ),
        ("restart_from = \"yesterday\"", "restart_from"),
    ];
    for (extra, expected) in cases {
        let config = scratch.write(
            "watchd.toml",
            &format!(
                "[watchd]\ndata_dir = {}\n[[service]]\nname = \"a\"\ncommand = \"/bin/true\"\n{extra}\n",
                q(scratch.file("data"))
            ),
        );
        let out = Command::new(ftkit_tests::binary("ftctl"))
            .arg("--config")
            .arg(&config)
            .arg("status")
            .output()
            .expect("run ftctl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}: {err}");
        assert!(
            err.contains(expected),
            "{extra}: expected {expected:?} in {err}"
        );
        assert!(
            err.contains("watchd.toml"),
            "{extra}: the file is named: {err}"
        );
    }
}

/// A probe sees the counter's data file go stale when it is SIGSTOPped: the hang verdict kills
/// it, and it comes back from its newest checkpoint (taken before it stopped: a stopped process
/// is not dumped), so the count goes on instead of starting again.
#[test]
fn a_hung_service_comes_back_from_its_checkpoint() {
    let (_build, exe) = counter();
    let scratch = Scratch::new("tp-hang");
    let data = scratch.file("counter.data");
    let probe = format!(
        "restart_from = \"checkpoint\"\n\
         [[service.probe]]\nkind = \"exec\"\n\
         command = [\"/bin/sh\", \"-c\", {}]\nperiod = \"300ms\"\nfailures = 3\n",
        q(format!(
            "test $(( $(date +%s) - $(stat -c %Y {}) )) -lt 2",
            data.display()
        ))
    );
    let w = Watchd::start("tp-hang", &service(&exe, &data, &probe));
    let pid = w.wait_running("counter");
    wait_dumps(&w, 3);
    signal(pid, Signal::SIGSTOP);
    ftkit_tests::wait_stopped(pid, Duration::from_secs(5));
    let stopped_at = last_count(&w).expect("the counter printed");
    let log_len = w.service_log("counter").len();

    w.wait_event("counter", "hang", RESTORE_TIMEOUT);
    w.wait_for("counter", "restored and running", RESTORE_TIMEOUT, |s| {
        s["state"] == "running" && s["restarts"] == 1
    });
    assert_eq!(
        w.events_of_kind("counter", "restored").len(),
        1,
        "{:?}",
        w.events_of("counter")
    );
    let after = wait_until("output of the restored counter", RESTORE_TIMEOUT, || {
        let log = w.service_log("counter");
        let new = log.get(log_len..).unwrap_or_default().to_owned();
        (counts(&new).len() >= 5).then_some(new)
    });
    let new = counts(&after);
    assert!(
        new[0] > 0 && new[0] <= stopped_at + 1,
        "first count after the restore is {} (stopped at {stopped_at})",
        new[0]
    );
    // Running again, the probe passes: no second hang.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.events_of_kind("counter", "hang").len(), 1);
}
