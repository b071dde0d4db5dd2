//! Cloud chats on the node. So far: the hosting policy (whom this node
//! stores chats for) with its API routes and commands; the log store is
//! [`crate::segments`].

pub mod api;
pub mod cli;
pub mod hosting;
