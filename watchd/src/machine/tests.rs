//! Simulated-time tests of the supervision rules.

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn rules() -> Rules {
    Rules {
        policy: RestartPolicy::OnFailure,
        immediate_first: true,
        backoff_initial: ms(100),
        backoff_max: ms(1000),
        backoff_factor: 2.0,
        jitter: 0.0,
        stable_after: ms(5000),
        max_restarts: 5,
        window: ms(60_000),
        ready_notify: false,
        ready_timeout: ms(3000),
        ready_delay: Duration::ZERO,
        stop_grace: ms(2000),
        heartbeat: true,
        watchdog: None,
        probe_failures: vec![],
        max_rss: None,
        rejuvenate_every: None,
        delivery_grace: Duration::ZERO,
    }
}

/// A machine plus a simulated clock and a fake executor that hands out pids.
struct Sim {
    m: ServiceMachine,
    t0: Instant,
    now: Instant,
    next_pid: u32,
    events: Vec<Event>,
    spawns: Vec<Instant>,
    signals: Vec<(u32, TreeSignal)>,
    escalations: Vec<String>,
}

impl Sim {
    fn new(r: Rules) -> Sim {
        let t0 = Instant::now();
        Sim {
            m: ServiceMachine::new(r, 42),
            t0,
            now: t0,
            next_pid: 100,
            events: vec![],
            spawns: vec![],
            signals: vec![],
            escalations: vec![],
        }
    }

    /// Feeds an input and carries out the actions like the actor would (spawns succeed).
    fn feed(&mut self, input: Input) {
        let mut queue = vec![input];
        while let Some(i) = queue.pop() {
            for a in self.m.step(self.now, i) {
                match a {
                    Action::Spawn => {
                        self.spawns.push(self.now);
                        self.next_pid += 1;
                        queue.push(Input::Spawned { pid: self.next_pid });
                    }
                    Action::Signal { pid, signal } => self.signals.push((pid, signal)),
                    Action::Report(e) => self.events.push(e),
                    Action::Escalate { reason } => self.escalations.push(reason),
                }
            }
        }
    }

    /// Advances the clock to `at`, firing ticks at every deadline on the way, like the timer.
    fn advance_to(&mut self, at: Instant) {
        while let Some(d) = self.m.next_deadline() {
            if d > at {
                break;
            }
            self.now = self.now.max(d);
            self.feed(Input::Tick);
        }
        self.now = at;
        self.feed(Input::Tick);
    }

    fn advance(&mut self, d: Duration) {
        let at = self.now + d;
        self.advance_to(at);
    }

    fn pid(&self) -> u32 {
        self.m.pid().expect("a process")
    }

    fn crash(&mut self) {
        let pid = self.pid();
        self.feed(Input::Exited {
            pid,
            status: ExitStatus::Signal(9),
        });
    }

    fn kinds(&self) -> Vec<EventKind> {
        self.events.iter().map(|e| e.kind).collect()
    }

    fn state(&self) -> String {
        self.m.view(self.now).state
    }
}

#[test]
fn start_spawns_and_is_running_without_readiness_notification() {
    let mut s = Sim::new(rules());
    s.feed(Input::Start);
    assert_eq!(s.spawns.len(), 1);
    assert_eq!(s.state(), "running");
    assert_eq!(s.kinds(), vec![EventKind::Spawned, EventKind::Ready]);
}

#[test]
fn first_crash_restarts_at_once_then_backoff_doubles_up_to_the_cap() {
    let mut r = rules();
    r.max_restarts = 100;
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    let mut delays = vec![];
    for _ in 0..7 {
        let before = s.spawns.len();
        s.crash();
        let crashed_at = s.now;
        // Let time run until the restart happens.
        while s.spawns.len() == before {
            let d = s.m.next_deadline().expect("a restart is scheduled");
            s.advance_to(d);
        }
        delays.push(s.spawns[before] - crashed_at);
    }
    assert_eq!(
        delays,
        vec![
            ms(0),
            ms(100),
            ms(200),
            ms(400),
            ms(800),
            ms(1000),
            ms(1000)
        ]
    );
}

