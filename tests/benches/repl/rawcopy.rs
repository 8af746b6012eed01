//! The yardstick of the throughput table: a raw copy of the same files over loopback TCP, with
//! no replication protocol at all. A sender thread reads each file and streams
//! `[name len u32][name][len u64][bytes]` frames; a receiver thread writes each into a file of
//! the target directory and, after the last one, makes them durable with one syncfs(2), then
//! answers one byte.
//!
//! Owns only this copy; it never touches the files it reads, and writes only beneath its
//! target directory.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Buffer size of both ends (large writes: the best case for a raw copy).
const BUFFER: usize = 1 << 20;
/// Longest relative name accepted by the receiver.
const MAX_NAME: u32 = 4096;

/// One copy: bytes and files moved, and the time from connect to the receiver's answer
/// (after its syncfs).
#[derive(Debug, Clone, Copy)]
pub struct RawCopy {
    pub seconds: f64,
    pub bytes: u64,
    pub files: u64,
}

/// Every regular file beneath `root`, as (relative name, path), sorted.
pub fn files_beneath(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let ty = entry.file_type()?;
            let path = entry.path();
            if ty.is_dir() {
                stack.push(path);
            } else if ty.is_file() {
                let rel = path
                    .strip_prefix(root)
                    .context("a listed file lies beneath its root")?
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Copies `files` into `target` (created; must be empty or absent) over 127.0.0.1.
pub fn copy(files: &[(String, PathBuf)], target: &Path) -> Result<RawCopy> {
    fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the receiver")?;
    let addr = listener.local_addr()?;
    let target_owned = target.to_path_buf();
    let receiver = std::thread::Builder::new()
        .name("raw-receiver".into())
        .spawn(move || receive(&listener, &target_owned))
        .context("starting the receiver thread")?;
    let t0 = Instant::now();
    let sent = send(files, addr);
    let seconds = t0.elapsed().as_secs_f64();
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))?;
    let (bytes, count) = sent?;
    let (rbytes, rcount) = received?;
    if (bytes, count) != (rbytes, rcount) {
        bail!("sent {bytes} bytes in {count} files, received {rbytes} in {rcount}");
    }
    Ok(RawCopy {
        seconds,
        bytes,
        files: count,
    })
}

fn send(files: &[(String, PathBuf)], addr: std::net::SocketAddr) -> Result<(u64, u64)> {
    let stream = TcpStream::connect(addr).context("connecting to the receiver")?;
    let mut answer = stream.try_clone()?;
    let mut w = BufWriter::with_capacity(BUFFER, stream);
    let (mut bytes, mut count) = (0u64, 0u64);
    for (rel, path) in files {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = f.metadata()?.len();
        let name = rel.as_bytes();
        w.write_all(&u32::try_from(name.len())?.to_le_bytes())?;
        w.write_all(name)?;
        w.write_all(&len.to_le_bytes())?;
        let copied = std::io::copy(&mut f.take(len), &mut w)?;
        if copied != len {
            bail!("{} shrank while it was copied", path.display());
        }
        bytes += len;
        count += 1;
    }
    w.write_all(&0u32.to_le_bytes())?;
    w.flush()?;
    let mut done = [0u8; 1];
    answer
        .read_exact(&mut done)
        .context("waiting for the receiver's answer")?;
    Ok((bytes, count))
}

fn receive(listener: &TcpListener, target: &Path) -> Result<(u64, u64)> {
    let (stream, _) = listener.accept().context("accepting the sender")?;
    let mut answer = stream.try_clone()?;
    let mut r = BufReader::with_capacity(BUFFER, stream);
    let mut buf = vec![0u8; BUFFER];
    let (mut bytes, mut count) = (0u64, 0u64);
    let mut made_dirs: Option<PathBuf> = None;
    loop {
        let mut n4 = [0u8; 4];
        r.read_exact(&mut n4)?;
        let name_len = u32::from_le_bytes(n4);
        if name_len == 0 {
            break;
        }
        if name_len > MAX_NAME {
            bail!("a name of {name_len} bytes");
        }
        let mut name = vec![0u8; usize::try_from(name_len)?];
        r.read_exact(&mut name)?;
        let rel = String::from_utf8(name).context("a name that is not UTF-8")?;
        if rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!("refusing the name {rel:?}");
        }
        let mut n8 = [0u8; 8];
        r.read_exact(&mut n8)?;
        let mut left = u64::from_le_bytes(n8);
        let path = target.join(&rel);
        if let Some(parent) = path.parent()
            && made_dirs.as_deref() != Some(parent)
        {
            fs::create_dir_all(parent)?;
            made_dirs = Some(parent.to_path_buf());
        }
        let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        while left > 0 {
            let want = usize::try_from(left.min(BUFFER as u64))?;
            r.read_exact(&mut buf[..want])?;
            f.write_all(&buf[..want])?;
            left -= want as u64;
            bytes += want as u64;
        }
        count += 1;
    }
    let dir = File::open(target)?;
    // SAFETY: syncfs takes a file descriptor, which `dir` keeps open for the call, and touches
    // no memory of ours.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("syncfs");
    }
    answer.write_all(&[1])?;
    Ok((bytes, count))
}
