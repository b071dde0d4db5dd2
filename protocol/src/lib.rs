//! Tern's sans-IO core: record formats, identities and cryptography, and (as
//! they arrive) the protocol state machines.
//!
//! Nothing in this crate performs IO, reads a clock or draws randomness of its
//! own: time and random bytes are inputs. That is what lets the node and the
//! simulator drive the very same code, and lets a test replay any run exactly.

pub mod cloud;
pub mod codec;
pub mod collections;
pub mod identity;
pub mod link;
pub mod sealed;
pub mod secret;
pub mod ticket;

pub use codec::{DecodeError, Record};
pub use identity::{AccountId, AccountKeypair, DeviceCertificate, DevicePublicKey, IdentityError};
pub use sealed::{KdfParams, SealError, SealedSecret};
pub use ticket::{Ticket, TicketError};