#[test]
fn jitter_stays_within_its_fraction() {
    let mut r = rules();
    r.jitter = 0.2;
    r.max_restarts = 1000;
    r.backoff_max = ms(100);
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    s.crash(); // immediate
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        s.crash();
        let Phase::BackingOff { until } = *s.m.phase() else {
            panic!("backing off")
        };
        let d = until - s.now;
        assert!(
            d >= ms(80) && d <= ms(100),
            "delay {d:?} out of [80, 100] ms"
        );
        seen.insert(d.as_micros());
        s.advance_to(until);
    }
    assert!(
        seen.len() > 50,
        "jitter should vary the delay, saw {} values",
        seen.len()
    );
}

#[test]
fn stable_run_resets_the_backoff() {
    let mut s = Sim::new(rules());
    s.feed(Input::Start);
    s.crash();
    s.crash();
    assert!(matches!(s.m.phase(), Phase::BackingOff { .. }));
    s.advance(ms(100));
    assert_eq!(s.state(), "running");
    s.advance(ms(5000)); // stable_after
    assert_eq!(s.m.view(s.now).consecutive_failures, 0);
    let n = s.spawns.len();
    s.crash();
    assert_eq!(
        s.spawns.len(),
        n + 1,
        "restarted at once again after a stable run"
    );
}

#[test]
fn budget_exhausted_fails_and_escalates_once() {
    let mut r = rules();
    r.max_restarts = 3;
    r.backoff_initial = ms(10);
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    for _ in 0..3 {
        s.crash();
        s.advance(ms(50));
        assert_eq!(s.state(), "running");
    }
    s.crash();
    assert_eq!(s.state(), "failed");
    assert_eq!(s.escalations.len(), 1);
    assert!(
        s.escalations[0].contains("restart budget exhausted"),
        "{}",
        s.escalations[0]
    );
    assert!(s.kinds().contains(&EventKind::Failed));
    // Nothing more happens on its own.
    assert_eq!(s.m.next_deadline(), None);
    s.advance(ms(100_000));
    assert_eq!(s.state(), "failed");
    // An operator's start is a fresh start.
    s.feed(Input::Start);
    assert_eq!(s.state(), "running");
}

#[test]
fn restarts_outside_the_window_do_not_count() {
    let mut r = rules();
    r.max_restarts = 2;
    r.window = ms(1000);
    r.immediate_first = true;
    r.stable_after = ms(100);
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    for _ in 0..10 {
        s.advance(ms(600));
        s.crash();
        assert_ne!(s.state(), "failed");
    }
}

#[test]
fn policies_decide_on_exit_status() {
    for (policy, status, expect_restart, expect_state) in [
        (RestartPolicy::Always, ExitStatus::Code(0), true, "running"),
        (
            RestartPolicy::OnFailure,
            ExitStatus::Code(0),
            false,
            "stopped",
        ),
        (
            RestartPolicy::OnFailure,
            ExitStatus::Code(1),
            true,
            "running",
        ),
        (
            RestartPolicy::OnFailure,
            ExitStatus::Unknown,
            true,
            "running",
        ),
        (RestartPolicy::Never, ExitStatus::Code(1), false, "failed"),
        (RestartPolicy::Never, ExitStatus::Code(0), false, "stopped"),
    ] {
        let mut r = rules();
        r.policy = policy;
        let mut s = Sim::new(r);
        s.feed(Input::Start);
        let pid = s.pid();
        s.feed(Input::Exited { pid, status });
        assert_eq!(s.spawns.len() == 2, expect_restart, "{policy:?} {status:?}");
        assert_eq!(s.state(), expect_state, "{policy:?} {status:?}");
    }
}

