//! Secret chats on the node: the service that drives `tern-protocol`'s
//! [`SecretSession`](tern_protocol::secret::SecretSession) and
//! [`SecretChat`](tern_protocol::secret::SecretChat) for every secret chat
//! of this device, carries their frames over `/tern/secret/1`, keeps them in
//! the erasable store and fires their self-destruct timers.

pub mod api;
pub mod cli;
pub mod service;
pub mod store;
pub mod time;
pub mod wire;

pub use service::{
    HistoryItem, KeyInfo, SecretError, SecretHandle, SecretInfo, SecretService, StartTarget,
};
