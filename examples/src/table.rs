//! A chained hash table of byte strings living entirely in libft's critical heap, shared by the
//! `kvstate` and `kv` examples: a root [`Table`], its bucket array, entries, keys and values are
//! all heap blocks linked by raw pointers, which stay valid after `t_recover` because the heap
//! lives at a fixed address. It never trusts a recovered structure before [`HashTable::open`]
//! has walked and checked every pointer, and never touches memory outside the heap.
//!
//! The layout is that of `examples/c/kvstate.c`: both programs recover each other's images.

use std::ptr::NonNull;

use ft::critical::{CriticalBox, CriticalHeap};

/// Buckets of the hash table.
pub const NBUCKETS: u64 = 64;
/// Alignment of every heap block, that of `t_ftmalloc` in the C program.
const BLOCK_ALIGN: usize = 16;
/// Marks an initialised table.
const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"KVTABLE1");
/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a, 64 bits: the digest the examples compute over their tables.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(FNV_OFFSET)
    }
}

impl Fnv {
    /// Hashes `data` into the state.
    pub fn bytes(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    /// Hashes the little-endian bytes of `v`.
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

fn bucket_of(key: &[u8]) -> usize {
    let mut h = Fnv::default();
    h.bytes(key);
    // The remainder is below NBUCKETS, which fits any usize.
    usize::try_from(h.0 % NBUCKETS).unwrap_or(0)
}

/// Why the table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The critical heap refused an allocation.
    #[error("critical heap: {0}")]
    Heap(#[source] ft::critical::Error),
    /// The recovered structure does not hold together, or an argument is out of range.
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

/// A key and its value, borrowed from the table.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

/// The table's root, in the critical heap.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Table {
    magic: u64,
    /// Operations applied since the fresh start (the program decides what counts).
    counter: u64,
    /// Live entries.
    count: u64,
    nbuckets: u64,
    /// NBUCKETS chain heads, a heap block of its own.
    buckets: *mut *mut Entry,
}

/// One key-value pair, in the critical heap; key and value are heap blocks of their own.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    next: *mut Entry,
    key: *mut u8,
    value: *mut u8,
    klen: u32,
    vlen: u32,
}

/// The table in the critical heap, and the heap its blocks come from.
///
/// Invariant: `table` and every pointer reachable from it (bucket array, entries, keys,
/// values) are live blocks of `heap` owned by this structure, and the owner of this value is
/// the only one touching them. `open` checks what a recovered heap holds before trusting it.
#[derive(Debug)]
pub struct HashTable<'h> {
    heap: &'h CriticalHeap,
    table: NonNull<Table>,
}

