//! The flow hashes, shared by the eBPF data plane and `vipr-balancer` (the
//! userspace reference `vipr trace` runs), so both compute bit-identical
//! values from one implementation.
//!
//! [`jhash_words`] is Linux's `jhash2` (Bob Jenkins' lookup3 over 32-bit
//! words): no byte loads, no 64-bit multiplies, and, inlined with a
//! constant word count, a straight line of ALU operations the verifier
//! accepts. The words fed to it are documented in `vipr_balancer::flow`.

/// Initval of the 5-tuple hash (`maglev`). Fixed so every node hashes a flow
/// the same way, which is what lets any node pick the same Maglev backend.
pub const FLOW_HASH_INITVAL: u32 = 0x7669_7072; // "vipr"
/// Initval of the source-address hash (`sh`).
pub const SOURCE_HASH_INITVAL: u32 = 0x0000_5348; // "SH"
/// Initval of the destination-address hash (`dh`).
pub const DESTINATION_HASH_INITVAL: u32 = 0x0000_4448; // "DH"

/// Linux's `JHASH_INITVAL`.
const JHASH_GOLDEN: u32 = 0xdead_beef;

#[inline(always)]
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

#[inline(always)]
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
#[inline(always)]
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

/// `jhash_words(&[a], initval)` as straight-line code: the data plane's
/// `sh` and `dh` hash (the slice form compiles to a loop on the BPF target).
#[inline(always)]
pub fn jhash_1word(w: u32, initval: u32) -> u32 {
    let mut a = JHASH_GOLDEN.wrapping_add(1 << 2).wrapping_add(initval);
    let (mut b, mut c) = (a, a);
    a = a.wrapping_add(w);
    jhash_final(&mut a, &mut b, &mut c);
    c
}

/// `jhash_words(&words, initval)` for four words as straight-line code.
#[inline(always)]
pub fn jhash_4words(words: [u32; 4], initval: u32) -> u32 {
    let mut a = JHASH_GOLDEN.wrapping_add(4 << 2).wrapping_add(initval);
    let (mut b, mut c) = (a, a);
    a = a.wrapping_add(words[0]);
    b = b.wrapping_add(words[1]);
    c = c.wrapping_add(words[2]);
    jhash_mix(&mut a, &mut b, &mut c);
    a = a.wrapping_add(words[3]);
    jhash_final(&mut a, &mut b, &mut c);
    c
}

/// The `maglev` hash of an IPv4 flow: `jhash_words(&[src, dst, (src_port
/// << 16) | dst_port, protocol], FLOW_HASH_INITVAL)`, everything in host
/// order. `dst` is the frontend the client asked for (before translation).
#[inline(always)]
pub fn flow_hash_v4(src: u32, dst: u32, src_port: u16, dst_port: u16, protocol: u8) -> u32 {
    let ports = ((src_port as u32) << 16) | dst_port as u32;
    jhash_4words([src, dst, ports, protocol as u32], FLOW_HASH_INITVAL)
}

/// The `sh` hash of an IPv4 client address (host order).
#[inline(always)]
pub fn source_hash_v4(src: u32) -> u32 {
    jhash_1word(src, SOURCE_HASH_INITVAL)
}

/// The `dh` hash of an IPv4 frontend address (host order).
#[inline(always)]
pub fn destination_hash_v4(dst: u32) -> u32 {
    jhash_1word(dst, DESTINATION_HASH_INITVAL)
}

/// Maps a 32-bit hash or draw onto `0..total` by multiply-shift
/// (`hash * total >> 32`) rather than `hash % total`: the high bits of a
/// one-word jhash are well mixed, its low bits measurably less so over
/// sequential addresses, and no division is needed. Exact for any u32 total.
#[inline(always)]
pub const fn scale(value: u32, total: u32) -> u32 {
    ((value as u64 * total as u64) >> 32) as u32
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
    fn straight_line_forms_equal_the_slice_form() {
        for seed in [0u32, 1, 0x7669_7072, u32::MAX] {
            for w in [0u32, 1, 0x0a00_0001, u32::MAX] {
                assert_eq!(jhash_1word(w, seed), jhash_words(&[w], seed));
                let four = [w, w ^ 0x1234_5678, w.rotate_left(7), 6];
                assert_eq!(jhash_4words(four, seed), jhash_words(&four, seed));
            }
        }
    }

    #[test]
    fn flow_hashes_are_the_documented_words() {
        let (src, dst) = (0x0a00_0001, 0x0a60_000a);
        assert_eq!(
            flow_hash_v4(src, dst, 1234, 80, 6),
            jhash_words(&[src, dst, (1234 << 16) | 80, 6], FLOW_HASH_INITVAL)
        );
        assert_eq!(
            source_hash_v4(src),
            jhash_words(&[src], SOURCE_HASH_INITVAL)
        );
        assert_eq!(
            destination_hash_v4(dst),
            jhash_words(&[dst], DESTINATION_HASH_INITVAL)
        );
    }

    #[test]
    fn scale_stays_below_total() {
        assert_eq!(scale(0, 7), 0);
        assert_eq!(scale(u32::MAX, 7), 6);
        assert_eq!(scale(u32::MAX, u32::MAX), u32::MAX - 1);
    }
}
