//! Short-lived helper commands that watchd runs and waits for (probe commands, `exec` resource
//! agents): their whole process group dies with the wait, and their end is told in watchd's
//! own terms. It never touches a service's processes (those are `process`'s).

use std::os::unix::process::ExitStatusExt;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;

use crate::machine::ExitStatus;

/// How a command ended.
pub(crate) fn exit_status(status: std::process::ExitStatus) -> ExitStatus {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitStatus::Code(code),
        (None, Some(signal)) => ExitStatus::Signal(signal),
        (None, None) => ExitStatus::Unknown,
    }
}

/// SIGKILLs a command's process group when dropped or asked, unless disarmed: a caller that
/// stops waiting (its bound passed, or its future was dropped) leaves nothing running.
#[derive(Debug)]
pub(crate) struct GroupKill {
    group: Option<Pid>,
}

impl GroupKill {
    /// For `child`, which called setpgid(0, 0) before exec, so its pid is its group id.
    pub(crate) fn of(child: &Child) -> GroupKill {
        let group = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .filter(|&p| p > 0)
            .map(Pid::from_raw);
        GroupKill { group }
    }

    /// Kills the group now (once).
    pub(crate) fn kill(&mut self) {
        if let Some(group) = self.group.take() {
            // ESRCH (everyone already gone) is fine.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }

    /// The command ended by itself: nothing to kill.
    pub(crate) fn disarm(&mut self) {
        self.group = None;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.kill();
    }
}
