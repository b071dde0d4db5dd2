//! A secret chat as both devices see it: its life cycle, its messages and
//! their self-destruct timers. Sans-IO: the node feeds it commands, payloads
//! from the peer (already decrypted by the [`super::SecretSession`]) and the
//! time; it answers with payloads to send and events for the user.
//!
//! Timers follow Telegram's rule: the timer set when a message is sent
//! travels with it; the countdown starts when the recipient reads it, on the
//! recipient's device at once and on the sender's when the read receipt
//! arrives; when it ends, both devices delete the message.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, Record};

/// Longest message text, in bytes.
pub const MAX_TEXT: usize = 4096;
/// Most message ids in one receipt or deletion.
pub const MAX_IDS: usize = 1024;
/// Most messages a chat keeps; the oldest go first beyond this.
pub const MAX_MESSAGES: usize = 100_000;
/// Longest self-destruct timer: one week.
pub const MAX_TIMER_MS: u64 = 7 * 24 * 3600 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChatState {
    /// Requested, waiting for the other device to accept.
    Pending {
        by_me: bool,
    },
    Active,
    /// Declined by the other side ("secret chat cancelled").
    Cancelled,
    Closed,
}

/// What travels inside the session between the two devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretPayload {
    Message {
        id: MessageId,
        text: String,
        /// The chat's timer when this was sent; applies to this message only.
        timer_ms: Option<u64>,
    },
    /// The recipient has shown these messages: their countdowns start.
    Read {
        ids: Vec<MessageId>,
    },
    Delete {
        ids: Vec<MessageId>,
    },
    Clear,
    SetTimer {
        timer_ms: Option<u64>,
    },
    Close,
    /// A step of the short-code exchange (see [`super::sas`]); the node
    /// drives it, the chat ignores it.
    ShortCode(super::sas::SasMessage),
}

impl Record for SecretPayload {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = MAX_TEXT + MAX_IDS * 17 + 64;

