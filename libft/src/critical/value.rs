//! Typed critical values on top of the critical heap.
//!
//! [`CriticalBox`] places a plain `Copy` value in the heap (its bytes are checkpointed as they
//! are). [`Critical`] keeps a serde value serialized (MessagePack) in a named heap slot, so it
//! may hold `String`s, `Vec`s and maps that live in ordinary memory. Neither caches the value
//! outside the heap: what a checkpoint captured is what recovery gives back.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Error;
use super::heap::{CriticalHeap, MAX_ALIGN};

/// A `T` placed in the critical heap, freed on drop (like `Box`).
///
/// `T: Copy` rules out types that own ordinary memory (`String`, `Vec`, `Box`): those
/// pointers would dangle in a recovered process. Raw pointers inside `T` should point into the
/// critical heap, whose addresses recovery preserves. Use [`CriticalBox::into_raw`] to keep the
/// value beyond the box (e.g. linked from another heap object or a root) and
/// [`CriticalBox::from_raw`] to take it back.
#[derive(Debug)]
pub struct CriticalBox<'h, T: Copy> {
    heap: &'h CriticalHeap,
    ptr: NonNull<T>,
}

impl<'h, T: Copy> CriticalBox<'h, T> {
    /// Allocates room for a `T` in `heap` and moves `value` there.
    pub fn new_in(heap: &'h CriticalHeap, value: T) -> Result<CriticalBox<'h, T>, Error> {
        if align_of::<T>() > MAX_ALIGN {
            return Err(Error::InvalidArgument(format!(
                "alignment {} exceeds the heap's {MAX_ALIGN}",
                align_of::<T>()
            )));
        }
        let ptr = heap
            .alloc(size_of::<T>().max(1), align_of::<T>())?
            .cast::<T>();
        // SAFETY: `ptr` is a fresh block of at least size_of::<T>() bytes aligned for T.
        unsafe { ptr.as_ptr().write(value) };
        Ok(CriticalBox { heap, ptr })
    }

    /// Gives up ownership: the value stays in the heap until freed through `from_raw`.
    pub fn into_raw(self) -> NonNull<T> {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }

    /// Takes ownership of a value made by [`CriticalBox::new_in`] + [`CriticalBox::into_raw`]
    /// (possibly in a process that recovered the heap since).
    ///
    /// # Safety
    /// `ptr` came from `into_raw` of a box of the same `T` in this heap (or its recovered
    /// image), and no other box owns it.
    pub unsafe fn from_raw(heap: &'h CriticalHeap, ptr: NonNull<T>) -> CriticalBox<'h, T> {
        CriticalBox { heap, ptr }
    }

    /// The address in the heap.
    pub fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }
}

impl<T: Copy> Deref for CriticalBox<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the box owns an initialised, aligned T in the heap, which outlives 'h.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: Copy> DerefMut for CriticalBox<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in deref; `&mut self` makes the access unique.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T: Copy> Drop for CriticalBox<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the box owns the block, which came from `alloc` on this heap; nothing uses
        // it after the box is gone. A refusal (heap corrupted by the application) leaks.
        let _ = unsafe { self.heap.free(self.ptr.cast()) };
    }
}

// SAFETY: the box owns its T exactly like Box<T> does; the heap itself is Sync.
unsafe impl<T: Copy + Send> Send for CriticalBox<'_, T> {}
// SAFETY: shared access only hands out &T.
unsafe impl<T: Copy + Sync> Sync for CriticalBox<'_, T> {}

/// A serde value kept serialized in a named slot of the critical heap.
///
/// `store` serializes into the heap (under the heap lock, so a checkpoint sees the old or the
/// new value whole); `load` deserializes what is there now — after `t_recover`, what the
/// checkpoint held. The slot is found by name through the heap's roots, so a recovered process
/// reaches it with the same name. Serialization cost is paid on every `store`/`load`: keep hot
/// data in a [`CriticalBox`] or raw heap memory.
#[derive(Debug)]
pub struct Critical<'h, T> {
    heap: &'h CriticalHeap,
    name: String,
    _value: PhantomData<fn() -> T>,
}

impl<'h, T: Serialize + DeserializeOwned> Critical<'h, T> {
    /// The value named `name` (1..=47 bytes) in `heap`; nothing is allocated until `store`.
    pub fn new(heap: &'h CriticalHeap, name: &str) -> Result<Critical<'h, T>, Error> {
        // Validates the name now rather than at the first store.
        heap.root(name)?;
        Ok(Critical {
            heap,
            name: name.to_owned(),
            _value: PhantomData,
        })
    }

    /// The stored value, or None when nothing was stored under this name.
    pub fn load(&self) -> Result<Option<T>, Error> {
        match self.heap.read_slot(&self.name)? {
            None => Ok(None),
            Some(bytes) => rmp_serde::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.value_error(e.to_string())),
        }
    }

    /// The stored value, or `init()` (not stored) when there is none.
    pub fn load_or(&self, init: impl FnOnce() -> T) -> Result<T, Error> {
        Ok(self.load()?.unwrap_or_else(init))
    }

    /// Replaces the stored value.
    pub fn store(&self, value: &T) -> Result<(), Error> {
        let bytes = rmp_serde::to_vec(value).map_err(|e| self.value_error(e.to_string()))?;
        self.heap.write_slot(&self.name, &bytes)
    }

    /// Removes the value and frees its slot.
    pub fn clear(&self) -> Result<(), Error> {
        self.heap.remove_slot(&self.name)
    }

    /// The slot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn value_error(&self, reason: String) -> Error {
        Error::Value {
            name: self.name.clone(),
            reason,
        }
    }
}
