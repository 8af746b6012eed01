//! The durable applied seq of a replica, `<state_dir>/applied`: written with the atomic recipe
//! (temp file, fdatasync, rename, fsync of the directory) and checksummed. Owns that file and
//! the state directory's lock; it must never report a seq that was not completely written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::ReplayError;

/// Name of the applied-seq file in the state directory.
pub const APPLIED_FILE: &str = "applied";
const APPLIED_TEMP: &str = "applied.tmp";
/// The lock that keeps two replicas from sharing a state directory.
const LOCK_FILE: &str = "replica.lock";
const MAGIC: &[u8; 8] = b"FTAPPLD1";
const RECORD_BYTES: usize = 20;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ReplayError + 'a {
    move |source| ReplayError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn encode(seq: u64) -> [u8; RECORD_BYTES] {
    let mut out = [0u8; RECORD_BYTES];
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&out[..16]);
    out[16..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Result<u64, String> {
    let Ok::<&[u8; RECORD_BYTES], _>(record) = bytes.try_into() else {
        return Err(format!(
            "{} bytes where {RECORD_BYTES} were expected",
            bytes.len()
        ));
    };
    let (head, crc) = record.split_at(16);
    if &head[..8] != MAGIC {
        return Err("wrong magic".to_owned());
    }
    let stored = u32::from_le_bytes(crc.try_into().map_err(|_| "short checksum".to_owned())?);
    if crc32c::crc32c(head) != stored {
        return Err("checksum mismatch".to_owned());
    }
    let seq = u64::from_le_bytes(head[8..16].try_into().map_err(|_| "short seq".to_owned())?);
    Ok(seq)
}

/// The open state directory.
#[derive(Debug)]
pub(crate) struct StateFile {
    dir_path: PathBuf,
    dir: File,
    path: PathBuf,
    temp: PathBuf,
    _lock: File,
}

impl StateFile {
    /// Opens (creating) the state directory, locks it and reads the applied seq (0 when the
    /// file does not exist yet). A damaged file is an error, not a silent 0: replaying from
    /// the start over a later tree is not what the caller wants.
    pub(crate) fn open(dir_path: &Path) -> Result<(StateFile, u64), ReplayError> {
        fs::create_dir_all(dir_path).map_err(io_err("create directory", dir_path))?;
        let lock_path = dir_path.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        if !crate::segment::lock_exclusive(&lock).map_err(io_err("lock", &lock_path))? {
            return Err(ReplayError::Locked {
                path: dir_path.to_path_buf(),
            });
        }
        let dir = File::open(dir_path).map_err(io_err("open", dir_path))?;
        let path = dir_path.join(APPLIED_FILE);
        let temp = dir_path.join(APPLIED_TEMP);
        // A temp file is what a crash in the middle of a store leaves behind; the previous
        // value is still in place.
        match fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("delete", &temp)(e)),
        }
        let seq = match fs::read(&path) {
            Ok(bytes) => decode(&bytes).map_err(|why| ReplayError::State {
                path: path.clone(),
                why,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let state = StateFile {
            dir_path: dir_path.to_path_buf(),
            dir,
            path,
            temp,
            _lock: lock,
        };
        Ok((state, seq))
    }

    /// Stores `seq` durably (the atomic recipe).
    pub(crate) fn store(&mut self, seq: u64) -> Result<(), ReplayError> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&self.temp)
            .map_err(io_err("create", &self.temp))?;
        file.write_all(&encode(seq))
            .map_err(io_err("write", &self.temp))?;
        file.sync_data().map_err(io_err("sync", &self.temp))?;
        drop(file);
        fs::rename(&self.temp, &self.path).map_err(io_err("rename", &self.path))?;
        self.dir
            .sync_all()
            .map_err(io_err("sync", &self.dir_path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_applied_file_round_trips_and_damage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut state, seq) = StateFile::open(dir.path()).expect("open");
        assert_eq!(seq, 0);
        state.store(41).expect("store");
        state.store(42).expect("store");
        assert!(matches!(
            StateFile::open(dir.path()),
            Err(ReplayError::Locked { .. })
        ));
        drop(state);
        fs::write(dir.path().join(APPLIED_TEMP), b"half").expect("leftover temp");
        let (state, seq) = StateFile::open(dir.path()).expect("reopen");
        assert_eq!(seq, 42);
        assert!(!dir.path().join(APPLIED_TEMP).exists());
        drop(state);
        for bad in [&b""[..], b"FTAPPLD1", &[0u8; RECORD_BYTES]] {
            fs::write(dir.path().join(APPLIED_FILE), bad).expect("write");
            assert!(matches!(
                StateFile::open(dir.path()),
                Err(ReplayError::State { .. })
            ));
        }
        let mut flipped = encode(7);
        flipped[9] ^= 4;
        fs::write(dir.path().join(APPLIED_FILE), flipped).expect("write");
        assert!(matches!(
            StateFile::open(dir.path()),
            Err(ReplayError::State { .. })
        ));
    }
}
