//! The flow table: conntrack's storage, one implementation shared by the
//! eBPF programs (which look flows up on every packet, open and close them)
//! and userspace (which reads, expires and clears them through a memory
//! mapping of the same array).
//!
//! Why not a kernel hash map: on a conntrack hit, the kernel's generic hash
//! lookup (jhash over the key, a bucket walk, an out-of-line compare) was
//! 25 of the 35 ns the whole XDP program spent above an empty program
//! (BPF_PROG_TEST_RUN, this project's machine kind). Here a lookup is a
//! multiply-xorshift hash, an inlined array index and, for a flow stored
//! in its home slot, one cache line: the hit went from 2.7x to 1.8x the
//! empty program.
//!
//! Layout: a power-of-two array (`BPF_MAP_TYPE_ARRAY`, `BPF_F_MMAPABLE`)
//! of 64-byte slots, one cache line each. A flow's *home* is
//! `hash(key) & mask`; the flow is stored in the first free slot among the
//! [`NEIGHBOURHOOD`] slots from its home on, and the home slot's
//! `neighbours` bitmap records which of them hold flows homed there
//! (hopscotch hashing, without displacement). A lookup reads the home's
//! bitmap and compares only the slots it names, so a miss on an empty
//! neighbourhood costs one line, and removal needs no tombstones (a freed
//! slot is simply empty again). The table is sized at [`SLOTS_PER_FLOW`]
//! slots per flow, i.e. at most half full with both directions of every
//! flow: a neighbourhood then has a free slot unless something is badly
//! wrong, and when it has none the flow is refused and counted, never
//! another one evicted.
//!
//! Concurrency is lock-free, so any CPU and userspace may act at once:
//! - a slot's `control` word (state, a fingerprint of its key's hash, a
//!   version bumped on every claim) changes only by compare-and-swap, so
//!   two writers never both own a slot, and a remove that expects a flow
//!   never removes the flow that reused its slot (the version differs);
//! - readers copy the key and entry between two loads of `control` and
//!   discard the copy when it changed (a seqlock read, [`lookup`]); the
//!   XDP hit path alone reads the entry in place after [`find`], as a
//!   preallocated kernel hash map's lookup does: a flow removed and its
//!   slot reused in those nanoseconds lends its last packet the
//!   newcomer's translation;
//! - an insert claims a free slot, fills it, announces it in its home's
//!   bitmap with an atomic OR, and only then checks the slots the bitmap
//!   named before for the same key (or a claim with the same fingerprint).
//!   Of two inserts of one key, the second OR sees the first one's bit and
//!   backs off, so a key is stored at most once (SNAT port claims rely on
//!   it). The insert publishes its slot (LIVE) after that check;
//! - a remove takes the slot from LIVE to DYING by CAS, clears its bit in
//!   the home's bitmap, then frees the slot: a slot is never reachable
//!   from a bitmap once it is free.
//!
//! Ordering: the eBPF side uses the BPF atomic instructions (full barriers)
//! for every read-modify-write and volatile loads and stores otherwise; on
//! x86-64 (TSO) that gives the acquire/release order the protocol needs.
//! A weakly ordered CPU (arm64) would need load-acquire and store-release
//! instructions (BPF ISA v4, kernel 6.15) for the publishing store and the
//! seqlock loads: not done, vipr runs on x86-64 only so far.
//! Userspace uses acquire loads, release stores and an acquire fence
//! between a seqlock's data reads and its re-check
//! ([`SlotMemory::order_reads`]). In-place updates of a live entry: the
//! hit path's time stamp is a plain store, the flags (SEEN, FIN, CLOSED)
//! atomic ORs; a racing remove may lose either, as with a preallocated
//! kernel hash map.
//!
//! The hash is keyed by a random per-node seed ([`TableShape::seed`],
//! kept in the pinned `CONFIG` map so a restarted agent finds its flows).
//! It is not a cryptographic hash: a client able to watch which of its
//! flows get refused could in principle crowd one neighbourhood; the
//! refusal is counted (`drop_flow_map_full`) and hits no other flow.

use core::ptr::{read_volatile, write_volatile};

use crate::{FlowKey, NatEntry};

/// Slots a flow may be stored in, counting from its home slot: the width
/// of a home's `neighbours` bitmap.
pub const NEIGHBOURHOOD: u32 = 32;

/// Slots the table has per flow it is sized for: two entries per flow
/// (both directions), at most half the slots in use.
pub const SLOTS_PER_FLOW: u32 = 4;

