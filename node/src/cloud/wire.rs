//! `/tern/store/1`: what members and replicas send a storage peer, and
//! what it answers.

use serde::{Deserialize, Serialize};
use tern_protocol::{
    DecodeError, Record,
    cloud::{ChatId, ChatSummary, Entry, SyncRequest, SyncResponse},
    codec::{encode_nested, nested_len},
};

/// Most entries in one push.
pub const MAX_PUSH: usize = 1024;
/// Largest push, in bytes (and so what one request may make a storage peer
/// allocate).
pub const MAX_PUSH_BYTES: usize = 1 << 20;
/// Longest reason in an answer.
pub const MAX_REASON: usize = 300;
/// Most chat ids in one `Chats` answer.
pub const MAX_CHAT_LIST: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreRequest {
    /// Keep these entries (in order; parents first).
    Push { entries: Vec<Entry> },
    /// Send what I lack of this chat.
    Sync(SyncRequest),
    /// What do you hold of this chat? (Answered with `Summary`.)
    Summary { chat: ChatId },
    /// A storage peer tells a member device that this chat has new entries;
    /// the device pulls them with `Sync`.
    Notify { chat: ChatId },
    /// Which chats do you keep that my account (the one the connection
    /// proved) is a member of? A new device finds its chats this way.
    ChatsOf,
    /// May I send you a long run of pushes on a lane (`crate::net::lane`)?
    /// Answered with `Lane`, or `Refused` where lanes are off.
    OpenLane,
    /// A `Push` of kept entries, built from their records as they are kept
    /// (see [`EncodedPush`]). It is only ever sent, and its bytes are those
    /// of a `Push`: a receiver decodes it as one. (Last, and not numbered
    /// on the wire: the others keep their numbers.)
    #[serde(skip)]
    EncodedPush(EncodedPush),
}

/// The encoding of a `StoreRequest::Push`, written from the entries'
/// encodings as a storage peer keeps them (a kept record less its version
/// byte) instead of from decoded entries: sending what it holds to another
/// replica costs a storage peer no decoding and no copy of each body into
/// an entry and out again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedPush {
    /// [`Self::HEADROOM`] bytes for a transport's length prefix, then the
    /// request's encoding, version byte included.
    buf: Vec<u8>,
}

impl EncodedPush {
    /// Room left in front of the encoding, so a lane writes its length
    /// there instead of copying the push behind one.
    pub const HEADROOM: usize = 4;

    /// The push of these entries (1 to [`MAX_PUSH`]), each given as its
    /// encoding without the version byte, in order.
    pub fn new<E: AsRef<[u8]>>(entries: &[E]) -> Self {
        debug_assert!((1..=MAX_PUSH).contains(&entries.len()));
        let len: usize = entries.iter().map(|e| e.as_ref().len()).sum();
        let mut buf = Vec::with_capacity(Self::HEADROOM + 1 + 1 + 2 + len);
        buf.extend_from_slice(&[0; Self::HEADROOM]);
        buf.push(StoreRequest::VERSION);
        // What serde writes for `Push { entries }`: the variant's number,
        // then the sequence's length, then each entry.
        encode_nested(&0u32, &mut buf);
        encode_nested(&entries.len(), &mut buf);
        for e in entries {
            buf.extend_from_slice(e.as_ref());
        }
        Self { buf }
    }

    /// The request's encoding, version byte included.
    pub fn encoding(&self) -> &[u8] {
        &self.buf[Self::HEADROOM..]
    }

