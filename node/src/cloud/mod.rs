//! Cloud chats on the node:
//! - [`hosting`]: whom this node stores chats for;
//! - [`replica`]: every chat this node keeps (as a storage peer, as a
//!   member, or both), verified and on disk in [`crate::segments`];
//! - [`service`]: the thread that owns them: it answers `/tern/store/1`,
//!   writes for this device's account, pushes to storage peers, counts the
//!   write quorum, notifies and pulls, and compares replicas;
//! - [`wire`], [`api`], [`cli`]: the protocol, the `/v1/chats` and
//!   `/v1/host` routes, and `tern chat` / `tern host`.

pub mod account_keys;
pub mod acks;
pub mod api;
pub mod cli;
pub mod hosting;
pub mod replica;
pub mod service;
pub mod wire;

use serde::{Deserialize, Serialize};

/// A cloud chat as `tern chat list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChatInfo {
    pub chat_id: String,
    pub title: Option<String>,
    /// Member account ids.
    pub members: Vec<String>,
    /// Messages shown (purged ones are gone).
    pub messages: usize,
    /// Entries in this device's copy of the log.
    pub entries: usize,
    /// Storage peers (peer ids) and the write quorum.
    pub storage: Vec<String>,
    pub quorum: u8,
}

/// One message as `tern chat history` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MessageView {
    pub id: String,
    pub author: String,
    pub text: String,
    /// `sending`, `stored` or `read`.
    pub status: String,
    pub edited: bool,
    pub from_me: bool,
    pub reply_to: Option<String>,
    /// Accounts whose read receipt covers this message.
    pub read_by: Vec<String>,
}

/// What `tern chat send` (and edit, delete, read) answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SendReceipt {
    pub chat_id: String,
    pub message_id: String,
    /// `sending`, `stored` or `read`.
    pub status: String,
    /// Storage peers holding it durably, the quorum, and the set's size.
    pub acknowledged: usize,
    pub quorum: usize,
    pub storage_peers: usize,
    /// Why some storage peers do not have it yet, if they said.
    pub problems: Vec<String>,
}

/// One storage peer of a chat, as `tern chat replicas` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaView {
    pub peer_id: String,
    /// Entries it holds (as of its last answer).
    pub entries: u64,
    /// It holds exactly what this device holds.
    pub in_sync: bool,
    /// Its last request succeeded.
    pub reachable: bool,
    pub this_node: bool,
    /// Milliseconds since its last answer, if any.
    pub last_seen_ms: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error("no cloud chat {0} on this device (see `tern chat list`)")]
    NoSuchChat(String),
    #[error("no message {0} in this chat (see `tern chat history`)")]
    NoSuchMessage(String),
    #[error("{0} matches more than one; give more characters")]
    Ambiguous(String),
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot write to this device's copy: {0}")]
    Store(String),
    #[error("the cloud-chat service has stopped")]
    Stopped,
}