/// States of a slot (the low bits of [`FlowSlot::control`]).
pub mod slot_state {
    /// Free.
    pub const EMPTY: u32 = 0;
    /// Taken by an insert that has not published it yet.
    pub const CLAIMED: u32 = 1;
    /// Holds a flow entry lookups may return.
    pub const LIVE: u32 = 2;
    /// Being removed.
    pub const DYING: u32 = 3;
}

const STATE_MASK: u32 = 0b11;
/// Bits 2..16: the key hash's fingerprint; bits 16..32: the version.
const FINGERPRINT_MASK: u32 = 0xfffc;
const VERSION_ONE: u32 = 1 << 16;

/// One slot: a cache line holding the bitmap of its home role, its own
/// control word, and a flow entry (one direction of a flow) with its key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSlot {
    /// Bit `i`: slot `self + i` holds a flow whose home is this slot.
    pub neighbours: u32,
    /// State, fingerprint and version; changed by compare-and-swap only.
    pub control: u32,
    pub key: FlowKey,
    pub entry: NatEntry,
    pub _reserved: u64,
}

/// The state bits of a control word.
#[inline(always)]
pub const fn state_of(control: u32) -> u32 {
    control & STATE_MASK
}

/// Where a table's flows are found: its size and hash seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableShape {
    /// Slots minus one (the slot count is a power of two).
    pub mask: u32,
    pub seed: u64,
}

impl TableShape {
    /// The slots a table for `max_flows` flows has: a power of two.
    pub const fn slots_for(max_flows: u32) -> u32 {
        let wanted = max_flows.saturating_mul(SLOTS_PER_FLOW);
        let slots = wanted.next_power_of_two();
        // A neighbourhood must fit in the table.
        if slots < NEIGHBOURHOOD {
            NEIGHBOURHOOD
        } else {
            slots
        }
    }
}

/// The 64-bit hash a flow is placed by: the home slot from its high half,
/// the fingerprint from its low bits. Each of the key's two words is keyed
/// by half of `seed` and multiplied (the two in parallel), and the sum
/// goes through one more multiply between xor-shifts, so that keys
/// differing only in a port spread over the whole table and which keys
/// collide depends on the seed.
#[inline(always)]
pub fn flow_hash(key: &FlowKey, seed: u64) -> u64 {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    const K2: u64 = 0xbf58_476d_1ce4_e5b9;
    const K3: u64 = 0x94d0_49bb_1331_11eb;
    let [addrs, ports] = key.words();
    let h = (addrs ^ seed).wrapping_mul(K1) ^ (ports ^ seed.rotate_left(32)).wrapping_mul(K2);
    let h = (h ^ (h >> 32)).wrapping_mul(K3);
    h ^ (h >> 29)
}

#[inline(always)]
fn home_of(hash: u64, mask: u32) -> u32 {
    (hash >> 32) as u32 & mask
}

#[inline(always)]
fn fingerprint_of(hash: u64) -> u32 {
    (hash as u32) & FINGERPRINT_MASK
}

/// The control word after `control`'s, in state `state` with `fingerprint`.
#[inline(always)]
fn next_control(control: u32, state: u32, fingerprint: u32) -> u32 {
    (control & !(STATE_MASK | FINGERPRINT_MASK)).wrapping_add(VERSION_ONE) | fingerprint | state
}

/// The memory a table lives in, and the atomic operations on its words.
/// The eBPF side implements it on the map with BPF atomic instructions,
/// userspace on a mapping of the same map (or, in tests, on a heap array).
pub trait SlotMemory: Copy {
    /// Slot `index` (already masked), or `None` when out of bounds (which
    /// the eBPF side must be ready for, whatever the mask).
    fn slot(&self, index: u32) -> Option<*mut FlowSlot>;
    /// Loads a word (acquire).
    ///
    /// # Safety
    /// `word` points into a slot this memory gave.
    unsafe fn load(&self, word: *mut u32) -> u32;
    /// Stores a word (release).
    ///
    /// # Safety
    /// As for [`SlotMemory::load`].
    unsafe fn store(&self, word: *mut u32, value: u32);
    /// Sets `word` to `new` if it is `current`; whether it did.
    ///
    /// # Safety
    /// As for [`SlotMemory::load`].
    unsafe fn compare_exchange(&self, word: *mut u32, current: u32, new: u32) -> bool;
    /// ORs `bits` in; the word before.
    ///
    /// # Safety
    /// As for [`SlotMemory::load`].
    unsafe fn fetch_or(&self, word: *mut u32, bits: u32) -> u32;
    /// ANDs `bits` in; the word before.
    ///
    /// # Safety
    /// As for [`SlotMemory::load`].
    unsafe fn fetch_and(&self, word: *mut u32, bits: u32) -> u32;
    /// Calls `step` with 0, 1, ... up to `count - 1`, until it returns
    /// `true`. The eBPF side runs it with `bpf_loop`, so the verifier
    /// checks one step instead of every path through every iteration.
    fn repeat<F: FnMut(u32) -> bool>(&self, count: u32, step: F);
    /// Keeps the plain reads of a slot's key and entry before the control
    /// word's re-check that validates them (a seqlock's read fence). BPF
    /// has no fence instruction: on x86, where loads are not reordered
    /// with loads, none is needed (see the module docs).
    #[inline(always)]
    fn order_reads(&self) {}
}