    /// The buffer: [`Self::HEADROOM`] bytes free, then the encoding.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

/// The fate of one pushed entry, in the order pushed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushResult {
    /// On disk here.
    Stored,
    /// Was already on disk here.
    Duplicate,
    /// Waiting for its parents; push them (or sync) first.
    Missing,
    /// The hosting policy says no; the reason says what to do.
    Refused(String),
    /// It does not verify; the reason says why.
    Rejected(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreResponse {
    Pushed {
        results: Vec<PushResult>,
    },
    Synced(SyncResponse),
    /// `None`: this node does not keep that chat.
    Summary(Option<ChatSummary>),
    Noted,
    Chats(Vec<ChatId>),
    /// The whole request was refused.
    Refused {
        reason: String,
    },
    /// Where to open the lane asked for, and its one-time key. (Last:
    /// postcard numbers variants by position, and nodes without lanes must
    /// still read the others.)
    Lane(crate::net::lane::LaneOffer),
}

fn bounded_reason(r: &str) -> String {
    let mut s = r.to_owned();
    if s.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl PushResult {
    pub fn refused(r: &str) -> Self {
        Self::Refused(bounded_reason(r))
    }
    pub fn rejected(r: &str) -> Self {
        Self::Rejected(bounded_reason(r))
    }
}

impl StoreResponse {
    pub fn refused(r: &str) -> Self {
        Self::Refused {
            reason: bounded_reason(r),
        }
    }
}

impl Record for StoreRequest {
    /// 2: pushes carry [`Entry`] 2.
    const VERSION: u8 = 2;
    const MAX_LEN: usize = MAX_PUSH_BYTES + Entry::MAX_LEN;

    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Self::EncodedPush(push) => out.extend_from_slice(push.encoding()),
            request => {
                out.reserve(request.encoded_len());
                out.push(Self::VERSION);
                encode_nested(request, out);
            }
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Self::EncodedPush(push) => push.encoding().len(),
            request => 1 + nested_len(request),
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Self::Push { entries } if entries.is_empty() || entries.len() > MAX_PUSH => Err(
                DecodeError::Invalid(format!("a push carries 1 to {MAX_PUSH} entries")),
            ),
            Self::Push { entries } => {
                // Each entry as if decoded on its own: an entry a receiver
                // of a later sync batch would refuse is refused here.
                for e in entries {
                    Record::validate(e)?;
                    if e.encoded_len() > Entry::MAX_LEN {
                        return Err(DecodeError::Invalid("entry too large".into()));
                    }
                }
                Ok(())
            }
            Self::Sync(r) => r.validate(),
            Self::Summary { .. }
            | Self::Notify { .. }
            | Self::ChatsOf
            | Self::OpenLane
            | Self::EncodedPush(_) => Ok(()),
        }
    }
}

impl Record for StoreResponse {
    /// 2: syncs carry [`Entry`] 2.
    const VERSION: u8 = 2;
    const MAX_LEN: usize = SyncResponse::MAX_LEN + MAX_PUSH * (MAX_REASON + 4);

    fn validate(&self) -> Result<(), DecodeError> {
        let too_long = |r: &String| r.len() > MAX_REASON;
        match self {
            Self::Pushed { results } if results.len() > MAX_PUSH => {
                Err(DecodeError::Invalid("too many results".into()))
            }
            Self::Pushed { results }
                if results.iter().any(|r| {
                    matches!(r, PushResult::Refused(s) | PushResult::Rejected(s) if too_long(s))
                }) =>
            {
                Err(DecodeError::Invalid("reason too long".into()))
            }
            Self::Refused { reason } if too_long(reason) => {
                Err(DecodeError::Invalid("reason too long".into()))
            }
            Self::Synced(r) => r.validate(),
            Self::Summary(Some(s)) => s.validate(),
            Self::Chats(c) if c.len() > MAX_CHAT_LIST => {
                Err(DecodeError::Invalid("too many chats".into()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_hold() {
        assert!(StoreRequest::decode(&vec![1; StoreRequest::MAX_LEN + 1]).is_err());
        let empty = StoreRequest::Push { entries: vec![] };
        assert!(StoreRequest::decode(&empty.encode()).is_err());
        let r = StoreResponse::refused(&"ü".repeat(500));
        assert!(StoreResponse::decode(&r.encode()).is_ok());
        let p = StoreResponse::Pushed {
            results: vec![PushResult::refused(&"x".repeat(1000)), PushResult::Stored],
        };
        assert_eq!(StoreResponse::decode(&p.encode()).unwrap(), p);
    }

    /// A push built from kept records is, byte for byte, the push of those
    /// entries (around the sizes where the count takes a second byte).
    #[test]
    fn an_encoded_push_is_the_push_of_its_entries() {
        let entries = crate::test_util::chat_entries(300);
        for n in [1, 127, 128, 300] {
            let entries = entries[..n].to_vec();
            let pieces: Vec<Vec<u8>> = entries.iter().map(|e| e.encode()[1..].to_vec()).collect();
            let encoded = StoreRequest::EncodedPush(EncodedPush::new(&pieces));
            let push = StoreRequest::Push { entries };
            assert_eq!(encoded.encode(), push.encode(), "{n} entries");
            assert_eq!(encoded.encoded_len(), push.encoded_len());
            assert_eq!(StoreRequest::decode(&encoded.encode()).unwrap(), push);
        }
    }

    /// Variants are numbered by position on the wire: a refusal must read
    /// the same on nodes with and without lanes.
    #[test]
    fn variants_keep_their_numbers() {
        let r = StoreResponse::refused("no");
        assert_eq!(r.encode(), [StoreResponse::VERSION, 5, 2, b'n', b'o']);
        assert_eq!(StoreRequest::OpenLane.encode(), [StoreRequest::VERSION, 5]);
        assert_eq!(StoreRequest::ChatsOf.encode(), [StoreRequest::VERSION, 4]);
    }
}
