//! The C ABI of libft (`libft.so`, `libft.a`, `include/ft.h`), named after NT-SwiFT.
//!
//! Owns the process-wide [`Watch`] behind `ft_reg_watch`. Every exported function runs inside
//! a panic boundary, NULL-checks its pointers and returns an `FT_E*` code: nothing here may
//! unwind into C, abort the process, block or allocate on the heartbeat path.

use std::ffi::{CStr, c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use crate::watch::{Error, Watch};

/// Success.
pub const FT_OK: c_int = 0;
/// FT_SOCKET is not set: the process does not run under watchd.
pub const FT_ENOSOCKET: c_int = -1;
/// watchd cannot be reached, even after one reconnect.
pub const FT_EUNREACHABLE: c_int = -2;
/// watchd's queue is full; the message was dropped.
pub const FT_EAGAIN: c_int = -3;
/// ft_reg_watch has not succeeded yet (or ft_del_watch was called).
pub const FT_ENOTREG: c_int = -4;
/// An argument is invalid (NULL pointer, text not UTF-8).
pub const FT_EINVAL: c_int = -5;
/// libft hit an internal bug; the call had no effect on the application.
pub const FT_EPANIC: c_int = -6;
/// Another I/O error on the socket to watchd.
pub const FT_EIO: c_int = -7;

/// The process-wide registration. A read lock on the heartbeat path is uncontended in
/// practice (writers are only ft_reg_watch and ft_del_watch) and allocates nothing.
static WATCH: RwLock<Option<Watch>> = RwLock::new(None);

fn code_of(result: Result<(), Error>) -> c_int {
    match result {
        Ok(()) => FT_OK,
        Err(Error::NoSocket) => FT_ENOSOCKET,
        Err(Error::Unreachable(_)) => FT_EUNREACHABLE,
        Err(Error::WouldBlock) => FT_EAGAIN,
        Err(Error::InvalidArgument(_)) => FT_EINVAL,
        Err(Error::Io(_)) => FT_EIO,
    }
}

/// Runs `body` behind the panic boundary that every exported function needs.
fn boundary(body: impl FnOnce() -> c_int) -> c_int {
    boundary_or(FT_EPANIC, body)
}

/// Like [`boundary`], returning `on_panic` when `body` panics.
fn boundary_or<T>(on_panic: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(on_panic)
}

/// Runs `call` on the registered Watch, or returns FT_ENOTREG.
fn with_watch(call: impl FnOnce(&Watch) -> Result<(), Error>) -> c_int {
    boundary(|| {
        let guard = WATCH.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(watch) => code_of(call(watch)),
            None => FT_ENOTREG,
        }
    })
}

/// Registers the process with the watchd named by the FT_SOCKET environment variable.
///
/// Returns FT_OK when watchd received the registration. FT_ENOSOCKET (FT_SOCKET unset) and
/// FT_EIO from creating the socket register nothing. Any other error (FT_EUNREACHABLE while
/// watchd restarts, FT_EAGAIN) is the fate of the first message only: the registration is
/// kept, and later calls reconnect and register first, so a program may carry on. Calling it
/// again replaces the registration with a fresh one.
#[unsafe(no_mangle)]
pub extern "C" fn ft_reg_watch() -> c_int {
    boundary(|| match Watch::register_lenient() {
        Ok((watch, first)) => {
            *WATCH.write().unwrap_or_else(PoisonError::into_inner) = Some(watch);
            code_of(first)
        }
        Err(e) => code_of(Err(e)),
    })
}

/// FtHbeat: thread `tid` entered (or renews) a monitored region and promises its next
/// heartbeat, or ft_hbeat_end, within `timeout_ms` milliseconds. One non-blocking send.
#[unsafe(no_mangle)]
pub extern "C" fn ft_hbeat(tid: u32, timeout_ms: u32) -> c_int {
    with_watch(|w| w.heartbeat(tid, Duration::from_millis(u64::from(timeout_ms))))
}