impl<'h> HashTable<'h> {
    /// An empty table in `heap`. The caller links [`HashTable::as_ptr`] from a root it
    /// finds again after recovery.
    pub fn create(heap: &'h CriticalHeap) -> Result<HashTable<'h>, TableError> {
        let nbuckets = usize::try_from(NBUCKETS).unwrap_or(usize::MAX);
        let bytes = nbuckets * size_of::<*mut Entry>();
        let buckets = heap
            .alloc(bytes, BLOCK_ALIGN)
            .map_err(TableError::Heap)?
            .cast::<*mut Entry>();
        // SAFETY: `buckets` is a fresh block of `bytes` bytes, aligned for pointers; writing
        // NBUCKETS null pointers fills exactly that block.
        unsafe { std::ptr::write_bytes(buckets.as_ptr(), 0, nbuckets) };
        let table = Table {
            magic: TABLE_MAGIC,
            counter: 0,
            count: 0,
            nbuckets: NBUCKETS,
            buckets: buckets.as_ptr(),
        };
        let table = match CriticalBox::new_in(heap, table) {
            Ok(b) => b.into_raw(),
            Err(e) => {
                // SAFETY: `buckets` came from `alloc` above and nothing refers to it.
                let _ = unsafe { heap.free(buckets.cast()) };
                return Err(TableError::Heap(e));
            }
        };
        Ok(HashTable { heap, table })
    }

    /// The table at `ptr` (a pointer found in a recovered root), after checking its root and
    /// walking every chain: a structure that does not hold together is refused, not trusted.
    pub fn open(heap: &'h CriticalHeap, ptr: *mut Table) -> Result<HashTable<'h>, TableError> {
        let table = NonNull::new(ptr)
            .filter(|p| heap.contains(p.as_ptr().cast()) && p.is_aligned())
            .ok_or_else(|| {
                TableError::Corrupt(format!("table pointer {ptr:p} is outside the heap"))
            })?;
        // SAFETY: the pointer is aligned and inside the heap, which is mapped for its whole
        // size; Table is plain integers and a pointer, valid for any bit pattern.
        let t = unsafe { table.as_ptr().read() };
        if t.magic != TABLE_MAGIC || t.nbuckets != NBUCKETS {
            return Err(TableError::Corrupt(format!(
                "table at {ptr:p} has magic {:#x} and {} buckets",
                t.magic, t.nbuckets
            )));
        }
        if !heap.contains(t.buckets.cast()) || !t.buckets.is_aligned() {
            return Err(TableError::Corrupt(format!(
                "bucket array {:p} is outside the heap",
                t.buckets
            )));
        }
        let opened = HashTable { heap, table };
        opened.walk(|_, _, _| {})?;
        Ok(opened)
    }

    /// The root's address in the heap, for the caller's own root.
    pub fn as_ptr(&self) -> *mut Table {
        self.table.as_ptr()
    }

    fn table(&self) -> &Table {
        // SAFETY: by the invariant, `table` is a live, initialised Table of this structure.
        unsafe { self.table.as_ref() }
    }

    fn table_mut(&mut self) -> &mut Table {
        // SAFETY: as in `table`; `&mut self` makes the access unique.
        unsafe { self.table.as_mut() }
    }

    /// The program's operation counter.
    pub fn counter(&self) -> u64 {
        self.table().counter
    }

    /// Sets the program's operation counter.
    pub fn set_counter(&mut self, counter: u64) {
        self.table_mut().counter = counter;
    }

    /// Live entries.
    pub fn count(&self) -> u64 {
        self.table().count
    }

    /// The head of chain `b` (< NBUCKETS).
    fn head(&self, b: usize) -> *mut *mut Entry {
        // SAFETY: the bucket array holds NBUCKETS pointers and callers pass b < NBUCKETS.
        unsafe { self.table().buckets.add(b) }
    }

    /// Copies `data` into a new heap block.
    fn alloc_bytes(&self, data: &[u8]) -> Result<NonNull<u8>, TableError> {
        let p = self
            .heap
            .alloc(data.len(), BLOCK_ALIGN)
            .map_err(TableError::Heap)?;
        // SAFETY: `p` is a fresh block of at least data.len() bytes, disjoint from `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.as_ptr(), data.len()) };
        Ok(p)
    }

    fn free_bytes(&self, p: *mut u8) {
        if let Some(p) = NonNull::new(p) {
            // SAFETY: key and value pointers are blocks of this heap owned by their entry,
            // which no longer refers to them after this call.
            let _ = unsafe { self.heap.free(p) };
        }
    }

    /// Finds `key`: the link that points to its entry (the chain head or a `next` field).
    fn find(&self, key: &[u8]) -> Option<*mut *mut Entry> {
        let mut link = self.head(bucket_of(key));
        // SAFETY: by the invariant every link and entry on the chain is live and initialised,
        // and each key block holds klen bytes.
        unsafe {
            while !(*link).is_null() {
                let e = *link;
                let k = std::slice::from_raw_parts((*e).key, (*e).klen as usize);
                if k == key {
                    return Some(link);
                }
                link = &raw mut (*e).next;
            }
        }
        None
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        let link = self.find(key)?;
        // SAFETY: `find` returned a link to a live entry whose value block holds vlen bytes;
        // the slice lives no longer than `&self`, and changes need `&mut self`.
        unsafe {
            let e = *link;
            Some(std::slice::from_raw_parts((*e).value, (*e).vlen as usize))
        }
    }

    /// Sets `key` to `value`: replaces the value block of an existing entry, or links a new
    /// entry at the head of its chain. Allocates everything before changing anything.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), TableError> {
        let vlen =
            u32::try_from(value.len()).map_err(|_| TableError::Corrupt("value too long".into()))?;
        let klen =
            u32::try_from(key.len()).map_err(|_| TableError::Corrupt("key too long".into()))?;
        let v = self.alloc_bytes(value)?;
        if let Some(link) = self.find(key) {
            // SAFETY: `find` returned a link to a live entry of this table.
            let old = unsafe {
                let e = *link;
                let old = (*e).value;
                (*e).value = v.as_ptr();
                (*e).vlen = vlen;
                old
            };
            self.free_bytes(old);
            return Ok(());
        }
        let k = match self.alloc_bytes(key) {
            Ok(k) => k,
            Err(e) => {
                self.free_bytes(v.as_ptr());
                return Err(e);
            }
        };
        let head = self.head(bucket_of(key));
        // SAFETY: `head` is a slot of the bucket array (see `head`).
        let next = unsafe { *head };
        let entry = Entry {
            next,
            key: k.as_ptr(),
            value: v.as_ptr(),
            klen,
            vlen,
        };
        let entry = match CriticalBox::new_in(self.heap, entry) {
            Ok(b) => b.into_raw(),
            Err(e) => {
                self.free_bytes(k.as_ptr());
                self.free_bytes(v.as_ptr());
                return Err(TableError::Heap(e));
            }
        };
        // SAFETY: as above; the new entry now owns its key and value and heads the chain.
        unsafe { *head = entry.as_ptr() };
        self.table_mut().count += 1;
        Ok(())
    }

    /// Unlinks and frees `key`'s entry; whether there was one.
    pub fn delete(&mut self, key: &[u8]) -> bool {
        let Some(link) = self.find(key) else {
            return false;
        };
        // SAFETY: `find` returned a link to a live entry; after unlinking, nothing refers to
        // the entry, which came from CriticalBox::into_raw of an Entry in this heap.
        let (k, v) = unsafe {
            let e = *link;
            *link = (*e).next;
            let (k, v) = ((*e).key, (*e).value);
            drop(CriticalBox::from_raw(self.heap, NonNull::new_unchecked(e)));
            (k, v)
        };
        self.free_bytes(k);
        self.free_bytes(v);
        self.table_mut().count -= 1;
        true
    }

    /// Digests the counter, the entry count, and each entry's bucket, key and value in chain
    /// order (kvstate's digest, the same in C).
    pub fn digest(&self) -> Result<u64, TableError> {
        let t = *self.table();
        let mut h = Fnv::default();
        h.u64(t.counter);
        h.u64(t.count);
        self.walk(|b, key, value| {
            h.u64(b as u64);
            h.u64(key.len() as u64);
            h.bytes(key);
            h.u64(value.len() as u64);
            h.bytes(value);
        })?;
        Ok(h.0)
    }

    /// Every (key, value) pair, in chain order.
    pub fn entries(&self) -> Result<Vec<Pair<'_>>, TableError> {
        let mut all = Vec::new();
        self.walk(|_, k, v| all.push((k, v)))?;
        Ok(all)
    }

