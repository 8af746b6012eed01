//! The local checkpoint store: one directory per application stream holding committed images
//! `<seq:020>.ckpt` and in-flight `.tmp-<seq>-<pid>` files. Owns the atomic commit recipe,
//! compaction (an increment replaced by the equivalent full image, so chains stay short),
//! retention and recovery (newest image whose whole chain verifies). It must never rename an
//! unsynced image into place, never delete an image a kept checkpoint needs, never replace an
//! image by anything but the same state, and never apply a byte of a chain before the whole
//! chain has verified.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};

use crate::compact::{self, ComposeError, Link};
use crate::failpoint;
use crate::image::{self, ImageError, ImageHeader, ImageSummary, ImageWriter};

/// Default number of good checkpoints retention keeps.
pub const DEFAULT_KEEP: usize = 3;
/// Default number of increments after which the next image is a full one.
pub const DEFAULT_FULL_EVERY: u32 = 8;
/// An image being written has each step of this many bytes handed to writeback as soon as it
/// is written (`sync_file_range`), so the disk works while the rest is written and the final
/// fdatasync waits for little more than the last step.
pub const WRITEBACK_STEP: u64 = 4 << 20;
/// A chain may outgrow `full_every` by as many increments again (at least this many) while
/// its compaction fails or lags; past that the next image must be full.
pub const COMPACTION_SLACK_MIN: u32 = 4;
/// Walks of a chain that found a link gone (a compaction replaced the image they started
/// from, and retention removed its old ancestors) are started again this many times.
const CHAIN_WALK_ATTEMPTS: usize = 3;
/// Suffix of committed images.
const IMAGE_SUFFIX: &str = ".ckpt";
/// Digits of the zero-padded sequence in an image's name (u64::MAX has 20).
const SEQ_DIGITS: usize = 20;
/// Prefix of in-flight images.
const TEMP_PREFIX: &str = ".tmp-";
/// Mode of image files: checkpoints hold process memory, so only the owner may read them.
const IMAGE_MODE: u32 = 0o600;

/// How many checkpoints to keep and how long incremental chains may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePolicy {
    /// Good checkpoints kept by retention (at least 1 is always kept), plus every image their
    /// chains need. Default 3.
    pub keep: usize,
    /// A full image after this many increments; 0 means every image is full. Default 8. The
    /// image after `full_every` increments may itself be written as an increment and then
    /// compacted into a full image (see `Plan::compact`).
    pub full_every: u32,
}

impl StorePolicy {
    /// The most increments a chain may hold: `full_every` plus as many again (at least
    /// `COMPACTION_SLACK_MIN`) for compactions that fail or lag. `plan` asks for a full image
    /// and `begin` refuses an increment beyond it, so recovery never reads a longer chain.
    pub fn chain_limit(&self) -> u32 {
        self.full_every
            .saturating_add(self.full_every.max(COMPACTION_SLACK_MIN))
    }
}

impl Default for StorePolicy {
    fn default() -> Self {
        StorePolicy {
            keep: DEFAULT_KEEP,
            full_every: DEFAULT_FULL_EVERY,
        }
    }
}

/// A committed image, as its header (and footer, or a full read) describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub seq: u64,
    pub parent: Option<u64>,
    pub created_unix_ns: u64,
    pub file_bytes: u64,
    pub data_bytes: u64,
    pub path: PathBuf,
}

/// What `Store::recover` restored: the newest good image `seq` (its header), the chain applied
/// (full base first), and each newer image that was refused with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub seq: u64,
    pub header: ImageHeader,
    pub chain: Vec<u64>,
    pub skipped: Vec<(u64, String)>,
}

/// Receives each chunk of a recovered chain: (header of its image, region index, offset in the
/// region, data).
pub type ApplyFn<'a> = dyn FnMut(&ImageHeader, u32, u64, &[u8]) + 'a;

/// Asked by `Store::compact` before each chunk it reads or writes: true to go on, false to
/// abandon the compaction. It may block, to keep a long compaction out of the way of more
/// urgent work (libft holds it while the application is paused for a checkpoint).
pub type CompactGate<'a> = dyn FnMut() -> bool + 'a;

/// One committed image file of `Store::list_entries`: its sequence and its cheap description,
/// or why even that could not be read.
pub type ListEntry = (u64, Result<ImageInfo, StoreError>);

