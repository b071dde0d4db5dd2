//! Shared pieces of Tern's developer tools.

pub mod stats;
