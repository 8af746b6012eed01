//! The typed metadata section of a process image: registers, memory map, descriptors, signal
//! actions and mm fields, MessagePack-encoded into region 0 of an ordinary v1 image (so the
//! image format, its checksums and the store are unchanged). Owns the region-id scheme and the
//! metadata version; it must never decode without checking that version, and never trust a
//! decoded value that indexes something (regions, signals) without bounds checks by its users.
//!
//! ```text
//! region id 0                  metadata (this module), base 0, len = a capacity the encoding
//!                              fits in (zero-padded: increments of a chain keep its length)
//! region id 1 + i              contents of mapping i (base = its start, len = its length)
//! region id FILE_REGION_BASE+k contents of written regular file k at dump time (base 0)
//! ```

use serde::{Deserialize, Serialize};

/// Version of the metadata encoding; bumped on any incompatible change of these types.
/// Version 2 added `Mapping::runs` (version 1 images still decode, without runs); version 3
/// added `ThreadState::clear_child_tid` (older images decode with None, which a restore of
/// their other threads refuses); version 4 added `FdState::excluded` (older images decode
/// with false, which is what they meant).
pub const META_VERSION: u32 = 4;
/// Oldest metadata version this build reads.
pub const META_VERSION_MIN: u32 = 1;
/// Region id of the metadata blob.
pub const META_REGION_ID: u32 = 0;
/// Region id of mapping i's contents is `MAPPING_REGION_BASE + i`.
pub const MAPPING_REGION_BASE: u32 = 1;
/// Region id of file snapshot k's contents is `FILE_REGION_BASE + k`.
pub const FILE_REGION_BASE: u32 = 0x8000_0000;
/// Image stream of process checkpoints (ASCII "PROC"), apart from libft's streams.
pub const PROC_STREAM: u32 = 0x5052_4f43;
/// Highest signal number on Linux.
pub const NSIG: usize = 64;

/// Everything about a process except its memory contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessMeta {
    pub version: u32,
    pub pid: i32,
    pub comm: String,
    pub exe: String,
    pub cwd: String,
    /// The thread whose tid is the pid comes first.
    pub threads: Vec<ThreadState>,
    pub mappings: Vec<Mapping>,
    pub fds: Vec<FdState>,
    pub files: Vec<FileSnapshot>,
    /// Action of signal `i + 1`.
    pub sigactions: Vec<SigAction>,
    pub mm: MmLayout,
    pub auxv: Vec<u8>,
}

/// One thread's CPU and kernel-side state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadState {
    pub tid: i32,
    /// `struct user_regs_struct` as 27 words, already adjusted so that resuming at them
    /// restarts an interrupted system call (`orig_rax` = -1).
    pub regs: Vec<u64>,
    /// The `NT_X86_XSTATE` register set (XSAVE layout).
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    /// The system call the thread was stopped in and that restarts on resume, if any.
    pub restarted_syscall: Option<u64>,
    pub rseq: Option<Rseq>,
    /// Head and length of the robust futex list (0, 0 when none).
    pub robust_list: (u64, u64),
    /// The thread's `clear_child_tid` (`set_tid_address`; 0 when none): where the kernel
    /// clears its tid and wakes joiners when it exits. None in version 1 and 2 images, and
    /// when the thread could not be asked at dump time.
    #[serde(default)]
    pub clear_child_tid: Option<u64>,
}

/// An rseq registration (`PTRACE_GET_RSEQ_CONFIGURATION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub signature: u32,
}

/// Protection bits of a mapping.
pub const PROT_R: u8 = 1;
pub const PROT_W: u8 = 2;
pub const PROT_X: u8 = 4;

/// One line of `/proc/PID/maps` and how it comes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// `PROT_R | PROT_W | PROT_X` bits.
    pub prot: u8,
    pub shared: bool,
    pub offset: u64,
    pub kind: MappingKind,
    /// True when the image holds contents for it (region `MAPPING_REGION_BASE + index`).
    pub has_contents: bool,
    /// The page runs `(start, end)` that held data of their own at dump time. A restore writes
    /// only inside them, so a page freed since an older image of the chain comes back empty
    /// (or as its file's page) instead of with the older contents. None in version 1 images.
    #[serde(default)]
    pub runs: Option<Vec<(u64, u64)>>,
}

/// What backs a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MappingKind {
    /// Anonymous memory (shared or private); `name` is `[heap]`, `[stack]`, `[anon:x]`, a
    /// deleted file's name (its contents are saved whole) or empty.
    Anon { name: String },
    /// A file mapped from `path`, identified by device and inode at dump time.
    File {
        path: String,
        dev: u64,
        ino: u64,
        size: u64,
        mtime_ns: i128,
    },
    /// A kernel-provided mapping (`[vdso]`, `[vvar]`, `[vvar_vclock]`, `[vsyscall]`).
    Special { name: String },
}

