//! The conntrack table (`CONNTRACK`) as `vipr_common::flow_table` sees it:
//! its memory, with the BPF atomic instructions for the words several CPUs
//! and userspace change at once, and its shape, from read-only globals the
//! loader sets.

use core::{
    intrinsics::{AtomicOrdering, atomic_and, atomic_cxchg, atomic_or},
    ptr::{read_volatile, write_volatile},
};

use aya_ebpf::{cty::c_void, helpers::bpf_loop};

use vipr_common::{
    FlowKey, NatEntry,
    flow_table::{self, FlowSlot, Found, InsertError, SlotMemory, SlotRef, TableShape},
};

use crate::CONNTRACK;

#[derive(Clone, Copy)]
struct ConntrackMemory;

impl SlotMemory for ConntrackMemory {
    #[inline(always)]
    fn slot(&self, index: u32) -> Option<*mut FlowSlot> {
        CONNTRACK.get_ptr_mut(index)
    }

    #[inline(always)]
    unsafe fn load(&self, word: *mut u32) -> u32 {
        // SAFETY: the trait's contract: a word of a live map value.
        unsafe { read_volatile(word) }
    }

    #[inline(always)]
    unsafe fn store(&self, word: *mut u32, value: u32) {
        // SAFETY: as above.
        unsafe { write_volatile(word, value) }
    }

    #[inline(always)]
    unsafe fn compare_exchange(&self, word: *mut u32, current: u32, new: u32) -> bool {
        // SAFETY: as above; BPF_CMPXCHG (ISA v3).
        unsafe {
            atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                word, current, new,
            )
            .1
        }
    }

    #[inline(always)]
    unsafe fn fetch_or(&self, word: *mut u32, bits: u32) -> u32 {
        // SAFETY: as above; BPF_OR | BPF_FETCH (ISA v3).
        unsafe { atomic_or::<u32, u32, { AtomicOrdering::SeqCst }>(word, bits) }
    }

    #[inline(always)]
    unsafe fn fetch_and(&self, word: *mut u32, bits: u32) -> u32 {
        // SAFETY: as above; BPF_AND | BPF_FETCH (ISA v3).
        unsafe { atomic_and::<u32, u32, { AtomicOrdering::SeqCst }>(word, bits) }
    }

    #[inline(always)]
    fn repeat<F: FnMut(u32) -> bool>(&self, count: u32, mut step: F) {
        // SAFETY: the callback takes exactly this context type, which lives
        // on this frame for the call.
        unsafe {
            bpf_loop(
                count,
                repeat_step::<F> as *mut c_void,
                &mut step as *mut F as *mut c_void,
                0,
            )
        };
    }
}

/// One `bpf_loop` step of [`SlotMemory::repeat`]: 1 stops the loop.
#[inline(never)]
extern "C" fn repeat_step<F: FnMut(u32) -> bool>(index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the context `repeat` gave: its closure.
    let step = unsafe { &mut *(ctx as *mut F) };
    i64::from(step(index))
}

/// The flow `slot` records, to remove it (a map value holds no pointer:
/// the verifier forgets a pointer's type once it is stored in a map).
#[inline(always)]
pub fn found_at(slot: &SlotRef) -> Option<Found> {
    Some(Found {
        slot: CONNTRACK.get_ptr_mut(slot.index)?,
        index: slot.index,
        home: slot.home,
        control: slot.control,
    })
}

/// The conntrack table's shape, set by userspace at load (read-only data,
/// `vipr_common::globals`).
#[unsafe(no_mangle)]
static FLOW_TABLE_MASK: u32 = 0;
#[unsafe(no_mangle)]
static FLOW_TABLE_SEED: u64 = 0;

/// The table's shape; `None` if userspace did not set it (no flow can be
/// found or opened then).
#[inline(always)]
fn shape() -> Option<TableShape> {
    // SAFETY: plain reads of globals; volatile, or the compiler would fold
    // in the zeros they are built with.
    let (mask, seed) = unsafe {
        (
            read_volatile(&FLOW_TABLE_MASK),
            read_volatile(&FLOW_TABLE_SEED),
        )
    };
    (mask != 0).then_some(TableShape { mask, seed })
}

/// Where `key`'s flow entry is and a copy of it, if one is stored.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<(Found, NatEntry)> {
    flow_table::lookup(&ConntrackMemory, shape()?, key)
}

/// Where `key`'s flow entry is, if one is stored.
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<Found> {
    flow_table::find(&ConntrackMemory, shape()?, key)
}

/// Whether the slot `found` names still holds the flow it was found with.
#[inline(always)]
pub fn still_holds(found: &Found) -> bool {
    flow_table::still_holds(&ConntrackMemory, found)
}

/// Stores `entry` under `key` unless the key is stored already.
#[inline(always)]
pub fn insert(key: &FlowKey, entry: &NatEntry) -> Result<Found, InsertError> {
    let mut found = Found {
        slot: core::ptr::null_mut(),
        index: 0,
        home: 0,
        control: 0,
    };
    match insert_into(key, entry, &mut found) {
        INSERTED => Ok(found),
        EXISTS => Err(InsertError::Exists),
        _ => Err(InsertError::Full),
    }
}

const INSERTED: u32 = 0;
const EXISTS: u32 = 1;
const FULL: u32 = 2;

/// [`insert`] as a BPF subprogram (a frame of its own, verified once per
/// call site instead of inlined into each): the outcome as a code, the
/// slot in `found`.
#[inline(never)]
fn insert_into(key: &FlowKey, entry: &NatEntry, found: &mut Found) -> u32 {
    let Some(shape) = shape() else {
        return FULL;
    };
    match flow_table::insert(&ConntrackMemory, shape, key, entry) {
        Ok(inserted) => {
            *found = inserted;
            INSERTED
        }
        Err(InsertError::Exists) => EXISTS,
        Err(InsertError::Full) => FULL,
    }
}

/// Removes the flow `found` names, if it is still there; whether this call
/// removed it.
#[inline(always)]
pub fn remove(found: &Found) -> bool {
    shape().is_some_and(|shape| flow_table::remove(&ConntrackMemory, shape, found))
}
