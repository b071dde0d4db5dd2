//! How a secret chat sits on disk: one erasable space per chat, with one
//! value for the chat's header, one per message, one per frame waiting to be
//! sent, and one for the session keys. Everything here is erased for real
//! when it goes (see [`crate::erasable`]), and nothing of a secret chat is
//! ever written to the main store.
//!
//! Write order matters for crashes. A received message is written before
//! the session that advanced past it, so a crash in between makes the peer
//! resend a frame the chat then shows once (messages are keyed by id). A
//! sealed frame is written before the session that sealed it; on load,
//! frames the saved session has not reached yet were never sent and are
//! dropped.

use serde::{Deserialize, Serialize};
use tern_protocol::{
    AccountId, DecodeError, DevicePublicKey, Record,
    secret::{
        ChatState, MessageId, SasResponder, SecretFrame, SecretMessage, SessionSnapshot,
        chat::MAX_TEXT,
    },
};
use zeroize::Zeroize;

use super::wire::SecretId;
use crate::{
    erasable::{ErasableError, ErasableStore, Op},
    hex::hex,
};

/// What still has to reach the peer before the chat can move on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    Offer,
    Accept,
    /// Decline (by the asked side) or withdraw (by the asking side).
    Decline,
}

/// A chat's header: who, what state, and the handshake material that must
/// survive a restart until the handshake is done.
#[derive(Clone, Serialize, Deserialize)]
pub struct ChatRecord {
    pub secret_id: SecretId,
    pub initiator: bool,
    pub peer_device: DevicePublicKey,
    /// The peer's account: from the ticket or the contact asked for, else
    /// from its introduction; checked against the handshake's proof.
    pub peer_account: Option<AccountId>,
    pub peer_name: String,
    /// Addresses from a ticket, to reach a peer not met before.
    pub peer_addrs: Vec<Vec<u8>>,
    pub created_ms: u64,
    pub state: ChatState,
    pub timer_ms: Option<u64>,
    pub pending: Option<Pending>,
    /// Seeds this side's handshake until it completes: the handshake is
    /// rebuilt from it after a restart.
    pub handshake_seed: Option<[u8; 32]>,
    /// The initiator's first handshake message, kept by the responder until
    /// it accepts or declines.
    pub peer_handshake: Option<Vec<u8>>,
    /// Our last handshake message, resent if the peer asks again.
    pub our_handshake: Option<Vec<u8>>,
    /// The initiator's short-code nonce, until it is revealed.
    pub sas_nonce: Option<[u8; 32]>,
    pub sas_responder: Option<SasResponder>,
    pub short_code: Option<[u8; 32]>,
    /// Set when the short-code exchange was tampered with.
    pub sas_failed: bool,
    pub fingerprint: Option<[u8; 32]>,
    pub rekeys: u32,
}

impl Drop for ChatRecord {
    fn drop(&mut self) {
        self.handshake_seed.zeroize();
        self.sas_nonce.zeroize();
    }
}

impl Record for ChatRecord {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 8 * 1024;
}

/// A message and its place in the chat's order.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredMessage {
    pub seq: u64,
    pub message: SecretMessage,
}

impl Record for StoredMessage {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = MAX_TEXT + 128;

    fn validate(&self) -> Result<(), DecodeError> {
        if self.message.text.len() > MAX_TEXT {
            return Err(DecodeError::Invalid("message text too long".into()));
        }
        Ok(())
    }
}

/// Everything loaded for one chat.
pub struct LoadedChat {
    pub record: ChatRecord,
    pub messages: Vec<StoredMessage>,
    pub outbox: Vec<SecretFrame>,
    pub session: Option<SessionSnapshot>,
}

/// Shortens every long hex run (chat and message ids in paths) to its
/// first 4 digits, so errors that reach the logs keep no record of ids.
pub fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 16 {
            out.push_str(&run[..4]);
            out.push('…');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for ch in s.chars() {
        if ch.is_ascii_hexdigit() {
            run.push(ch);
        } else {
            flush(&mut run, &mut out);
            out.push(ch);
        }
    }
    flush(&mut run, &mut out);
    out
}

pub fn space(id: &SecretId) -> String {
    format!("secret-{}", hex(id))
}

fn message_key(id: &MessageId) -> String {
    format!("m-{}", hex(&id.0))
}

fn frame_key(n: u64) -> String {
    format!("o-{n:016x}")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}", redact(&.0.to_string()))]
    Erasable(#[from] ErasableError),
    #[error(
        "damaged secret-chat data in {}/{}: {error}",
        redact(space),
        redact(key)
    )]
    Damaged {
        space: String,
        key: String,
        error: DecodeError,
    },
}

/// The secret chats' side of the erasable store. Writes are collected and
/// made durable together by [`ChatStore::commit`] (group commit): the
/// service commits once per batch of work, before it answers anyone or
/// sends anything that depends on them.
pub struct ChatStore {
    store: ErasableStore,
    pending: std::cell::RefCell<Vec<Op>>,
}