/// The next image to write: its sequence, the image it may be an increment against (`None`:
/// it must be full), and whether such an increment is due for compaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub seq: u64,
    pub parent: Option<u64>,
    /// True when an increment against `parent` would carry more than `full_every` increments:
    /// the policy wants a full image now. Either write a full image, or write the increment
    /// (cheap to capture) and then `Store::compact` it, which replaces it with the equivalent
    /// full image in the background.
    pub compact: bool,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("{path}: the file is named for sequence {named} but its header says {header}")]
    NameMismatch {
        path: PathBuf,
        named: u64,
        header: u64,
    },
    #[error("no checkpoint image with sequence {seq} in {dir}")]
    NotFound { seq: u64, dir: PathBuf },
    #[error("image header is for application {found:?} but this store holds {expected:?}")]
    WrongApp { found: String, expected: String },
    #[error("sequence {seq} is not newer than the newest image {newest} in the store")]
    SeqNotNewer { seq: u64, newest: u64 },
    #[error("image {seq} would be an increment against {parent}, which cannot be used: {reason}")]
    ParentUnusable {
        seq: u64,
        parent: u64,
        reason: String,
    },
    #[error(
        "recovery failed while applying image {path} (the target is partly written; recover again): {source}"
    )]
    Apply {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error("{path}: the image is not what its writer reported: {reason}")]
    Unfinished { path: PathBuf, reason: String },
    #[error("cannot compact image {seq}: {reason}")]
    Uncompactable { seq: u64, reason: String },
    #[error("compaction of image {seq} was cancelled")]
    Cancelled { seq: u64 },
}

impl StoreError {
    /// The kind of the underlying I/O error, if there is one; `StorageFull` means disk full.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            StoreError::Io { source, .. } => Some(source.kind()),
            StoreError::Image { source, .. } | StoreError::Apply { source, .. } => source.io_kind(),
            _ => None,
        }
    }

    /// True when the operation failed because the file system is full (ENOSPC).
    pub fn is_storage_full(&self) -> bool {
        self.io_kind() == Some(io::ErrorKind::StorageFull)
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn image_name(seq: u64) -> String {
    format!("{seq:0width$}{IMAGE_SUFFIX}", width = SEQ_DIGITS)
}

fn parse_image_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(IMAGE_SUFFIX)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn temp_name(seq: u64, pid: i32) -> String {
    format!("{TEMP_PREFIX}{seq}-{pid}")
}

/// `Some(pid)` for a temp file name; pid `None` when the name is ours but malformed.
fn parse_temp_name(name: &str) -> Option<Option<i32>> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let pid = rest
        .split_once('-')
        .filter(|(seq, _)| seq.parse::<u64>().is_ok())
        .and_then(|(_, pid)| pid.parse::<i32>().ok());
    Some(pid)
}