#[test]
fn stop_sends_term_then_kill_after_grace_and_stays_stopped() {
    let mut s = Sim::new(rules());
    s.feed(Input::Start);
    let pid = s.pid();
    s.feed(Input::Stop);
    assert_eq!(s.signals, vec![(pid, TreeSignal::Term)]);
    assert_eq!(s.state(), "stopping");
    s.advance(ms(1999));
    assert_eq!(s.signals.len(), 1);
    s.advance(ms(1));
    assert_eq!(
        s.signals,
        vec![(pid, TreeSignal::Term), (pid, TreeSignal::Kill)]
    );
    s.feed(Input::Exited {
        pid,
        status: ExitStatus::Signal(9),
    });
    assert_eq!(s.state(), "stopped");
    assert_eq!(s.spawns.len(), 1, "a stopped service is not restarted");
}

#[test]
fn manual_restart_does_not_count_against_the_budget() {
    let mut r = rules();
    r.max_restarts = 1;
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    for _ in 0..5 {
        let pid = s.pid();
        s.feed(Input::Restart);
        s.feed(Input::Exited {
            pid,
            status: ExitStatus::Signal(15),
        });
        assert_eq!(s.state(), "running");
    }
    assert_eq!(s.m.view(s.now).restarts_in_window, 0);
}

#[test]
fn heartbeat_deadline_missed_is_a_hang_killed_and_restarted() {
    let mut s = Sim::new(rules());
    s.feed(Input::Start);
    let pid = s.pid();
    s.feed(Input::Register);
    s.feed(Input::Heartbeat {
        tid: 1,
        timeout: ms(500),
    });
    s.advance(ms(400));
    s.feed(Input::Heartbeat {
        tid: 1,
        timeout: ms(500),
    });
    s.advance(ms(499));
    assert!(s.signals.is_empty(), "renewed deadline not reached yet");
    s.advance(ms(1));
    assert_eq!(
        s.signals,
        vec![(pid, TreeSignal::Kill)],
        "hang verdict kills the tree at once"
    );
    assert!(s.kinds().contains(&EventKind::Hang));
    let hang = s
        .events
        .iter()
        .find(|e| e.kind == EventKind::Hang)
        .expect("hang");
    assert!(hang.detail.contains("thread 1"), "{}", hang.detail);
    s.feed(Input::Exited {
        pid,
        status: ExitStatus::Signal(9),
    });
    assert_eq!(s.state(), "running");
    assert_eq!(s.spawns.len(), 2);
}

#[test]
fn leaving_the_region_ends_monitoring_of_that_thread() {
    let mut s = Sim::new(rules());
    s.feed(Input::Start);
    s.feed(Input::Heartbeat {
        tid: 1,
        timeout: ms(100),
    });
    s.feed(Input::Heartbeat {
        tid: 2,
        timeout: ms(300),
    });
    s.feed(Input::HeartbeatEnd { tid: 1 });
    s.advance(ms(200));
    assert!(s.signals.is_empty());
    s.advance(ms(100));
    assert_eq!(s.signals.len(), 1, "thread 2 is still monitored");
}

#[test]
fn unregister_drops_all_regions() {
    let mut s = Sim::new(rules());
    s.feed(Input::Start);
    s.feed(Input::Heartbeat {
        tid: 1,
        timeout: ms(100),
    });
    s.feed(Input::Unregister);
    s.advance(ms(10_000));
    assert!(s.signals.is_empty());
}

#[test]
fn heartbeats_ignored_when_disabled() {
    let mut r = rules();
    r.heartbeat = false;
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    s.feed(Input::Heartbeat {
        tid: 1,
        timeout: ms(100),
    });
    s.advance(ms(10_000));
    assert!(s.signals.is_empty());
}

#[test]
fn sd_notify_watchdog_armed_at_spawn_and_renewed() {
    let mut r = rules();
    r.watchdog = Some(ms(1000));
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    s.advance(ms(900));
    s.feed(Input::Watchdog);
    s.advance(ms(900));
    assert!(s.signals.is_empty());
    s.advance(ms(100));
    assert_eq!(s.signals.len(), 1);
    let hang = s
        .events
        .iter()
        .find(|e| e.kind == EventKind::Hang)
        .expect("hang");
    assert!(hang.detail.contains("WATCHDOG"), "{}", hang.detail);
}