/// Where a flow is stored: what [`remove`] needs to remove it and no later
/// flow of the same slot.
#[derive(Clone, Copy, Debug)]
pub struct Found {
    pub slot: *mut FlowSlot,
    pub index: u32,
    /// The flow's home slot.
    pub home: u32,
    /// The slot's control word when the flow was found.
    pub control: u32,
}

/// Where a flow is, as a map value can hold it (no pointer): what
/// [`Found`] is without its slot pointer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRef {
    pub index: u32,
    pub home: u32,
    pub control: u32,
    pub _pad: u32,
}

impl SlotRef {
    #[inline(always)]
    pub const fn of(found: &Found) -> Self {
        SlotRef {
            index: found.index,
            home: found.home,
            control: found.control,
            _pad: 0,
        }
    }
}

/// Why an insert did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// The key is stored already (or another insert of it won the race).
    Exists,
    /// No free slot in the key's neighbourhood.
    Full,
}

/// Whether the slot's key is `key`, read as two words without tearing
/// guarantees: callers validate with the control word.
///
/// # Safety
/// `slot` is a valid slot pointer.
#[inline(always)]
unsafe fn holds(slot: *mut FlowSlot, key: &FlowKey) -> bool {
    let wanted = key.words();
    // SAFETY: the caller's promise; the key sits 8-aligned in the slot.
    // Volatile, as other CPUs write it.
    unsafe {
        let stored = (&raw const (*slot).key).cast::<u64>();
        read_volatile(stored) == wanted[0] && read_volatile(stored.add(1)) == wanted[1]
    }
}

/// The slot's control word.
#[inline(always)]
fn control_word(slot: *mut FlowSlot) -> *mut u32 {
    // SAFETY: only the address is taken; `slot` came from a `SlotMemory`.
    unsafe { &raw mut (*slot).control }
}

/// The slot's bitmap of the flows homed at it.
#[inline(always)]
fn neighbours(slot: *mut FlowSlot) -> *mut u32 {
    // SAFETY: as above.
    unsafe { &raw mut (*slot).neighbours }
}

/// The slot's key, read without tearing guarantees (the caller validates
/// with the control word).
///
/// # Safety
/// `slot` is a valid slot pointer.
#[inline(always)]
unsafe fn read_key(slot: *mut FlowSlot) -> FlowKey {
    // SAFETY: the caller's promise; volatile, as other CPUs write it.
    unsafe { read_volatile(&raw const (*slot).key) }
}

/// The slot's entry, as [`read_key`].
///
/// # Safety
/// As for [`read_key`].
#[inline(always)]
unsafe fn read_entry(slot: *mut FlowSlot) -> NatEntry {
    // SAFETY: the caller's promise.
    unsafe { read_volatile(&raw const (*slot).entry) }
}

/// Whether `slot` holds `key`'s flow (live, same key); its control word if
/// so, [`NOWHERE`] if not.
#[inline(always)]
fn holding<M: SlotMemory>(memory: &M, slot: *mut FlowSlot, key: &FlowKey) -> u32 {
    // SAFETY: a slot the memory gave.
    let control = unsafe { memory.load(control_word(slot)) };
    // SAFETY: as above.
    if state_of(control) == slot_state::LIVE && unsafe { holds(slot, key) } {
        control
    } else {
        NOWHERE
    }
}

