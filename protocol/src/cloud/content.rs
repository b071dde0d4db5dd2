//! What members write, as it is inside an entry's encrypted body. Storage
//! peers never see this: it exists only after decryption on a member device.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::entry::{EntryHash, MAX_PARENTS};
use crate::codec::{DecodeError, Record};

/// Longest message text or title, in bytes.
pub const MAX_TEXT: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// The chat's title (in the genesis body, or a later rename).
    Title { text: String },
    Text {
        text: String,
        reply_to: Option<EntryHash>,
    },
    /// Replaces the text of an earlier message by the same account.
    Edit { target: EntryHash, text: String },
    /// The reader has shown everything up to (and including) these entries.
    Read { up_to: Vec<EntryHash> },
}

/// First byte of a padded body plaintext. (A bare content record, as bodies
/// written before padding hold, starts with its version, 1.)
const PADDED: u8 = 0x50;
/// The marker and the record's length (u32 LE) in front of the record.
const PAD_HEADER: usize = 5;
/// Every padded plaintext is at least this long: short messages ("ok",
/// "see you at 8") all look alike to a storage peer.
const MIN_PADDED: usize = 256;

/// The length a plaintext of `len` bytes is padded to: at least
/// `MIN_PADDED` bytes, and above that Padmé (Nikitin et al., "Reducing Metadata
/// Leakage from Encrypted Files and Communication with PURBs", 2019): the
/// length keeps only its top bits, so a storage peer learns about
/// log log of it, for at most 12% more bytes.
pub const fn padded_len(len: usize) -> usize {
    if len <= MIN_PADDED {
        return MIN_PADDED;
    }
    let e = len.ilog2();
    let s = e.ilog2() + 1;
    let mask = (1usize << (e - s)) - 1;
    (len + mask) & !mask
}

/// Longest padded plaintext of an entry body.
pub const MAX_PADDED_LEN: usize = padded_len(PAD_HEADER + <Content as Record>::MAX_LEN);

impl Content {
    /// An entry body's plaintext: a marker, the record's length, the
    /// record, and zeros up to [`padded_len`], so the ciphertext's length
    /// says little about the message's.
    pub fn to_padded(&self) -> Zeroizing<Vec<u8>> {
        let record = Zeroizing::new(self.encode());
        let mut out = Zeroizing::new(Vec::with_capacity(padded_len(PAD_HEADER + record.len())));
        out.push(PADDED);
        // The record is bounded by MAX_LEN, far below u32::MAX.
        out.extend_from_slice(&(record.len() as u32).to_le_bytes());
        out.extend_from_slice(&record);
        out.resize(padded_len(PAD_HEADER + record.len()), 0);
        out
    }

    /// The content of a body's plaintext, padded ([`Self::to_padded`]) or
    /// bare (bodies written before padding). A padded one must be padded
    /// exactly as [`Self::to_padded`] pads, with zeros.
    pub fn from_plaintext(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.first() != Some(&PADDED) {
            return Self::decode(bytes);
        }
        if bytes.len() > MAX_PADDED_LEN {
            return Err(DecodeError::TooLong {
                len: bytes.len(),
                max: MAX_PADDED_LEN,
            });
        }
        let Some(len) = bytes.get(1..PAD_HEADER) else {
            return Err(DecodeError::Malformed("padded body cut short".into()));
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let record_end = PAD_HEADER.saturating_add(len);
        if record_end > bytes.len() || padded_len(record_end) != bytes.len() {
            return Err(DecodeError::Invalid("padding of the wrong length".into()));
        }
        if bytes[record_end..].iter().any(|b| *b != 0) {
            return Err(DecodeError::Invalid("padding that is not zeros".into()));
        }
        Self::decode(&bytes[PAD_HEADER..record_end])
    }
}

impl Record for Content {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 1 + MAX_TEXT + MAX_PARENTS * 32 + 64;

    fn validate(&self) -> Result<(), DecodeError> {
        let bad = |why: &str| Err(DecodeError::Invalid(why.into()));
        match self {
            Self::Title { text } | Self::Text { text, .. } | Self::Edit { text, .. }
                if text.len() > MAX_TEXT =>
            {
                bad("text too long")
            }
            Self::Read { up_to } if up_to.is_empty() || up_to.len() > MAX_PARENTS => {
                bad("a read receipt names 1 to 16 entries")
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_round_trips_and_is_bounded() {
        let c = Content::Text {
            text: "hi".into(),
            reply_to: Some(EntryHash([1; 32])),
        };
        assert_eq!(Content::decode(&c.encode()).unwrap(), c);

        let long = Content::Text {
            text: "x".repeat(MAX_TEXT + 1),
            reply_to: None,
        };
        assert!(Content::decode(&long.encode()).is_err());
        let empty = Content::Read { up_to: vec![] };
        assert!(Content::decode(&empty.encode()).is_err());
    }

    #[test]
    fn padding_hides_lengths_within_a_bucket_and_decodes_strictly() {
        let text = |n: usize| Content::Text {
            text: "x".repeat(n),
            reply_to: None,
        };
        // Short messages all have one length; long ones few.
        let lens: Vec<usize> = [0, 2, 40, 200]
            .iter()
            .map(|&n| text(n).to_padded().len())
            .collect();
        assert!(lens.iter().all(|&l| l == MIN_PADDED), "{lens:?}");
        let long: std::collections::BTreeSet<usize> =
            (9000..10000).map(|n| text(n).to_padded().len()).collect();
        assert!(long.len() <= 3, "{long:?}");
        for n in [0, 1, 250, 251, 1000, 4097, MAX_TEXT] {
            let c = text(n);
            let padded = c.to_padded();
            assert!(padded.len() <= MAX_PADDED_LEN);
            assert!(
                padded.len() * 100 <= (c.encoded_len() + PAD_HEADER) * 112
                    || padded.len() == MIN_PADDED
            );
            assert_eq!(Content::from_plaintext(&padded).unwrap(), c);
        }
        // A bare record (a body written before padding) still reads.
        assert_eq!(Content::from_plaintext(&text(3).encode()).unwrap(), text(3));

        // Non-zero padding, a lying length, a cut or grown plaintext.
        let good = text(10).to_padded();
        let mut bad = good.to_vec();
        *bad.last_mut().unwrap() = 1;
        assert!(Content::from_plaintext(&bad).is_err());
        let mut bad = good.to_vec();
        bad[1..5].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(Content::from_plaintext(&bad).is_err());
        assert!(Content::from_plaintext(&good[..good.len() - 1]).is_err());
        let mut grown = good.to_vec();
        grown.push(0);
        assert!(Content::from_plaintext(&grown).is_err());
        assert!(Content::from_plaintext(&[PADDED, 1]).is_err());
        assert!(Content::from_plaintext(&vec![PADDED; MAX_PADDED_LEN + 1]).is_err());
    }

    #[test]
    fn hostile_length_prefix_is_rejected_without_allocating() {
        // Version, variant Text, then a string claiming ~4 GiB.
        let bytes = [1u8, 1, 0xff, 0xff, 0xff, 0xff, 0x0f, b'a'];
        assert!(matches!(
            Content::decode(&bytes),
            Err(DecodeError::Malformed(_))
        ));
        let huge = vec![1u8; Content::MAX_LEN + 1];
        assert!(matches!(
            Content::decode(&huge),
            Err(DecodeError::TooLong { .. })
        ));
    }
}
