//! Cloud chats: end-to-end encrypted, signed, hash-linked chat logs that
//! storage peers replicate without being able to read them.
//!
//! - [`keys`]: account encryption keys, chat keys per epoch, wrapping and
//!   body encryption.
//! - [`entry`]: the log entry (signed cleartext header, separate encrypted
//!   body) and its record format.
//! - [`content`]: what is inside a body (text, edit, read receipt, title).
//! - [`membership`]: who may write and manage, and the epoch in force.
//! - [`log`]: [`ChatLog`], the verified log a member device or a storage
//!   peer keeps.
//! - [`member`]: [`ChatMember`], a member device's keys: writes entries and
//!   reads the history.
//! - [`sync`]: anti-entropy between two holders of a chat.
//! - [`signatures`]: the one rule entry signatures are checked by, alone
//!   or in batches.
//!
//! # Driving it
//!
//! - **State.** Every member device and every storage peer keeps one
//!   [`ChatLog`] per chat; a member device also keeps one [`ChatMember`]
//!   (device key, certificate, account encryption key). A storage peer has
//!   no key at all and verifies everything all the same.
//! - **Persisting.** For each [`LogOutput::Persist`] (hash and record), write the record
//!   under [`Entry::storage_key`] (replacing any earlier version) and flush
//!   before acknowledging the entry to anyone. For each
//!   [`LogOutput::EraseBody`], rewrite that record without its body
//!   ([`Entry::without_body`]) so the ciphertext is gone from disk. After a
//!   restart, insert the stored records into a new log in key order: the
//!   key order is parents-first, and a purge whose erasure a crash
//!   interrupted yields its `EraseBody` again.
//! - **Sending.** [`ChatMember::compose`] (or [`ChatMember::create`] for a
//!   new chat) returns a signed entry; insert it into the local log, then
//!   push it to the chat's storage peers, which insert it and acknowledge
//!   once persisted. A [`LogError`] is a refusal with its reason;
//!   [`LogError::Duplicate`] means the peer already has it. Each compose
//!   takes 32 fresh random bytes; a chat id is 16.
//! - **Receiving.** [`LogOutput::Missing`] names parents to fetch: run a
//!   sync round with whoever sent the entry. [`LogEvent`]s say what
//!   arrived; a member device calls [`ChatMember::decrypt`] on an appended
//!   message to tell text, edit and receipt apart, and
//!   [`ChatMember::history`] for the whole chat.
//! - **Sync.** Send [`SyncRequest::for_log`]; the other side answers with
//!   [`respond`]; insert the entries in the order given (a `Duplicate` is
//!   harmless there) and ask again while `more` is set. The answering side
//!   checks [`they_have_more`] on the request's summary and, if so, asks
//!   back. [`in_sync`] on two summaries is the replica-health check;
//!   [`sync::diverged`] means a fork reached two replicas in opposite orders
//!   (see [`ChatLog::fork_evidence`]).
//! - **Statuses.** "Stored" is the driver's: a write quorum of storage
//!   peers acknowledged the entry hash. "Read" is
//!   [`DisplayedMessage::read_by`]: [`Draft::Read`] writes a receipt for
//!   everything the device holds.
//! - **Storage set.** [`EntryKind::Storage`] entries carry the chat's
//!   storage peers and write quorum, signed and replicated like membership.
//!   A new chat's creator composes [`Draft::Storage`] right after the
//!   genesis; [`ChatLog::storage_set`] is the set in force, and a storage
//!   peer with no key reads it all the same.
//! - **Keys.** A member's [`EncryptionPublicKey`] must be known to whoever
//!   creates a chat with it or adds it (publish it in the account record).
//!   A device holding the account key derives the first one (generation 0);
//!   a linked device without it needs [`AccountEncryptionKey::secret_bytes`]
//!   handed over.
//! - **Revoking a device.** Draw a key with [`AccountEncryptionKey::generate`],
//!   keep it, give it to [`ChatMember::add_encryption_key`] at the next
//!   generation, and compose [`Draft::AccountKey`] in every chat of the
//!   account. A device of the account that stays finds the key sealed to
//!   it there; hand what [`ChatMember::take_learned_keys`] returns to
//!   storage, and the keys kept so far to `add_encryption_key` at start.

pub mod account;
pub mod content;
pub mod entry;
pub mod keys;
pub mod log;
pub mod member;
pub mod membership;
pub mod signatures;
pub mod sync;

pub use content::Content;
pub use entry::{
    AccountKeyChange, BodyHash, ChatId, Composed, DeviceKeyGrant, Entry, EntryBody, EntryError,
    EntryHash, EntryHeader, EntryKind, KeyGrant, MAX_RUN, MemberGrant, Prechecked, RunPath,
    SignedHeader, check_storage_set, sign_run,
};
pub use keys::{
    AccountEncryptionKey, BodyContext, ChatKey, EncryptionPublicKey, KeyError, WrappedKey,
};
pub use log::{ChatLog, ForkEvidence, LogError, LogEvent, LogOutput};
pub use member::{ChatHistory, ChatMember, DisplayedMessage, Draft, MemberError};
pub use membership::{Membership, MembershipError};
pub use sync::{
    BatchLimits, ChatSummary, DeviceProgress, SyncError, SyncRequest, SyncResponse, in_sync,
    missing_entries, missing_order, respond, they_have_more,
};

#[cfg(test)]
mod tests;
