//! The Tern node: drives `tern-protocol` with libp2p, the store, timers, the
//! control API and the CLI. See `docs/architecture.md`.

pub mod api;
pub mod cli;
pub mod client;
pub mod cloud;
pub mod config;
pub mod data_dir;
pub mod devices;
pub mod erasable;
pub mod events;
pub mod hex;
pub mod keys;
pub mod metrics;
pub mod net;
pub mod node;
pub mod secret;
pub mod segments;
pub mod service_thread;
pub mod store;
#[cfg(test)]
mod test_util;
pub mod testnet;
