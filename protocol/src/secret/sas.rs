//! The short code: 5 emoji two people can read to each other in a call.
//!
//! 30 bits are few enough to read aloud and far too few to compare a key
//! directly: a man in the middle could search for key pairs whose codes
//! collide. So the code is not derived from the keys alone. After the
//! handshake, inside the encrypted channel, the initiator first *commits* to
//! a random nonce, the responder then reveals its nonce, and only then does
//! the initiator reveal its own (the commit-then-reveal pattern of SAS
//! protocols such as ZRTP). Whoever sits in the middle must fix its nonce
//! for each side before it learns the nonce that side will contribute, so
//! its two codes match by chance alone: one guess at 2^-30, no search.
//!
//! Sans-IO: nonces are inputs, messages are outputs.

use super::fingerprint::{EMOJI, sextet};

/// Emoji in the short code.
pub const SHORT_CODE_LEN: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SasMessage {
    /// Initiator → responder: BLAKE3 commitment to the initiator's nonce.
    Commit([u8; 32]),
    /// Responder → initiator: the responder's nonce.
    Nonce([u8; 32]),
    /// Initiator → responder: the committed nonce, opened.
    Reveal([u8; 32]),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SasError {
    #[error("the revealed nonce does not match the commitment: the exchange was tampered with")]
    CommitmentMismatch,
    #[error("unexpected {0} message in this state")]
    Unexpected(&'static str),
}

/// The short code both people compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShortCode([u8; 32]);

impl ShortCode {
    fn derive(
        handshake_hash: &[u8; 32],
        initiator_nonce: &[u8; 32],
        responder_nonce: &[u8; 32],
    ) -> Self {
        let mut h = blake3::Hasher::new_derive_key("tern secret-chat short code v1");
        h.update(handshake_hash);
        h.update(initiator_nonce);
        h.update(responder_nonce);
        Self(*h.finalize().as_bytes())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn emoji(&self) -> String {
        (0..SHORT_CODE_LEN)
            .map(|i| EMOJI[sextet(&self.0, i)])
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn commitment(handshake_hash: &[u8; 32], nonce: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("tern secret-chat short code commitment v1");
    h.update(handshake_hash);
    h.update(nonce);
    *h.finalize().as_bytes()
}

/// The side that started the secret chat.
pub struct SasInitiator {
    handshake_hash: [u8; 32],
    nonce: [u8; 32],
}

impl SasInitiator {
    /// `nonce` must be fresh randomness. Returns the commitment to send.
    pub fn start(handshake_hash: [u8; 32], nonce: [u8; 32]) -> (Self, SasMessage) {
        let commit = SasMessage::Commit(commitment(&handshake_hash, &nonce));
        (
            Self {
                handshake_hash,
                nonce,
            },
            commit,
        )
    }

    /// On the responder's nonce: reveal ours, and the code is known.
    pub fn on_message(self, msg: SasMessage) -> Result<(SasMessage, ShortCode), SasError> {
        match msg {
            SasMessage::Nonce(theirs) => Ok((
                SasMessage::Reveal(self.nonce),
                ShortCode::derive(&self.handshake_hash, &self.nonce, &theirs),
            )),
            SasMessage::Commit(_) => Err(SasError::Unexpected("commit")),
            SasMessage::Reveal(_) => Err(SasError::Unexpected("reveal")),
        }
    }
}

/// The side that accepted the secret chat. Kept on disk between the
/// commitment and the reveal, so it serialises.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SasResponder {
    handshake_hash: [u8; 32],
    nonce: [u8; 32],
    commit: Option<[u8; 32]>,
}

impl SasResponder {
    pub fn new(handshake_hash: [u8; 32], nonce: [u8; 32]) -> Self {
        Self {
            handshake_hash,
            nonce,
            commit: None,
        }
    }

    /// First the commitment (answered with our nonce), then the reveal
    /// (answered with the code, if it opens the commitment).
    pub fn on_message(&mut self, msg: SasMessage) -> Result<SasStep, SasError> {
        match (msg, self.commit) {
            (SasMessage::Commit(c), None) => {
                self.commit = Some(c);
                Ok(SasStep::Send(SasMessage::Nonce(self.nonce)))
            }
            (SasMessage::Reveal(theirs), Some(c)) => {
                if commitment(&self.handshake_hash, &theirs) != c {
                    return Err(SasError::CommitmentMismatch);
                }
                Ok(SasStep::Done(ShortCode::derive(
                    &self.handshake_hash,
                    &theirs,
                    &self.nonce,
                )))
            }
            (SasMessage::Commit(_), Some(_)) => Err(SasError::Unexpected("second commit")),
            (SasMessage::Reveal(_), None) => Err(SasError::Unexpected("reveal before commit")),
            (SasMessage::Nonce(_), _) => Err(SasError::Unexpected("nonce")),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum SasStep {
    Send(SasMessage),
    Done(ShortCode),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(hh_i: [u8; 32], hh_r: [u8; 32], ni: [u8; 32], nr: [u8; 32]) -> (ShortCode, ShortCode) {
        let (init, commit) = SasInitiator::start(hh_i, ni);
        let mut resp = SasResponder::new(hh_r, nr);
        let SasStep::Send(nonce) = resp.on_message(commit).unwrap() else {
            panic!()
        };
        let (reveal, code_i) = init.on_message(nonce).unwrap();
        let SasStep::Done(code_r) = resp.on_message(reveal).unwrap() else {
            panic!()
        };
        (code_i, code_r)
    }

    #[test]
    fn honest_sides_get_the_same_five_emoji() {
        let (a, b) = run([1; 32], [1; 32], [2; 32], [3; 32]);
        assert_eq!(a, b);
        assert_eq!(a.emoji().split(' ').count(), SHORT_CODE_LEN);
    }

    #[test]
    fn different_handshakes_give_different_codes() {
        // A man in the middle runs one handshake with each side.
        let (a, _) = run([1; 32], [1; 32], [2; 32], [3; 32]);
        let (_, b) = run([9; 32], [9; 32], [2; 32], [3; 32]);
        assert_ne!(a.emoji(), b.emoji());
    }

    #[test]
    fn a_reveal_that_does_not_open_the_commitment_is_caught() {
        let (_, commit) = SasInitiator::start([1; 32], [2; 32]);
        let mut resp = SasResponder::new([1; 32], [3; 32]);
        resp.on_message(commit).unwrap();
        assert_eq!(
            resp.on_message(SasMessage::Reveal([7; 32])),
            Err(SasError::CommitmentMismatch)
        );
    }

    #[test]
    fn out_of_order_messages_are_refused() {
        let mut resp = SasResponder::new([1; 32], [3; 32]);
        assert!(resp.on_message(SasMessage::Reveal([2; 32])).is_err());
        let (init, _) = SasInitiator::start([1; 32], [2; 32]);
        assert!(init.on_message(SasMessage::Commit([0; 32])).is_err());
    }

    #[test]
    fn the_code_depends_on_every_nonce_and_spreads_over_the_space() {
        // The middleman must send its nonce to the initiator before it learns
        // the initiator's nonce; changing its nonce afterwards changes the
        // code. Over many nonces the code spreads over the whole space.
        let mut codes = std::collections::HashSet::new();
        for m in 0u8..=255 {
            let (a, _) = run([1; 32], [1; 32], [2; 32], [m; 32]);
            codes.insert(a.emoji());
        }
        assert!(
            codes.len() > 250,
            "codes collide far too often: {}",
            codes.len()
        );
    }
}