/// Finds where `key` is stored, if it is (and is not being removed). A
/// flow in its home slot, and a miss on a home no flow is homed at, are
/// settled without a loop and with one slot lookup; the rest of the
/// neighbourhood is walked by [`SlotMemory::repeat`].
///
/// Built from plain values to the end (an index and a control word, with
/// [`NOWHERE`] for none): LLVM may keep the undefined payload of a `None`
/// in a register and spill it, which the verifier refuses to read.
#[inline(always)]
pub fn find<M: SlotMemory>(memory: &M, shape: TableShape, key: &FlowKey) -> Option<Found> {
    let memory = *memory;
    let home = home_of(flow_hash(key, shape.seed), shape.mask);
    let home_slot = memory.slot(home)?;
    // SAFETY: a slot the memory gave.
    let bits = unsafe { memory.load(neighbours(home_slot)) };
    let mut control = if bits & 1 != 0 {
        holding(&memory, home_slot, key)
    } else {
        NOWHERE
    };
    let mut at = home;
    let mut slot = home_slot;
    let rest = bits >> 1;
    if control == NOWHERE && rest != 0 {
        // Small by design (an index and a word), like every loop state
        // here: the eBPF stack is 512 bytes for a whole call chain.
        let mask = shape.mask;
        memory.repeat(NEIGHBOURHOOD - 1, |i| {
            let bit = rest >> i;
            if bit & 1 != 0
                && let Some(candidate) = memory.slot(home.wrapping_add(i + 1) & mask)
            {
                at = home.wrapping_add(i + 1) & mask;
                control = holding(&memory, candidate, key);
            }
            control != NOWHERE || bit >> 1 == 0
        });
        // Every field is computed whether or not the key was found, so
        // LLVM never has to carry (and spill) an undefined one into a None.
        slot = memory.slot(at).unwrap_or(core::ptr::null_mut());
    }
    (control != NOWHERE && !slot.is_null()).then_some(Found {
        slot,
        index: at,
        home,
        control,
    })
}

/// No slot (loop results).
const NOWHERE: u32 = u32::MAX;

/// Looks `key` up: where it is and a consistent copy of its entry.
#[inline(always)]
pub fn lookup<M: SlotMemory>(
    memory: &M,
    shape: TableShape,
    key: &FlowKey,
) -> Option<(Found, NatEntry)> {
    let found = find(memory, shape, key)?;
    // SAFETY: a slot the memory gave.
    let entry = unsafe { read_entry(found.slot) };
    memory.order_reads();
    still_holds(memory, &found).then_some((found, entry))
}

/// Whether the slot `found` names still holds the flow it was found with:
/// a LIVE slot's control word changes only when its flow is removed (after
/// which the slot may hold a newer flow's entry).
#[inline(always)]
pub fn still_holds<M: SlotMemory>(memory: &M, found: &Found) -> bool {
    // SAFETY: a slot the memory gave.
    unsafe { memory.load(control_word(found.slot)) == found.control }
}

/// Stores `entry` under `key`, unless the key is stored already.
#[inline(always)]
pub fn insert<M: SlotMemory>(
    memory: &M,
    shape: TableShape,
    key: &FlowKey,
    entry: &NatEntry,
) -> Result<Found, InsertError> {
    let memory = *memory;
    // The common refusal (an SNAT port already taken) costs a lookup, not
    // a claim and its release; a key stored meanwhile is caught below.
    if find(&memory, shape, key).is_some() {
        return Err(InsertError::Exists);
    }
    let hash = flow_hash(key, shape.seed);
    let home = home_of(hash, shape.mask);
    let fingerprint = fingerprint_of(hash);
    let home_slot = memory.slot(home).ok_or(InsertError::Full)?;
    let offset = claim_free_slot(memory, shape.mask, home, fingerprint);
    let index = home.wrapping_add(offset) & shape.mask;
    let slot = match memory.slot(index) {
        Some(slot) if offset < NEIGHBOURHOOD => slot,
        _ => return Err(InsertError::Full),
    };
    // The claim's control word: only this insert changes it from here on.
    // SAFETY: a slot this insert owns (CLAIMED by it).
    let claimed = unsafe { memory.load(control_word(slot)) };
    // SAFETY: as above.
    unsafe {
        write_volatile(&raw mut (*slot).key, *key);
        write_volatile(&raw mut (*slot).entry, *entry);
    }
    let bit = 1u32 << offset;
    // SAFETY: a slot the memory gave.
    let before = unsafe { memory.fetch_or(neighbours(home_slot), bit) };
    // An existing copy, or an earlier insert of the same key, is among the
    // slots named before this one's bit (this one is not: it was free).
    if another_copy(memory, shape.mask, home, before, key, fingerprint) {
        // SAFETY: as above; the slot is still this insert's.
        unsafe {
            memory.fetch_and(neighbours(home_slot), !bit);
            memory.store(
                control_word(slot),
                next_control(claimed, slot_state::EMPTY, 0),
            );
        }
        return Err(InsertError::Exists);
    }
    let live = (claimed & !STATE_MASK) | slot_state::LIVE;
    // SAFETY: as above.
    unsafe { memory.store(control_word(slot), live) };
    Ok(Found {
        slot,
        index,
        home,
        control: live,
    })
}

