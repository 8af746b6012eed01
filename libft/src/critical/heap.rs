//! The critical heap: one anonymous mapping at a fixed virtual address, and the allocator that
//! carves it up (TLSF, two-level segregated fit: O(1) allocate and free, immediate coalescing).
//!
//! Every byte of allocator state — the header with its free lists, bitmaps and named roots, and
//! every block header — lives inside the mapping, so a checkpoint of the mapping is a checkpoint
//! of the allocator, and a recovered heap goes on allocating exactly where it stopped. It never
//! maps over an existing mapping, and it bounds-checks every offset it reads from the heap.
//!
//! ```text
//! base                                                   base + top        base + size
//! | header: magic, top, bitmaps, free lists, roots | blocks ... | sentinel | never used |
//! block = { prev_phys u64, size|FREE|PREV_FREE u64 } + payload (free: next, prev links)
//! ```

use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::Error;
use super::vm::{self, align_up, page_size};

/// Critical memory needs the fixed high addresses of a 64-bit address space.
const _: () = assert!(usize::BITS == 64);

/// The reservation used when neither `FT_HEAP_SIZE` nor an API parameter sets one.
pub const DEFAULT_HEAP_SIZE: usize = 1 << 30;
/// The smallest heap: the header plus room for a few blocks.
pub const MIN_HEAP_SIZE: usize = 1 << 16;
/// The largest heap the allocator's size classes cover.
pub const MAX_HEAP_SIZE: usize = 1 << 40;
/// Default heap addresses lie in a window starting here: far above where x86_64 Linux loads
/// PIE executables and their brk heap (around 0x55..-0x56.. with ASLR) and far below where
/// `mmap` places libraries, thread stacks and anonymous memory (top-down from about 0x7f..).
pub const DEFAULT_WINDOW_BASE: usize = 0x5f00_0000_0000;
/// The window is cut into this many slots, one per application identity hash.
pub const DEFAULT_WINDOW_SLOTS: u64 = 64;
/// The distance between two slots, which is also the largest heap a default address fits.
pub const DEFAULT_SLOT_SIZE: usize = 64 << 30;
/// The largest alignment `alloc` honours.
pub const MAX_ALIGN: usize = 4096;
/// How many named roots the header holds.
pub const ROOT_SLOTS: usize = 32;
/// The longest root name, in bytes.
pub const ROOT_NAME_MAX: usize = 47;
/// Environment: the heap's fixed address, hex (`0x5f0000000000`).
pub const ENV_HEAP_ADDR: &str = "FT_HEAP_ADDR";
/// Environment: the heap's size, bytes with an optional binary suffix (`256MiB`, `1G`).
pub const ENV_HEAP_SIZE: &str = "FT_HEAP_SIZE";

const MAGIC: [u8; 8] = *b"FTHEAP\0\x01";
/// First word of a named slot (serialized critical value): magic, then the length.
const SLOT_MAGIC: u64 = u64::from_le_bytes(*b"FTSLOT\0\x01");
const SLOT_HEADER: u64 = 16;
const VERSION: u32 = 1;
/// Block and payload alignment.
const ALIGN: u64 = 16;
const BLOCK_HEADER: u64 = 16;
/// Header plus the two free-list links.
const MIN_BLOCK: u64 = 32;
const FREE: u64 = 1;
const PREV_FREE: u64 = 2;
const FLAG_BITS: u64 = ALIGN - 1;
const SL_LOG2: u32 = 4;
const SL_COUNT: usize = 1 << SL_LOG2;
/// Blocks below this size share the first first-level list, split linearly.
const SMALL_BLOCK: u64 = 256;
const FL_SHIFT: u32 = SMALL_BLOCK.trailing_zeros();
const FL_COUNT: usize = (MAX_HEAP_SIZE.trailing_zeros() - FL_SHIFT + 1) as usize;
/// Where the first block starts: the header, rounded up to a cache line.
const FIRST_BLOCK: u64 = ((size_of::<HeapHeader>() as u64) + 63) & !63;

/// FIRST_BLOCK as stored in the header.
#[allow(clippy::cast_possible_truncation)] // a few KiB, checked by header_fits_before_the_first_block
const FIRST_BLOCK_LEN: u32 = FIRST_BLOCK as u32;

/// A named pointer into the heap, so that a program finds its data again after recovery.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Root {
    /// NUL-padded UTF-8; all zero for an empty slot.
    name: [u8; ROOT_NAME_MAX + 1],
    /// Offset of the pointee from the heap base (0: none).
    offset: u64,
    reserved: u64,
}

/// The allocator's state at the heap base. Only integers: any bit pattern is a valid value, so
/// the zero-filled fresh mapping and a recovered image can both be viewed as one.
#[repr(C)]
#[derive(Debug)]
struct HeapHeader {
    magic: [u8; 8],
    version: u32,
    header_len: u32,
    base: u64,
    size: u64,
    /// Offset of the sentinel block header; the used span is `top + BLOCK_HEADER`.
    top: u64,
    /// Bytes in allocated blocks, headers included.
    allocated: u64,
    allocations: u64,
    fl_bitmap: u64,
    sl_bitmap: [u64; FL_COUNT],
    heads: [[u64; SL_COUNT]; FL_COUNT],
    roots: [Root; ROOT_SLOTS],
}

/// Where and how large the critical heap is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapConfig {
    /// Fixed, page-aligned virtual address of the heap.
    pub addr: usize,
    /// Reserved size in bytes (MAP_NORESERVE: only touched pages use memory).
    pub size: usize,
}

