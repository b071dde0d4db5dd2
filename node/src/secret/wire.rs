//! The `/tern/secret/1` protocol: what two devices send each other to set
//! up a secret chat and carry its frames.
//!
//! Every exchange is one request and one response over libp2p's
//! request-response, on a connection whose transport already proves which
//! device is at the other end; the frames inside carry the secret chat's
//! own end-to-end encryption. A sender keeps one request in flight per chat,
//! so frames arrive in the order they were sealed.

use serde::{Deserialize, Serialize};
use tern_protocol::{DecodeError, Record, secret::SecretFrame};

/// A secret chat's id: 16 random bytes chosen by the device that starts it.
pub type SecretId = [u8; 16];

/// Most frames in one request.
pub const MAX_FRAMES: usize = 256;
/// Largest request: what one request may make the receiver allocate. A
/// sender packs frames up to this (at least one fits: a frame is at most
/// `MAX_PAYLOAD` plus a little).
pub const MAX_REQUEST: usize = 1 << 20;
/// Longest Noise handshake message accepted.
pub const MAX_HANDSHAKE: usize = 1024;
/// Longest refusal reason.
pub const MAX_REASON: usize = 200;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretRequest {
    /// "Let's start a secret chat": the first Noise handshake message.
    Offer {
        secret_id: SecretId,
        handshake: Vec<u8>,
    },
    /// The offer was accepted: the second handshake message. Answered by
    /// [`SecretResponse::Finish`].
    Accept {
        secret_id: SecretId,
        handshake: Vec<u8>,
    },
    /// The offer was declined.
    Decline { secret_id: SecretId },
    /// Frames of an established chat, in order. Answered by
    /// [`SecretResponse::Ack`].
    Frames {
        secret_id: SecretId,
        frames: Vec<SecretFrame>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretResponse {
    Ok,
    /// The third handshake message: the chat is active on both sides.
    Finish {
        handshake: Vec<u8>,
    },
    /// Every frame numbered below `next` has been received and kept; the
    /// sender forgets them and resends from `next`.
    Ack {
        next: u64,
    },
    /// This device has no such chat with the asking device (never had, or
    /// logged out): the asker closes it.
    Unknown,
    /// Refused for a reason the asker should show or retry on.
    Refused {
        reason: String,
    },
}

impl Record for SecretRequest {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = MAX_REQUEST;

    fn validate(&self) -> Result<(), DecodeError> {
        let bad = |why: &str| Err(DecodeError::Invalid(why.into()));
        match self {
            Self::Offer { handshake, .. } | Self::Accept { handshake, .. }
                if handshake.len() > MAX_HANDSHAKE =>
            {
                bad("handshake message too long")
            }
            Self::Frames { frames, .. } if frames.is_empty() || frames.len() > MAX_FRAMES => {
                bad("a frames request carries 1 to 256 frames")
            }
            Self::Frames { frames, .. }
                if frames.windows(2).any(|w| w[1].n != w[0].n.wrapping_add(1)) =>
            {
                bad("frames must be consecutive")
            }
            _ => Ok(()),
        }
    }
}

impl Record for SecretResponse {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = MAX_HANDSHAKE + MAX_REASON + 64;

    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Self::Finish { handshake } if handshake.len() > MAX_HANDSHAKE => {
                Err(DecodeError::Invalid("handshake message too long".into()))
            }
            Self::Refused { reason } if reason.len() > MAX_REASON => {
                Err(DecodeError::Invalid("refusal reason too long".into()))
            }
            _ => Ok(()),
        }
    }
}

impl SecretResponse {
    pub fn refused(reason: &str) -> Self {
        let mut reason = reason.to_owned();
        if reason.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Self::Refused { reason }
    }
}

/// The frames from the front of `outbox` that fit in one request.
pub fn pack<'a>(outbox: impl IntoIterator<Item = &'a SecretFrame>) -> Vec<SecretFrame> {
    let mut size = 64;
    let mut out = Vec::new();
    for f in outbox {
        // Encoded size of a frame: its ciphertext plus varint headers.
        let cost = f.ciphertext.len() + 32;
        if out.len() == MAX_FRAMES || (!out.is_empty() && size + cost > MAX_REQUEST) {
            break;
        }
        size += cost;
        out.push(f.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::secret::session::MAX_PAYLOAD;

    fn frame(n: u64) -> SecretFrame {
        SecretFrame {
            epoch: 0,
            n,
            ciphertext: vec![7; 40],
        }
    }

    #[test]
    fn requests_round_trip_and_bounds_hold() {
        let r = SecretRequest::Frames {
            secret_id: [1; 16],
            frames: (5..9).map(frame).collect(),
        };
        assert_eq!(SecretRequest::decode(&r.encode()).unwrap(), r);
        let gap = SecretRequest::Frames {
            secret_id: [1; 16],
            frames: vec![frame(1), frame(3)],
        };
        assert!(SecretRequest::decode(&gap.encode()).is_err());
        let empty = SecretRequest::Frames {
            secret_id: [1; 16],
            frames: vec![],
        };
        assert!(SecretRequest::decode(&empty.encode()).is_err());
        let huge = SecretRequest::Offer {
            secret_id: [1; 16],
            handshake: vec![0; MAX_HANDSHAKE + 1],
        };
        assert!(SecretRequest::decode(&huge.encode()).is_err());
        assert!(SecretRequest::decode(&vec![1; SecretRequest::MAX_LEN + 1]).is_err());
        // Packing never exceeds what a receiver accepts.
        let big: Vec<SecretFrame> = (0..100)
            .map(|n| SecretFrame {
                epoch: 0,
                n,
                ciphertext: vec![1; MAX_PAYLOAD + 17],
            })
            .collect();
        let packed = pack(&big);
        assert!(!packed.is_empty() && packed.len() < big.len());
        let r = SecretRequest::Frames {
            secret_id: [1; 16],
            frames: packed,
        };
        assert!(SecretRequest::decode(&r.encode()).is_ok());
        let small: Vec<SecretFrame> = (0..1000).map(frame).collect();
        assert_eq!(pack(&small).len(), MAX_FRAMES);
        let long = SecretResponse::refused(&"é".repeat(400));
        assert!(SecretResponse::decode(&long.encode()).is_ok());
    }
}