/// True when no process `pid` exists (so its temp file can never be committed).
fn process_is_gone(pid: i32) -> bool {
    // Only positive numbers name one process (and `Pid::from_raw` asserts that).
    if pid <= 0 {
        return true;
    }
    match rustix::process::Pid::from_raw(pid) {
        None => true,
        Some(p) => rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    let d = File::open(dir).map_err(io_err("open directory", dir))?;
    d.sync_all().map_err(io_err("fsync directory", dir))
}

/// Renames without ever replacing an existing committed image.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => Ok(()),
        // A file system without RENAME_NOREPLACE: check, then rename. Sequences are allocated
        // by one writer per stream, so the window between the two is not a real race.
        Err(rustix::io::Errno::INVAL) => {
            if to.exists() {
                Err(io::Error::from(io::ErrorKind::AlreadyExists))
            } else {
                fs::rename(from, to)
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The file an image is written to: writes go straight to it (vectored, no buffer copy), and
/// every `WRITEBACK_STEP` bytes the range just written is handed to writeback. Allocates
/// nothing, so a copy-on-write snapshot child may write through a copy of it (onto the same
/// open file, whose offset it then advances).
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    written: u64,
    flushed_to: u64,
}

impl ImageFile {
    /// Writes to `file` from its current offset (images are written from offset 0).
    pub fn new(file: File) -> ImageFile {
        ImageFile {
            file,
            written: 0,
            flushed_to: 0,
        }
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn advance(&mut self, n: usize) {
        self.written += n as u64;
        let pending = self.written - self.flushed_to;
        if pending >= WRITEBACK_STEP {
            let (Ok(start), Ok(len)) = (
                libc::off64_t::try_from(self.flushed_to),
                libc::off64_t::try_from(pending),
            ) else {
                return;
            };
            // SAFETY: sync_file_range on a file descriptor we own; no memory is passed. Its
            // result is ignored on purpose: it only starts writeback early, and any I/O error
            // it could see is reported again by the fdatasync of the commit.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    start,
                    len,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.flushed_to = self.written;
        }
    }
}

impl Write for ImageFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&self.file).write(buf)?;
        self.advance(n);
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = (&self.file).write_vectored(bufs)?;
        self.advance(n);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The failpoints one run of the commit recipe passes: a commit's or a compaction's.
#[derive(Debug)]
struct Points {
    written: &'static str,
    synced: &'static str,
    renamed: &'static str,
    dir_synced: &'static str,
}

const COMMIT_POINTS: Points = Points {
    written: failpoint::COMMIT_WRITTEN,
    synced: failpoint::COMMIT_SYNCED,
    renamed: failpoint::COMMIT_RENAMED,
    dir_synced: failpoint::COMMIT_DIR_SYNCED,
};

const COMPACT_POINTS: Points = Points {
    written: failpoint::COMPACT_WRITTEN,
    synced: failpoint::COMPACT_SYNCED,
    renamed: failpoint::COMPACT_RENAMED,
    dir_synced: failpoint::COMPACT_DIR_SYNCED,
};

fn pass(point: &'static str, path: &Path) -> Result<(), StoreError> {
    failpoint::hit(point).map_err(|source| StoreError::Io {
        op: "pass a failpoint with",
        path: path.to_owned(),
        source,
    })
}

/// Identity of a file's current contents, for the verification cache.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdent {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileIdent {
    fn of(m: &fs::Metadata) -> Self {
        FileIdent {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }
}

/// An image that fully verified (or that this process wrote and synced itself).
#[derive(Debug, Clone)]
struct Verified {
    ident: FileIdent,
    header: ImageHeader,
    info: ImageInfo,
}

/// A checked image with its file still open, so what is applied is what was verified.
#[derive(Debug)]
struct Checked {
    header: ImageHeader,
    info: ImageInfo,
    file: File,
}

/// Why a chain is not usable: the images are refused (go on with an older one), or the store
/// could not be read at all (stop: nothing can be judged).
enum ChainFault {
    Refused(String),
    Fatal(StoreError),
}

/// Why one walk down a chain stopped: a fault, or a link that vanished under the walk (walk
/// again; the sequences walked so far are listed, to be checked again).
enum WalkStop {
    Fault(ChainFault),
    Vanished(Vec<u64>),
}

impl From<ChainFault> for WalkStop {
    fn from(f: ChainFault) -> WalkStop {
        WalkStop::Fault(f)
    }
}

/// Per-call memo of image checks, so a broken base is judged once, not once per descendant.
type Memo = HashMap<u64, Result<Rc<Checked>, String>>;

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    app: String,
    policy: StorePolicy,
    /// Per sequence, the files of that name this process verified or wrote, newest first: two
    /// while a compaction replaces an increment (a reader may still hold the old file), else
    /// one.
    verified: Mutex<HashMap<u64, Vec<Verified>>>,
}

/// The checkpoint store of one application stream (one directory).
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens (creating it if needed) the store in `dir` for application `app`, and removes
    /// temp files left by processes that no longer exist.
    pub fn open(dir: &Path, app: &str, policy: StorePolicy) -> Result<Store, StoreError> {
        let existed = dir.is_dir();
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        if !existed && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // The new directory's own entry must be durable before images are committed in it.
            fsync_dir(parent)?;
        }
        let own_pid = rustix::process::getpid().as_raw_nonzero().get();
        for entry in fs::read_dir(dir).map_err(io_err("read directory", dir))? {
            let entry = entry.map_err(io_err("read directory", dir))?;
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(parse_temp_name) else {
                continue;
            };
            let stale = match pid {
                Some(pid) => pid != own_pid && process_is_gone(pid),
                None => true,
            };
            if stale {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("remove stale temp file", &path)(e)),
                }
            }
        }
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                app: app.to_owned(),
                policy,
                verified: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The application identity every image here must carry.
    pub fn app(&self) -> &str {
        &self.inner.app
    }

    /// The retention and chain policy.
    pub fn policy(&self) -> &StorePolicy {
        &self.inner.policy
    }

    /// The next sequence (above every committed image, good or not) and whether it may be an
    /// increment: against the newest good image, unless `full_every` is 0 or its chain already
    /// holds `chain_limit` increments. `compact` says the increment would carry more than
    /// `full_every` increments: write a full image, or the increment and then `compact` it.
    pub fn plan(&self) -> Result<Plan, StoreError> {
        let seqs = self.inner.scan()?;
        let seq = seqs.last().map_or(1, |s| s.saturating_add(1));
        let policy = &self.inner.policy;
        let full_every = usize::try_from(policy.full_every).unwrap_or(usize::MAX);
        let limit = usize::try_from(policy.chain_limit()).unwrap_or(usize::MAX);
        let mut memo = Memo::new();
        for &cand in seqs.iter().rev() {
            match self.inner.good_chain(cand, true, &mut memo) {
                Ok(chain) => {
                    let increments = chain.len() - 1;
                    if full_every == 0 || increments >= limit {
                        break;
                    }
                    return Ok(Plan {
                        seq,
                        parent: Some(cand),
                        compact: increments >= full_every,
                    });
                }
                Err(ChainFault::Refused(_)) => continue,
                Err(ChainFault::Fatal(e)) => return Err(e),
            }
        }
        Ok(Plan {
            seq,
            parent: None,
            compact: false,
        })
    }

    /// Starts writing image `header.seq`: creates its temp file (exclusively) and writes the
    /// header. The sequence must be above every committed image, and a parent must be a
    /// verifiable image of this store whose chain holds fewer than `chain_limit` increments.
    pub fn begin(&self, header: &ImageHeader) -> Result<Pending, StoreError> {
        let inner = &self.inner;
        if header.app != inner.app {
            return Err(StoreError::WrongApp {
                found: header.app.clone(),
                expected: inner.app.clone(),
            });
        }
        if let Some(&newest) = inner.scan()?.last()
            && header.seq <= newest
        {
            return Err(StoreError::SeqNotNewer {
                seq: header.seq,
                newest,
            });
        }
        if let Some(parent) = header.parent {
            let mut memo = Memo::new();
            match inner.good_chain(parent, true, &mut memo) {
                Ok(chain) => {
                    let limit = inner.policy.chain_limit();
                    if chain.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
                        return Err(StoreError::ParentUnusable {
                            seq: header.seq,
                            parent,
                            reason: format!(
                                "its chain holds {} increments, the most a chain may hold is \
                                 {limit}: write a full image",
                                chain.len() - 1
                            ),
                        });
                    }
                }
                Err(ChainFault::Fatal(e)) => return Err(e),
                Err(ChainFault::Refused(reason)) => {
                    return Err(StoreError::ParentUnusable {
                        seq: header.seq,
                        parent,
                        reason,
                    });
                }
            }
        }
        let (writer, tmp_path) = inner.create_temp(header, failpoint::COMMIT_CREATED)?;
        Ok(Pending {
            inner: Arc::clone(inner),
            header: header.clone(),
            final_path: inner.dir.join(image_name(header.seq)),
            tmp_path,
            writer: Some(writer),
            done: false,
        })
    }

    /// Committed images, oldest first, described from their headers and footers (cheap: no
    /// chunk is read). Images whose header or footer cannot be read are left out; see
    /// `list_entries` for those.
    pub fn list(&self) -> Result<Vec<ImageInfo>, StoreError> {
        Ok(self
            .list_entries()?
            .into_iter()
            .filter_map(|(_, r)| r.ok())
            .collect())
    }

    /// Every committed image file, oldest first, with its cheap description or why even that
    /// could not be read.
    pub fn list_entries(&self) -> Result<Vec<ListEntry>, StoreError> {
        let inner = &self.inner;
        let mut out = Vec::new();
        for seq in inner.scan()? {
            let path = inner.dir.join(image_name(seq));
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("open", &path)(e)),
            };
            let described = (|| {
                let image_err = |source| StoreError::Image {
                    path: path.clone(),
                    source,
                };
                let header = image::read_header(&file, &inner.app).map_err(image_err)?;
                if header.seq != seq {
                    return Err(StoreError::NameMismatch {
                        path: path.clone(),
                        named: seq,
                        header: header.seq,
                    });
                }
                let (_, data_bytes) = image::read_footer(&mut file).map_err(image_err)?;
                let file_bytes = file.metadata().map_err(io_err("stat", &path))?.len();
                Ok(ImageInfo {
                    seq,
                    parent: header.parent,
                    created_unix_ns: header.created_unix_ns,
                    file_bytes,
                    data_bytes,
                    path: path.clone(),
                })
            })();
            out.push((seq, described));
        }
        Ok(out)
    }

    /// Reads and verifies the whole of image `seq` (not its parents).
    pub fn verify(&self, seq: u64) -> Result<ImageInfo, StoreError> {
        self.inner.check(seq, false).map(|c| c.info)
    }

    /// Deletes image `seq` (whatever depends on it) and syncs the directory.
    pub fn delete(&self, seq: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        let path = inner.dir.join(image_name(seq));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    seq,
                    dir: inner.dir.clone(),
                });
            }
            Err(e) => return Err(io_err("delete", &path)(e)),
        }
        inner.forget(seq);
        fsync_dir(&inner.dir)
    }

    /// Runs retention now (commit runs it too): keeps the newest `keep` good checkpoints and
    /// every image their chains need, and images newer than the newest good one (refused
    /// images are kept as evidence until a newer good image supersedes them); deletes the rest.
    /// Returns the deleted sequences. Deletes nothing if no image is good or if an image could
    /// not be judged.
    pub fn retain(&self) -> Result<Vec<u64>, StoreError> {
        self.inner.retain()
    }

    /// Compaction: replaces image `seq`, an increment, with the full image of the same state
    /// (the same sequence, header and creation time, no parent), composed from its chain on
    /// disk: every image of the chain is verified on the way, and the result is committed with
    /// the atomic recipe (temp file, fdatasync, rename over the increment, directory fsync),
    /// passing the `compact.*` failpoints. Whatever step a crash interrupts, image `seq` is
    /// either the old increment with its chain intact or the new full image. The old chain
    /// stays until retention (the next commit, or `retain`) finds that no kept checkpoint
    /// needs it any more. A full image is left alone.
    ///
    /// Takes as long as writing a full image; `gate` is asked before every chunk and may hold
    /// the compaction back or abandon it (nothing of it remains then). Images newer than `seq`
    /// stay valid: they hold the same state on top of it.
    pub fn compact(&self, seq: u64, gate: &mut CompactGate<'_>) -> Result<ImageInfo, StoreError> {
        let inner = &self.inner;
        let mut memo = Memo::new();
        let chain = match inner.good_chain(seq, true, &mut memo) {
            Ok(chain) => chain,
            Err(ChainFault::Fatal(e)) => return Err(e),
            Err(ChainFault::Refused(reason)) => {
                return Err(StoreError::Uncompactable { seq, reason });
            }
        };
        let newest = chain
            .last()
            .expect("a good chain holds at least its newest image");
        if chain.len() == 1 {
            return Ok(newest.info.clone());
        }
        let header = ImageHeader {
            parent: None,
            ..newest.header.clone()
        };
        let (mut writer, tmp_path) = inner.create_temp(&header, failpoint::COMPACT_CREATED)?;
        let links: Vec<Link<'_>> = chain
            .iter()
            .map(|c| Link {
                file: &c.file,
                path: &c.info.path,
                header: &c.header,
            })
            .collect();
        let composed = compact::compose(&links, &inner.app, &mut writer, gate);
        let result = composed
            .map_err(|e| match e {
                ComposeError::Source { path, source } => StoreError::Image { path, source },
                ComposeError::Output(source) => StoreError::Image {
                    path: tmp_path.clone(),
                    source,
                },
                ComposeError::Layout(reason) => StoreError::Uncompactable { seq, reason },
                ComposeError::Reread { path, record_pos } => StoreError::Uncompactable {
                    seq,
                    reason: format!(
                        "the chunk at offset {record_pos} of {} changed since it was verified",
                        path.display()
                    ),
                },
                ComposeError::Cancelled => StoreError::Cancelled { seq },
            })
            .and_then(|()| {
                writer.finish().map_err(|source| StoreError::Image {
                    path: tmp_path.clone(),
                    source,
                })
            })
            .and_then(|(out, summary)| {
                // Replace the increment only if it is still the file this chain was read from.
                let final_path = &newest.info.path;
                let current = fs::metadata(final_path).map_err(io_err("stat", final_path))?;
                let read = newest.file.metadata().map_err(io_err("stat", final_path))?;
                if FileIdent::of(&current) != FileIdent::of(&read) {
                    return Err(StoreError::Uncompactable {
                        seq,
                        reason: "the image changed while it was compacted".to_owned(),
                    });
                }
                let mut renamed = false;
                let sealed = inner.seal(
                    &out.file,
                    &tmp_path,
                    final_path,
                    &header,
                    &summary,
                    &COMPACT_POINTS,
                    true,
                    &mut renamed,
                );
                if sealed.is_err() && renamed {
                    // The full image replaced the increment but its directory entry may not be
                    // durable: either one holds the same state, so both may stay. Only the
                    // cache must not vouch for a file this process did not see through.
                    inner.forget(seq);
                }
                sealed
            });
        if result.is_err() {
            let _ = fs::remove_file(&tmp_path);
        }
        result
    }

    /// Finds the newest image whose whole chain (back to its full base) verifies, verifying
    /// BEFORE applying anything, then applies base..=newest in order through `apply`. Returns
    /// None when there is no good image.
    pub fn recover(&self, apply: &mut ApplyFn<'_>) -> Result<Option<Recovery>, StoreError> {
        let inner = &self.inner;
        let seqs = inner.scan()?;
        let mut memo = Memo::new();
        let mut skipped = Vec::new();
        for &cand in seqs.iter().rev() {
            let chain = match inner.good_chain(cand, false, &mut memo) {
                Ok(chain) => chain,
                Err(ChainFault::Refused(reason)) => {
                    skipped.push((cand, reason));
                    continue;
                }
                Err(ChainFault::Fatal(e)) => return Err(e),
            };
            for link in &chain {
                let apply_err = |source| StoreError::Apply {
                    path: link.info.path.clone(),
                    source,
                };
                let mut file = &link.file;
                file.seek(SeekFrom::Start(0))
                    .map_err(|source| ImageError::Io { offset: 0, source })
                    .map_err(apply_err)?;
                let header = &link.header;
                let mut visit = |region: u32, offset: u64, data: &[u8]| {
                    apply(header, region, offset, data);
                };
                image::read_image(file, &inner.app, Some(&mut visit)).map_err(apply_err)?;
            }
            let newest = chain
                .last()
                .expect("a good chain holds at least its newest image");
            return Ok(Some(Recovery {
                seq: cand,
                header: newest.header.clone(),
                chain: chain.iter().map(|c| c.info.seq).collect(),
                skipped,
            }));
        }
        Ok(None)
    }
}

