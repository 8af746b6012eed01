//! The local checkpoint store: one directory per application stream holding committed images
//! `<seq:020>.ckpt` and in-flight `.tmp-<seq>-<pid>` files. Owns the atomic commit recipe,
//! retention and recovery (newest image whose whole chain verifies). It must never rename an
//! unsynced image into place, never delete an image a kept checkpoint needs, and never apply a
//! byte of a chain before the whole chain has verified.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError};

use crate::failpoint;
use crate::image::{self, ImageError, ImageHeader, ImageWriter};

/// Default number of good checkpoints retention keeps.
pub const DEFAULT_KEEP: usize = 3;
/// Default number of increments after which the next image is a full one.
pub const DEFAULT_FULL_EVERY: u32 = 8;
/// Write buffer of an image being committed; large chunks bypass it.
const WRITE_BUFFER: usize = 256 * 1024;
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
    /// A full image after this many increments; 0 means every image is full. Default 8.
    pub full_every: u32,
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

/// One committed image file of `Store::list_entries`: its sequence and its cheap description,
/// or why even that could not be read.
pub type ListEntry = (u64, Result<ImageInfo, StoreError>);

/// The next image to write: its sequence, and the image it may be an increment against
/// (`None`: it must be full).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub seq: u64,
    pub parent: Option<u64>,
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