#[test]
fn watchdog_trigger_is_an_immediate_hang() {
    let mut s = Sim::new(rules());
    s.feed(Input::Start);
    s.feed(Input::WatchdogTrigger);
    assert_eq!(s.signals.len(), 1);
}

#[test]
fn readiness_by_notification_or_timeout() {
    let mut r = rules();
    r.ready_notify = true;
    let mut s = Sim::new(r.clone());
    s.feed(Input::Start);
    assert_eq!(s.state(), "starting");
    s.advance(ms(1000));
    s.feed(Input::Ready);
    assert_eq!(s.state(), "running");
    s.advance(ms(10_000));
    assert!(s.signals.is_empty());

    let mut s = Sim::new(r);
    s.feed(Input::Start);
    s.advance(ms(3000));
    assert_eq!(s.signals.len(), 1, "no READY within the timeout is a hang");
}

#[test]
fn every_ready_of_the_current_process_is_counted_and_a_new_process_starts_from_zero() {
    let mut r = rules();
    r.ready_notify = true;
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    s.feed(Input::Ready);
    assert_eq!(
        (s.state().as_str(), s.m.view(s.now).readies),
        ("running", 1)
    );
    // A promoted warm standby says READY again once it serves.
    s.feed(Input::Ready);
    assert_eq!(s.m.view(s.now).readies, 2);
    s.crash();
    s.advance(ms(10_000));
    assert_eq!(s.m.view(s.now).readies, 0, "{}", s.state());
}

#[test]
fn ready_delay_without_notification() {
    let mut r = rules();
    r.ready_delay = ms(500);
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    assert_eq!(s.state(), "starting");
    s.advance(ms(499));
    assert_eq!(s.state(), "starting");
    s.advance(ms(1));
    assert_eq!(s.state(), "running");
}

#[test]
fn probes_count_consecutive_failures_only_while_running() {
    let mut r = rules();
    r.probe_failures = vec![3];
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    let fail = |s: &mut Sim| {
        s.feed(Input::Probe {
            index: 0,
            ok: false,
            detail: "refused".into(),
        })
    };
    fail(&mut s);
    fail(&mut s);
    s.feed(Input::Probe {
        index: 0,
        ok: true,
        detail: String::new(),
    });
    fail(&mut s);
    fail(&mut s);
    assert!(s.signals.is_empty());
    fail(&mut s);
    assert_eq!(s.signals.len(), 1);
    // Out-of-range index is ignored, not a panic.
    s.feed(Input::Probe {
        index: 7,
        ok: false,
        detail: String::new(),
    });
}

#[test]
fn rejuvenation_by_rss_and_schedule_restarts_without_failure() {
    let mut r = rules();
    r.max_rss = Some(1000);
    r.rejuvenate_every = Some(ms(10_000));
    r.max_restarts = 0; // rejuvenation must not need the budget
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    s.feed(Input::Rss { bytes: 999 });
    assert!(s.signals.is_empty());
    let pid = s.pid();
    s.feed(Input::Rss { bytes: 1001 });
    assert_eq!(s.signals, vec![(pid, TreeSignal::Term)]);
    s.feed(Input::Exited {
        pid,
        status: ExitStatus::Signal(15),
    });
    assert_eq!(s.state(), "running");
    let pid = s.pid();
    s.advance(ms(10_000));
    assert_eq!(s.signals.last(), Some(&(pid, TreeSignal::Term)));
    s.feed(Input::Exited {
        pid,
        status: ExitStatus::Code(0),
    });
    assert_eq!(s.state(), "running");
    assert_eq!(
        s.kinds()
            .iter()
            .filter(|k| **k == EventKind::Rejuvenate)
            .count(),
        2
    );
}

#[test]
fn stop_during_spawn_and_backoff() {
    let mut s = Sim::new(rules());
    // Stop while spawning: the process is stopped as soon as it exists.
    let _ = s.m.step(s.now, Input::Start);
    let _ = s.m.step(s.now, Input::Stop);
    let acts = s.m.step(s.now, Input::Spawned { pid: 7 });
    assert!(acts.contains(&Action::Signal {
        pid: 7,
        signal: TreeSignal::Term
    }));
    // Stop while backing off.
    let mut s = Sim::new(rules());
    s.feed(Input::Start);
    s.crash();
    s.crash();
    assert_eq!(s.state(), "backoff");
    s.feed(Input::Stop);
    assert_eq!(s.state(), "stopped");
    s.advance(ms(10_000));
    assert_eq!(s.state(), "stopped");
}