/// Claims the first free slot from `home` on; its offset from home, or
/// [`NEIGHBOURHOOD`] when every slot is taken.
#[inline(always)]
fn claim_free_slot<M: SlotMemory>(memory: M, mask: u32, home: u32, fingerprint: u32) -> u32 {
    let mut claimed = NEIGHBOURHOOD;
    memory.repeat(NEIGHBOURHOOD, |offset| {
        let Some(slot) = memory.slot(home.wrapping_add(offset) & mask) else {
            return false;
        };
        let word = control_word(slot);
        // SAFETY: a slot the memory gave.
        let control = unsafe { memory.load(word) };
        if state_of(control) != slot_state::EMPTY {
            return false;
        }
        let new = next_control(control, slot_state::CLAIMED, fingerprint);
        // SAFETY: as above.
        if unsafe { memory.compare_exchange(word, control, new) } {
            claimed = offset;
            return true;
        }
        false
    });
    claimed
}

/// Whether a slot named in `bits` (a bitmap of `home`) holds `key`, or is
/// claimed by an insert whose key has the same fingerprint (possibly the
/// same key, not written yet).
#[inline(always)]
fn another_copy<M: SlotMemory>(
    memory: M,
    mask: u32,
    home: u32,
    bits: u32,
    key: &FlowKey,
    fingerprint: u32,
) -> bool {
    if bits == 0 {
        return false;
    }
    let mut same = false;
    memory.repeat(NEIGHBOURHOOD, |i| {
        let bit = bits >> i;
        if bit & 1 != 0
            && let Some(slot) = memory.slot(home.wrapping_add(i) & mask)
        {
            // SAFETY: a slot the memory gave.
            let control = unsafe { memory.load(control_word(slot)) };
            same = match state_of(control) {
                // SAFETY: as above.
                slot_state::LIVE => unsafe { holds(slot, key) },
                slot_state::CLAIMED => control & FINGERPRINT_MASK == fingerprint,
                _ => false,
            };
        }
        same || bit >> 1 == 0
    });
    same
}

/// Removes the flow `found` describes, if its slot still holds it; whether
/// this call removed it (of racing removes, exactly one does).
#[inline(always)]
pub fn remove<M: SlotMemory>(memory: &M, shape: TableShape, found: &Found) -> bool {
    let slot = found.slot;
    let word = control_word(slot);
    let dying = (found.control & !STATE_MASK) | slot_state::DYING;
    // SAFETY: a slot the memory gave.
    if !unsafe { memory.compare_exchange(word, found.control, dying) } {
        return false;
    }
    let offset = found.index.wrapping_sub(found.home) & shape.mask;
    if offset < NEIGHBOURHOOD
        && let Some(home_slot) = memory.slot(found.home)
    {
        // SAFETY: as above.
        unsafe { memory.fetch_and(neighbours(home_slot), !(1u32 << offset)) };
    }
    // SAFETY: as above; the slot is this call's until it is stored EMPTY.
    unsafe { memory.store(word, next_control(dying, slot_state::EMPTY, 0)) };
    true
}

/// Looks `key` up and removes it; whether it was there and this call
/// removed it.
#[inline(always)]
pub fn remove_key<M: SlotMemory>(memory: &M, shape: TableShape, key: &FlowKey) -> bool {
    find(memory, shape, key).is_some_and(|found| remove(memory, shape, &found))
}

/// The flow in slot `index` if it holds a live one: a consistent copy of
/// its key and entry, with what [`remove`] needs. For walks over the table.
#[inline(always)]
pub fn read_slot<M: SlotMemory>(
    memory: &M,
    shape: TableShape,
    index: u32,
) -> Option<(FlowKey, NatEntry, Found)> {
    let slot = memory.slot(index)?;
    let word = control_word(slot);
    // SAFETY: a slot the memory gave.
    let control = unsafe { memory.load(word) };
    if state_of(control) != slot_state::LIVE {
        return None;
    }
    // SAFETY: as above.
    let (key, entry) = unsafe { (read_key(slot), read_entry(slot)) };
    memory.order_reads();
    // SAFETY: as above.
    if unsafe { memory.load(word) } != control {
        return None;
    }
    let home = home_of(flow_hash(&key, shape.seed), shape.mask);
    Some((
        key,
        entry,
        Found {
            slot,
            index,
            home,
            control,
        },
    ))
}

