//! The hash functions of the balancer, written so the eBPF datapath can
//! compute bit-identical values.
//!
//! - [`jhash_words`] is Linux's `jhash2` (Bob Jenkins' lookup3 over 32-bit
//!   words). The datapath hashes flows with it: it needs no byte loads, no
//!   loops over unbounded data and no 64-bit multiplies, which keeps the
//!   verifier happy, and it is what Cilium and the kernel already use.
//! - [`murmur3_x64_128`] is MurmurHash3 x64/128. Only userspace uses it, to
//!   derive a backend's Maglev permutation; its two independent 64-bit
//!   halves give the paper's two hashes (offset, skip) in one pass.

/// Linux's `JHASH_INITVAL`.
const JHASH_GOLDEN: u32 = 0xdead_beef;

#[inline]
fn jhash_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline]
fn jhash_final(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// Linux `jhash2(words, words.len(), initval)`.
pub fn jhash_words(words: &[u32], initval: u32) -> u32 {
    // The kernel takes the length as u32; flows are at most 10 words.
    let len = words.len() as u32;
    let mut a = JHASH_GOLDEN.wrapping_add(len << 2).wrapping_add(initval);
    let (mut b, mut c) = (a, a);
    let mut rest = words;
    while rest.len() > 3 {
        a = a.wrapping_add(rest[0]);
        b = b.wrapping_add(rest[1]);
        c = c.wrapping_add(rest[2]);
        jhash_mix(&mut a, &mut b, &mut c);
        rest = &rest[3..];
    }
    // The kernel's switch falls through from 3 to 1; the tail is added
    // word by word and then mixed once.
    if rest.is_empty() {
        return c;
    }
    if rest.len() == 3 {
        c = c.wrapping_add(rest[2]);
    }
    if rest.len() >= 2 {
        b = b.wrapping_add(rest[1]);
    }
    a = a.wrapping_add(rest[0]);
    jhash_final(&mut a, &mut b, &mut c);
    c
}

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
    fn jhash_of_nothing_is_the_seeded_golden_ratio() {
        // jhash2 with length 0 returns its initial state untouched.
        assert_eq!(jhash_words(&[], 0), 0xdead_beef);
        assert_eq!(jhash_words(&[], 1), 0xdead_bef0);
    }

    #[test]
    fn jhash_depends_on_every_word_and_the_initval() {
        let base = jhash_words(&[1, 2, 3, 4, 5], 7);
        for i in 0..5 {
            let mut w = [1, 2, 3, 4, 5];
            w[i] ^= 1;
            assert_ne!(jhash_words(&w, 7), base, "word {i}");
        }
        assert_ne!(jhash_words(&[1, 2, 3, 4, 5], 8), base);
    }

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
