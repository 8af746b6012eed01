//! A service's stdout/stderr file under `<data_dir>/logs/`: its path, size-based rotation and
//! reading its tail across rotated files.
//!
//! Rotation is copy-truncate because the child keeps its own O_APPEND fd to the file: renaming
//! it away would leave the child writing into the rotated copy. This module never opens the
//! file for the child and never holds a file open between calls.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Directory under the data directory that holds the services' log files.
pub const LOG_DIR: &str = "logs";

/// Mode of log files: the service's output may hold secrets, so no access for others.
pub const LOG_FILE_MODE: u32 = 0o640;

/// `<data_dir>/logs/<service>.log`.
pub fn log_path(data_dir: &Path, service: &str) -> PathBuf {
    data_dir.join(LOG_DIR).join(format!("{service}.log"))
}

/// The `n`th rotated file of `path`: `<path>.<n>`, 1 the newest.
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// When `path` has reached `max_bytes`, shifts `.1`..`.keep-1` one up (dropping `.keep`),
/// copies `path` to `.1` and truncates `path`. Returns whether it rotated. `max_bytes == 0`
/// disables rotation; `keep == 0` truncates without keeping a copy. A missing file is not an
/// error.
///
/// Lines lost: whatever the service appends between the copy reaching the end of the file and
/// the truncation (a few syscalls later) is in neither file. A writer that reopened the file
/// without O_APPEND would keep its offset and leave a sparse hole after the truncation.
pub fn rotate_if_needed(path: &Path, max_bytes: u64, keep: u32) -> io::Result<bool> {
    let len = match fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if max_bytes == 0 || len < max_bytes {
        return Ok(false);
    }
    if keep > 0 {
        remove_if_exists(&rotated_path(path, keep))?;
        for n in (1..keep).rev() {
            match fs::rename(rotated_path(path, n), rotated_path(path, n + 1)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let newest = rotated_path(path, 1);
        let mut tmp = newest.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut src = File::open(path)?;
            let mut dst = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(LOG_FILE_MODE)
                .open(&tmp)?;
            // io::copy reads until EOF, so lines appended during the copy are included.
            io::copy(&mut src, &mut dst)?;
        }
        // Renamed before truncating: a crash in between duplicates lines instead of losing them.
        fs::rename(&tmp, &newest)?;
    }
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// The last `max_bytes` bytes of the service's output, across the current file and its rotated
/// files, oldest first. Missing files read as empty.
pub fn tail(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut remaining = max_bytes;
    match read_last(path, remaining) {
        Ok(bytes) => {
            remaining -= u64::try_from(bytes.len())
                .unwrap_or(remaining)
                .min(remaining);
            chunks.push(bytes);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Rotation fills .1 first and shifts upwards, so the first missing number ends the chain.
    let mut n = 1;
    while remaining > 0 {
        match read_last(&rotated_path(path, n), remaining) {
            Ok(bytes) => {
                remaining -= u64::try_from(bytes.len())
                    .unwrap_or(remaining)
                    .min(remaining);
                chunks.push(bytes);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(e) => return Err(e),
        }
        n = match n.checked_add(1) {
            Some(next) => next,
            None => break,
        };
    }
    chunks.reverse();
    Ok(chunks.concat())
}

/// At most the last `max_bytes` bytes of one file; fewer if it shrinks while being read.
fn read_last(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    file.seek(SeekFrom::Start(start))?;
    let mut out = Vec::with_capacity(usize::try_from(len - start).unwrap_or(0));
    file.take(max_bytes).read_to_end(&mut out)?;
    Ok(out)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, data: &[u8]) {
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .expect("open log");
        f.write_all(data).expect("append");
    }

    #[test]
    fn path_layout() {
        assert_eq!(
            log_path(Path::new("/d"), "web"),
            PathBuf::from("/d/logs/web.log")
        );
        assert_eq!(
            rotated_path(Path::new("/d/logs/web.log"), 3),
            PathBuf::from("/d/logs/web.log.3")
        );
    }

    #[test]
    fn rotation_keeps_keep_files_newest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("svc.log");
        assert!(!rotate_if_needed(&p, 10, 2).expect("missing file is fine"));
        append(&p, b"12345");
        assert!(!rotate_if_needed(&p, 10, 2).expect("below the limit"));
        for round in ["aaaaaaaaaa", "bbbbbbbbbb", "cccccccccc", "dddddddddd"] {
            append(&p, round.as_bytes());
            assert!(rotate_if_needed(&p, 10, 2).expect("rotate"));
            assert_eq!(fs::metadata(&p).expect("current stays").len(), 0);
        }
        assert_eq!(fs::read(rotated_path(&p, 1)).expect(".1"), b"dddddddddd");
        assert_eq!(fs::read(rotated_path(&p, 2)).expect(".2"), b"cccccccccc");
        assert!(!rotated_path(&p, 3).exists());
        let mut tmp = rotated_path(&p, 1).into_os_string();
        tmp.push(".tmp");
        assert!(!PathBuf::from(tmp).exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(rotated_path(&p, 1))
            .expect(".1")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(
            mode & !LOG_FILE_MODE,
            0,
            "rotated copy is not more open than the log"
        );
    }

    #[test]
    fn keep_zero_truncates_and_zero_limit_disables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("svc.log");
        append(&p, b"0123456789");
        assert!(!rotate_if_needed(&p, 0, 3).expect("disabled"));
        assert!(rotate_if_needed(&p, 5, 0).expect("rotate"));
        assert_eq!(fs::metadata(&p).expect("current").len(), 0);
        assert!(!rotated_path(&p, 1).exists());
    }

    #[test]
    fn an_append_only_writer_continues_at_the_start_after_truncation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("svc.log");
        let mut writer = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&p)
            .expect("open");
        writer.write_all(b"old line\n").expect("write");
        assert!(rotate_if_needed(&p, 4, 1).expect("rotate"));
        writer.write_all(b"new line\n").expect("write");
        assert_eq!(fs::read(&p).expect("current"), b"new line\n");
        assert_eq!(fs::read(rotated_path(&p, 1)).expect(".1"), b"old line\n");
    }

    #[test]
    fn tail_crosses_file_boundaries_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("svc.log");
        fs::write(rotated_path(&p, 2), b"AAAA").expect("write");
        fs::write(rotated_path(&p, 1), b"BBBB").expect("write");
        fs::write(&p, b"CC").expect("write");
        assert_eq!(tail(&p, 1).expect("tail"), b"C");
        assert_eq!(tail(&p, 2).expect("tail"), b"CC");
        assert_eq!(tail(&p, 5).expect("tail"), b"BBBCC");
        assert_eq!(tail(&p, 7).expect("tail"), b"ABBBBCC");
        assert_eq!(tail(&p, 8).expect("tail"), b"AABBBBCC");
        assert_eq!(tail(&p, 1000).expect("tail"), b"AAAABBBBCC");
        assert_eq!(tail(&p, 0).expect("tail"), b"");
        // A gap ends the chain: .4 is not reached past a missing .3.
        fs::write(rotated_path(&p, 4), b"ZZ").expect("write");
        assert_eq!(tail(&p, 1000).expect("tail"), b"AAAABBBBCC");
    }

    #[test]
    fn tail_of_missing_files_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("nothing.log");
        assert_eq!(tail(&p, 100).expect("tail"), b"");
        // Only a rotated file left (current removed by hand): still read.
        fs::write(rotated_path(&p, 1), b"xy").expect("write");
        assert_eq!(tail(&p, 100).expect("tail"), b"xy");
    }
}