/// [`SlotMemory`] over plain memory with the CPU's atomics: userspace's
/// view of the table (a mapping of the map) and the tests' (a heap array).
#[cfg(any(test, feature = "user"))]
pub mod user {
    use core::sync::atomic::{AtomicU32, Ordering, fence};

    use super::{FlowSlot, SlotMemory};

    /// `len` slots from `base`.
    #[derive(Clone, Copy)]
    pub struct RawSlots {
        base: *mut FlowSlot,
        len: u32,
    }

    // SAFETY: every access through it is atomic or validated by the
    // control word (see the module docs); the memory outlives it by the
    // constructor's contract.
    unsafe impl Send for RawSlots {}
    // SAFETY: as above.
    unsafe impl Sync for RawSlots {}

    impl RawSlots {
        /// # Safety
        /// `base` points to `len` slots, 8-byte aligned, valid and shared
        /// only with users of the same protocol for the value's lifetime.
        pub unsafe fn new(base: *mut FlowSlot, len: u32) -> Self {
            RawSlots { base, len }
        }

        pub fn len(&self) -> u32 {
            self.len
        }

        pub fn is_empty(&self) -> bool {
            self.len == 0
        }
    }

    fn atomic<'a>(word: *mut u32) -> &'a AtomicU32 {
        // SAFETY: callers pass words of slots of this memory (trait
        // contract), which are aligned and live.
        unsafe { AtomicU32::from_ptr(word) }
    }

