//! Diagnostics of the shim itself: one line on stderr per kind of failure, once per process.
//!
//! Owns the rule "a failure inside the shim never fails the application's call". Must never
//! allocate or take a lock: it formats into a stack buffer and writes with a raw syscall.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU32, Ordering};

/// What went wrong, one bit each, so each kind is reported once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Trouble {
    /// `FT_REPL_FILESETS` could not be used.
    Config = 1 << 0,
    /// Appending an operation to a ring failed.
    Append = 1 << 1,
    /// A path could not be canonicalized (no /proc, too long, ...).
    Path = 1 << 2,
    /// A position or size needed for an operation could not be read.
    Position = 1 << 3,
    /// A file's contents could not be read back for an operation.
    ReadBack = 1 << 4,
    /// A panic was caught inside the shim.
    Panic = 1 << 5,
    /// A descriptor number beyond the tracked range.
    FdRange = 1 << 6,
    /// A stdio stream could not be given a tracking cookie.
    Stream = 1 << 7,
    /// An entry the operation log cannot express (device node, FIFO, socket).
    Unsupported = 1 << 8,
    /// A call arrived while the shim was busy on the same thread (signal handler).
    Reentered = 1 << 9,
}

static REPORTED: AtomicU32 = AtomicU32::new(0);

/// Longest diagnostic line; longer ones are cut.
const LINE_BYTES: usize = 512;

struct Line {
    buf: [u8; LINE_BYTES],
    len: usize,
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = LINE_BYTES.saturating_sub(self.len + 1);
        let take = s.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// Reports `what` on stderr unless a trouble of this kind was already reported.
pub(crate) fn report(kind: Trouble, what: fmt::Arguments<'_>) {
    let bit = kind as u32;
    if REPORTED.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
        return;
    }
    let mut line = Line {
        buf: [0; LINE_BYTES],
        len: 0,
    };
    let _ = write!(line, "libftrepl[{}]: ", std::process::id());
    let _ = line.write_fmt(what);
    let _ = line.write_str(" (further problems of this kind are not reported)");
    line.buf[line.len] = b'\n';
    line.len += 1;
    let saved = crate::reentry::Errno::save();
    // SAFETY: the buffer is valid for `line.len` bytes; a raw syscall bypasses our own
    // `write` wrapper, so reporting can never recurse.
    unsafe {
        libc::syscall(
            libc::SYS_write,
            libc::STDERR_FILENO,
            line.buf.as_ptr(),
            line.len,
        );
    }
    saved.restore();
}