impl HeapConfig {
    /// The default for an application identity: [`DEFAULT_HEAP_SIZE`] at
    /// `DEFAULT_WINDOW_BASE + (xxh3(identity) % DEFAULT_WINDOW_SLOTS) * DEFAULT_SLOT_SIZE`, so
    /// every run of the same service asks for the same address and different services on one
    /// host rarely collide.
    pub fn for_identity(identity: &str) -> HeapConfig {
        let slot = xxhash_rust::xxh3::xxh3_64(identity.as_bytes()) % DEFAULT_WINDOW_SLOTS;
        HeapConfig {
            addr: DEFAULT_WINDOW_BASE + to_usize(slot) * DEFAULT_SLOT_SIZE,
            size: DEFAULT_HEAP_SIZE,
        }
    }

    /// [`HeapConfig::for_identity`] overridden by `FT_HEAP_ADDR` / `FT_HEAP_SIZE`.
    pub fn from_env(identity: &str) -> Result<HeapConfig, Error> {
        let mut config = HeapConfig::for_identity(identity);
        if let Some(addr) = std::env::var_os(ENV_HEAP_ADDR) {
            let text = addr.to_string_lossy();
            config.addr = parse_addr(&text).ok_or_else(|| {
                Error::Config(format!("{ENV_HEAP_ADDR}={text:?} is not a hex address"))
            })?;
        }
        if let Some(size) = std::env::var_os(ENV_HEAP_SIZE) {
            let text = size.to_string_lossy();
            config.size = parse_size(&text).ok_or_else(|| {
                Error::Config(format!(
                    "{ENV_HEAP_SIZE}={text:?} is not a size like 256MiB"
                ))
            })?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks alignment and bounds; the size is rounded up to whole pages by [`CriticalHeap::map`].
    pub fn validate(&self) -> Result<(), Error> {
        let page = page_size();
        if self.addr == 0 || !self.addr.is_multiple_of(page) {
            return Err(Error::Config(format!(
                "heap address {:#x} is not a non-zero multiple of the page size {page}",
                self.addr
            )));
        }
        if !(MIN_HEAP_SIZE..=MAX_HEAP_SIZE).contains(&self.size) {
            return Err(Error::Config(format!(
                "heap size {} is outside {MIN_HEAP_SIZE}..={MAX_HEAP_SIZE}",
                self.size
            )));
        }
        if self.addr.checked_add(self.size).is_none() {
            return Err(Error::Config(format!(
                "heap {:#x}+{:#x} wraps around the address space",
                self.addr, self.size
            )));
        }
        Ok(())
    }
}

/// Parses `0x5f0000000000` or `5f0000000000`.
pub fn parse_addr(text: &str) -> Option<usize> {
    let t = text.trim();
    let hex = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    usize::from_str_radix(&hex.replace('_', ""), 16).ok()
}

/// Parses a byte count with an optional binary suffix: `4096`, `64K`, `256MiB`, `1G`, `1GiB`.
pub fn parse_size(text: &str) -> Option<usize> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: usize = digits.parse().ok()?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => return None,
    };
    n.checked_mul(1usize << shift)
}

/// Usage figures of a heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes from the base to the end of the highest block ever handed out (what checkpoints
    /// cover); it only grows.
    pub used_span: usize,
    /// Bytes in allocated blocks, block headers included.
    pub allocated: usize,
    /// Number of live allocations.
    pub allocations: usize,
    /// The reserved size.
    pub size: usize,
}

/// The anonymous mapping; unmapped on drop.
#[derive(Debug)]
struct Mapping {
    base: NonNull<u8>,
    size: usize,
}