#[test]
fn spawn_failures_use_the_budget() {
    let mut r = rules();
    r.max_restarts = 2;
    let mut m = ServiceMachine::new(r, 1);
    let t0 = Instant::now();
    let mut now = t0;
    assert_eq!(m.step(now, Input::Start), vec![Action::Spawn]);
    let mut escalated = false;
    for _ in 0..10 {
        let acts = m.step(
            now,
            Input::SpawnFailed {
                error: "No such file".into(),
            },
        );
        escalated |= acts.iter().any(|a| matches!(a, Action::Escalate { .. }));
        if let Some(d) = m.next_deadline() {
            now = d;
            let _ = m.step(now, Input::Tick);
        }
        if escalated {
            break;
        }
    }
    assert!(escalated);
    assert_eq!(m.view(now).state, "failed");
}

#[test]
fn exits_of_other_pids_are_ignored() {
    let mut s = Sim::new(rules());
    s.feed(Input::Start);
    let pid = s.pid();
    s.feed(Input::Exited {
        pid: pid + 1000,
        status: ExitStatus::Code(1),
    });
    assert_eq!(s.pid(), pid);
    assert_eq!(s.spawns.len(), 1);
}

#[test]
fn adopted_process_is_running_and_monitored() {
    let mut r = rules();
    r.watchdog = Some(ms(100));
    let mut s = Sim::new(r);
    s.feed(Input::Adopted { pid: 55 });
    assert_eq!(s.state(), "running");
    assert_eq!(s.pid(), 55);
    s.advance(ms(100));
    assert_eq!(s.signals, vec![(55, TreeSignal::Kill)]);
    s.feed(Input::Exited {
        pid: 55,
        status: ExitStatus::Unknown,
    });
    assert_eq!(s.state(), "running");
    assert_ne!(s.pid(), 55);
}

/// Random inputs at random times: no panic, and the invariants hold at every step.
#[test]
fn random_inputs_keep_invariants() {
    for seed in 0..300u64 {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut r = rules();
        r.watchdog = (rnd(2) == 0).then(|| ms(50 + rnd(500)));
        r.ready_notify = rnd(2) == 0;
        r.probe_failures = vec![1 + u32::try_from(rnd(3)).expect("small")];
        r.max_restarts = u32::try_from(rnd(6)).expect("small");
        r.policy = [
            RestartPolicy::Always,
            RestartPolicy::OnFailure,
            RestartPolicy::Never,
        ][usize::try_from(rnd(3)).expect("small")];
        let mut s = Sim::new(r);
        for _ in 0..400 {
            let pid = s.m.pid().unwrap_or(1);
            let input = match rnd(14) {
                0 => Input::Start,
                1 => Input::Stop,
                2 => Input::Restart,
                3 => Input::Exited {
                    pid,
                    status: ExitStatus::Code(i32::try_from(rnd(3)).expect("small")),
                },
                4 => Input::Ready,
                5 => Input::Heartbeat {
                    tid: u32::try_from(rnd(3)).expect("small"),
                    timeout: ms(rnd(300)),
                },
                6 => Input::HeartbeatEnd {
                    tid: u32::try_from(rnd(3)).expect("small"),
                },
                7 => Input::Watchdog,
                8 => Input::Probe {
                    index: usize::try_from(rnd(2)).expect("small"),
                    ok: rnd(2) == 0,
                    detail: String::new(),
                },
                9 => Input::Rss { bytes: rnd(10_000) },
                10 => Input::Unregister,
                _ => Input::Tick,
            };
            s.feed(input);
            s.advance(ms(rnd(200)));
            // Invariants.
            if let Some(d) = s.m.next_deadline() {
                assert!(d >= s.t0);
            }
            let v = s.m.view(s.now);
            match v.state.as_str() {
                "running" | "starting" | "stopping" => {
                    assert!(v.pid.is_some(), "seed {seed}: {v:?}")
                }
                "stopped" | "failed" | "backoff" => assert!(v.pid.is_none(), "seed {seed}: {v:?}"),
                other => panic!("unknown state {other}"),
            }
            assert!(
                v.restarts_in_window <= s.m.rules.max_restarts,
                "seed {seed}: budget overrun {v:?}"
            );
            if v.state != "failed" {
                assert!(v.failed_reason.is_none());
            }
        }
    }
}

