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

pub mod content;
pub mod entry;
pub mod keys;
pub mod log;
pub mod member;
pub mod membership;
pub mod sync;

pub use content::Content;
pub use entry::{
    BodyHash, ChatId, Entry, EntryBody, EntryError, EntryHash, EntryHeader, EntryKind, KeyGrant,
    MemberGrant, SignedHeader,
};
pub use keys::{
    AccountEncryptionKey, BodyContext, ChatKey, EncryptionPublicKey, KeyError, WrappedKey,
};
pub use log::{ChatLog, ForkEvidence, LogError, LogEvent, LogOutput};
pub use member::{ChatHistory, ChatMember, DisplayedMessage, Draft, MemberError};
pub use membership::{Membership, MembershipError};
pub use sync::{
    BatchLimits, ChatSummary, DeviceProgress, SyncError, SyncRequest, SyncResponse, in_sync,
    missing_entries, respond, they_have_more,
};

#[cfg(test)]
mod tests;