    /// Calls `visit(bucket, key, value)` for every entry in chain order, checking every
    /// pointer it follows, so that a broken recovered structure is reported instead of
    /// crashing.
    fn walk<'s>(
        &'s self,
        mut visit: impl FnMut(usize, &'s [u8], &'s [u8]),
    ) -> Result<(), TableError> {
        let count = self.table().count;
        let mut seen: u64 = 0;
        for b in 0..usize::try_from(NBUCKETS).unwrap_or(0) {
            // SAFETY: b < NBUCKETS.
            let mut e = unsafe { *self.head(b) };
            while !e.is_null() {
                if !self.heap.contains(e.cast()) || !e.is_aligned() {
                    return Err(TableError::Corrupt(format!(
                        "entry pointer {e:p} in bucket {b}"
                    )));
                }
                seen += 1;
                if seen > count {
                    return Err(TableError::Corrupt(format!(
                        "more entries than the table's count {count}"
                    )));
                }
                // SAFETY: `e` is aligned and inside the mapped heap; Entry is valid for any
                // bit pattern.
                let entry = unsafe { e.read() };
                let key = self.bytes_at(entry.key, entry.klen)?;
                let value = self.bytes_at(entry.value, entry.vlen)?;
                visit(b, key, value);
                e = entry.next;
            }
        }
        if seen != count {
            return Err(TableError::Corrupt(format!(
                "{seen} entries reachable, the table counts {count}"
            )));
        }
        Ok(())
    }

    fn bytes_at(&self, p: *mut u8, len: u32) -> Result<&[u8], TableError> {
        let len = len as usize;
        let last = (p as usize).wrapping_add(len.saturating_sub(1));
        if p.is_null() || !self.heap.contains(p) || !self.heap.contains(last as *const u8) {
            return Err(TableError::Corrupt(format!(
                "string {p:p}+{len} outside the heap"
            )));
        }
        // SAFETY: the whole range lies inside the mapped heap (checked above) and is only
        // read while `self` is borrowed.
        Ok(unsafe { std::slice::from_raw_parts(p, len) })
    }
}