/// Per-call memo of image checks, so a broken base is judged once, not once per descendant.
type Memo = HashMap<u64, Result<Rc<Checked>, String>>;

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    app: String,
    policy: StorePolicy,
    verified: Mutex<HashMap<u64, Verified>>,
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
    /// increment: against the newest good image when the chain since its full base has fewer
    /// than `full_every` increments, else it must be full.
    pub fn plan(&self) -> Result<Plan, StoreError> {
        let seqs = self.inner.scan()?;
        let seq = seqs.last().map_or(1, |s| s.saturating_add(1));
        let mut memo = Memo::new();
        for &cand in seqs.iter().rev() {
            match self.inner.good_chain(cand, true, &mut memo) {
                Ok(chain) => {
                    let increments = chain.len() - 1;
                    let full_every =
                        usize::try_from(self.inner.policy.full_every).unwrap_or(usize::MAX);
                    let parent = (increments < full_every).then_some(cand);
                    return Ok(Plan { seq, parent });
                }
                Err(ChainFault::Refused(_)) => continue,
                Err(ChainFault::Fatal(e)) => return Err(e),
            }
        }
        Ok(Plan { seq, parent: None })
    }

    /// Starts writing image `header.seq`: creates its temp file (exclusively) and writes the
    /// header. The sequence must be above every committed image, and a parent must be a
    /// verifiable image of this store.
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
                Ok(_) => {}
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
        let pid = rustix::process::getpid().as_raw_nonzero().get();
        let tmp_path = inner.dir.join(temp_name(header.seq, pid));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(IMAGE_MODE)
            .open(&tmp_path)
            .map_err(io_err("create temp file", &tmp_path))?;
        let remove_tmp = |e: StoreError| {
            let _ = fs::remove_file(&tmp_path);
            e
        };
        failpoint::hit(failpoint::COMMIT_CREATED)
            .map_err(io_err("pass failpoint commit.created for", &tmp_path))
            .map_err(remove_tmp)?;
        let writer = ImageWriter::new(BufWriter::with_capacity(WRITE_BUFFER, file), header)
            .map_err(|source| StoreError::Image {
                path: tmp_path.clone(),
                source,
            })
            .map_err(remove_tmp)?;
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
            if let Some(v) = cache.get(&seq).filter(|v| v.ident == ident) {
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
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                seq,
                Verified {
                    ident,
                    header: header.clone(),
                    info: info.clone(),
                },
            );
        Ok(Checked { header, info, file })
    }

    /// The chain of `seq` (full base first) if every image in it checks out.
    fn good_chain(
        &self,
        seq: u64,
        trust_cache: bool,
        memo: &mut Memo,
    ) -> Result<Vec<Rc<Checked>>, ChainFault> {
        let mut chain: Vec<Rc<Checked>> = Vec::new();
        let mut cur = seq;
        loop {
            let checked = match memo.get(&cur) {
                Some(r) => r.clone(),
                None => {
                    let r = match self.check(cur, trust_cache) {
                        Ok(c) => Ok(Rc::new(c)),
                        Err(e @ StoreError::Io { .. }) => return Err(ChainFault::Fatal(e)),
                        Err(e) => Err(e.to_string()),
                    };
                    memo.insert(cur, r.clone());
                    r
                }
            };
            let checked = match checked {
                Ok(c) => c,
                Err(reason) if cur == seq => return Err(ChainFault::Refused(reason)),
                Err(reason) => {
                    return Err(ChainFault::Refused(format!(
                        "chain broken: image {cur}, needed by image {seq}, is refused: {reason}"
                    )));
                }
            };
            if let Some(child) = chain.last()
                && checked.header.stream != child.header.stream
            {
                return Err(ChainFault::Refused(format!(
                    "chain broken: image {cur} is of stream {} but image {} of stream {}",
                    checked.header.stream, child.info.seq, child.header.stream
                )));
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
    writer: Option<ImageWriter<BufWriter<File>>>,
    done: bool,
}

impl Pending {
    /// The image writer: add the chunks through it.
    pub fn writer(&mut self) -> &mut ImageWriter<BufWriter<File>> {
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

    /// The temp file being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// The atomic recipe: finish (footer), flush, fdatasync, rename to the final name, fsync
    /// the directory; then retention. On error nothing of the new image remains (temp file or
    /// renamed file removed) and the previous checkpoints are intact. A retention failure does
    /// not fail the commit (the image is committed); the next commit or `Store::retain` retries.
    pub fn commit(mut self) -> Result<ImageInfo, StoreError> {
        self.done = true;
        let writer = self
            .writer
            .take()
            .expect("the writer is present until commit or abort consumes the Pending");
        let mut renamed = false;
        match self.commit_steps(writer, &mut renamed) {
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

    fn commit_steps(
        &self,
        writer: ImageWriter<BufWriter<File>>,
        renamed: &mut bool,
    ) -> Result<ImageInfo, StoreError> {
        let tmp = &self.tmp_path;
        let (buffered, summary) = writer.finish().map_err(|source| StoreError::Image {
            path: tmp.clone(),
            source,
        })?;
        let file = buffered
            .into_inner()
            .map_err(|e| io_err("flush", tmp)(e.into_error()))?;
        failpoint::hit(failpoint::COMMIT_WRITTEN)
            .map_err(io_err("pass failpoint commit.written for", tmp))?;
        file.sync_data().map_err(io_err("fdatasync", tmp))?;
        failpoint::hit(failpoint::COMMIT_SYNCED)
            .map_err(io_err("pass failpoint commit.synced for", tmp))?;
        rename_noreplace(tmp, &self.final_path).map_err(io_err("rename", tmp))?;
        *renamed = true;
        failpoint::hit(failpoint::COMMIT_RENAMED).map_err(io_err(
            "pass failpoint commit.renamed for",
            &self.final_path,
        ))?;
        fsync_dir(&self.inner.dir)?;
        failpoint::hit(failpoint::COMMIT_DIR_SYNCED).map_err(io_err(
            "pass failpoint commit.dir_synced for",
            &self.final_path,
        ))?;
        let meta = file.metadata().map_err(io_err("stat", &self.final_path))?;
        let info = ImageInfo {
            seq: self.header.seq,
            parent: self.header.parent,
            created_unix_ns: self.header.created_unix_ns,
            file_bytes: summary.file_bytes,
            data_bytes: summary.data_bytes,
            path: self.final_path.clone(),
        };
        // This process wrote and synced the image, so it counts as verified for planning and
        // retention (recovery re-verifies regardless).
        self.inner
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                self.header.seq,
                Verified {
                    ident: FileIdent::of(&meta),
                    header: self.header.clone(),
                    info: info.clone(),
                },
            );
        Ok(info)
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
