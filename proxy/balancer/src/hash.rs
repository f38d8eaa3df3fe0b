//! The hash functions of the balancer, written so the eBPF datapath can
//! compute bit-identical values.
//!
//! - [`jhash_words`] is Linux's `jhash2` (Bob Jenkins' lookup3 over 32-bit
//!   words). The datapath hashes flows with it: it needs no byte loads, no
//!   loops over unbounded data and no 64-bit multiplies, which keeps the
//!   verifier happy, and it is what Cilium and the kernel already use. It
//!   lives in `vipr_common::hash`, compiled into both the eBPF programs and
//!   this crate, so the two cannot drift.
//! - [`murmur3_x64_128`] is MurmurHash3 x64/128. Only userspace uses it, to
//!   derive a backend's Maglev permutation; its two independent 64-bit
//!   halves give the paper's two hashes (offset, skip) in one pass.

pub use vipr_common::hash::jhash_words;

#[inline]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

const MURMUR_C1: u64 = 0x87c3_7b91_1142_53d5;
const MURMUR_C2: u64 = 0x4cf5_ad43_2745_937f;

#[inline]
fn murmur_k1(k1: u64) -> u64 {
    k1.wrapping_mul(MURMUR_C1)
        .rotate_left(31)
        .wrapping_mul(MURMUR_C2)
}

#[inline]
fn murmur_k2(k2: u64) -> u64 {
    k2.wrapping_mul(MURMUR_C2)
        .rotate_left(33)
        .wrapping_mul(MURMUR_C1)
}

/// Little-endian u64 from up to 8 bytes, zero padded (Murmur's tail rule).
fn le_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(buf)
}

/// MurmurHash3 x64/128 of `data`, returned as `(h1, h2)`.
///
/// The reference takes a 32-bit seed and starts both lanes from it; this
/// takes 64 bits and does the same, so any seed below 2^32 gives exactly the
/// reference's output.
pub fn murmur3_x64_128(data: &[u8], seed: u64) -> (u64, u64) {
    let (mut h1, mut h2) = (seed, seed);
    let mut blocks = data.chunks_exact(16);
    for block in &mut blocks {
        h1 ^= murmur_k1(le_u64(&block[..8]));
        h1 = h1
            .rotate_left(27)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
        h2 ^= murmur_k2(le_u64(&block[8..]));
        h2 = h2
            .rotate_left(31)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(0x3849_5ab5);
    }
    let tail = blocks.remainder();
    if tail.len() > 8 {
        h2 ^= murmur_k2(le_u64(&tail[8..]));
    }
    if !tail.is_empty() {
        h1 ^= murmur_k1(le_u64(&tail[..tail.len().min(8)]));
    }
    let len = data.len() as u64;
    h1 ^= len;
    h2 ^= len;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    (h1, h2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_reference_vectors() {
        // Published MurmurHash3_x64_128 outputs (seed 0).
        assert_eq!(murmur3_x64_128(b"", 0), (0, 0));
        assert_eq!(
            murmur3_x64_128(b"hello", 0),
            (0xcbd8_a7b3_41bd_9b02, 0x5b1e_906a_48ae_1d19)
        );
        assert_eq!(
            murmur3_x64_128(b"The quick brown fox jumps over the lazy dog", 0),
            (0xe34b_bc7b_bc07_1b6c, 0x7a43_3ca9_c49a_9347)
        );
    }
}