    fn validate(&self) -> Result<(), DecodeError> {
        let bad = |why: &str| Err(DecodeError::Invalid(why.into()));
        match self {
            Self::Message { text, timer_ms, .. } => {
                if text.len() > MAX_TEXT {
                    return bad("message text too long");
                }
                if timer_ms.is_some_and(|t| t == 0 || t > MAX_TIMER_MS) {
                    return bad("timer out of range");
                }
            }
            Self::Read { ids } | Self::Delete { ids } if ids.len() > MAX_IDS => {
                return bad("too many ids");
            }
            Self::SetTimer { timer_ms: Some(t) } if *t == 0 || *t > MAX_TIMER_MS => {
                return bad("timer out of range");
            }
            _ => {}
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChatError {
    #[error("the secret chat is {0:?}; that needs an active chat")]
    NotActive(ChatState),
    #[error("only the device that was asked can accept or decline")]
    NotPendingForMe,
    #[error("message text is {0} bytes; at most {MAX_TEXT} are allowed")]
    TextTooLong(usize),
    #[error("timer must be between 1 ms and one week")]
    BadTimer,
    #[error("message {0:?} does not exist")]
    UnknownMessage(MessageId),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMessage {
    pub id: MessageId,
    pub from_me: bool,
    pub text: String,
    pub timer_ms: Option<u64>,
    /// When the recipient read it (local clock), once it has.
    pub read_at_ms: Option<u64>,
    /// When it self-destructs, once its countdown has started.
    pub expires_at_ms: Option<u64>,
}

/// What the user should be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatEvent {
    Message(MessageId),
    Read(Vec<MessageId>),
    Deleted(Vec<MessageId>),
    Expired(Vec<MessageId>),
    Cleared,
    TimerChanged(Option<u64>),
    Closed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretChat {
    pub state: ChatState,
    pub timer_ms: Option<u64>,
    /// In the order both sides agree on: the session delivers in order.
    order: Vec<MessageId>,
    messages: BTreeMap<MessageId, SecretMessage>,
    /// Dropped to stay within [`MAX_MESSAGES`]; the node erases them too.
    #[serde(skip)]
    evicted: Vec<MessageId>,
}

impl SecretChat {
    pub fn requested_by_me() -> Self {
        Self::with_state(ChatState::Pending { by_me: true })
    }

    pub fn requested_by_peer() -> Self {
        Self::with_state(ChatState::Pending { by_me: false })
    }

    fn with_state(state: ChatState) -> Self {
        Self {
            state,
            timer_ms: None,
            order: Vec::new(),
            messages: BTreeMap::new(),
            evicted: Vec::new(),
        }
    }

    /// A chat as it was saved: its state, its timer and its messages in
    /// order (at most [`MAX_MESSAGES`], the newest kept).
    pub fn restore(state: ChatState, timer_ms: Option<u64>, messages: Vec<SecretMessage>) -> Self {
        let mut chat = Self::with_state(state);
        chat.timer_ms = timer_ms;
        for m in messages {
            chat.insert(m);
        }
        chat
    }

    /// Messages dropped since the last call because the chat was full.
    pub fn take_evicted(&mut self) -> Vec<MessageId> {
        std::mem::take(&mut self.evicted)
    }

    pub fn message(&self, id: &MessageId) -> Option<&SecretMessage> {
        self.messages.get(id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The peer accepted our request, or we accepted theirs.
    pub fn activate(&mut self) {
        if matches!(self.state, ChatState::Pending { .. }) {
            self.state = ChatState::Active;
        }
    }

    /// Either side declined: the chat is cancelled on both.
    pub fn cancel(&mut self) {
        if matches!(self.state, ChatState::Pending { .. }) {
            self.state = ChatState::Cancelled;
        }
    }

    fn require_active(&self) -> Result<(), ChatError> {
        match self.state {
            ChatState::Active => Ok(()),
            other => Err(ChatError::NotActive(other)),
        }
    }

    /// Messages in order, with what has expired by `now_ms` left out.
    pub fn history(&self, now_ms: u64) -> impl Iterator<Item = &SecretMessage> {
        self.order
            .iter()
            .filter_map(|id| self.messages.get(id))
            .filter(move |m| m.expires_at_ms.is_none_or(|t| t > now_ms))
    }

    pub fn set_timer(&mut self, timer_ms: Option<u64>) -> Result<SecretPayload, ChatError> {
        self.require_active()?;
        if timer_ms.is_some_and(|t| t == 0 || t > MAX_TIMER_MS) {
            return Err(ChatError::BadTimer);
        }
        self.timer_ms = timer_ms;
        Ok(SecretPayload::SetTimer { timer_ms })
    }

    /// A new message from this device; `id` must be fresh and random.
    pub fn compose(&mut self, id: MessageId, text: &str) -> Result<SecretPayload, ChatError> {
        self.require_active()?;
        if text.len() > MAX_TEXT {
            return Err(ChatError::TextTooLong(text.len()));
        }
        self.insert(SecretMessage {
            id,
            from_me: true,
            text: text.to_owned(),
            timer_ms: self.timer_ms,
            read_at_ms: None,
            expires_at_ms: None,
        });
        Ok(SecretPayload::Message {
            id,
            text: text.to_owned(),
            timer_ms: self.timer_ms,
        })
    }

    /// The user has seen the chat: unread incoming messages become read,
    /// their countdowns start, and receipts go to the peer (one per
    /// [`MAX_IDS`] messages, so none is refused for its size).
    pub fn mark_read(&mut self, now_ms: u64) -> Vec<SecretPayload> {
        let mut ids = Vec::new();
        for m in self
            .messages
            .values_mut()
            .filter(|m| !m.from_me && m.read_at_ms.is_none())
        {
            m.read_at_ms = Some(now_ms);
            m.expires_at_ms = m.timer_ms.map(|t| now_ms.saturating_add(t));
            ids.push(m.id);
        }
        ids.chunks(MAX_IDS)
            .map(|c| SecretPayload::Read { ids: c.to_vec() })
            .collect()
    }

    pub fn delete(&mut self, ids: &[MessageId]) -> Result<SecretPayload, ChatError> {
        if let Some(missing) = ids.iter().find(|id| !self.messages.contains_key(id)) {
            return Err(ChatError::UnknownMessage(*missing));
        }
        self.remove(ids);
        Ok(SecretPayload::Delete { ids: ids.to_vec() })
    }

    pub fn clear(&mut self) -> SecretPayload {
        self.order.clear();
        self.messages.clear();
        SecretPayload::Clear
    }

    pub fn close(&mut self) -> SecretPayload {
        self.state = ChatState::Closed;
        SecretPayload::Close
    }

    /// Applies a payload from the peer.
    pub fn on_payload(&mut self, payload: SecretPayload, now_ms: u64) -> Vec<ChatEvent> {
        match payload {
            SecretPayload::Message { id, text, timer_ms } => {
                if self.state != ChatState::Active || self.messages.contains_key(&id) {
                    return Vec::new(); // closed, or already shown: exactly once
                }
                self.insert(SecretMessage {
                    id,
                    from_me: false,
                    text,
                    timer_ms,
                    read_at_ms: None,
                    expires_at_ms: None,
                });
                vec![ChatEvent::Message(id)]
            }
            SecretPayload::Read { ids } => {
                let mut read = Vec::new();
                for id in ids {
                    if let Some(m) = self
                        .messages
                        .get_mut(&id)
                        .filter(|m| m.from_me && m.read_at_ms.is_none())
                    {
                        m.read_at_ms = Some(now_ms);
                        m.expires_at_ms = m.timer_ms.map(|t| now_ms.saturating_add(t));
                        read.push(id);
                    }
                }
                if read.is_empty() {
                    Vec::new()
                } else {
                    vec![ChatEvent::Read(read)]
                }
            }
            SecretPayload::Delete { ids } => {
                let gone = self.remove(&ids);
                if gone.is_empty() {
                    Vec::new()
                } else {
                    vec![ChatEvent::Deleted(gone)]
                }
            }
            SecretPayload::Clear => {
                self.clear();
                vec![ChatEvent::Cleared]
            }
            SecretPayload::SetTimer { timer_ms } => {
                self.timer_ms = timer_ms;
                vec![ChatEvent::TimerChanged(timer_ms)]
            }
            SecretPayload::Close => {
                self.state = ChatState::Closed;
                vec![ChatEvent::Closed]
            }
            SecretPayload::ShortCode(_) => Vec::new(),
        }
    }

    /// Deletes every message whose countdown has ended by `now_ms`.
    pub fn expire(&mut self, now_ms: u64) -> Option<ChatEvent> {
        let due: Vec<MessageId> = self
            .messages
            .values()
            .filter(|m| m.expires_at_ms.is_some_and(|t| t <= now_ms))
            .map(|m| m.id)
            .collect();
        let gone = self.remove(&due);
        (!gone.is_empty()).then_some(ChatEvent::Expired(gone))
    }

    /// When [`Self::expire`] next has work: the node sets its timer to this.
    pub fn next_expiry(&self) -> Option<u64> {
        self.messages.values().filter_map(|m| m.expires_at_ms).min()
    }

    fn insert(&mut self, m: SecretMessage) {
        if self.order.len() >= MAX_MESSAGES {
            let oldest = self.order.remove(0);
            self.messages.remove(&oldest);
            self.evicted.push(oldest);
        }
        self.order.push(m.id);
        self.messages.insert(m.id, m);
    }

    fn remove(&mut self, ids: &[MessageId]) -> Vec<MessageId> {
        let gone: Vec<MessageId> = ids
            .iter()
            .filter(|id| self.messages.remove(id).is_some())
            .copied()
            .collect();
        if !gone.is_empty() {
            self.order.retain(|id| !gone.contains(id));
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> MessageId {
        MessageId([n; 16])
    }

    /// Two active chats, with a helper that carries a payload across.
    fn pair() -> (SecretChat, SecretChat) {
        let (mut a, mut b) = (
            SecretChat::requested_by_me(),
            SecretChat::requested_by_peer(),
        );
        a.activate();
        b.activate();
        (a, b)
    }

    fn carry(p: SecretPayload, to: &mut SecretChat, now: u64) -> Vec<ChatEvent> {
        // Through the wire format, as the node will.
        to.on_payload(SecretPayload::decode(&p.encode()).unwrap(), now)
    }

    fn texts(c: &SecretChat, now: u64) -> Vec<String> {
        c.history(now).map(|m| m.text.clone()).collect()
    }

    #[test]
    fn nothing_can_be_sent_before_accept_or_after_decline() {
        let mut a = SecretChat::requested_by_me();
        assert!(matches!(
            a.compose(id(1), "early"),
            Err(ChatError::NotActive(_))
        ));
        a.cancel();
        assert_eq!(a.state, ChatState::Cancelled);
        a.activate();
        assert_eq!(
            a.state,
            ChatState::Cancelled,
            "a cancelled chat stays cancelled"
        );
    }

    #[test]
    fn the_countdown_starts_when_read_and_deletes_on_both_sides() {
        let (mut a, mut b) = pair();
        let before = a.compose(id(1), "before the timer").unwrap();
        carry(before, &mut b, 0);
        carry(a.set_timer(Some(2_000)).unwrap(), &mut b, 0);
        let secret = a.compose(id(2), "self-destructs").unwrap();
        assert_eq!(carry(secret, &mut b, 10), vec![ChatEvent::Message(id(2))]);

        // Unread, nothing expires however long it waits.
        assert_eq!(b.expire(1_000_000), None);
        assert_eq!(b.next_expiry(), None);

        // B reads at t=5000; A learns of it at t=5100.
        let receipts = b.mark_read(5_000);
        assert_eq!(receipts.len(), 1);
        for receipt in receipts {
            carry(receipt, &mut a, 5_100);
        }
        assert_eq!(b.next_expiry(), Some(7_000));
        assert_eq!(a.next_expiry(), Some(7_100));
        assert_eq!(texts(&b, 6_999), ["before the timer", "self-destructs"]);
        assert_eq!(b.expire(7_000), Some(ChatEvent::Expired(vec![id(2)])));
        assert_eq!(a.expire(7_100), Some(ChatEvent::Expired(vec![id(2)])));
        // The message sent before the timer stays on both sides.
        assert_eq!(texts(&a, 10_000), ["before the timer"]);
        assert_eq!(texts(&b, 10_000), ["before the timer"]);
    }

    #[test]
    fn delete_and_clear_reach_the_other_device() {
        let (mut a, mut b) = pair();
        for n in 1..=3 {
            let p = a.compose(id(n), &format!("m{n}")).unwrap();
            carry(p, &mut b, 0);
        }
        let del = b.delete(&[id(2)]).unwrap();
        assert_eq!(carry(del, &mut a, 0), vec![ChatEvent::Deleted(vec![id(2)])]);
        assert_eq!(texts(&a, 0), ["m1", "m3"]);
        assert_eq!(texts(&b, 0), ["m1", "m3"]);
        assert_eq!(b.delete(&[id(9)]), Err(ChatError::UnknownMessage(id(9))));
        let clear = a.clear();
        carry(clear, &mut b, 0);
        assert!(texts(&b, 0).is_empty());
    }

    #[test]
    fn a_message_is_shown_once_and_closing_stops_the_chat() {
        let (mut a, mut b) = pair();
        let p = a.compose(id(1), "once").unwrap();
        assert_eq!(carry(p.clone(), &mut b, 0).len(), 1);
        assert!(carry(p, &mut b, 0).is_empty());
        let close = a.close();
        assert_eq!(carry(close, &mut b, 0), vec![ChatEvent::Closed]);
        assert!(matches!(
            b.compose(id(2), "after"),
            Err(ChatError::NotActive(ChatState::Closed))
        ));
    }

    #[test]
    fn hostile_payloads_are_bounded() {
        let long = SecretPayload::Message {
            id: id(1),
            text: "x".repeat(MAX_TEXT + 1),
            timer_ms: None,
        };
        assert!(SecretPayload::decode(&long.encode()).is_err());
        let forever = SecretPayload::SetTimer {
            timer_ms: Some(MAX_TIMER_MS + 1),
        };
        assert!(SecretPayload::decode(&forever.encode()).is_err());
        let many = SecretPayload::Read {
            ids: vec![id(1); MAX_IDS + 1],
        };
        assert!(SecretPayload::decode(&many.encode()).is_err());
        let (mut a, _) = pair();
        assert_eq!(a.set_timer(Some(0)), Err(ChatError::BadTimer));
        assert_eq!(
            a.compose(id(1), &"x".repeat(MAX_TEXT + 1)),
            Err(ChatError::TextTooLong(MAX_TEXT + 1))
        );
    }
}