impl Inner {
    /// Creates the temp file of image `header.seq` (exclusively), passes failpoint `created`
    /// and writes the header; on failure nothing remains.
    fn create_temp(
        &self,
        header: &ImageHeader,
        created: &'static str,
    ) -> Result<(ImageWriter<ImageFile>, PathBuf), StoreError> {
        let pid = rustix::process::getpid().as_raw_nonzero().get();
        let tmp_path = self.dir.join(temp_name(header.seq, pid));
        // Readable too: a commit reads back the footer of an image another process finished.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(IMAGE_MODE)
            .open(&tmp_path)
            .map_err(io_err("create temp file", &tmp_path))?;
        let remove_tmp = |e: StoreError| {
            let _ = fs::remove_file(&tmp_path);
            e
        };
        pass(created, &tmp_path).map_err(remove_tmp)?;
        let writer = ImageWriter::new(ImageFile::new(file), header)
            .map_err(|source| StoreError::Image {
                path: tmp_path.clone(),
                source,
            })
            .map_err(remove_tmp)?;
        Ok((writer, tmp_path))
    }

    /// The atomic recipe for a temp file whose image is complete: fdatasync, rename to
    /// `final_path` (over an existing file only when `replace`, which compaction does), fsync of
    /// the directory, each step followed by its failpoint in `points`; then the image counts as
    /// verified for this process. Sets `renamed` once the rename happened.
    #[allow(clippy::too_many_arguments)] // one private recipe for commit and compaction
    fn seal(
        &self,
        file: &File,
        tmp: &Path,
        final_path: &Path,
        header: &ImageHeader,
        summary: &ImageSummary,
        points: &Points,
        replace: bool,
        renamed: &mut bool,
    ) -> Result<ImageInfo, StoreError> {
        pass(points.written, tmp)?;
        file.sync_data().map_err(io_err("fdatasync", tmp))?;
        pass(points.synced, tmp)?;
        let meta = file.metadata().map_err(io_err("stat", tmp))?;
        let ident = FileIdent::of(&meta);
        let info = ImageInfo {
            seq: header.seq,
            parent: header.parent,
            created_unix_ns: header.created_unix_ns,
            file_bytes: summary.file_bytes,
            data_bytes: summary.data_bytes,
            path: final_path.to_owned(),
        };
        // This process wrote and synced the image, so it counts as verified for planning and
        // retention (recovery re-verifies regardless). Known before the rename (which keeps
        // the identity): a thread that opens the file the moment it appears must not verify
        // a whole image while its application is paused.
        self.remember(Verified {
            ident: ident.clone(),
            header: header.clone(),
            info: info.clone(),
        });
        let renaming = if replace {
            fs::rename(tmp, final_path)
        } else {
            rename_noreplace(tmp, final_path)
        };
        if let Err(e) = renaming {
            self.unremember(header.seq, &ident);
            return Err(io_err("rename", tmp)(e));
        }
        *renamed = true;
        pass(points.renamed, final_path)?;
        fsync_dir(&self.dir)?;
        pass(points.dir_synced, final_path)?;
        Ok(info)
    }