#[test]
fn what_a_new_process_says_before_its_spawn_is_seen_is_kept() {
    let mut r = rules();
    r.ready_notify = true;
    let mut m = ServiceMachine::new(r, 3);
    let t0 = Instant::now();
    assert_eq!(m.step(t0, Input::Start), vec![Action::Spawn]);
    // The child speaks before the executor reports the spawn.
    let _ = m.step(t0, Input::Register);
    let _ = m.step(
        t0,
        Input::Heartbeat {
            tid: 9,
            timeout: ms(300),
        },
    );
    let _ = m.step(t0, Input::Ready);
    let _ = m.step(t0 + ms(1), Input::Spawned { pid: 77 });
    let v = m.view(t0 + ms(1));
    assert_eq!(v.state, "running");
    assert_eq!(v.heartbeats.len(), 1);
    // And its heartbeat deadline is enforced.
    let acts = m.step(t0 + ms(300), Input::Tick);
    assert!(
        acts.contains(&Action::Signal {
            pid: 77,
            signal: TreeSignal::Kill
        }),
        "{acts:?}"
    );
}

#[test]
fn deadlines_are_judged_after_the_delivery_grace() {
    let mut r = rules();
    r.delivery_grace = ms(5);
    r.watchdog = Some(ms(100));
    let mut s = Sim::new(r);
    s.feed(Input::Start);
    s.feed(Input::Watchdog);
    s.feed(Input::Heartbeat {
        tid: 1,
        timeout: ms(50),
    });
    s.advance(ms(54));
    assert!(s.signals.is_empty(), "a heartbeat may still be on its way");
    s.advance(ms(1));
    assert_eq!(s.signals.len(), 1, "missed: judged at deadline + grace");
}

#[test]
fn spawns_after_a_failure_are_marked_for_restore() {
    let mut r = rules();
    r.rejuvenate_every = Some(ms(60_000));
    let mut sim = Sim::new(r);
    sim.feed(Input::Start);
    assert!(!sim.m.spawn_after_failure(), "an operator's start is fresh");
    sim.crash();
    assert!(
        sim.m.spawn_after_failure(),
        "the immediate restart after a crash"
    );
    sim.crash();
    assert_eq!(sim.state(), "backoff");
    sim.advance(ms(1000));
    assert_eq!(sim.state(), "running");
    assert!(sim.m.spawn_after_failure(), "the restart after a backoff");
    sim.feed(Input::Restart);
    let pid = sim.pid();
    sim.feed(Input::Exited {
        pid,
        status: ExitStatus::Signal(15),
    });
    assert!(
        !sim.m.spawn_after_failure(),
        "an operator's restart is fresh"
    );
    sim.feed(Input::WatchdogTrigger);
    let pid = sim.pid();
    sim.feed(Input::Exited {
        pid,
        status: ExitStatus::Signal(9),
    });
    sim.advance(ms(1000));
    assert_eq!(sim.state(), "running");
    assert!(
        sim.m.spawn_after_failure(),
        "the restart after a hang verdict"
    );
    sim.advance(ms(61_000));
    let pid = sim.pid();
    sim.feed(Input::Exited {
        pid,
        status: ExitStatus::Signal(15),
    });
    assert!(
        sim.kinds().contains(&EventKind::Rejuvenate),
        "{:?}",
        sim.kinds()
    );
    assert!(!sim.m.spawn_after_failure(), "a rejuvenation is fresh");
}