/// Thread `tid` left its monitored region: watchd stops expecting its heartbeats.
#[unsafe(no_mangle)]
pub extern "C" fn ft_hbeat_end(tid: u32) -> c_int {
    with_watch(|w| w.heartbeat_end(tid))
}

/// The service finished starting up.
#[unsafe(no_mangle)]
pub extern "C" fn ft_ready() -> c_int {
    with_watch(Watch::ready)
}

/// Sets the status line shown by `ftctl status`. `text` is a NUL-terminated UTF-8 string,
/// cut to fit one datagram (about 1 KiB). NULL or invalid UTF-8 gives FT_EINVAL.
///
/// # Safety
/// `text` must be NULL or point to a NUL-terminated string valid for the duration of the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ft_status(text: *const c_char) -> c_int {
    boundary(|| {
        if text.is_null() {
            return FT_EINVAL;
        }
        // SAFETY: `text` is non-NULL and, by this function's contract, points to a
        // NUL-terminated string that stays valid and unmodified while the call runs.
        let Ok(text) = unsafe { CStr::from_ptr(text) }.to_str() else {
            return FT_EINVAL;
        };
        with_watch(|w| w.status(text))
    })
}

/// Unregisters: sends Unregister to watchd and forgets the registration. Later calls return
/// FT_ENOTREG until ft_reg_watch is called again. The registration is forgotten even when the
/// message cannot be delivered.
#[unsafe(no_mangle)]
pub extern "C" fn ft_del_watch() -> c_int {
    boundary(|| {
        let taken = WATCH.write().unwrap_or_else(PoisonError::into_inner).take();
        match taken {
            Some(watch) => code_of(watch.unregister()),
            None => FT_ENOTREG,
        }
    })
}

/// A static, human-readable description of an FT_* code; never NULL, never to be freed.
#[unsafe(no_mangle)]
pub extern "C" fn ft_strerror(code: c_int) -> *const c_char {
    boundary_or(c"internal error in libft".as_ptr(), || {
        strerror(code).as_ptr()
    })
}

fn strerror(code: c_int) -> &'static CStr {
    match code {
        FT_OK => c"success",
        FT_ENOSOCKET => c"FT_SOCKET is not set: not running under watchd",
        FT_EUNREACHABLE => c"watchd is unreachable",
        FT_EAGAIN => c"watchd's queue is full, message dropped",
        FT_ENOTREG => c"not registered: call ft_reg_watch first",
        FT_EINVAL => c"invalid argument",
        FT_EPANIC => c"internal error in libft",
        FT_EIO => c"I/O error talking to watchd",
        _ => c"unknown libft error code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_code() {
        let io = || std::io::Error::from_raw_os_error(libc::EBADF);
        assert_eq!(code_of(Ok(())), FT_OK);
        assert_eq!(code_of(Err(Error::NoSocket)), FT_ENOSOCKET);
        assert_eq!(code_of(Err(Error::Unreachable(io()))), FT_EUNREACHABLE);
        assert_eq!(code_of(Err(Error::WouldBlock)), FT_EAGAIN);
        assert_eq!(code_of(Err(Error::InvalidArgument("x"))), FT_EINVAL);
        assert_eq!(code_of(Err(Error::Io(io()))), FT_EIO);
    }

    #[test]
    fn a_panic_becomes_ft_epanic() {
        assert_eq!(boundary(|| panic!("injected")), FT_EPANIC);
    }

    #[test]
    fn strerror_is_never_null_and_distinct() {
        let codes = [
            FT_OK,
            FT_ENOSOCKET,
            FT_EUNREACHABLE,
            FT_EAGAIN,
            FT_ENOTREG,
            FT_EINVAL,
            FT_EPANIC,
            FT_EIO,
        ];
        let texts: Vec<String> = codes
            .iter()
            .map(|&c| {
                let p = ft_strerror(c);
                assert!(!p.is_null());
                // SAFETY: ft_strerror returns pointers to static NUL-terminated strings.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            })
            .collect();
        let mut unique = texts.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), texts.len());
        assert!(!ft_strerror(42).is_null());
    }
}