    /// Records a verified (or written) file of sequence `v.info.seq`, keeping the newest two.
    fn remember(&self, v: Verified) {
        let mut cache = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        let files = cache.entry(v.info.seq).or_default();
        files.retain(|f| f.ident != v.ident);
        files.insert(0, v);
        files.truncate(2);
    }

    fn unremember(&self, seq: u64, ident: &FileIdent) {
        let mut cache = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(files) = cache.get_mut(&seq) {
            files.retain(|f| f.ident != *ident);
        }
    }

    /// Sequences of committed image files, ascending.
    fn scan(&self) -> Result<Vec<u64>, StoreError> {
        let mut seqs = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("read directory", &self.dir))? {
            let entry = entry.map_err(io_err("read directory", &self.dir))?;
            if let Some(seq) = entry.file_name().to_str().and_then(parse_image_name) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        Ok(seqs)
    }

    fn forget(&self, seq: u64) {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&seq);
    }

    /// Opens image `seq` and verifies it fully, unless `trust_cache` and this process already
    /// verified (or wrote) exactly this file.
    fn check(&self, seq: u64, trust_cache: bool) -> Result<Checked, StoreError> {
        let path = self.dir.join(image_name(seq));
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    seq,
                    dir: self.dir.clone(),
                });
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let ident = FileIdent::of(&file.metadata().map_err(io_err("stat", &path))?);
        if trust_cache {
            let cache = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(v) = cache
                .get(&seq)
                .and_then(|files| files.iter().find(|v| v.ident == ident))
            {
                return Ok(Checked {
                    header: v.header.clone(),
                    info: v.info.clone(),
                    file,
                });
            }
        }
        let (header, summary) =
            image::read_image(&file, &self.app, None).map_err(|source| StoreError::Image {
                path: path.clone(),
                source,
            })?;
        if header.seq != seq {
            return Err(StoreError::NameMismatch {
                path,
                named: seq,
                header: header.seq,
            });
        }
        let info = ImageInfo {
            seq,
            parent: header.parent,
            created_unix_ns: header.created_unix_ns,
            file_bytes: summary.file_bytes,
            data_bytes: summary.data_bytes,
            path,
        };
        self.remember(Verified {
            ident,
            header: header.clone(),
            info: info.clone(),
        });
        Ok(Checked { header, info, file })
    }

    /// The chain of `seq` (full base first) if every image in it checks out. A link found
    /// missing under an image that was checked is most likely a compaction at work (the image
    /// replaced by its full equivalent, the old ancestors removed): the walk starts again, up
    /// to `CHAIN_WALK_ATTEMPTS` times.
    fn good_chain(
        &self,
        seq: u64,
        trust_cache: bool,
        memo: &mut Memo,
    ) -> Result<Vec<Rc<Checked>>, ChainFault> {
        let mut attempt = 1;
        loop {
            let retry = attempt < CHAIN_WALK_ATTEMPTS;
            match self.walk_chain(seq, trust_cache, memo, retry) {
                Ok(chain) => return Ok(chain),
                Err(WalkStop::Fault(f)) => return Err(f),
                Err(WalkStop::Vanished(walked)) => {
                    for s in walked {
                        memo.remove(&s);
                    }
                    attempt += 1;
                }
            }
        }
    }

    fn walk_chain(
        &self,
        seq: u64,
        trust_cache: bool,
        memo: &mut Memo,
        retry: bool,
    ) -> Result<Vec<Rc<Checked>>, WalkStop> {
        let mut chain: Vec<Rc<Checked>> = Vec::new();
        let mut cur = seq;
        loop {
            let checked = match memo.get(&cur) {
                Some(r) => r.clone(),
                None => {
                    let r = match self.check(cur, trust_cache) {
                        Ok(c) => Ok(Rc::new(c)),
                        Err(e @ StoreError::Io { .. }) => {
                            return Err(ChainFault::Fatal(e).into());
                        }
                        Err(StoreError::NotFound { .. }) if retry && cur != seq => {
                            return Err(WalkStop::Vanished(
                                chain.iter().map(|c| c.info.seq).collect(),
                            ));
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    memo.insert(cur, r.clone());
                    r
                }
            };
            let checked = match checked {
                Ok(c) => c,
                Err(reason) if cur == seq => return Err(ChainFault::Refused(reason).into()),
                Err(reason) => {
                    return Err(ChainFault::Refused(format!(
                        "chain broken: image {cur}, needed by image {seq}, is refused: {reason}"
                    ))
                    .into());
                }
            };
            if let Some(child) = chain.last()
                && checked.header.stream != child.header.stream
            {
                return Err(ChainFault::Refused(format!(
                    "chain broken: image {cur} is of stream {} but image {} of stream {}",
                    checked.header.stream, child.info.seq, child.header.stream
                ))
                .into());
            }
            let parent = checked.header.parent;
            chain.push(checked);
            match parent {
                None => break,
                // The format guarantees parent < seq, so this walk always ends.
                Some(p) => cur = p,
            }
        }
        chain.reverse();
        Ok(chain)
    }

    fn retain(&self) -> Result<Vec<u64>, StoreError> {
        let seqs = self.scan()?;
        let keep = self.policy.keep.max(1);
        let mut memo = Memo::new();
        let mut needed: HashSet<u64> = HashSet::new();
        let mut newest_good = None;
        let mut good = 0;
        for &cand in seqs.iter().rev() {
            if good == keep {
                break;
            }
            match self.good_chain(cand, true, &mut memo) {
                Ok(chain) => {
                    newest_good.get_or_insert(cand);
                    good += 1;
                    needed.extend(chain.iter().map(|c| c.info.seq));
                }
                Err(ChainFault::Refused(_)) => {}
                Err(ChainFault::Fatal(e)) => return Err(e),
            }
        }
        let Some(newest_good) = newest_good else {
            return Ok(Vec::new());
        };
        let mut deleted = Vec::new();
        for &seq in seqs
            .iter()
            .filter(|&&s| s < newest_good && !needed.contains(&s))
        {
            let path = self.dir.join(image_name(seq));
            match fs::remove_file(&path) {
                Ok(()) => deleted.push(seq),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("delete", &path)(e)),
            }
            self.forget(seq);
        }
        if !deleted.is_empty() {
            fsync_dir(&self.dir)?;
        }
        Ok(deleted)
    }
}

