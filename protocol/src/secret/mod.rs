//! Secret chats: the parts both devices must compute identically and that
//! need no IO — the key fingerprint and its visualisations, and the
//! short-code exchange that makes a spoken comparison safe.

pub mod chat;
pub mod fingerprint;
pub mod picture;
pub mod sas;
pub mod session;

pub use chat::{
    ChatError, ChatEvent, ChatState, MessageId, SecretChat, SecretMessage, SecretPayload,
};
pub use fingerprint::{EMOJI, Fingerprint};
pub use picture::KeyPicture;
pub use sas::{SasError, SasInitiator, SasMessage, SasResponder, ShortCode};
pub use session::{
    Established, Handshake, LocalDevice, Opened, Role, SecretFrame, SecretSession, SessionError,
    SessionSnapshot,
};
