//! Events for the user: what `tern watch` and the WebSocket stream show.
//!
//! The bus is a bounded broadcast channel. A subscriber that falls behind
//! loses the oldest events and is told how many (a `lagged` event); the node
//! never blocks or grows memory on a slow reader.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

/// How many events a slow subscriber may fall behind before it loses some:
/// about two seconds of a node sending 3,000 messages a second (each makes
/// a `chat_message` and a `chat_status` or two), a few MiB at most.
pub const CAPACITY: usize = 16 * 1024;

/// How many peer events (connected, identified, disconnected) a service
/// may fall behind on. Peers come and go far more slowly than messages.
pub const PEER_CAPACITY: usize = 1024;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// First message on every event stream: the subscription is live, and
    /// everything that happens from now on will be delivered.
    Subscribed,
    /// The node is listening on a new address.
    Listening { address: String },
    /// A peer connected (first connection to it).
    PeerConnected { peer_id: String, address: String },
    /// A peer proved which account it belongs to.
    PeerIdentified {
        peer_id: String,
        account_id: String,
        name: String,
    },
    /// The last connection to a peer closed.
    PeerDisconnected { peer_id: String },
    /// Another device asks for a secret chat (`tern secret accept ID`).
    SecretRequest {
        secret_id: String,
        peer: Option<String>,
        peer_device: String,
        name: String,
    },
    /// A secret chat became active on this device.
    SecretAccepted { secret_id: String },
    /// A secret chat request was declined or withdrawn.
    SecretCancelled { secret_id: String },
    /// A secret chat message arrived.
    SecretMessage {
        secret_id: String,
        message_id: String,
        text: String,
    },
    /// The other device read these messages (their timers start).
    SecretRead {
        secret_id: String,
        message_ids: Vec<String>,
    },
    /// These messages self-destructed.
    SecretExpired {
        secret_id: String,
        message_ids: Vec<String>,
    },
    /// The other device deleted these messages.
    SecretDeleted {
        secret_id: String,
        message_ids: Vec<String>,
    },
    /// The other device cleared the history.
    SecretCleared { secret_id: String },
    /// The other device set the self-destruct timer.
    SecretTimer {
        secret_id: String,
        timer_ms: Option<u64>,
    },
    /// The secret chat was closed (by either side, or by logout).
    SecretClosed { secret_id: String },
    /// A cloud chat this account is in began (here or on another device).
    ChatCreated { chat_id: String, by: String },
    /// A new cloud-chat message, from this account or another.
    ChatMessage {
        chat_id: String,
        message_id: String,
        author: String,
        text: String,
        from_me: bool,
        reply_to: Option<String>,
    },
    /// A message was edited by its author.
    ChatEdited {
        chat_id: String,
        message_id: String,
        text: String,
    },
    /// Messages were deleted for everyone.
    ChatDeleted {
        chat_id: String,
        message_ids: Vec<String>,
        by: String,
    },
    /// Another member read the chat (two checks).
    ChatReceipt { chat_id: String, reader: String },
    /// A message of this device reached its write quorum (one check).
    ChatStatus {
        chat_id: String,
        message_id: String,
        status: String,
    },
    /// A storage peer of a chat became reachable or unreachable, or came
    /// into or out of sync.
    ReplicaHealth {
        chat_id: String,
        peer_id: String,
        reachable: bool,
        in_sync: bool,
        entries: u64,
    },
    /// This subscriber fell behind and missed events.
    Lagged { missed: u64 },
}

/// An event with the time it happened.
#[derive(Clone, Debug, Serialize)]
pub struct Stamped {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

impl Event {
    /// Whether this event is about a peer coming, proving its account, or
    /// going: what the node's services follow (`EventBus::subscribe_peers`).
    pub fn is_peer_event(&self) -> bool {
        matches!(
            self,
            Event::PeerConnected { .. }
                | Event::PeerIdentified { .. }
                | Event::PeerDisconnected { .. }
        )
    }
}

/// Every event goes to `subscribe`rs (the user's streams); peer events also
/// go to `subscribe_peers`, so that the node's services, which only follow
/// peers, are not woken for every message, status and receipt.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Stamped>,
    peers: broadcast::Sender<Stamped>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
            peers: broadcast::channel(PEER_CAPACITY).0,
        }
    }
}

impl EventBus {
    pub fn emit(&self, event: Event) {
        let stamped = Stamped {
            at_ms: now_ms(),
            event,
        };
        // No subscriber is not an error: events are for whoever is watching.
        if stamped.event.is_peer_event() {
            let _ = self.peers.send(stamped.clone());
        }
        let _ = self.tx.send(stamped);
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Stamped> {
        self.tx.subscribe()
    }

    /// Peer events only, from now on.
    pub fn subscribe_peers(&self) -> broadcast::Receiver<Stamped> {
        self.peers.subscribe()
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_subscribers_get_peer_events_only_and_user_streams_get_everything() {
        let bus = EventBus::default();
        let mut all = bus.subscribe();
        let mut peers = bus.subscribe_peers();
        let connected = Event::PeerConnected {
            peer_id: "p".into(),
            address: "/ip4/127.0.0.1/tcp/1".into(),
        };
        let status = Event::ChatStatus {
            chat_id: "c".into(),
            message_id: "m".into(),
            status: "stored".into(),
        };
        let gone = Event::PeerDisconnected {
            peer_id: "p".into(),
        };
        for e in [connected.clone(), status.clone(), gone.clone()] {
            bus.emit(e);
        }
        let seen: Vec<Event> =
            std::iter::from_fn(|| all.try_recv().ok().map(|s| s.event)).collect();
        assert_eq!(seen, vec![connected.clone(), status, gone.clone()]);
        let seen: Vec<Event> =
            std::iter::from_fn(|| peers.try_recv().ok().map(|s| s.event)).collect();
        assert_eq!(seen, vec![connected, gone]);
    }
}