/// An image being written into its temp file. `commit` makes it a checkpoint; `abort` or drop
/// removes the temp file.
#[derive(Debug)]
pub struct Pending {
    inner: Arc<Inner>,
    header: ImageHeader,
    tmp_path: PathBuf,
    final_path: PathBuf,
    /// Present until `commit` takes it; `commit` and `abort` consume the Pending.
    writer: Option<ImageWriter<ImageFile>>,
    done: bool,
}

impl Pending {
    /// The image writer: add the chunks through it (`chunks` writes many with few system
    /// calls, straight from where the data lies).
    pub fn writer(&mut self) -> &mut ImageWriter<ImageFile> {
        self.writer
            .as_mut()
            .expect("the writer is present until commit or abort consumes the Pending")
    }

    /// Adds a chunk through the writer (see `ImageWriter::chunk`), naming the temp file in the
    /// error.
    pub fn chunk(&mut self, region_index: u32, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        let tmp = self.tmp_path.clone();
        self.writer()
            .chunk(region_index, offset, data)
            .map_err(|source| StoreError::Image { path: tmp, source })
    }

    /// The sequence being written.
    pub fn seq(&self) -> u64 {
        self.header.seq
    }

    /// The header being written.
    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    /// The temp file being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// The atomic recipe: finish (footer), fdatasync, rename to the final name, fsync the
    /// directory; then retention. On error nothing of the new image remains (temp file or
    /// renamed file removed) and the previous checkpoints are intact. A retention failure does
    /// not fail the commit (the image is committed); the next commit or `Store::retain` retries.
    pub fn commit(mut self) -> Result<ImageInfo, StoreError> {
        let writer = self
            .writer
            .take()
            .expect("the writer is present until commit or abort consumes the Pending");
        let tmp = self.tmp_path.clone();
        self.finish_and_seal(|| {
            writer
                .finish()
                .map(|(out, summary)| (out.file, summary))
                .map_err(|source| StoreError::Image { path: tmp, source })
        })
    }

