//! Shared by the store, recovery, crash and disk-full tests: a model of an application's
//! critical memory with page-level dirty tracking, checkpointed through the real store the way
//! libft does it (plan, begin, chunks of dirty pages or everything, commit, and compaction when
//! the plan asks for it).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use ckpt::{ImageHeader, ImageInfo, Plan, Recovery, RegionDesc, Store, StoreError};

pub const APP: &str = "ckpt-test-app";
pub const PAGE: usize = 4096;
pub const STREAM: u32 = 42;

/// The memory being checkpointed: regions, pages written since the last commit, and the
/// sequence of that commit (what an increment is relative to).
#[derive(Debug, Clone)]
pub struct Model {
    pub regions: Vec<Vec<u8>>,
    dirty: Vec<BTreeSet<usize>>,
    pub last_committed: Option<u64>,
}

impl Model {
    pub fn new(lens: &[usize]) -> Self {
        Model {
            regions: lens.iter().map(|&l| vec![0; l]).collect(),
            dirty: lens.iter().map(|_| BTreeSet::new()).collect(),
            last_committed: None,
        }
    }

    pub fn zeroed(&self) -> Vec<Vec<u8>> {
        self.regions.iter().map(|r| vec![0; r.len()]).collect()
    }

    pub fn write(&mut self, region: usize, offset: usize, bytes: &[u8]) {
        self.regions[region][offset..offset + bytes.len()].copy_from_slice(bytes);
        if bytes.is_empty() {
            return;
        }
        for page in offset / PAGE..=(offset + bytes.len() - 1) / PAGE {
            self.dirty[region].insert(page);
        }
    }

    pub fn header(&self, seq: u64, parent: Option<u64>) -> ImageHeader {
        ImageHeader {
            app: APP.into(),
            stream: STREAM,
            seq,
            parent,
            created_unix_ns: ckpt::unix_now_ns(),
            page_size: u32::try_from(PAGE).unwrap(),
            regions: self
                .regions
                .iter()
                .enumerate()
                .map(|(i, r)| RegionDesc {
                    id: u32::try_from(i).unwrap() + 1,
                    base: 0x5000_0000 + (i as u64) * 0x100_0000,
                    len: r.len() as u64,
                })
                .collect(),
        }
    }

    /// Whether the next image may be incremental: only against what this model committed last.
    pub fn parent_for(&self, plan: &Plan) -> Option<u64> {
        plan.parent.filter(|p| Some(*p) == self.last_committed)
    }

    /// Writes the image for `plan` into a begun Pending and commits it.
    pub fn checkpoint_with(&mut self, store: &Store, plan: &Plan) -> Result<ImageInfo, StoreError> {
        let parent = self.parent_for(plan);
        let mut pending = store.begin(&self.header(plan.seq, parent))?;
        for (ri, region) in self.regions.iter().enumerate() {
            let ri32 = u32::try_from(ri).unwrap();
            if parent.is_none() {
                pending.chunk(ri32, 0, region)?;
                continue;
            }
            // Runs of consecutive dirty pages become one chunk each.
            let pages: Vec<usize> = self.dirty[ri].iter().copied().collect();
            let mut i = 0;
            while i < pages.len() {
                let mut j = i;
                while j + 1 < pages.len() && pages[j + 1] == pages[j] + 1 {
                    j += 1;
                }
                let start = pages[i] * PAGE;
                let end = ((pages[j] + 1) * PAGE).min(region.len());
                pending.chunk(ri32, start as u64, &region[start..end])?;
                i = j + 1;
            }
        }
        let info = pending.commit()?;
        for d in &mut self.dirty {
            d.clear();
        }
        self.last_committed = Some(info.seq);
        if plan.compact && parent.is_some() {
            // As libft does in the background: the increment is committed, then replaced by
            // the full image of the same state; retention (libft's next commit) then drops
            // the chain nothing needs any more.
            let full = store.compact(info.seq, &mut || true)?;
            store.retain()?;
            return Ok(full);
        }
        Ok(info)
    }

    pub fn checkpoint(&mut self, store: &Store) -> ImageInfo {
        let plan = store.plan().unwrap();
        self.checkpoint_with(store, &plan).unwrap()
    }
}

/// Recovers `store` into zeroed regions shaped like `model`.
pub fn recover(store: &Store, model: &Model) -> (Vec<Vec<u8>>, Option<Recovery>) {
    let mut bufs = model.zeroed();
    let r = store
        .recover(&mut |_h, region, off, data| {
            let off = usize::try_from(off).unwrap();
            bufs[usize::try_from(region).unwrap()][off..off + data.len()].copy_from_slice(data);
        })
        .unwrap();
    (bufs, r)
}

/// A small deterministic generator (xorshift64*), so failures reproduce from the seed.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
}

pub fn image_path(dir: &Path, seq: u64) -> std::path::PathBuf {
    dir.join(format!("{seq:020}.ckpt"))
}

pub fn flip_byte(path: &Path, at: u64) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x10;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
}

pub fn truncate(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Names of the files in `dir`, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

pub fn seqs(store: &Store) -> Vec<u64> {
    store.list().unwrap().iter().map(|i| i.seq).collect()
}
