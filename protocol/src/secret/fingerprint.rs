//! The fingerprint of a secret chat: 256 bits derived from the Noise
//! handshake hash, which commits to both devices' keys. Anyone who swaps a
//! key gets a different handshake hash on each side, hence different
//! fingerprints, pictures and emoji lines.

use std::fmt::Write as _;

/// 64 emoji, chosen to be distinct at a glance and easy to name aloud.
/// Each stands for 6 bits. The order is part of the format: never reorder.
pub const EMOJI: [&str; 64] = [
    "🐶", "🐱", "🐭", "🐰", "🦊", "🐻", "🐼", "🐨", "🐯", "🦁", "🐮", "🐷", "🐸", "🐵", "🐔", "🐧",
    "🐦", "🦆", "🦉", "🐴", "🦄", "🐝", "🐛", "🦋", "🐌", "🐞", "🐢", "🐍", "🐙", "🦀", "🐬", "🐳",
    "🍎", "🍐", "🍊", "🍋", "🍌", "🍉", "🍇", "🍓", "🍒", "🍑", "🍍", "🥥", "🥕", "🌽", "🍄", "🌵",
    "🌲", "🌻", "🌙", "⭐", "🔥", "🌈", "⛄", "🎈", "🎁", "🔑", "🔔", "⚓", "🚲", "🚀", "⛵", "🎸",
];

/// Emoji in the full line: 22 × 6 = 132 bits.
pub const EMOJI_LINE_LEN: usize = 22;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    const CONTEXT: &'static str = "tern secret-chat fingerprint v1";

    /// Derives the fingerprint from a Noise handshake hash.
    pub fn from_handshake_hash(handshake_hash: &[u8]) -> Self {
        Self(blake3::derive_key(Self::CONTEXT, handshake_hash))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 hex digits in groups of four.
    pub fn hex(&self) -> String {
        let mut out = String::with_capacity(80);
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 && i % 2 == 0 {
                out.push(' ');
            }
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// The emoji line: the first 132 bits, 6 per emoji.
    pub fn emoji_line(&self) -> String {
        let mut out = String::new();
        for i in 0..EMOJI_LINE_LEN {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(EMOJI[sextet(&self.0, i)]);
        }
        out
    }

    /// The 2-bit colour index of every cell of the 12 × 12 key picture:
    /// the 256 fingerprint bits, then 32 bits of BLAKE3 of the fingerprint to
    /// fill the square (288 bits in all).
    pub fn cells(&self) -> [u8; 144] {
        let mut bits = [0u8; 36];
        bits[..32].copy_from_slice(&self.0);
        bits[32..].copy_from_slice(&blake3::hash(&self.0).as_bytes()[..4]);
        let mut cells = [0u8; 144];
        for (i, c) in cells.iter_mut().enumerate() {
            *c = (bits[i / 4] >> (6 - 2 * (i % 4))) & 0b11;
        }
        cells
    }
}

/// The `index`-th group of 6 bits of `bytes`, most significant first.
pub(crate) fn sextet(bytes: &[u8], index: usize) -> usize {
    let bit = index * 6;
    let hi = u16::from(bytes[bit / 8]) << 8;
    let lo = bytes.get(bit / 8 + 1).copied().map_or(0, u16::from);
    usize::from(((hi | lo) >> (10 - bit % 8)) & 0x3f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_emoji_alphabet_has_64_distinct_entries() {
        let mut seen = std::collections::HashSet::new();
        assert!(EMOJI.iter().all(|e| seen.insert(*e)));
    }

    #[test]
    fn sextets_cover_the_bits_in_order() {
        // 0b000001_000010_000011_000100 = 0x04 0x20 0xC4
        let bytes = [0x04, 0x20, 0xC4];
        assert_eq!(
            (0..4).map(|i| sextet(&bytes, i)).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn same_handshake_same_everything_different_handshake_different_everything() {
        let a = Fingerprint::from_handshake_hash(b"handshake one");
        let b = Fingerprint::from_handshake_hash(b"handshake one");
        let c = Fingerprint::from_handshake_hash(b"handshake two");
        assert_eq!(
            (a.hex(), a.emoji_line(), a.cells()),
            (b.hex(), b.emoji_line(), b.cells())
        );
        assert_ne!(a.hex(), c.hex());
        assert_ne!(a.emoji_line(), c.emoji_line());
        assert_ne!(a.cells(), c.cells());
        assert_eq!(a.hex().replace(' ', "").len(), 64);
        assert_eq!(a.emoji_line().split(' ').count(), EMOJI_LINE_LEN);
    }

    #[test]
    fn every_single_bit_of_the_first_128_changes_both_line_and_picture() {
        let base = Fingerprint::from_bytes([0x5a; 32]);
        for bit in 0..128 {
            let mut b = *base.as_bytes();
            b[bit / 8] ^= 0x80 >> (bit % 8);
            let f = Fingerprint::from_bytes(b);
            assert_ne!(f.emoji_line(), base.emoji_line(), "bit {bit}");
            assert_ne!(f.cells(), base.cells(), "bit {bit}");
        }
    }
}