impl Mapping {
    fn map_fixed(addr: usize, size: usize) -> Result<Mapping, Error> {
        let flags = libc::MAP_PRIVATE
            | libc::MAP_ANONYMOUS
            | libc::MAP_NORESERVE
            | libc::MAP_FIXED_NOREPLACE;
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no memory that
        // anything else owns is affected; the result is checked below.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EEXIST) {
                return Err(address_in_use(addr, size));
            }
            return Err(Error::Map {
                addr,
                size,
                source: err,
            });
        }
        if p as usize != addr {
            // A kernel older than 4.17 ignores MAP_FIXED_NOREPLACE and picks another address.
            // SAFETY: `p` is the mapping of `size` bytes just created here, used by nothing.
            unsafe { libc::munmap(p, size) };
            return Err(address_in_use(addr, size));
        }
        // Precise dirty tracking wants 4 KiB pages: a huge page would turn one written byte
        // into 2 MiB of checkpoint. Advice only, so a failure changes nothing that matters.
        // SAFETY: the range is the mapping just created.
        unsafe { libc::madvise(p, size, libc::MADV_NOHUGEPAGE) };
        let base = NonNull::new(p.cast::<u8>()).ok_or(Error::Map {
            addr,
            size,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        Ok(Mapping { base, size })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map_fixed` with this base and size and nothing
        // else unmaps it; the heap that owned it is being dropped, so no reference into it
        // handed out by safe code outlives it (CriticalBox borrows the heap).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size) };
    }
}

fn address_in_use(addr: usize, size: usize) -> Error {
    let occupant = match vm::mappings_in(addr, addr + size) {
        Ok(maps) if !maps.is_empty() => maps
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        Ok(_) => "a mapping that vanished since".to_owned(),
        Err(e) => format!("(cannot read /proc/self/maps: {e})"),
    };
    Error::AddressInUse {
        addr,
        size,
        occupant,
    }
}

/// The critical heap. Thread-safe: one lock serialises the allocator, and checkpoints take the
/// same lock while they capture, so a snapshot never sees a half-updated free list.
#[derive(Debug)]
pub struct CriticalHeap {
    map: Mapping,
    lock: Mutex<()>,
}

// SAFETY: the mapping is plain memory owned by the heap for its whole life; allocator state in
// it is only read or written while `lock` is held, and payload bytes belong to the callers
// that allocated them.
unsafe impl Send for CriticalHeap {}
// SAFETY: as for Send: every shared access to allocator state goes through `lock`.
unsafe impl Sync for CriticalHeap {}

impl CriticalHeap {
    /// Maps a fresh, empty heap at `config.addr` (MAP_FIXED_NOREPLACE: an existing mapping in
    /// the range gives [`Error::AddressInUse`], naming it).
    pub fn map(config: HeapConfig) -> Result<CriticalHeap, Error> {
        config.validate()?;
        let size = align_up(config.size, page_size()).ok_or_else(|| {
            Error::Config(format!("heap size {} cannot be page-rounded", config.size))
        })?;
        let heap = CriticalHeap {
            map: Mapping::map_fixed(config.addr, size)?,
            lock: Mutex::new(()),
        };
        heap.lock().format();
        Ok(heap)
    }

    /// The heap's fixed base address.
    pub fn base(&self) -> usize {
        self.map.base.as_ptr() as usize
    }

    /// The reserved size in bytes.
    pub fn size(&self) -> usize {
        self.map.size
    }

    /// Whether `ptr` points into the heap's reservation.
    pub fn contains(&self, ptr: *const u8) -> bool {
        let p = ptr as usize;
        p >= self.base() && p - self.base() < self.size()
    }

    /// Allocates `size` bytes aligned to `align` (a power of two, at most [`MAX_ALIGN`]); the
    /// memory is not zeroed. `size` 0 gets a unique minimal block, like `malloc(0)`.
    pub fn alloc(&self, size: usize, align: usize) -> Result<NonNull<u8>, Error> {
        let mut guard = self.lock();
        let offset = guard.arena()?.alloc(size as u64, align as u64)?;
        Ok(guard.ptr_at(offset))
    }

    /// Frees a block returned by [`CriticalHeap::alloc`]. A pointer that is not the start of a
    /// live block of this heap is refused with [`Error::InvalidPointer`] when the block headers
    /// show it (not inside the heap, misaligned, already free).
    ///
    /// # Safety
    /// `ptr` must have come from `alloc` on this heap (or be recovered from a checkpoint of it)
    /// and must not be used after this call.
    pub unsafe fn free(&self, ptr: NonNull<u8>) -> Result<(), Error> {
        let offset = self.payload_offset(ptr)?;
        self.lock().arena()?.free(offset)
    }

    /// The usable size of the live block at `ptr` (at least what was asked for).
    pub fn usable_size(&self, ptr: NonNull<u8>) -> Result<usize, Error> {
        let offset = self.payload_offset(ptr)?;
        let mut guard = self.lock();
        let capacity = guard
            .arena()?
            .payload_capacity(offset)
            .map_err(|_| Error::InvalidPointer(ptr.as_ptr() as usize))?;
        Ok(to_usize(capacity))
    }

    /// Stores `ptr` under `name` in the heap header (None removes the name), so that the
    /// program finds it again after recovery. Names are 1..=[`ROOT_NAME_MAX`] bytes.
    pub fn set_root(&self, name: &str, ptr: Option<NonNull<u8>>) -> Result<(), Error> {
        let key = root_key(name)?;
        let offset = match ptr {
            Some(p) if self.contains(p.as_ptr()) => (p.as_ptr() as usize - self.base()) as u64,
            Some(p) => return Err(Error::InvalidPointer(p.as_ptr() as usize)),
            None => 0,
        };
        let mut guard = self.lock();
        guard.arena()?.set_root(&key, offset)
    }

    /// The pointer stored under `name`, if any.
    pub fn root(&self, name: &str) -> Result<Option<NonNull<u8>>, Error> {
        let key = root_key(name)?;
        let mut guard = self.lock();
        let offset = guard.arena()?.root(&key)?;
        Ok(offset.map(|o| guard.ptr_at(o)))
    }

    /// Usage figures.
    pub fn stats(&self) -> Result<HeapStats, Error> {
        let mut guard = self.lock();
        let arena = guard.arena()?;
        Ok(HeapStats {
            used_span: to_usize(arena.hdr.top + BLOCK_HEADER),
            allocated: to_usize(arena.hdr.allocated),
            allocations: to_usize(arena.hdr.allocations),
            size: self.size(),
        })
    }

    /// Walks every block and free list and checks the allocator's invariants: what recovery
    /// runs on a restored heap, and what tests run after stress.
    pub fn check(&self) -> Result<(), Error> {
        self.lock().arena()?.check()
    }

    /// Replaces the bytes of the named slot (a heap block found through the root `name`),
    /// growing it when needed; the new contents and the root change under one lock, so a
    /// checkpoint sees either the old or the new value, never a mix.
    pub(crate) fn write_slot(&self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        let key = root_key(name)?;
        let need = SLOT_HEADER + bytes.len() as u64;
        let mut guard = self.lock();
        let mut arena = guard.arena()?;
        let existing = arena.root(&key)?;
        let target = match existing {
            Some(offset) if arena.payload_capacity(offset)? >= need => offset,
            _ => {
                // Room to grow by half before the next move, if the heap has it.
                let fresh = match arena.alloc(need.saturating_add(need / 2), ALIGN) {
                    Ok(offset) => offset,
                    Err(Error::OutOfMemory { .. }) => arena.alloc(need, ALIGN)?,
                    Err(e) => return Err(e),
                };
                if let Some(old) = existing {
                    arena.free(old)?;
                }
                arena.set_root(&key, fresh)?;
                fresh
            }
        };
        arena.set_word(target, SLOT_MAGIC)?;
        arena.set_word(target + 8, bytes.len() as u64)?;
        // SAFETY: `target` is the payload of a live block of at least `need` bytes inside the
        // used span (checked by payload_capacity or fresh from alloc), past the header; the
        // heap lock is held.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                arena.base.add(to_usize(target + SLOT_HEADER)),
                bytes.len(),
            );
        }
        Ok(())
    }

    /// The bytes of the named slot, if it exists.
    pub(crate) fn read_slot(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let key = root_key(name)?;
        let mut guard = self.lock();
        let arena = guard.arena()?;
        let Some(offset) = arena.root(&key)? else {
            return Ok(None);
        };
        let capacity = arena.payload_capacity(offset)?;
        if arena.word(offset)? != SLOT_MAGIC {
            return Err(arena.corrupt("slot without its magic", offset));
        }
        let len = arena.word(offset + 8)?;
        if SLOT_HEADER.saturating_add(len) > capacity {
            return Err(arena.corrupt("slot longer than its block", offset));
        }
        let mut out = vec![0u8; to_usize(len)];
        // SAFETY: the slot's bytes lie inside its live block (checked against its capacity),
        // inside the mapping; the heap lock is held.
        unsafe {
            std::ptr::copy_nonoverlapping(
                arena.base.add(to_usize(offset + SLOT_HEADER)),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        Ok(Some(out))
    }

    /// Frees the named slot and forgets its root.
    pub(crate) fn remove_slot(&self, name: &str) -> Result<(), Error> {
        let key = root_key(name)?;
        let mut guard = self.lock();
        let mut arena = guard.arena()?;
        if let Some(offset) = arena.root(&key)? {
            arena.payload_capacity(offset)?;
            arena.free(offset)?;
            arena.set_root(&key, 0)?;
        }
        Ok(())
    }

    fn payload_offset(&self, ptr: NonNull<u8>) -> Result<u64, Error> {
        let p = ptr.as_ptr() as usize;
        if !self.contains(ptr.as_ptr()) || !((p - self.base()) as u64).is_multiple_of(ALIGN) {
            return Err(Error::InvalidPointer(p));
        }
        let offset = (p - self.base()) as u64;
        if offset < FIRST_BLOCK + BLOCK_HEADER {
            return Err(Error::InvalidPointer(p));
        }
        Ok(offset)
    }

    /// Locks the allocator: checkpoints hold this while they capture, recovery while it
    /// rewrites the heap.
    pub(crate) fn lock(&self) -> HeapGuard<'_> {
        HeapGuard {
            heap: self,
            _guard: self.lock.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }
}

/// Exclusive access to the heap's allocator state (and, for recovery, to all its bytes).
#[derive(Debug)]
pub(crate) struct HeapGuard<'a> {
    heap: &'a CriticalHeap,
    _guard: MutexGuard<'a, ()>,
}

impl HeapGuard<'_> {
    fn ptr_at(&self, offset: u64) -> NonNull<u8> {
        // SAFETY: callers pass offsets inside the mapping (validated block offsets), so the
        // result stays inside the same allocation and cannot be null.
        unsafe { NonNull::new_unchecked(self.heap.map.base.as_ptr().add(to_usize(offset))) }
    }

    fn header(&mut self) -> &mut HeapHeader {
        // SAFETY: the mapping is at least MIN_HEAP_SIZE > size_of::<HeapHeader>() bytes,
        // page-aligned (so aligned for u64), HeapHeader is made of integers only (every bit
        // pattern is valid), and the heap lock held by `self` makes this the only reference.
        unsafe { &mut *self.heap.map.base.as_ptr().cast::<HeapHeader>() }
    }

    /// Writes an empty heap: header, no blocks, sentinel at the first block offset.
    pub(crate) fn format(&mut self) {
        let base = self.heap.base() as u64;
        let size = self.heap.size() as u64;
        let hdr = self.header();
        hdr.magic = MAGIC;
        hdr.version = VERSION;
        hdr.header_len = FIRST_BLOCK_LEN;
        hdr.base = base;
        hdr.size = size;
        hdr.top = FIRST_BLOCK;
        hdr.allocated = 0;
        hdr.allocations = 0;
        hdr.fl_bitmap = 0;
        hdr.sl_bitmap = [0; FL_COUNT];
        hdr.heads = [[0; SL_COUNT]; FL_COUNT];
        hdr.roots = [Root {
            name: [0; ROOT_NAME_MAX + 1],
            offset: 0,
            reserved: 0,
        }; ROOT_SLOTS];
        let base_ptr = self.heap.map.base.as_ptr();
        // SAFETY: FIRST_BLOCK + BLOCK_HEADER < MIN_HEAP_SIZE, so the sentinel is inside the
        // mapping, past the header, and 16-aligned; we hold the heap lock.
        unsafe { write_block_header(base_ptr, FIRST_BLOCK, 0, 0) };
    }

    /// Gives every page back to the kernel (zero-filled on next touch) and formats an empty
    /// heap: the state before recovery applies an image, and after a failed one.
    pub(crate) fn wipe_and_format(&mut self) {
        // SAFETY: the range is exactly our private anonymous mapping; MADV_DONTNEED on it
        // only makes its contents zero, which is what the caller asks for while holding the
        // heap lock (no allocator state is being read concurrently).
        unsafe {
            libc::madvise(
                self.heap.map.base.as_ptr().cast(),
                self.heap.size(),
                libc::MADV_DONTNEED,
            )
        };
        self.format();
    }

    /// Bytes from the base to the end of the sentinel: what checkpoints must cover.
    pub(crate) fn used_span(&mut self) -> usize {
        let size = self.heap.size() as u64;
        let top = self.header().top;
        // A corrupt `top` is caught by `arena()`; capturing a bounded span is still safe.
        to_usize(top.saturating_add(BLOCK_HEADER).min(size))
    }

    /// Checks the header and the allocator invariants of a heap whose bytes were just
    /// restored from an image.
    pub(crate) fn check_restored(&mut self) -> Result<(), Error> {
        self.arena()?.check()
    }

    fn arena(&mut self) -> Result<Arena<'_>, Error> {
        let base_addr = self.heap.base() as u64;
        let size = self.heap.size() as u64;
        let base = self.heap.map.base.as_ptr();
        let hdr = self.header();
        if hdr.magic != MAGIC || hdr.version != VERSION || u64::from(hdr.header_len) != FIRST_BLOCK
        {
            return Err(Error::Corrupt(format!(
                "heap header at {base_addr:#x} has a bad magic or version"
            )));
        }
        if hdr.base != base_addr || hdr.size != size {
            return Err(Error::Corrupt(format!(
                "heap header describes {:#x}+{:#x}, but the heap is {base_addr:#x}+{size:#x}",
                hdr.base, hdr.size
            )));
        }
        if hdr.top < FIRST_BLOCK || !hdr.top.is_multiple_of(ALIGN) || hdr.top + BLOCK_HEADER > size
        {
            return Err(Error::Corrupt(format!(
                "heap top {:#x} out of bounds",
                hdr.top
            )));
        }
        Ok(Arena { base, size, hdr })
    }
}

/// Writes a block header at `offset`.
///
/// # Safety
/// `offset + BLOCK_HEADER` is inside the mapping at `base`, `offset` is 16-aligned and at least
/// FIRST_BLOCK (so it does not overlap the header), and the heap lock is held.
unsafe fn write_block_header(base: *mut u8, offset: u64, prev_phys: u64, size_flags: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let p = base.add(to_usize(offset)).cast::<u64>();
        p.write(prev_phys);
        p.add(1).write(size_flags);
    }
}

/// The allocator over a locked, header-validated heap. Block offsets are relative to the base;
/// 0 means "none" in links and list heads (offset 0 is the header, never a block).
struct Arena<'a> {
    base: *mut u8,
    size: u64,
    hdr: &'a mut HeapHeader,
}

impl Arena<'_> {
    fn corrupt(&self, what: &str, offset: u64) -> Error {
        Error::Corrupt(format!("{what} at heap offset {offset:#x}"))
    }

    /// Reads the u64 at `offset` after checking it lies in the block area below the sentinel's
    /// end.
    fn word(&self, offset: u64) -> Result<u64, Error> {
        if offset < FIRST_BLOCK
            || !offset.is_multiple_of(8)
            || offset + 8 > self.hdr.top + BLOCK_HEADER
        {
            return Err(self.corrupt("out-of-bounds heap metadata", offset));
        }
        // SAFETY: offset is 8-aligned, past the header (no overlap with `hdr`) and below the
        // sentinel's end, which `arena()` checked is inside the mapping; the heap lock is held.
        Ok(unsafe { self.base.add(to_usize(offset)).cast::<u64>().read() })
    }

    fn set_word(&mut self, offset: u64, value: u64) -> Result<(), Error> {
        if offset < FIRST_BLOCK
            || !offset.is_multiple_of(8)
            || offset + 8 > self.hdr.top + BLOCK_HEADER
        {
            return Err(self.corrupt("out-of-bounds heap metadata", offset));
        }
        // SAFETY: as in `word`.
        unsafe { self.base.add(to_usize(offset)).cast::<u64>().write(value) };
        Ok(())
    }

    /// (size, flags) of the block at `offset`.
    fn block_info(&self, offset: u64) -> Result<(u64, u64), Error> {
        if !offset.is_multiple_of(ALIGN) {
            return Err(self.corrupt("misaligned block", offset));
        }
        let sf = self.word(offset + 8)?;
        Ok((sf & !FLAG_BITS, sf & FLAG_BITS))
    }

    fn set_block(&mut self, offset: u64, size: u64, flags: u64) -> Result<(), Error> {
        self.set_word(offset + 8, size | flags)
    }

    fn set_flags(&mut self, offset: u64, set: u64, clear: u64) -> Result<(), Error> {
        let sf = self.word(offset + 8)?;
        self.set_word(offset + 8, (sf | set) & !clear)
    }

    fn prev_phys(&self, offset: u64) -> Result<u64, Error> {
        self.word(offset)
    }

    fn set_prev_phys(&mut self, offset: u64, prev: u64) -> Result<(), Error> {
        self.set_word(offset, prev)
    }

    fn next_free(&self, offset: u64) -> Result<u64, Error> {
        self.word(offset + 16)
    }

    fn prev_free(&self, offset: u64) -> Result<u64, Error> {
        self.word(offset + 24)
    }

    /// Inserts the free block at `offset` of `size` into its list.
    fn insert(&mut self, offset: u64, size: u64) -> Result<(), Error> {
        let (fl, sl) = mapping_insert(size);
        if fl >= FL_COUNT {
            return Err(self.corrupt("oversized free block", offset));
        }
        let head = self.hdr.heads[fl][sl];
        self.set_word(offset + 16, head)?;
        self.set_word(offset + 24, 0)?;
        if head != 0 {
            self.set_word(head + 24, offset)?;
        }
        self.hdr.heads[fl][sl] = offset;
        self.hdr.fl_bitmap |= 1 << fl;
        self.hdr.sl_bitmap[fl] |= 1 << sl;
        Ok(())
    }

    /// Unlinks the free block at `offset` of `size` from its list.
    fn remove(&mut self, offset: u64, size: u64) -> Result<(), Error> {
        let (fl, sl) = mapping_insert(size);
        if fl >= FL_COUNT {
            return Err(self.corrupt("oversized free block", offset));
        }
        let next = self.next_free(offset)?;
        let prev = self.prev_free(offset)?;
        if prev == 0 {
            if self.hdr.heads[fl][sl] != offset {
                return Err(self.corrupt("free block missing from its list", offset));
            }
            self.hdr.heads[fl][sl] = next;
        } else {
            self.set_word(prev + 16, next)?;
        }
        if next != 0 {
            self.set_word(next + 24, prev)?;
        }
        if self.hdr.heads[fl][sl] == 0 {
            self.hdr.sl_bitmap[fl] &= !(1 << sl);
            if self.hdr.sl_bitmap[fl] == 0 {
                self.hdr.fl_bitmap &= !(1 << fl);
            }
        }
        Ok(())
    }

    /// The head of a non-empty list whose blocks are all at least `size` bytes.
    fn find(&self, size: u64) -> Option<u64> {
        let (fl, sl) = mapping_search(size)?;
        let sl_map = self.hdr.sl_bitmap[fl] & (!0u64 << sl);
        let (fl, sl_map) = if sl_map != 0 {
            (fl, sl_map)
        } else {
            let fl_map = self.hdr.fl_bitmap & (!0u64).checked_shl(to_u32(fl + 1)).unwrap_or(0);
            if fl_map == 0 {
                return None;
            }
            let fl = to_usize(u64::from(fl_map.trailing_zeros()));
            (fl, *self.hdr.sl_bitmap.get(fl)?)
        };
        let sl = to_usize(u64::from(sl_map.trailing_zeros()));
        let head = *self.hdr.heads.get(fl)?.get(sl)?;
        (head != 0).then_some(head)
    }

    /// Extends the used span for a block of `need` bytes, reusing a free block that ends at
    /// the sentinel. Returns the new block's offset and size (marked used).
    fn grow(&mut self, need: u64) -> Result<(u64, u64), Error> {
        let top = self.hdr.top;
        let (_, sentinel_flags) = self.block_info(top)?;
        let (start, last_free) = if sentinel_flags & PREV_FREE != 0 {
            let last = self.prev_phys(top)?;
            let (lsize, lflags) = self.block_info(last)?;
            if lflags & FREE == 0 || last + lsize != top {
                return Err(self.corrupt("bad last free block", last));
            }
            (last, Some(lsize))
        } else {
            (top, None)
        };
        let end = start
            .checked_add(need)
            .filter(|end| end + BLOCK_HEADER <= self.size)
            .ok_or(Error::OutOfMemory {
                requested: to_usize(need),
                used: to_usize(top + BLOCK_HEADER),
                size: to_usize(self.size),
            })?;
        if let Some(lsize) = last_free {
            self.remove(start, lsize)?;
        }
        let new_top = end.max(top);
        self.hdr.top = new_top;
        // SAFETY: new_top + BLOCK_HEADER <= size (checked above), new_top is 16-aligned and
        // past the header; the heap lock is held by the guard that made this arena.
        unsafe { write_block_header(self.base, new_top, 0, 0) };
        let size = new_top - start;
        self.set_block(start, size, 0)?;
        Ok((start, size))
    }

    /// Returns the payload offset of a new block.
    fn alloc(&mut self, size: u64, align: u64) -> Result<u64, Error> {
        if !align.is_power_of_two() || align > MAX_ALIGN as u64 {
            return Err(Error::InvalidArgument(format!(
                "alignment {align} is not a power of two up to {MAX_ALIGN}"
            )));
        }
        let used = to_usize(self.hdr.top + BLOCK_HEADER);
        let heap_size = to_usize(self.size);
        let oom = || Error::OutOfMemory {
            requested: to_usize(size),
            used,
            size: heap_size,
        };
        let need = size
            .checked_add(BLOCK_HEADER + ALIGN - 1)
            .map(|n| (n & !(ALIGN - 1)).max(MIN_BLOCK))
            .filter(|n| *n <= self.size)
            .ok_or_else(oom)?;
        let search = if align > ALIGN {
            need + align + MIN_BLOCK
        } else {
            need
        };
        let (mut block, mut bsize) = match self.find(search) {
            Some(found) => {
                let (fsize, _) = self.block_info(found)?;
                self.remove(found, fsize)?;
                self.set_flags(found, 0, FREE)?;
                (found, fsize)
            }
            None => self.grow(search).map_err(|e| match e {
                Error::OutOfMemory { .. } => oom(),
                other => other,
            })?,
        };
        // The block is used now; its physical predecessor is not free (free blocks never
        // touch), so PREV_FREE is clear.
        if align > ALIGN {
            let payload = self.base as u64 + block + BLOCK_HEADER;
            let mut aligned = (payload + align - 1) & !(align - 1);
            if aligned != payload {
                while aligned - payload < MIN_BLOCK {
                    aligned += align;
                }
                let gap = aligned - payload;
                self.set_block(block, gap, FREE)?;
                self.insert(block, gap)?;
                let moved = block + gap;
                self.set_prev_phys(moved, block)?;
                self.set_block(moved, bsize - gap, PREV_FREE)?;
                block = moved;
                bsize -= gap;
            }
        }
        let next = block + bsize;
        if bsize - need >= MIN_BLOCK {
            let rest = block + need;
            let rest_size = bsize - need;
            self.set_block(rest, rest_size, FREE)?;
            self.set_prev_phys(rest, block)?;
            self.insert(rest, rest_size)?;
            self.set_prev_phys(next, rest)?;
            self.set_flags(next, PREV_FREE, 0)?;
            let (_, flags) = self.block_info(block)?;
            self.set_block(block, need, flags & PREV_FREE)?;
            bsize = need;
        } else {
            self.set_flags(next, 0, PREV_FREE)?;
        }
        self.hdr.allocated += bsize;
        self.hdr.allocations += 1;
        Ok(block + BLOCK_HEADER)
    }

    fn free(&mut self, payload: u64) -> Result<(), Error> {
        let ptr = self.base as usize + to_usize(payload);
        let mut block = payload - BLOCK_HEADER;
        if block + MIN_BLOCK > self.hdr.top {
            return Err(Error::InvalidPointer(ptr));
        }
        let (size, flags) = self.block_info(block)?;
        if flags & FREE != 0 || size < MIN_BLOCK || block + size > self.hdr.top {
            return Err(Error::InvalidPointer(ptr));
        }
        self.hdr.allocated = self.hdr.allocated.saturating_sub(size);
        self.hdr.allocations = self.hdr.allocations.saturating_sub(1);
        let mut merged = size;
        let next = block + size;
        let (next_size, next_flags) = self.block_info(next)?;
        if next_flags & FREE != 0 {
            self.remove(next, next_size)?;
            merged += next_size;
        }
        if flags & PREV_FREE != 0 {
            let prev = self.prev_phys(block)?;
            let (prev_size, prev_flags) = self.block_info(prev)?;
            if prev_flags & FREE == 0 || prev + prev_size != block {
                return Err(self.corrupt("bad previous free block", prev));
            }
            self.remove(prev, prev_size)?;
            block = prev;
            merged += prev_size;
        }
        self.set_block(block, merged, FREE)?;
        self.insert(block, merged)?;
        let after = block + merged;
        self.set_prev_phys(after, block)?;
        self.set_flags(after, PREV_FREE, 0)
    }

    /// The payload size of the live block whose payload starts at `payload`.
    fn payload_capacity(&self, payload: u64) -> Result<u64, Error> {
        let block = payload
            .checked_sub(BLOCK_HEADER)
            .filter(|b| *b >= FIRST_BLOCK)
            .ok_or_else(|| self.corrupt("payload offset before the first block", payload))?;
        let (size, flags) = self.block_info(block)?;
        if flags & FREE != 0 || size < MIN_BLOCK || block + size > self.hdr.top {
            return Err(self.corrupt("not a live block", block));
        }
        Ok(size - BLOCK_HEADER)
    }

    fn set_root(&mut self, key: &[u8; ROOT_NAME_MAX + 1], offset: u64) -> Result<(), Error> {
        if let Some(slot) = self.hdr.roots.iter_mut().find(|r| &r.name == key) {
            if offset == 0 {
                slot.name = [0; ROOT_NAME_MAX + 1];
            }
            slot.offset = offset;
            return Ok(());
        }
        if offset == 0 {
            return Ok(());
        }
        let slot = self
            .hdr
            .roots
            .iter_mut()
            .find(|r| r.name[0] == 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("all {ROOT_SLOTS} heap roots are in use"))
            })?;
        slot.name = *key;
        slot.offset = offset;
        Ok(())
    }

    fn root(&self, key: &[u8; ROOT_NAME_MAX + 1]) -> Result<Option<u64>, Error> {
        match self.hdr.roots.iter().find(|r| &r.name == key) {
            None => Ok(None),
            Some(r) if r.offset < self.size => Ok(Some(r.offset)),
            Some(r) => Err(self.corrupt("root pointing outside the heap", r.offset)),
        }
    }

    /// Checks: blocks tile [FIRST_BLOCK, top) exactly; PREV_FREE and prev_phys agree with the
    /// physical neighbour; no two free blocks touch; every free block is in the list its size
    /// maps to and every list entry is a free block; bitmaps match the lists; counters match.
    fn check(&self) -> Result<(), Error> {
        let mut offset = FIRST_BLOCK;
        let mut prev: Option<(u64, bool)> = None;
        let mut free_blocks = 0u64;
        let mut allocated = 0u64;
        let mut allocations = 0u64;
        while offset < self.hdr.top {
            let (size, flags) = self.block_info(offset)?;
            if size < MIN_BLOCK || offset + size > self.hdr.top {
                return Err(self.corrupt("block size out of bounds", offset));
            }
            let is_free = flags & FREE != 0;
            let prev_free = prev.is_some_and(|(_, f)| f);
            if (flags & PREV_FREE != 0) != prev_free {
                return Err(self.corrupt("PREV_FREE disagrees with the previous block", offset));
            }
            if prev_free {
                let (p, _) = prev.expect("prev_free implies a previous block");
                if self.prev_phys(offset)? != p {
                    return Err(self.corrupt("wrong prev_phys", offset));
                }
                if is_free {
                    return Err(self.corrupt("two adjacent free blocks", offset));
                }
            }
            if is_free {
                free_blocks += 1;
                let (fl, sl) = mapping_insert(size);
                if !self.list_contains(fl, sl, offset)? {
                    return Err(self.corrupt("free block missing from its list", offset));
                }
            } else {
                allocated += size;
                allocations += 1;
            }
            prev = Some((offset, is_free));
            offset += size;
        }
        if offset != self.hdr.top {
            return Err(self.corrupt("blocks overrun the sentinel", offset));
        }
        let (sentinel_size, sentinel_flags) = self.block_info(offset)?;
        let prev_free = prev.is_some_and(|(_, f)| f);
        if sentinel_size != 0 || (sentinel_flags & PREV_FREE != 0) != prev_free {
            return Err(self.corrupt("bad sentinel", offset));
        }
        let mut listed = 0u64;
        for fl in 0..FL_COUNT {
            for sl in 0..SL_COUNT {
                let head = self.hdr.heads[fl][sl];
                let bit = self.hdr.sl_bitmap[fl] & (1 << sl) != 0;
                if bit != (head != 0) {
                    return Err(self.corrupt("second-level bitmap disagrees with list", head));
                }
                let mut cur = head;
                let mut prev_link = 0;
                while cur != 0 {
                    let (size, flags) = self.block_info(cur)?;
                    if flags & FREE == 0 || mapping_insert(size) != (fl, sl) {
                        return Err(
                            self.corrupt("listed block is not free or in the wrong list", cur)
                        );
                    }
                    if self.prev_free(cur)? != prev_link {
                        return Err(self.corrupt("broken free-list back link", cur));
                    }
                    listed += 1;
                    if listed > free_blocks {
                        return Err(self.corrupt("free list longer than the free blocks", cur));
                    }
                    prev_link = cur;
                    cur = self.next_free(cur)?;
                }
            }
            if (self.hdr.fl_bitmap & (1 << fl) != 0) != (self.hdr.sl_bitmap[fl] != 0) {
                return Err(self.corrupt("first-level bitmap disagrees with lists", 0));
            }
        }
        if listed != free_blocks {
            return Err(self.corrupt("free lists and free blocks differ in number", 0));
        }
        if allocated != self.hdr.allocated || allocations != self.hdr.allocations {
            return Err(self.corrupt("allocation counters disagree with the blocks", 0));
        }
        Ok(())
    }

    fn list_contains(&self, fl: usize, sl: usize, offset: u64) -> Result<bool, Error> {
        let Some(mut cur) = self.hdr.heads.get(fl).and_then(|l| l.get(sl)).copied() else {
            return Ok(false);
        };
        let mut steps = 0u64;
        while cur != 0 {
            if cur == offset {
                return Ok(true);
            }
            steps += 1;
            if steps > self.size / MIN_BLOCK {
                return Err(self.corrupt("free list cycle", cur));
            }
            cur = self.next_free(cur)?;
        }
        Ok(false)
    }
}

/// The list a free block of `size` belongs to.
fn mapping_insert(size: u64) -> (usize, usize) {
    if size < SMALL_BLOCK {
        (0, to_usize(size / (SMALL_BLOCK / SL_COUNT as u64)))
    } else {
        let fl = 63 - size.leading_zeros();
        let sl = to_usize(size >> (fl - SL_LOG2)) ^ SL_COUNT;
        (to_usize(u64::from(fl - FL_SHIFT + 1)), sl)
    }
}

/// The first list whose every block holds `size` bytes (size rounded up to the next class).
fn mapping_search(size: u64) -> Option<(usize, usize)> {
    let rounded = if size >= SMALL_BLOCK {
        size.checked_add((1u64 << (63 - size.leading_zeros() - SL_LOG2)) - 1)?
    } else {
        size
    };
    let (fl, sl) = mapping_insert(rounded);
    (fl < FL_COUNT).then_some((fl, sl))
}

fn root_key(name: &str) -> Result<[u8; ROOT_NAME_MAX + 1], Error> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > ROOT_NAME_MAX || bytes.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "root name {name:?} must be 1..={ROOT_NAME_MAX} bytes without NUL"
        )));
    }
    let mut key = [0u8; ROOT_NAME_MAX + 1];
    key[..bytes.len()].copy_from_slice(bytes);
    Ok(key)
}

/// Lossless on the 64-bit targets this module compiles for (see the assertion at the top).
#[allow(clippy::cast_possible_truncation)]
pub(crate) fn to_usize(v: u64) -> usize {
    v as usize
}

fn to_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_are_ordered_and_search_rounds_up() {
        let mut last = (0, 0);
        for size in (MIN_BLOCK..1 << 20).step_by(16) {
            let class = mapping_insert(size);
            assert!(class >= last, "classes must not decrease at {size}");
            last = class;
            // Every block in the list `mapping_search` picks is large enough.
            let (fl, sl) = mapping_search(size).expect("in range");
            for candidate in (size.saturating_sub(4096).max(MIN_BLOCK)..size).step_by(16) {
                assert_ne!(
                    mapping_insert(candidate),
                    (fl, sl),
                    "{candidate} < {size} in same list"
                );
            }
        }
        assert_eq!(mapping_insert(MAX_HEAP_SIZE as u64 - 16).0, FL_COUNT - 1);
    }

    #[test]
    fn parses_sizes_and_addresses() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("256MiB"), Some(256 << 20));
        assert_eq!(parse_size(" 1 GiB "), Some(1 << 30));
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("99999999999999999999T"), None);
        assert_eq!(parse_addr("0x5f00_0000_0000"), Some(0x5f00_0000_0000));
        assert_eq!(parse_addr("5f0000000000"), Some(0x5f00_0000_0000));
        assert_eq!(parse_addr("zz"), None);
    }

    #[test]
    fn default_address_is_in_the_window_and_deterministic() {
        let a = HeapConfig::for_identity("svc-a");
        assert_eq!(a, HeapConfig::for_identity("svc-a"));
        assert!(a.addr >= DEFAULT_WINDOW_BASE);
        assert!(
            a.addr + a.size
                <= DEFAULT_WINDOW_BASE + to_usize(DEFAULT_WINDOW_SLOTS) * DEFAULT_SLOT_SIZE
        );
        assert_eq!((a.addr - DEFAULT_WINDOW_BASE) % DEFAULT_SLOT_SIZE, 0);
        assert!(a.validate().is_ok());
        assert!(
            HeapConfig {
                addr: 4097,
                size: MIN_HEAP_SIZE
            }
            .validate()
            .is_err()
        );
        assert!(
            HeapConfig {
                addr: 4096,
                size: 10
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn header_fits_before_the_first_block() {
        assert!(to_usize(FIRST_BLOCK) >= size_of::<HeapHeader>());
        assert!((FIRST_BLOCK + BLOCK_HEADER) < MIN_HEAP_SIZE as u64);
    }
}