    /// Commits an image that was completed, footer included, through a copy of this Pending's
    /// writer in another process: a copy-on-write snapshot child that wrote onto the same open
    /// file and reported `summary` (what its `finish_in_place` returned). Checks the file
    /// against that report (its length, the footer's counts), then runs the recipe as
    /// `commit` does. This process's own writer must not have written anything after `begin`.
    pub fn commit_finished(mut self, summary: &ImageSummary) -> Result<ImageInfo, StoreError> {
        let writer = self
            .writer
            .take()
            .expect("the writer is present until commit or abort consumes the Pending");
        let tmp = self.tmp_path.clone();
        let summary = summary.clone();
        self.finish_and_seal(move || {
            let (out, _) = writer.into_parts();
            let file = out.file;
            let unfinished = |reason: String| StoreError::Unfinished {
                path: tmp.clone(),
                reason,
            };
            let len = file.metadata().map_err(io_err("stat", &tmp))?.len();
            if len != summary.file_bytes {
                return Err(unfinished(format!(
                    "it holds {len} bytes, its writer reported {}",
                    summary.file_bytes
                )));
            }
            let (chunks, data_bytes) =
                image::read_footer(&mut &file).map_err(|source| StoreError::Image {
                    path: tmp.clone(),
                    source,
                })?;
            if (chunks, data_bytes) != (summary.chunks, summary.data_bytes) {
                return Err(unfinished(format!(
                    "its footer counts {chunks} chunks of {data_bytes} bytes, its writer \
                     reported {} chunks of {} bytes",
                    summary.chunks, summary.data_bytes
                )));
            }
            Ok((file, summary))
        })
    }

