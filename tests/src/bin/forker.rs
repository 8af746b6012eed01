//! forker: a test service with a process tree. It starts a grandchild (`sleep 1000`) and prints
//! `forker: main=PID grandchild=PID` on stdout, then sleeps. `--mode plain` (default): the
//! grandchild is an ordinary child in forker's process group; `--mode setsid`: the child calls
//! setsid() before exec (own session and group); `--mode orphan`: a daemon-style double fork,
//! the grandchild in its own session and re-parented away from forker. Only a cgroup still holds
//! the last two.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use ftkit_tests::{helper_args, say};

const NAME: &str = "forker";
const NAP: Duration = Duration::from_secs(3600);

/// Double fork: child calls setsid() and forks the grandchild (which execs sleep), then exits;
/// returns the grandchild's pid, read from a pipe.
fn orphan() -> u32 {
    let sleep = CString::new("/bin/sleep").expect("no NUL inside");
    let arg = CString::new("1000").expect("no NUL inside");
    let argv = [sleep.as_ptr(), arg.as_ptr(), std::ptr::null()];
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe() to fill.
    let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "pipe: {}", std::io::Error::last_os_error());
    // SAFETY: this program is single-threaded here; after fork the child only calls
    // async-signal-safe functions (setsid, fork, write, execv, _exit) on buffers prepared
    // before the fork.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: see above; every pointer is valid and NUL-terminated, argv ends with NULL.
        unsafe {
            libc::setsid();
            let grandchild = libc::fork();
            if grandchild == 0 {
                libc::close(fds[0]);
                libc::close(fds[1]);
                libc::execv(sleep.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
            let bytes = grandchild.to_ne_bytes();
            libc::write(fds[1], bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0);
        }
    }
    assert!(child > 0, "fork: {}", std::io::Error::last_os_error());
    // SAFETY: fds[1] is our open write end, no longer needed in the parent.
    unsafe { libc::close(fds[1]) };
    let mut bytes = [0u8; std::mem::size_of::<libc::pid_t>()];
    // SAFETY: `bytes` is a writable buffer of bytes.len() bytes; fds[0] is our open read end.
    let n = unsafe { libc::read(fds[0], bytes.as_mut_ptr().cast(), bytes.len()) };
    assert_eq!(
        usize::try_from(n).ok(),
        Some(bytes.len()),
        "read the grandchild pid"
    );
    let mut status = 0;
    // SAFETY: `child` is our child; `status` is a valid int to write to.
    unsafe { libc::waitpid(child, &mut status, 0) };
    u32::try_from(libc::pid_t::from_ne_bytes(bytes)).expect("a pid is positive")
}

fn main() {
    let args = helper_args(&["mode"]);
    let mode = args.get("mode").map_or("plain", String::as_str);
    let grandchild = match mode {
        "plain" => Command::new("/bin/sleep")
            .arg("1000")
            .spawn()
            .expect("spawn sleep")
            .id(),
        "setsid" => {
            let mut cmd = Command::new("/bin/sleep");
            cmd.arg("1000");
            // SAFETY: setsid() is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            cmd.spawn().expect("spawn sleep in a new session").id()
        }
        "orphan" => orphan(),
        other => panic!("unknown --mode {other} (plain, setsid, orphan)"),
    };
    say(
        NAME,
        &format!(
            "forker: main={} grandchild={grandchild} mode={mode}",
            std::process::id()
        ),
    );
    loop {
        std::thread::sleep(NAP);
    }
}