    impl SlotMemory for RawSlots {
        fn slot(&self, index: u32) -> Option<*mut FlowSlot> {
            // SAFETY: in bounds.
            (index < self.len).then(|| unsafe { self.base.add(index as usize) })
        }
        unsafe fn load(&self, word: *mut u32) -> u32 {
            atomic(word).load(Ordering::Acquire)
        }
        unsafe fn store(&self, word: *mut u32, value: u32) {
            atomic(word).store(value, Ordering::Release)
        }
        unsafe fn compare_exchange(&self, word: *mut u32, current: u32, new: u32) -> bool {
            atomic(word)
                .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        }
        unsafe fn fetch_or(&self, word: *mut u32, bits: u32) -> u32 {
            atomic(word).fetch_or(bits, Ordering::AcqRel)
        }
        unsafe fn fetch_and(&self, word: *mut u32, bits: u32) -> u32 {
            atomic(word).fetch_and(bits, Ordering::AcqRel)
        }
        fn repeat<F: FnMut(u32) -> bool>(&self, count: u32, mut step: F) {
            for i in 0..count {
                if step(i) {
                    break;
                }
            }
        }
        fn order_reads(&self) {
            fence(Ordering::Acquire);
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{sync::Arc, vec, vec::Vec};

    use super::{user::RawSlots, *};
    use crate::IPPROTO_TCP;

    /// A table on the heap: the slots, and the memory view over them.
    struct HeapTable {
        _slots: Vec<FlowSlot>,
        memory: RawSlots,
        shape: TableShape,
    }

    impl HeapTable {
        fn new(slots: u32, seed: u64) -> Self {
            let empty = FlowSlot {
                neighbours: 0,
                control: 0,
                key: key(0, 0),
                entry: entry(0),
                _reserved: 0,
            };
            let mut storage = vec![empty; slots as usize];
            // SAFETY: the vector outlives the view (same struct, dropped after).
            let memory = unsafe { RawSlots::new(storage.as_mut_ptr(), slots) };
            HeapTable {
                _slots: storage,
                memory,
                shape: TableShape {
                    mask: slots - 1,
                    seed,
                },
            }
        }

        fn insert(&self, k: &FlowKey, e: &NatEntry) -> Result<Found, InsertError> {
            insert(&self.memory, self.shape, k, e)
        }

        fn get(&self, k: &FlowKey) -> Option<NatEntry> {
            lookup(&self.memory, self.shape, k).map(|(_, e)| e)
        }

        fn live(&self) -> Vec<(FlowKey, NatEntry, Found)> {
            (0..=self.shape.mask)
                .filter_map(|i| read_slot(&self.memory, self.shape, i))
                .collect()
        }

        fn home(&self, k: &FlowKey) -> u32 {
            home_of(flow_hash(k, self.shape.seed), self.shape.mask)
        }

        /// Every bitmap bit names a live slot homed there; every live slot
        /// is named by its home's bitmap; no key is stored twice.
        fn check_invariants(&self) {
            let live = self.live();
            let mut keys: Vec<_> = live.iter().map(|(k, _, _)| *k).collect();
            keys.sort_by_key(|k| (k.src_addr, k.dst_addr, k.src_port, k.dst_port, k.proto));
            let before = keys.len();
            keys.dedup();
            assert_eq!(keys.len(), before, "a key is stored twice");
            for (k, _, found) in &live {
                let home = self.memory.slot(found.home).unwrap();
                let offset = found.index.wrapping_sub(found.home) & self.shape.mask;
                // SAFETY: a slot of the table.
                let bits = unsafe { (*home).neighbours };
                assert!(bits & (1 << offset) != 0, "{k:?} unreachable from its home");
            }
            for home in 0..=self.shape.mask {
                // SAFETY: as above.
                let bits = unsafe { (*self.memory.slot(home).unwrap()).neighbours };
                for i in 0..NEIGHBOURHOOD {
                    if bits & (1 << i) != 0 {
                        let index = (home + i) & self.shape.mask;
                        let (k, _, _) = read_slot(&self.memory, self.shape, index)
                            .unwrap_or_else(|| panic!("bit {i} of {home} names a free slot"));
                        assert_eq!(self.home(&k), home, "bit names a flow homed elsewhere");
                    }
                }
            }
        }
    }

    fn key(src: u32, port: u16) -> FlowKey {
        FlowKey {
            src_addr: src,
            dst_addr: 0x0a60_000a,
            src_port: port,
            dst_port: 80,
            proto: IPPROTO_TCP,
            _pad: 0,
            _pad2: 0,
        }
    }

    fn entry(tag: u32) -> NatEntry {
        NatEntry {
            src_addr: tag,
            dst_addr: !tag,
            src_port: 1,
            dst_port: 2,
            flags: 0,
            _pad: 0,
            stamp_tick: 0,
            ip_check_delta: 0,
            l4_check_delta: 0,
            last_seen: tag,
            stats_id: u64::from(tag),
        }
    }

    #[test]
    fn slot_is_one_cache_line() {
        assert_eq!(core::mem::size_of::<FlowSlot>(), 64);
    }

    #[test]
    fn insert_lookup_remove() {
        let t = HeapTable::new(1024, 7);
        let a = key(1, 1000);
        assert!(t.get(&a).is_none());
        t.insert(&a, &entry(1)).unwrap();
        assert_eq!(t.get(&a), Some(entry(1)));
        assert_eq!(t.insert(&a, &entry(2)).err(), Some(InsertError::Exists));
        assert_eq!(
            t.get(&a),
            Some(entry(1)),
            "a refused insert changes nothing"
        );
        assert!(remove_key(&t.memory, t.shape, &a));
        assert!(t.get(&a).is_none());
        assert!(!remove_key(&t.memory, t.shape, &a), "removed once only");
        t.insert(&a, &entry(3)).unwrap();
        assert_eq!(t.get(&a), Some(entry(3)));
        t.check_invariants();
    }

    #[test]
    fn a_stale_handle_never_removes_the_flow_that_reused_its_slot() {
        let t = HeapTable::new(1024, 7);
        let a = key(1, 1000);
        let stale = t.insert(&a, &entry(1)).unwrap();
        assert!(remove(&t.memory, t.shape, &stale));
        let fresh = t.insert(&a, &entry(2)).unwrap();
        assert_eq!(fresh.index, stale.index, "the freed slot is reused");
        assert!(!remove(&t.memory, t.shape, &stale));
        assert_eq!(t.get(&a), Some(entry(2)));
    }

    /// Keys that all share one home slot in `t`.
    fn same_home(t: &HeapTable, count: usize) -> Vec<FlowKey> {
        let home = t.home(&key(9, 0));
        (0..u16::MAX)
            .map(|p| key(9, p))
            .filter(|k| t.home(k) == home)
            .take(count)
            .collect()
    }

    #[test]
    fn a_full_neighbourhood_refuses_and_keeps_every_flow() {
        let t = HeapTable::new(256, 3);
        let keys = same_home(&t, NEIGHBOURHOOD as usize + 1);
        assert_eq!(keys.len(), NEIGHBOURHOOD as usize + 1);
        for (i, k) in keys[..NEIGHBOURHOOD as usize].iter().enumerate() {
            t.insert(k, &entry(i as u32)).unwrap();
        }
        assert_eq!(
            t.insert(&keys[NEIGHBOURHOOD as usize], &entry(99)).err(),
            Some(InsertError::Full)
        );
        for (i, k) in keys[..NEIGHBOURHOOD as usize].iter().enumerate() {
            assert_eq!(t.get(k), Some(entry(i as u32)));
        }
        // One goes, the refused one fits.
        assert!(remove_key(&t.memory, t.shape, &keys[5]));
        t.insert(&keys[NEIGHBOURHOOD as usize], &entry(99)).unwrap();
        assert_eq!(t.get(&keys[NEIGHBOURHOOD as usize]), Some(entry(99)));
        t.check_invariants();
    }

    #[test]
    fn the_neighbourhood_wraps_around_the_table_end() {
        let t = HeapTable::new(64, 11);
        let last = (0..u16::MAX)
            .map(|p| key(3, p))
            .filter(|k| t.home(k) == 63)
            .take(4)
            .collect::<Vec<_>>();
        for (i, k) in last.iter().enumerate() {
            t.insert(k, &entry(i as u32)).unwrap();
        }
        for (i, k) in last.iter().enumerate() {
            assert_eq!(t.get(k), Some(entry(i as u32)));
        }
        t.check_invariants();
    }

    #[test]
    fn homes_spread_evenly() {
        // 64 homes, 64,000 flows differing only in the client port, as a
        // NodePort flood's are: each home within 25% of its share.
        let t = HeapTable::new(64, 0x1234_5678_9abc_def0);
        let mut counts = [0u32; 64];
        for p in 0..64_000u16 {
            counts[t.home(&key(0x0a00_0001, p)) as usize] += 1;
        }
        for (home, n) in counts.iter().enumerate() {
            assert!((750..=1250).contains(n), "home {home}: {n} of 64,000");
        }
    }

    #[test]
    fn the_seed_changes_which_keys_share_a_home() {
        let a = HeapTable::new(1 << 16, 1);
        let b = HeapTable::new(1 << 16, 2);
        let keys = same_home(&a, 8);
        let homes: Vec<u32> = keys.iter().map(|k| b.home(k)).collect();
        assert!(homes.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn racing_inserts_store_each_key_once() {
        const THREADS: usize = 4;
        const KEYS: u16 = 2_000;
        for round in 0..20u64 {
            let t = Arc::new(HeapTable::new(1 << 14, round));
            let handles: Vec<_> = (0..THREADS)
                .map(|thread| {
                    let t = Arc::clone(&t);
                    std::thread::spawn(move || {
                        let mut won = 0;
                        for p in 0..KEYS {
                            if t.insert(&key(1, p), &entry(thread as u32)).is_ok() {
                                won += 1;
                            }
                        }
                        won
                    })
                })
                .collect();
            let won: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
            assert!(won <= u32::from(KEYS), "round {round}: {won} inserts won");
            t.check_invariants();
            // Both racers may back off only if neither saw the other first,
            // which the protocol rules out: every key is stored.
            assert_eq!(t.live().len(), usize::from(KEYS), "round {round}");
        }
    }

    #[test]
    fn concurrent_churn_keeps_the_table_consistent() {
        const THREADS: u32 = 4;
        let t = Arc::new(HeapTable::new(1 << 12, 99));
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    // Each thread owns its keys; all share the homes.
                    let mut state = u64::from(thread) + 1;
                    let mut held: Vec<FlowKey> = Vec::new();
                    for _ in 0..100_000 {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                        let k = key(thread, (state >> 40) as u16 % 512);
                        if held.contains(&k) {
                            assert_eq!(t.get(&k).map(|e| e.src_addr), Some(thread));
                            assert!(remove_key(&t.memory, t.shape, &k));
                            held.retain(|h| h != &k);
                        } else {
                            match t.insert(&k, &entry(thread)) {
                                Ok(_) => held.push(k),
                                Err(InsertError::Full) => {}
                                Err(InsertError::Exists) => panic!("{k:?} exists"),
                            }
                        }
                    }
                    held
                })
            })
            .collect();
        let held: Vec<FlowKey> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        t.check_invariants();
        assert_eq!(t.live().len(), held.len());
        for k in &held {
            assert!(t.get(k).is_some());
        }
    }
}