    /// Runs `finish` (which yields the completed temp file) and the atomic recipe; cleans up
    /// on error, runs retention on success.
    fn finish_and_seal(
        &mut self,
        finish: impl FnOnce() -> Result<(File, ImageSummary), StoreError>,
    ) -> Result<ImageInfo, StoreError> {
        self.done = true;
        let mut renamed = false;
        let result = finish().and_then(|(file, summary)| {
            self.inner.seal(
                &file,
                &self.tmp_path,
                &self.final_path,
                &self.header,
                &summary,
                &COMMIT_POINTS,
                false,
                &mut renamed,
            )
        });
        match result {
            Ok(info) => {
                // Retention is housekeeping: the image is durable whatever it says.
                let _ = self.inner.retain();
                Ok(info)
            }
            Err(e) => {
                let _ = fs::remove_file(&self.tmp_path);
                if renamed {
                    self.inner.forget(self.header.seq);
                    let _ = fs::remove_file(&self.final_path);
                    let _ = fsync_dir(&self.inner.dir);
                }
                Err(e)
            }
        }
    }

    /// Removes the temp file; nothing is committed.
    pub fn abort(mut self) {
        self.done = true;
        let _ = fs::remove_file(&self.tmp_path);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn image_names_round_trip_and_strangers_are_ignored() {
        for seq in [1, 42, u64::MAX] {
            assert_eq!(parse_image_name(&image_name(seq)), Some(seq));
        }
        assert_eq!(image_name(7), "00000000000000000007.ckpt");
        for bad in [
            "7.ckpt",
            "0000000000000000007.ckpt",
            "000000000000000000007.ckpt",
            "0000000000000000000x.ckpt",
            "99999999999999999999.ckpt",
            "00000000000000000007.ckpt.bak",
            "+0000000000000000007.ckpt",
        ] {
            assert_eq!(parse_image_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn temp_names_parse() {
        assert_eq!(parse_temp_name(&temp_name(5, 1234)), Some(Some(1234)));
        assert_eq!(parse_temp_name(".tmp-x-1"), Some(None));
        assert_eq!(parse_temp_name(".tmp-5"), Some(None));
        assert_eq!(parse_temp_name("00000000000000000007.ckpt"), None);
        assert!(process_is_gone(0));
        assert!(process_is_gone(-5));
        assert!(!process_is_gone(
            rustix::process::getpid().as_raw_nonzero().get()
        ));
    }

    #[test]
    fn store_and_pending_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Store>();
        send::<Pending>();
        send_sync::<StoreError>();
    }
}
