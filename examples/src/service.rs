//! What an example needs to run as a watchd service and standalone alike: output lines that
//! reach the supervisor's log at once, lenient registration with watchd (none without
//! `FT_SOCKET`), and failures reported once per distinct message. Nothing here exits or
//! panics: every failure is printed and the program carries on.

use std::io::Write;
use std::sync::Arc;

use ft::{Error, Watch};

/// Prints `program[pid]: text` and flushes at once, so that a supervisor's log shows it before
/// a crash.
pub fn say(program: &str, text: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{program}[{}]: {text}", std::process::id());
    let _ = out.flush();
}

/// Registers with watchd when `FT_SOCKET` is set. A first registration that fails is kept
/// (libft retries with the next heartbeat); without `FT_SOCKET` the program runs standalone.
pub fn register(program: &str) -> Option<Arc<Watch>> {
    match Watch::register_lenient() {
        Ok((watch, Ok(()))) => {
            say(
                program,
                format_args!(
                    "registered with watchd at {}",
                    watch.socket_path().display()
                ),
            );
            Some(Arc::new(watch))
        }
        Ok((watch, Err(e))) => {
            say(
                program,
                format_args!("ft_reg_watch failed: {e} (will retry with the next heartbeat)"),
            );
            Some(Arc::new(watch))
        }
        Err(Error::NoSocket) => {
            say(
                program,
                format_args!("warning: FT_SOCKET is not set, running without watchd"),
            );
            None
        }
        Err(e) => {
            say(
                program,
                format_args!("ft_reg_watch failed: {e}; running without watchd"),
            );
            None
        }
    }
}

/// Says a failure once per distinct message (watchd may be down for a while), and when the
/// call works again.
#[derive(Debug)]
pub struct Complaint {
    program: &'static str,
    last: Option<String>,
}

impl Complaint {
    /// No complaint yet, for `program`'s output lines.
    pub fn new(program: &'static str) -> Complaint {
        Complaint {
            program,
            last: None,
        }
    }

    /// Reports `result` of `call` if it differs from the last one reported.
    pub fn check<E: std::fmt::Display>(&mut self, call: &str, result: Result<(), E>) {
        match result {
            Ok(()) => {
                if self.last.take().is_some() {
                    say(self.program, format_args!("{call} works again"));
                }
            }
            Err(e) => {
                let text = e.to_string();
                if self.last.as_ref() != Some(&text) {
                    say(self.program, format_args!("{call} failed: {text}"));
                    self.last = Some(text);
                }
            }
        }
    }
}