impl Mapping {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn is_stack(&self) -> bool {
        matches!(&self.kind, MappingKind::Anon { name } if name == "[stack]")
    }
}

/// One open file descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdState {
    pub fd: i32,
    pub kind: FdKind,
    /// `flags` of `/proc/PID/fdinfo/FD` (open flags, `O_CLOEXEC` included).
    pub flags: i32,
    pub pos: u64,
    pub dev: u64,
    pub ino: u64,
    /// A file left out of the snapshot (`DumpOptions::exclude_paths`/`exclude_fds`): its
    /// contents belong to the present and are neither saved nor put back. A restore or a
    /// rollback reopens it (or keeps it open) at its current end instead of at `pos`, with or
    /// without `O_APPEND`: an excluded file is meant to be a log, and for one opened without
    /// `O_APPEND` the checkpointed offset would make the replayed run overwrite what was
    /// written since the checkpoint (the end appends it after, as the history really went).
    /// False in images before metadata version 4.
    #[serde(default)]
    pub excluded: bool,
}

/// What an fd refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    File {
        path: String,
    },
    Directory {
        path: String,
    },
    /// A character device that holds no state worth keeping (`/dev/null`, `/dev/urandom`…).
    Device {
        path: String,
    },
    Pipe {
        target: String,
    },
    Socket {
        target: String,
    },
    /// Anything else (an anon inode, a tty, another device): recorded, not restorable.
    Other {
        target: String,
    },
}

impl FdKind {
    /// The path to reopen, when the descriptor can be reopened by path.
    pub fn reopen_path(&self) -> Option<&str> {
        match self {
            FdKind::File { path } | FdKind::Directory { path } | FdKind::Device { path } => {
                Some(path)
            }
            _ => None,
        }
    }

    /// How the descriptor reads in a report.
    pub fn describe(&self) -> String {
        match self {
            FdKind::File { path } => format!("file {path}"),
            FdKind::Directory { path } => format!("directory {path}"),
            FdKind::Device { path } => format!("device {path}"),
            FdKind::Pipe { target } => format!("pipe {target}"),
            FdKind::Socket { target } => format!("socket {target}"),
            FdKind::Other { target } => target.clone(),
        }
    }
}

/// A regular file the process had open for writing: its size at dump time and, when
/// `has_contents`, its whole contents (region `FILE_REGION_BASE + index`), so that a rollback
/// or a restore puts the file back as it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSnapshot {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub has_contents: bool,
}

/// A `struct kernel_sigaction` (x86_64): handler, flags, restorer, mask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// The mm fields `PR_SET_MM_MAP` sets (from `/proc/PID/stat` and the program break).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmLayout {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// Why metadata could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("process metadata does not decode: {0}")]
    Decode(String),
    #[error(
        "process metadata version {found} (this build reads {META_VERSION_MIN} to {META_VERSION})"
    )]
    Version { found: u32 },
    #[error("process metadata is inconsistent: {0}")]
    Invalid(String),
}

