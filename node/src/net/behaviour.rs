//! The composed libp2p behaviour and the swarm that carries it.

use std::time::Duration;

use libp2p::{
    StreamProtocol, Swarm, autonat, connection_limits, dcutr, identify, identity, kad, mdns, noise,
    ping, relay, request_response,
    swarm::{NetworkBehaviour, behaviour::toggle::Toggle},
    tcp, yamux,
};
use prometheus_client::registry::Registry;
use tern_protocol::{
    DeviceCertificate,
    cloud::account::{AccountQuery, AccountRecord},
    link::{LinkRequest, LinkResponse},
};

use super::codec::RecordCodec;
use crate::{
    cloud::wire::{StoreRequest, StoreResponse},
    config::Config,
    secret::wire::{SecretRequest, SecretResponse},
};

/// Kademlia for Tern nodes only: a private DHT, not the public IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/kad/1");
/// Peers exchange device certificates right after connecting, so each side
/// knows which account the other device belongs to.
pub const INTRODUCE_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/introduce/1");
/// Sent in identify, so Tern nodes recognise each other.
pub const IDENTIFY_VERSION: &str = "/tern/1";

/// Secret chats: set-up and frames between the two devices of a chat.
pub const SECRET_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/secret/1");

pub type IntroduceCodec = RecordCodec<DeviceCertificate, DeviceCertificate>;
pub type SecretCodec = RecordCodec<SecretRequest, SecretResponse>;
/// Cloud chats: pushing entries to storage peers and syncing from them.
pub const STORE_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/store/1");
pub type StoreCodec = RecordCodec<StoreRequest, StoreResponse>;
/// A device's signed account record (its account's devices, encryption key
/// and storage peers), fetched right after the introduction.
pub const ACCOUNT_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/account/1");
pub type AccountCodec = RecordCodec<AccountQuery, AccountRecord>;
/// Device linking: a new device proves it holds a one-time code and is
/// given the account (`tern init --link`). Nodes only answer it.
pub const LINK_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/link/1");
pub type LinkCodec = RecordCodec<LinkRequest, LinkResponse>;

#[derive(NetworkBehaviour)]
pub struct TernBehaviour {
    pub limits: connection_limits::Behaviour,
    pub relay_client: relay::client::Behaviour,
    pub relay: relay::Behaviour,
    pub dcutr: dcutr::Behaviour,
    pub autonat: autonat::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub introduce: request_response::Behaviour<IntroduceCodec>,
    pub secret: request_response::Behaviour<SecretCodec>,
    pub store: request_response::Behaviour<StoreCodec>,
    pub account: request_response::Behaviour<AccountCodec>,
    pub link: request_response::Behaviour<LinkCodec>,
}

/// The relay service carries other devices' connections (for secret chats:
/// ciphertext in flight, nothing kept). libp2p's defaults end a circuit
/// after 2 minutes or 128 KiB, too little for a conversation; these limits
/// still bound what one circuit may cost this node.
fn relay_config() -> relay::Config {
    relay::Config {
        max_circuit_duration: Duration::from_secs(3600),
        max_circuit_bytes: 256 * 1024 * 1024,
        ..relay::Config::default()
    }
}

/// Builds the swarm: TCP and QUIC (plus relayed connections), Noise, Yamux,
/// DNS, with bandwidth metrics registered in `registry`.
pub fn build_swarm(
    key: identity::Keypair,
    config: &Config,
    registry: &mut Registry,
    rejected_frames: prometheus_client::metrics::counter::Counter,
) -> anyhow::Result<Swarm<TernBehaviour>> {
    let max_connections = config.max_connections;
    let mdns_on = config.mdns;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_dns()?
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_established(Some(max_connections))
                .with_max_pending_incoming(Some(max_connections.div_ceil(4).max(8)))
                .with_max_pending_outgoing(Some(max_connections.div_ceil(4).max(8)))
                .with_max_established_per_peer(Some(4));

            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_query_timeout(Duration::from_secs(30));
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_config,
            );
            // Every node is a full DHT participant, also behind NAT: the
            // relay lets others reach it.
            kad.set_mode(Some(kad::Mode::Server));

            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };

            Ok(TernBehaviour {
                limits: connection_limits::Behaviour::new(limits),
                relay_client,
                relay: relay::Behaviour::new(peer_id, relay_config()),
                dcutr: dcutr::Behaviour::new(peer_id),
                autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_VERSION.into(), key.public())
                        .with_agent_version(format!("tern/{}", env!("CARGO_PKG_VERSION")))
                        .with_push_listen_addr_updates(true),
                ),
                ping: ping::Behaviour::default(),
                kad,
                mdns: mdns.into(),
                account: request_response::Behaviour::with_codec(
                    AccountCodec::new(rejected_frames.clone()),
                    [(ACCOUNT_PROTOCOL, request_response::ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(20))
                        .with_max_concurrent_streams(8),
                ),
                store: request_response::Behaviour::with_codec(
                    StoreCodec::new(rejected_frames.clone()),
                    [(STORE_PROTOCOL, request_response::ProtocolSupport::Full)],
                    // A push may be 1 MiB, read before it is looked at: few
                    // at once per connection (a sender keeps at most three
                    // in flight, and each side may be sending).
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(30))
                        .with_max_concurrent_streams(8),
                ),
                secret: request_response::Behaviour::with_codec(
                    SecretCodec::new(rejected_frames.clone()),
                    [(SECRET_PROTOCOL, request_response::ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(30))
                        .with_max_concurrent_streams(32),
                ),
                introduce: request_response::Behaviour::with_codec(
                    IntroduceCodec::new(rejected_frames.clone()),
                    [(INTRODUCE_PROTOCOL, request_response::ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(20))
                        .with_max_concurrent_streams(64),
                ),
                // Answered at once by the event loop, and only useful
                // while one of at most a few codes is open: few streams.
                link: request_response::Behaviour::with_codec(
                    LinkCodec::new(rejected_frames),
                    [(LINK_PROTOCOL, request_response::ProtocolSupport::Inbound)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(20))
                        .with_max_concurrent_streams(4),
                ),
            })
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout()))
        .build();
    Ok(swarm)
}
