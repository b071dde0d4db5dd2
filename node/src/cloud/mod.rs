//! Cloud chats on the node. So far:
//! - [`hosting`]: whom this node stores chats for, with its API routes and
//!   commands;
//! - [`replica`]: the storage-peer side: verify, keep, purge and serve the
//!   chats this node hosts, on [`crate::segments`].
//!
//! Still missing: the push, acknowledge and sync protocol between nodes,
//! the member side (`tern chat …`), and device linking.

pub mod api;
pub mod cli;
pub mod hosting;
pub mod replica;
pub mod service;
pub mod wire;