impl ProcessMeta {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("metadata types serialize without fallible parts")
    }

    /// Decodes and checks the invariants the restore code relies on. Bytes after the encoded
    /// value (the zero padding of the metadata region) are ignored.
    pub fn decode(bytes: &[u8]) -> Result<ProcessMeta, MetaError> {
        let mut de = rmp_serde::Deserializer::new(bytes);
        let meta: ProcessMeta = serde::Deserialize::deserialize(&mut de)
            .map_err(|e: rmp_serde::decode::Error| MetaError::Decode(e.to_string()))?;
        if !(META_VERSION_MIN..=META_VERSION).contains(&meta.version) {
            return Err(MetaError::Version {
                found: meta.version,
            });
        }
        meta.validate().map_err(MetaError::Invalid)?;
        Ok(meta)
    }

    fn validate(&self) -> Result<(), String> {
        if self.threads.is_empty() {
            return Err("no threads".into());
        }
        for t in &self.threads {
            if t.regs.len() != super::regs::USER_REGS_WORDS {
                return Err(format!(
                    "thread {} has {} register words",
                    t.tid,
                    t.regs.len()
                ));
            }
        }
        if self.sigactions.len() != NSIG {
            return Err(format!("{} signal actions", self.sigactions.len()));
        }
        let mut last_end = 0;
        for m in &self.mappings {
            if m.start >= m.end || m.start < last_end || m.start % 4096 != 0 || m.end % 4096 != 0 {
                return Err(format!(
                    "mapping {:#x}-{:#x} is empty, unaligned or out of order",
                    m.start, m.end
                ));
            }
            last_end = m.end;
            if let Some(runs) = &m.runs {
                let mut at = m.start;
                for &(s, e) in runs {
                    if s < at || s >= e || e > m.end {
                        return Err(format!(
                            "data run {s:#x}-{e:#x} of mapping {:#x}-{:#x} is out of order",
                            m.start, m.end
                        ));
                    }
                    at = e;
                }
            }
        }
        if u32::try_from(self.mappings.len()).is_err()
            || self.mappings.len() >= (FILE_REGION_BASE - MAPPING_REGION_BASE) as usize
        {
            return Err("too many mappings".into());
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    /// `ThreadState` and `ProcessMeta` as metadata version 2 wrote them (no clear_child_tid).
    #[derive(Serialize)]
    struct ThreadStateV2 {
        tid: i32,
        regs: Vec<u64>,
        xstate: Vec<u8>,
        sigmask: u64,
        restarted_syscall: Option<u64>,
        rseq: Option<Rseq>,
        robust_list: (u64, u64),
    }

    #[derive(Serialize)]
    struct ProcessMetaV2 {
        version: u32,
        pid: i32,
        comm: String,
        exe: String,
        cwd: String,
        threads: Vec<ThreadStateV2>,
        mappings: Vec<Mapping>,
        fds: Vec<FdState>,
        files: Vec<FileSnapshot>,
        sigactions: Vec<SigAction>,
        mm: MmLayout,
        auxv: Vec<u8>,
    }

    fn thread(tid: i32, ctid: Option<u64>) -> ThreadState {
        ThreadState {
            tid,
            regs: vec![7; super::super::regs::USER_REGS_WORDS],
            xstate: vec![1, 2, 3],
            sigmask: 0xa00,
            restarted_syscall: Some(0),
            rseq: None,
            robust_list: (0x1000, 24),
            clear_child_tid: ctid,
        }
    }

    fn meta(threads: Vec<ThreadState>) -> ProcessMeta {
        ProcessMeta {
            version: META_VERSION,
            pid: 10,
            comm: "x".into(),
            exe: "/bin/x".into(),
            cwd: "/".into(),
            threads,
            mappings: Vec::new(),
            fds: Vec::new(),
            files: Vec::new(),
            sigactions: vec![SigAction::default(); NSIG],
            mm: MmLayout::default(),
            auxv: Vec::new(),
        }
    }

    #[test]
    fn thread_state_round_trips() {
        let m = meta(vec![thread(10, Some(0x7000)), thread(11, Some(0x8000))]);
        let mut bytes = m.encode();
        bytes.resize(bytes.len() + 100, 0); // the region's zero padding
        assert_eq!(ProcessMeta::decode(&bytes).unwrap(), m);
    }

    /// `FdState` as metadata version 3 wrote it (no `excluded`).
    #[derive(Serialize)]
    struct FdStateV3 {
        fd: i32,
        kind: FdKind,
        flags: i32,
        pos: u64,
        dev: u64,
        ino: u64,
    }

    #[test]
    fn version_3_descriptors_decode_as_not_excluded() {
        let old = FdStateV3 {
            fd: 1,
            kind: FdKind::File {
                path: "/var/log/x.log".into(),
            },
            flags: libc::O_WRONLY | libc::O_APPEND,
            pos: 4096,
            dev: 8,
            ino: 12,
        };
        let fd: FdState = rmp_serde::from_slice(&rmp_serde::to_vec(&old).unwrap()).unwrap();
        assert_eq!((fd.fd, fd.pos, fd.excluded), (1, 4096, false));
        let mut m = meta(vec![thread(10, None)]);
        m.fds = vec![FdState {
            excluded: true,
            ..fd
        }];
        assert_eq!(ProcessMeta::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn version_2_metadata_decodes_without_clear_child_tid() {
        let m = meta(vec![thread(10, None), thread(11, None)]);
        let old = ProcessMetaV2 {
            version: 2,
            pid: m.pid,
            comm: m.comm.clone(),
            exe: m.exe.clone(),
            cwd: m.cwd.clone(),
            threads: m
                .threads
                .iter()
                .map(|t| ThreadStateV2 {
                    tid: t.tid,
                    regs: t.regs.clone(),
                    xstate: t.xstate.clone(),
                    sigmask: t.sigmask,
                    restarted_syscall: t.restarted_syscall,
                    rseq: t.rseq,
                    robust_list: t.robust_list,
                })
                .collect(),
            mappings: Vec::new(),
            fds: Vec::new(),
            files: Vec::new(),
            sigactions: m.sigactions.clone(),
            mm: m.mm,
            auxv: Vec::new(),
        };
        let decoded = ProcessMeta::decode(&rmp_serde::to_vec(&old).unwrap()).unwrap();
        assert_eq!(decoded.version, 2);
        assert_eq!(decoded.threads, m.threads);
    }
}
