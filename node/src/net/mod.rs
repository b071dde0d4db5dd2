//! Networking: the libp2p swarm, its event loop and the handle the rest of
//! the node uses to talk to it.

pub mod behaviour;
pub mod codec;
pub mod event_loop;
pub mod lane;
pub mod peers;

pub use event_loop::{
    EventLoop, EventLoopParts, InboundSecret, KnownDevice, NetError, NetStatus, NetworkHandle,
    PeerInfo,
};
