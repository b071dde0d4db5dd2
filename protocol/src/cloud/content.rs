//! What members write, as it is inside an entry's encrypted body. Storage
//! peers never see this: it exists only after decryption on a member device.

use serde::{Deserialize, Serialize};

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
