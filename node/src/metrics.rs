//! Prometheus metrics: libp2p's own (connections, bandwidth, identify, kad,
//! ping, relay, dcutr) and the node's.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone)]
pub struct NodeMetrics {
    pub libp2p: std::sync::Arc<libp2p::metrics::Metrics>,
    pub connected_peers: Gauge,
    pub known_peers: Gauge,
    pub rejected_frames: Counter,
    pub api_requests: Family<ApiLabels, Counter>,
    pub lanes: LaneMetrics,
}

/// What peers did on lanes to this node (`crate::net::lane`).
#[derive(Clone, Default)]
pub struct LaneMetrics {
    /// Lanes whose handshake succeeded.
    pub opened: Counter,
    /// Requests that arrived on them.
    pub requests: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ApiLabels {
    pub status: u16,
}

impl NodeMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            libp2p: std::sync::Arc::new(libp2p::metrics::Metrics::new(registry)),
            connected_peers: Gauge::default(),
            known_peers: Gauge::default(),
            rejected_frames: Counter::default(),
            api_requests: Family::default(),
            lanes: LaneMetrics::default(),
        };
        let tern = registry.sub_registry_with_prefix("tern");
        tern.register(
            "connected_peers",
            "Peers with at least one open connection",
            m.connected_peers.clone(),
        );
        tern.register(
            "known_peers",
            "Peers in the address book",
            m.known_peers.clone(),
        );
        tern.register(
            "rejected_frames",
            "Frames from peers rejected as malformed or unauthentic",
            m.rejected_frames.clone(),
        );
        tern.register(
            "api_requests",
            "Control API requests by response status",
            m.api_requests.clone(),
        );
        tern.register(
            "lanes_opened",
            "Lanes peers opened to this node",
            m.lanes.opened.clone(),
        );
        tern.register(
            "lane_requests",
            "Storage requests that arrived on lanes",
            m.lanes.requests.clone(),
        );
        m
    }
}