impl ChatStore {
    pub fn new(store: ErasableStore) -> Self {
        Self {
            store,
            pending: std::cell::RefCell::new(Vec::new()),
        }
    }

    fn put(&self, space: String, key: String, value: Vec<u8>) {
        self.pending
            .borrow_mut()
            .push(Op::Put { space, key, value });
    }

    fn delete(&self, space: String, key: String) {
        self.pending.borrow_mut().push(Op::Delete { space, key });
    }

    /// Whether writes wait for [`Self::commit`].
    pub fn has_pending(&self) -> bool {
        !self.pending.borrow().is_empty()
    }

    /// Makes every write since the last commit durable.
    pub fn commit(&self) -> Result<(), StoreError> {
        let mut ops = self.pending.take();
        let result = self.store.apply(std::mem::take(&mut ops));
        Ok(result?)
    }

    pub fn put_record(&self, r: &ChatRecord) -> Result<(), StoreError> {
        self.put(space(&r.secret_id), "chat".into(), r.encode());
        Ok(())
    }

    pub fn put_message(&self, id: &SecretId, m: &StoredMessage) -> Result<(), StoreError> {
        self.put(space(id), message_key(&m.message.id), m.encode());
        Ok(())
    }

    pub fn delete_message(&self, id: &SecretId, m: &MessageId) -> Result<(), StoreError> {
        self.delete(space(id), message_key(m));
        Ok(())
    }

    pub fn put_frame(&self, id: &SecretId, f: &SecretFrame) -> Result<(), StoreError> {
        self.put(space(id), frame_key(f.n), f.encode());
        Ok(())
    }

    pub fn delete_frame(&self, id: &SecretId, n: u64) -> Result<(), StoreError> {
        self.delete(space(id), frame_key(n));
        Ok(())
    }

    /// The snapshot's bytes stay in memory until the commit, then are
    /// dropped; the previous snapshot on disk is overwritten.
    pub fn put_session(&self, id: &SecretId, s: &SessionSnapshot) -> Result<(), StoreError> {
        self.put(space(id), "session".into(), s.encode());
        Ok(())
    }

    pub fn delete_session(&self, id: &SecretId) -> Result<(), StoreError> {
        self.delete(space(id), "session".into());
        Ok(())
    }

    /// Wipes the whole chat.
    pub fn delete_chat(&self, id: &SecretId) -> Result<(), StoreError> {
        self.pending
            .borrow_mut()
            .push(Op::DeleteSpace { space: space(id) });
        Ok(())
    }

    /// Every chat on disk. A chat whose header is damaged is reported and
    /// skipped (left on disk for inspection); damaged messages or frames are
    /// skipped with a warning.
    pub fn load_all(&self) -> Result<Vec<LoadedChat>, StoreError> {
        let mut chats = Vec::new();
        for sp in self.store.spaces("secret-")? {
            match self.load(&sp) {
                Ok(Some(c)) => chats.push(c),
                Ok(None) => {}
                Err(e) => tracing::error!("skipping a secret chat: {e}"),
            }
        }
        Ok(chats)
    }

    fn decode<R: Record>(&self, sp: &str, key: &str) -> Result<Option<R>, StoreError> {
        let Some(bytes) = self.store.get(sp, key)? else {
            return Ok(None);
        };
        R::decode(&bytes)
            .map(Some)
            .map_err(|error| StoreError::Damaged {
                space: sp.into(),
                key: key.into(),
                error,
            })
    }

    fn load(&self, sp: &str) -> Result<Option<LoadedChat>, StoreError> {
        let Some(record) = self.decode::<ChatRecord>(sp, "chat")? else {
            return Ok(None); // a crash before the first write
        };
        if space(&record.secret_id) != sp {
            return Err(StoreError::Damaged {
                space: sp.into(),
                key: "chat".into(),
                error: DecodeError::Invalid("the header belongs to another chat".into()),
            });
        }
        let session = self.decode::<SessionSnapshot>(sp, "session")?;
        let mut messages = Vec::new();
        let mut outbox = Vec::new();
        for key in self.store.keys(sp)? {
            let loaded = if key.starts_with("m-") {
                self.decode::<StoredMessage>(sp, &key)
                    .map(|m| messages.extend(m))
            } else if key.starts_with("o-") {
                self.decode::<SecretFrame>(sp, &key)
                    .map(|f| outbox.extend(f))
            } else {
                Ok(())
            };
            if let Err(e) = loaded {
                tracing::warn!("{e}");
            }
        }
        messages.sort_by_key(|m| m.seq);
        outbox.sort_by_key(|f| f.n);
        Ok(Some(LoadedChat {
            record,
            messages,
            outbox,
            session,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_chats_and_messages_by_four_digits() {
        let e = "/d/erasable/secret-053913a547436e509380754d95a1c3f9/m-c4baa778cb9c53d4ace5a815caf16230: No space left (os error 28)";
        assert_eq!(
            redact(e),
            "/d/erasable/secret-0539…/m-c4ba…: No space left (os error 28)"
        );
        assert_eq!(redact("o-000000000000002a"), "o-0000…");
        assert_eq!(redact("chat"), "chat");
    }
}
