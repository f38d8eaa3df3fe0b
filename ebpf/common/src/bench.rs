//! Map values of `vipr bench`'s packet tools (`ebpf/programs/bench`), which
//! are no part of the data plane.

/// Ethernet + IPv4 (no options) + UDP headers.
pub const FLOOD_HEADER_LEN: usize = 14 + 20 + 8;

/// What the flood generator sends: frame `n` is `header` from source port
/// `first_port + n % ports` and source address `header`'s plus
/// `(n / ports) % addresses` (added to the address's low 16 bits: keep a
/// plan within one /16).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloodPlan {
    /// Ethernet, IPv4 (checksum filled in) and UDP headers.
    pub header: [u8; FLOOD_HEADER_LEN],
    pub first_port: u16,
    pub ports: u32,
    pub addresses: u32,
}

#[cfg(test)]
mod tests {
    #[test]
    fn plan_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<super::FloodPlan>(), 52);
    }
}
