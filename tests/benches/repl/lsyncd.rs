//! The peer of copy mode: a private lsyncd (Debian package `lsyncd`, rsync underneath) syncing
//! a source directory to a local target directory with the same delay as copy mode's quiet
//! interval, from a configuration file written here.
//!
//! Owns the lsyncd configuration and the process; it never touches a system-wide lsyncd.

use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// How long lsyncd may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two looks at a stopping lsyncd.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Bytes of lsyncd's output shown when it fails.
const LOG_TAIL: usize = 2000;

/// The configuration file's text.
pub fn config(source: &Path, target: &Path, log: &Path, delay: Duration) -> String {
    format!(
        "settings {{\n    nodaemon = true,\n    logfile = {},\n}}\n\
         sync {{\n    default.rsync,\n    source = {},\n    target = {},\n    delay = {},\n}}\n",
        lua(log),
        lua(source),
        lua(target),
        delay.as_secs_f64()
    )
}

fn lua(p: &Path) -> String {
    // A JSON string is a valid Lua string for the characters a JSON encoder escapes.
    serde_json::to_string(&p.display().to_string()).expect("a string always serialises")
}

/// A running lsyncd; dropping it stops it.
#[derive(Debug)]
pub struct Lsyncd {
    child: Option<Child>,
    output: PathBuf,
}

impl Lsyncd {
    pub fn start(dir: &Path, source: &Path, target: &Path, delay: Duration) -> Result<Lsyncd> {
        fs::create_dir_all(dir)?;
        let conf = dir.join("lsyncd.conf.lua");
        let text = config(source, target, &dir.join("lsyncd.log"), delay);
        fs::write(&conf, &text)?;
        let output = dir.join("lsyncd.out");
        let out = fs::File::create(&output)?;
        let err = out.try_clone()?;
        let child = Command::new("lsyncd")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .context("spawning lsyncd")?;
        Ok(Lsyncd {
            child: Some(child),
            output,
        })
    }

    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            self.child = None;
            let text = fs::read_to_string(&self.output).unwrap_or_default();
            let tail = &text[text.len().saturating_sub(LOG_TAIL)..];
            bail!("lsyncd exited with {status}:\n{tail}");
        }
        Ok(())
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // lsyncd's rsync children are in its process group.
            let _ = signal::killpg(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let end = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < end {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(STOP_POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Lsyncd {
    fn drop(&mut self) {
        self.stop();
    }
}
