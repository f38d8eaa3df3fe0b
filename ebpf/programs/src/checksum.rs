//! Internet checksum arithmetic: incremental updates (RFC 1624, eqn. 3:
//! HC' = ~(~HC + ~m + m')) for rewrites, and sums from scratch for the
//! headers the data plane builds itself (RST and ICMP replies).
//!
//! Values are the 16-bit words exactly as they sit in the packet (read in host
//! order from network-order memory); the ones' complement sum does not care
//! about byte order as long as every word is read and written the same way.

#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The ones' complement difference of a set of field changes, applied to any
/// number of checksums that cover those fields.
#[derive(Clone, Copy, Default)]
pub struct Delta(u32);

impl Delta {
    /// A 32-bit field (an IPv4 address) changed from `old` to `new`.
    #[inline(always)]
    pub fn u32(self, old: u32, new: u32) -> Self {
        Delta(
            self.0
                + u32::from(!(old as u16))
                + u32::from(!((old >> 16) as u16))
                + (new & 0xffff)
                + (new >> 16),
        )
    }

    /// A 16-bit field (a port, a checksum) changed from `old` to `new`.
    #[inline(always)]
    pub fn u16(self, old: u16, new: u16) -> Self {
        Delta(self.0 + u32::from(!old) + u32::from(new))
    }

    /// `check` after the changes.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        apply_folded(self.folded(), check)
    }

    /// The changes as one 16-bit word, to store and apply later.
    #[inline(always)]
    pub fn folded(self) -> u16 {
        fold(self.0)
    }
}

/// `check` after changes whose sum was folded (`Delta::folded`) earlier.
#[inline(always)]
pub fn apply_folded(delta: u16, check: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(delta))
}

/// The ones' complement sum (not yet inverted) of a 32-bit value's halves.
#[inline(always)]
pub fn sum_u32(value: u32) -> u32 {
    (value & 0xffff) + (value >> 16)
}

impl Delta {
    /// Both sets of changes together.
    #[inline(always)]
    pub fn combine(self, other: Delta) -> Self {
        Delta(u32::from(fold(self.0)) + u32::from(fold(other.0)))
    }
}
