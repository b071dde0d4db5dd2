//! The network event loop: owns the swarm, answers commands from
//! [`NetworkHandle`]s, and turns swarm events into address-book updates and
//! user events. Local commands are served before new remote events (`biased`
//! select), every channel is bounded, and each dial reply is matched to its
//! request by connection id.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm,
    core::ConnectedPoint,
    core::transport::ListenerId,
    identify, kad, mdns,
    metrics::Recorder,
    multiaddr::Protocol,
    request_response,
    swarm::{
        ConnectionId, SwarmEvent,
        dial_opts::{DialOpts, PeerCondition},
    },
};
use serde::{Deserialize, Serialize};
use tern_protocol::{
    AccountId, DeviceCertificate,
    cloud::account::{AccountQuery, AccountRecord},
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

mod link;
pub use link::{DevicesCommand, IssuedCode};

use super::{
    behaviour::{IDENTIFY_VERSION, KAD_PROTOCOL, TernBehaviour, TernBehaviourEvent},
    peers::AddressBook,
};
use crate::{
    cloud::{
        service::{Answer, InboundStore},
        wire::{StoreRequest, StoreResponse},
    },
    events::{Event, EventBus, now_ms},
    keys::peer_id_of,
    metrics::NodeMetrics,
    secret::wire::{SecretRequest, SecretResponse},
    store::Keyspace,
};

/// Commands waiting for the event loop; senders wait when it is full.
pub const COMMAND_QUEUE: usize = 64;
/// Most `tern connect` dials in flight at once.
const MAX_PENDING_DIALS: usize = 64;
/// Most redials started per tick.
const REDIALS_PER_TICK: usize = 8;
/// Most secret-chat requests of ours waiting for an answer.
const MAX_PENDING_SECRET: usize = 1024;
/// Most account records kept in memory.
const MAX_ACCOUNT_RECORDS: usize = 4096;
/// Most requests of one peer waiting for the secret-chat service (and, as
/// many again, for the storage service).
const MAX_INBOUND_SECRET_PER_PEER: usize = 8;

/// A secret-chat request from a peer, for the secret-chat service; answered
/// with [`NetworkHandle::secret_respond`].
pub struct InboundSecret {
    pub peer: PeerId,
    pub request: SecretRequest,
    pub channel: request_response::ResponseChannel<SecretResponse>,
}

/// What the node knows about a device it has met.
#[derive(Clone, Debug)]
pub struct KnownDevice {
    pub account: Option<AccountId>,
    pub name: String,
    pub connected: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the node is shutting down")]
    Stopped,
    #[error("could not connect: {0}")]
    Dial(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetStatus {
    pub listen_addrs: Vec<String>,
    pub external_addrs: Vec<String>,
    pub connected_peers: usize,
    pub known_peers: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub account_id: Option<String>,
    pub name: Option<String>,
    pub addresses: Vec<String>,
    pub connections: usize,
}

pub enum Command {
    Status(oneshot::Sender<NetStatus>),
    Peers(oneshot::Sender<Vec<PeerInfo>>),
    Dial {
        peer: Option<PeerId>,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<PeerId, String>>,
    },
    SecretRequest {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: SecretRequest,
        reply: oneshot::Sender<Result<SecretResponse, String>>,
    },
    SecretRespond {
        peer: PeerId,
        channel: request_response::ResponseChannel<SecretResponse>,
        response: SecretResponse,
    },
    Device {
        peer: PeerId,
        reply: oneshot::Sender<Option<KnownDevice>>,
    },
    RemoteIps {
        peer: PeerId,
        reply: oneshot::Sender<Vec<std::net::IpAddr>>,
    },
    DevicesOf {
        account: AccountId,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    StoreRespond {
        peer: PeerId,
        channel: request_response::ResponseChannel<StoreResponse>,
        response: StoreResponse,
    },
    /// Link codes and the account's device list (`event_loop/link.rs`).
    Devices(DevicesCommand),
    Account {
        account: AccountId,
        reply: oneshot::Sender<Option<AccountRecord>>,
    },
    RefreshAccount {
        account: AccountId,
    },
    StoreRequest {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: StoreRequest,
        reply: oneshot::Sender<Result<StoreResponse, String>>,
    },
}

/// The IP address of a direct connection's address (`/ip4|ip6/…/tcp|udp/…`),
/// not of a relayed one.
pub fn direct_ip(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    use libp2p::multiaddr::Protocol;
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    let (ip, next) = leading_ip(addr)?;
    matches!(next, Protocol::Tcp(_) | Protocol::Udp(_))
        .then_some(ip)
        .filter(|ip| !ip.is_unspecified())
}

/// The IP address a multiaddr starts with, and the protocol after it.
pub fn leading_ip(addr: &Multiaddr) -> Option<(std::net::IpAddr, libp2p::multiaddr::Protocol<'_>)> {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    let ip = match parts.next()? {
        Protocol::Ip4(ip) => std::net::IpAddr::V4(ip),
        Protocol::Ip6(ip) => std::net::IpAddr::V6(ip),
        _ => return None,
    };
    Some((ip, parts.next()?))
}

/// A cheap, cloneable handle to the event loop.
#[derive(Clone)]
pub struct NetworkHandle {
    tx: mpsc::Sender<Command>,
}

impl NetworkHandle {
    /// A handle to no network at all: every call fails with
    /// [`NetError::Stopped`]. For driving a service's logic directly.
    #[cfg(test)]
    pub(crate) fn detached() -> Self {
        Self {
            tx: mpsc::channel(1).0,
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    pub async fn status(&self) -> Result<NetStatus, NetError> {
        self.call(Command::Status).await
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetError> {
        self.call(Command::Peers).await
    }

    /// Sends a secret-chat request to `peer` (dialling it, also at `addrs`,
    /// if needed) and waits for its answer.
    pub async fn secret_request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: SecretRequest,
    ) -> Result<SecretResponse, NetError> {
        self.call(|reply| Command::SecretRequest {
            peer,
            addrs,
            request,
            reply,
        })
        .await?
        .map_err(NetError::Dial)
    }

    pub async fn secret_respond(
        &self,
        peer: PeerId,
        channel: request_response::ResponseChannel<SecretResponse>,
        response: SecretResponse,
    ) -> Result<(), NetError> {
        self.tx
            .send(Command::SecretRespond {
                peer,
                channel,
                response,
            })
            .await
            .map_err(|_| NetError::Stopped)
    }

    pub async fn store_respond(
        &self,
        peer: PeerId,
        channel: request_response::ResponseChannel<StoreResponse>,
        response: StoreResponse,
    ) -> Result<(), NetError> {
        self.tx
            .send(Command::StoreRespond {
                peer,
                channel,
                response,
            })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// Sends a `/tern/store/1` request to `peer` (dialling it, also at
    /// `addrs`, if needed) and waits for its answer.
    pub async fn store_request(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: StoreRequest,
    ) -> Result<StoreResponse, NetError> {
        self.call(|reply| Command::StoreRequest {
            peer,
            addrs,
            request,
            reply,
        })
        .await?
        .map_err(NetError::Dial)
    }

    /// The newest signed record of `account` this node has seen (from one
    /// of its devices, right after meeting it).
    pub async fn account(&self, account: AccountId) -> Result<Option<AccountRecord>, NetError> {
        self.call(|reply| Command::Account { account, reply }).await
    }

    /// Asks the connected devices of `account` for its record again (it
    /// changed its encryption key); the answers replace the record held if
    /// they are newer.
    pub async fn refresh_account(&self, account: AccountId) -> Result<(), NetError> {
        self.tx
            .send(Command::RefreshAccount { account })
            .await
            .map_err(|_| NetError::Stopped)
    }

    /// What the node knows about `peer`, if it has met it.
    pub async fn device(&self, peer: PeerId) -> Result<Option<KnownDevice>, NetError> {
        self.call(|reply| Command::Device { peer, reply }).await
    }

    /// The IP addresses `peer` is connected from, direct connections only
    /// (where its lane listener is found).
    pub async fn remote_ips(&self, peer: PeerId) -> Result<Vec<std::net::IpAddr>, NetError> {
        self.call(|reply| Command::RemoteIps { peer, reply }).await
    }

    /// The known devices of an account, connected ones first.
    pub async fn devices_of(&self, account: AccountId) -> Result<Vec<PeerId>, NetError> {
        self.call(|reply| Command::DevicesOf { account, reply })
            .await
    }

    /// Dials and returns once connected (or failed). With `peer` given, the
    /// remote must prove that identity.
    pub async fn dial(
        &self,
        peer: Option<PeerId>,
        addrs: Vec<Multiaddr>,
    ) -> Result<PeerId, NetError> {
        self.call(|reply| Command::Dial { peer, addrs, reply })
            .await?
            .map_err(NetError::Dial)
    }
}

#[derive(Default)]
struct Connected {
    connections: Vec<(ConnectionId, Multiaddr)>,
    /// Addresses the peer listens on, from identify.
    listen_addrs: Vec<Multiaddr>,
    /// Addresses we reached it on.
    dialed_addrs: Vec<Multiaddr>,
}

pub struct EventLoop {
    swarm: Swarm<TernBehaviour>,
    commands: mpsc::Receiver<Command>,
    bus: EventBus,
    metrics: NodeMetrics,
    certificate: DeviceCertificate,
    book: AddressBook,
    peers_ks: Keyspace,
    state_ks: Keyspace,
    listeners: HashMap<ListenerId, String>,
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, String>>>,
    connected: HashMap<PeerId, Connected>,
    target_peers: usize,
    secret_inbound: mpsc::Sender<InboundSecret>,
    pending_secret: HashMap<
        request_response::OutboundRequestId,
        oneshot::Sender<Result<SecretResponse, String>>,
    >,
    inbound_secret: HashMap<PeerId, usize>,
    store_inbound: mpsc::Sender<InboundStore>,
    inbound_store: HashMap<PeerId, usize>,
    pending_store: HashMap<
        request_response::OutboundRequestId,
        oneshot::Sender<Result<StoreResponse, String>>,
    >,
    /// This device's own signed account record, served on request.
    own_record: AccountRecord,
    account_keys: crate::cloud::account_keys::SharedKeys,
    signing_key: ed25519_dalek::SigningKey,
    /// Account records learned from the devices met (newest per account).
    records: HashMap<AccountId, AccountRecord>,
    /// This account's devices and the link codes this device issued.
    devices: crate::devices::AccountDevices,
}

pub struct EventLoopParts {
    pub swarm: Swarm<TernBehaviour>,
    pub bus: EventBus,
    pub metrics: NodeMetrics,
    pub certificate: DeviceCertificate,
    pub peers_ks: Keyspace,
    pub state_ks: Keyspace,
    pub target_peers: usize,
    pub secret_inbound: mpsc::Sender<InboundSecret>,
    pub store_inbound: mpsc::Sender<InboundStore>,
    pub own_record: AccountRecord,
    pub devices: crate::devices::AccountDevices,
    /// The account's later encryption keys, for link grants and records.
    pub account_keys: crate::cloud::account_keys::SharedKeys,
    /// This device's key, to open an account key sealed to it in a record.
    pub signing_key: ed25519_dalek::SigningKey,
}

impl EventLoop {
    pub fn new(parts: EventLoopParts) -> (Self, NetworkHandle) {
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let mut this = Self {
            swarm: parts.swarm,
            commands,
            bus: parts.bus,
            metrics: parts.metrics,
            certificate: parts.certificate,
            book: AddressBook::default(),
            peers_ks: parts.peers_ks,
            state_ks: parts.state_ks,
            listeners: HashMap::new(),
            pending_dials: HashMap::new(),
            connected: HashMap::new(),
            target_peers: parts.target_peers,
            secret_inbound: parts.secret_inbound,
            pending_secret: HashMap::new(),
            inbound_secret: HashMap::new(),
            store_inbound: parts.store_inbound,
            inbound_store: HashMap::new(),
            pending_store: HashMap::new(),
            own_record: parts.own_record,
            account_keys: parts.account_keys,
            signing_key: parts.signing_key,
            records: HashMap::new(),
            devices: parts.devices,
        };
        this.restore_address_book();
        // The record built at start lists this device only; list them all.
        this.refresh_own_record();
        (this, NetworkHandle { tx })
    }

    fn restore_address_book(&mut self) {
        let now = Instant::now();
        let mut damaged = Vec::new();
        for item in self.peers_ks.iter() {
            let Ok((k, v)) = item else {
                warn!("cannot read the peer store");
                break;
            };
            let peer = PeerId::from_bytes(&k).ok();
            let record = <super::peers::PeerRecord as tern_protocol::Record>::decode(&v).ok();
            match (peer, record) {
                (Some(peer), Some(record)) => self.book.restore(peer, record, now),
                _ => damaged.push(k),
            }
        }
        for k in damaged {
            warn!("dropping a damaged entry from the peer store");
            let _ = self.peers_ks.remove_soon(&k);
        }
        self.metrics.known_peers.set(self.book.len() as i64);
        if !self.book.is_empty() {
            info!(peers = self.book.len(), "restored address book");
        }
    }

    /// Starts listening on `spec`. A port-0 address reuses the port this node
    /// had last time when it is still free, so its address stays stable.
    pub fn listen(&mut self, spec: &Multiaddr) -> anyhow::Result<()> {
        let key = format!("listen:{spec}");
        let remembered = self
            .state_ks
            .get(key.as_bytes())
            .ok()
            .flatten()
            .and_then(|v| <[u8; 2]>::try_from(v.as_slice()).ok())
            .map(u16::from_be_bytes);
        if let Some(port) = remembered.filter(|&p| has_zero_port(spec) && port_is_free(spec, p)) {
            match self.swarm.listen_on(with_port(spec, port)) {
                Ok(id) => {
                    self.listeners.insert(id, key);
                    return Ok(());
                }
                Err(e) => debug!(%spec, port, "previous port not available: {e}"),
            }
        }
        let id = self
            .swarm
            .listen_on(spec.clone())
            .map_err(|e| anyhow::anyhow!("cannot listen on {spec}: {e}"))?;
        self.listeners.insert(id, key);
        Ok(())
    }

    /// Declares an address at which others reach this node. A confirmed
    /// external address is what the relay server waits for before it
    /// serves reservations.
    pub fn add_external(&mut self, addr: Multiaddr) {
        info!(%addr, "announcing external address");
        self.swarm.add_external_address(addr);
    }

    /// Dials a bootstrap peer and seeds Kademlia with it.
    pub fn bootstrap(&mut self, addr: &Multiaddr) {
        let peer = match addr.iter().last() {
            Some(Protocol::P2p(p)) => Some(p),
            _ => None,
        };
        if let Some(p) = peer {
            self.swarm.behaviour_mut().kad.add_address(&p, addr.clone());
        }
        let opts = match peer {
            Some(p) => DialOpts::peer_id(p)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        if let Err(e) = self.swarm.dial(opts) {
            warn!(%addr, "cannot dial bootstrap peer: {e}");
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = tick.tick() => self.redial_due(),
            }
        }
        debug!("network event loop stopped");
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Peers(reply) => {
                let _ = reply.send(self.peers());
            }
            Command::Dial { peer, addrs, reply } => self.dial(peer, addrs, reply),
            Command::SecretRequest {
                peer,
                addrs,
                request,
                reply,
            } => self.send_secret(peer, addrs, request, reply),
            Command::SecretRespond {
                peer,
                channel,
                response,
            } => {
                release_inbound(&mut self.inbound_secret, &peer);
                // Fails only if the stream is gone; the peer then retries.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .secret
                    .send_response(channel, response);
            }
            Command::RemoteIps { peer, reply } => {
                let mut ips: Vec<std::net::IpAddr> = Vec::new();
                let addrs = self.connected.get(&peer).map(|c| &c.connections[..]);
                for ip in addrs
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|(_, a)| direct_ip(a))
                {
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
                let _ = reply.send(ips);
            }
            Command::Device { peer, reply } => {
                let known = self.book.get(&peer).map(|e| KnownDevice {
                    account: e.account,
                    name: e.name.clone(),
                    connected: self.swarm.is_connected(&peer),
                });
                let _ = reply.send(known);
            }
            Command::RefreshAccount { account } => {
                for peer in self.book.devices_of(&account) {
                    if self.connected.contains_key(&peer) {
                        self.swarm
                            .behaviour_mut()
                            .account
                            .send_request(&peer, AccountQuery);
                    }
                }
            }
            Command::DevicesOf { account, reply } => {
                let _ = reply.send(self.book.devices_of(&account));
            }
            Command::Account { account, reply } => {
                let record = if account == self.own_record.body.account {
                    Some(self.own_record.clone())
                } else {
                    self.records.get(&account).cloned()
                };
                let _ = reply.send(record);
            }
            Command::StoreRequest {
                peer,
                addrs,
                request,
                reply,
            } => {
                if self.pending_store.len() >= MAX_PENDING_SECRET {
                    let _ = reply.send(Err("too many storage requests in flight".into()));
                    return;
                }
                let addrs = self.with_known_addrs(&peer, addrs);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .store
                    .send_request_with_addresses(&peer, request, addrs);
                self.pending_store.insert(id, reply);
            }
            Command::StoreRespond {
                peer,
                channel,
                response,
            } => {
                release_inbound(&mut self.inbound_store, &peer);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .store
                    .send_response(channel, response);
            }
            Command::Devices(cmd) => self.on_devices_command(cmd),
        }
    }

    /// `addrs` and the addresses the address book knows for `peer`: where
    /// an outbound request may dial.
    fn with_known_addrs(&self, peer: &PeerId, mut addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
        if let Some(e) = self.book.get(peer) {
            addrs.extend(e.addrs.iter().cloned());
        }
        addrs
    }

    fn send_secret(
        &mut self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: SecretRequest,
        reply: oneshot::Sender<Result<SecretResponse, String>>,
    ) {
        if self.pending_secret.len() >= MAX_PENDING_SECRET {
            let _ = reply.send(Err("too many secret-chat requests in flight".into()));
            return;
        }
        let addrs = self.with_known_addrs(&peer, addrs);
        let id = self
            .swarm
            .behaviour_mut()
            .secret
            .send_request_with_addresses(&peer, request, addrs);
        self.pending_secret.insert(id, reply);
    }

    fn on_account(&mut self, event: request_response::Event<AccountQuery, AccountRecord>) {
        use request_response::{Event as E, Message};
        match event {
            E::Message { peer, message, .. } => match message {
                Message::Request { channel, .. } => {
                    let own = self.own_record.clone();
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .account
                        .send_response(channel, own);
                }
                // The decoder checked the signature and every certificate.
                Message::Response { response, .. } => self.on_account_record(peer, response),
            },
            E::OutboundFailure { peer, error, .. } => {
                debug!(%peer, "account record request failed: {error}");
            }
            E::InboundFailure { .. } | E::ResponseSent { .. } => {}
        }
    }

    /// Keeps a record a device sent about its own account, if it really is
    /// about that device's account and lists that device.
    fn on_account_record(&mut self, peer: PeerId, record: AccountRecord) {
        let known = self.book.get(&peer).and_then(|e| e.account);
        let lists_sender =
            crate::keys::device_of_peer(&peer).is_some_and(|d| record.has_device(&d));
        if known != Some(record.body.account) || !lists_sender {
            self.metrics.rejected_frames.inc();
            warn!(%peer, "rejected an account record that is not the sender's own");
            return;
        }
        // Another device of this account: it may know devices this one lacks.
        self.merge_own_record(&record);
        let newer = self
            .records
            .get(&record.body.account)
            .is_none_or(|old| record.supersedes(old));
        if newer
            && (self.records.len() < MAX_ACCOUNT_RECORDS
                || self.records.contains_key(&record.body.account))
        {
            debug!(account = %record.body.account.short(), "account record");
            self.records.insert(record.body.account, record);
        }
    }

    fn on_store(&mut self, event: request_response::Event<StoreRequest, StoreResponse>) {
        use request_response::{Event as E, Message};
        match event {
            E::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let waiting = self.inbound_store.entry(peer).or_default();
                if *waiting >= MAX_INBOUND_SECRET_PER_PEER {
                    debug!(%peer, "too many storage requests from one peer; dropping one");
                    return;
                }
                let inbound = InboundStore {
                    peer,
                    request,
                    answer: Answer::Libp2p(channel),
                };
                match self.store_inbound.try_send(inbound) {
                    Ok(()) => *waiting += 1,
                    Err(_) => debug!(%peer, "storage service busy; dropping a request"),
                }
            }
            E::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending_store.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            E::ResponseSent { .. } => {}
            E::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(%peer, "storage request failed: {error}");
                if let Some(reply) = self.pending_store.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            E::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound storage request failed: {error}");
            }
        }
    }

    fn on_secret(&mut self, event: request_response::Event<SecretRequest, SecretResponse>) {
        use request_response::{Event as E, Message};
        match event {
            E::Message { peer, message, .. } => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    // One peer gets a fair share of the service, not all of it.
                    let waiting = self.inbound_secret.entry(peer).or_default();
                    if *waiting >= MAX_INBOUND_SECRET_PER_PEER {
                        debug!(%peer, "too many secret-chat requests from one peer; dropping one");
                        return;
                    }
                    let inbound = InboundSecret {
                        peer,
                        request,
                        channel,
                    };
                    // Full means the service is behind: no answer, and the
                    // peer's sender retries later.
                    match self.secret_inbound.try_send(inbound) {
                        Ok(()) => *waiting += 1,
                        Err(_) => debug!(%peer, "secret-chat service busy; dropping a request"),
                    }
                }
                Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_secret.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            E::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                debug!(%peer, "secret-chat request failed: {error}");
                if let Some(reply) = self.pending_secret.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            E::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound secret-chat request failed: {error}");
            }
            E::ResponseSent { .. } => {}
        }
    }

    fn status(&self) -> NetStatus {
        // Sorted: the swarm keeps them in hash order, which varies by run.
        let sorted = |addrs: &mut dyn Iterator<Item = &Multiaddr>| {
            let mut v: Vec<String> = addrs.map(ToString::to_string).collect();
            v.sort();
            v
        };
        NetStatus {
            listen_addrs: sorted(&mut self.swarm.listeners()),
            external_addrs: sorted(&mut self.swarm.external_addresses()),
            connected_peers: self.swarm.connected_peers().count(),
            known_peers: self.book.len(),
        }
    }

    fn peers(&self) -> Vec<PeerInfo> {
        let mut out: Vec<PeerInfo> = self
            .connected
            .iter()
            .map(|(peer, c)| {
                let known = self.book.get(peer);
                PeerInfo {
                    peer_id: peer.to_string(),
                    account_id: known.and_then(|e| e.account).map(|a| a.to_string()),
                    name: known.map(|e| e.name.clone()),
                    addresses: c.connections.iter().map(|(_, a)| a.to_string()).collect(),
                    connections: c.connections.len(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        out
    }

    fn dial(
        &mut self,
        peer: Option<PeerId>,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<PeerId, String>>,
    ) {
        if let Some(p) = peer {
            if p == *self.swarm.local_peer_id() {
                let _ = reply.send(Err("that is this node itself".into()));
                return;
            }
            if self.swarm.is_connected(&p) {
                let _ = reply.send(Ok(p));
                return;
            }
            for a in &addrs {
                self.swarm.behaviour_mut().kad.add_address(&p, a.clone());
            }
        }
        if self.pending_dials.len() >= MAX_PENDING_DIALS {
            let _ = reply.send(Err(
                "too many connection attempts in progress; try again shortly".into(),
            ));
            return;
        }
        let opts = match (peer, addrs.as_slice()) {
            // Always: a background redial in flight must not fail the user's dial.
            (Some(p), _) => DialOpts::peer_id(p)
                .addresses(addrs)
                .condition(PeerCondition::Always)
                .build(),
            (None, [addr]) => DialOpts::unknown_peer_id().address(addr.clone()).build(),
            (None, _) => {
                let _ = reply.send(Err("give exactly one address, or a peer id".into()));
                return;
            }
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_dials.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }

    fn redial_due(&mut self) {
        let connected = self.swarm.connected_peers().count();
        if connected >= self.target_peers {
            return;
        }
        let budget = REDIALS_PER_TICK.min(self.target_peers - connected);
        for (peer, addrs) in self.book.due(Instant::now(), budget) {
            debug!(%peer, "redialling");
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if self.swarm.dial(opts).is_err() {
                self.book.on_dial_failed(&peer, Instant::now(), now_ms());
            }
        }
    }

    /// Dials a peer learned from the DHT or mDNS while below the target.
    fn maybe_dial_discovered(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == *self.swarm.local_peer_id()
            || self.swarm.is_connected(&peer)
            || self.swarm.connected_peers().count() >= self.target_peers
        {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        let _ = self.swarm.dial(opts);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<TernBehaviourEvent>) {
        self.metrics.libp2p.record(&event);
        match event {
            SwarmEvent::Behaviour(e) => self.on_behaviour_event(e),
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                info!("listening on {address}/p2p/{}", self.swarm.local_peer_id());
                if let (Some(key), Some(port)) =
                    (self.listeners.get(&listener_id), port_of(&address))
                {
                    let _ = self
                        .state_ks
                        .insert_soon(key.as_bytes(), &port.to_be_bytes());
                }
                self.bus.emit(Event::Listening {
                    address: address.to_string(),
                });
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let _span = tracing::info_span!("peer", peer = %peer_id).entered();
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
                let addr = endpoint.get_remote_address().clone();
                let entry = self.connected.entry(peer_id).or_default();
                entry.connections.push((connection_id, addr.clone()));
                if let ConnectedPoint::Dialer { address, .. } = &endpoint
                    && !entry.dialed_addrs.contains(address)
                {
                    entry.dialed_addrs.push(address.clone());
                }
                if num_established.get() == 1 {
                    debug!(%addr, "connected");
                    self.book.on_connected(&peer_id, now_ms());
                    self.bus.emit(Event::PeerConnected {
                        peer_id: peer_id.to_string(),
                        address: addr.to_string(),
                    });
                    self.swarm
                        .behaviour_mut()
                        .introduce
                        .send_request(&peer_id, self.certificate.clone());
                    self.metrics
                        .connected_peers
                        .set(self.swarm.connected_peers().count() as i64);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                let _span = tracing::info_span!("peer", peer = %peer_id).entered();
                if let Some(c) = self.connected.get_mut(&peer_id) {
                    c.connections.retain(|(id, _)| *id != connection_id);
                }
                if num_established == 0 {
                    debug!(?cause, "disconnected");
                    self.connected.remove(&peer_id);
                    self.book
                        .on_disconnected(&peer_id, Instant::now(), now_ms());
                    self.bus.emit(Event::PeerDisconnected {
                        peer_id: peer_id.to_string(),
                    });
                    self.metrics
                        .connected_peers
                        .set(self.swarm.connected_peers().count() as i64);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                debug!(?peer_id, "dial failed: {error}");
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
                if let Some(p) = peer_id
                    && self.book.on_dial_failed(&p, Instant::now(), now_ms())
                {
                    info!(peer = %p, "forgetting a peer unreachable for a week");
                    let _ = self.peers_ks.remove_soon(&p.to_bytes());
                }
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => debug!(%send_back_addr, "incoming connection failed: {error}"),
            SwarmEvent::ListenerError { error, .. } => warn!("listener error: {error}"),
            SwarmEvent::ExpiredListenAddr { address, .. } => info!(%address, "no longer listening"),
            SwarmEvent::ExternalAddrConfirmed { address } => {
                info!(%address, "external address confirmed")
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: TernBehaviourEvent) {
        match event {
            TernBehaviourEvent::Identify(e) => {
                self.metrics.libp2p.record(&e);
                if let identify::Event::Received { peer_id, info, .. } = e {
                    self.on_identified(peer_id, info);
                }
            }
            TernBehaviourEvent::Introduce(e) => self.on_introduce(e),
            TernBehaviourEvent::Secret(e) => self.on_secret(e),
            TernBehaviourEvent::Store(e) => self.on_store(e),
            TernBehaviourEvent::Account(e) => self.on_account(e),
            TernBehaviourEvent::Link(e) => self.on_link(e),
            TernBehaviourEvent::Kad(e) => {
                self.metrics.libp2p.record(&e);
                if let kad::Event::RoutingUpdated {
                    peer, addresses, ..
                } = e
                {
                    self.maybe_dial_discovered(peer, addresses.into_vec());
                }
            }
            TernBehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    debug!(%peer, %addr, "found on the local network");
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    self.maybe_dial_discovered(peer, vec![addr]);
                }
            }
            TernBehaviourEvent::Ping(e) => self.metrics.libp2p.record(&e),
            TernBehaviourEvent::Relay(e) => {
                self.metrics.libp2p.record(&e);
                debug!(?e, "relay");
            }
            TernBehaviourEvent::Dcutr(e) => {
                self.metrics.libp2p.record(&e);
                debug!(?e, "hole punching");
            }
            other => debug!(?other, "behaviour event"),
        }
    }

    fn on_identified(&mut self, peer: PeerId, info: identify::Info) {
        let _span = tracing::info_span!("peer", %peer).entered();
        if info.protocol_version != IDENTIFY_VERSION {
            debug!(version = %info.protocol_version, "not a Tern node; ignoring");
            return;
        }
        if info.protocols.contains(&KAD_PROTOCOL) {
            for addr in &info.listen_addrs {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
            }
        }
        if let Some(c) = self.connected.get_mut(&peer) {
            c.listen_addrs = info.listen_addrs;
        }
        self.refresh_addrs(&peer);
    }

    /// Updates a remembered peer's addresses from what it advertises plus
    /// what we reached it on (a ticket's address keeps working even if the
    /// peer does not list it), persisting only on change.
    fn refresh_addrs(&mut self, peer: &PeerId) {
        let Some(c) = self.connected.get(peer) else {
            return;
        };
        let addrs: Vec<Multiaddr> = c
            .listen_addrs
            .iter()
            .chain(&c.dialed_addrs)
            .cloned()
            .collect();
        if self.book.set_addrs(peer, addrs) {
            self.persist_peer(peer);
        }
    }

    fn on_introduce(
        &mut self,
        event: request_response::Event<DeviceCertificate, DeviceCertificate>,
    ) {
        use request_response::{Event as E, Message};
        match event {
            E::Message { peer, message, .. } => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    // A rejected introduction gets no answer: dropping the
                    // channel closes the stream.
                    if self.on_certificate(peer, request) {
                        let cert = self.certificate.clone();
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .introduce
                            .send_response(channel, cert);
                    }
                }
                Message::Response { response, .. } => {
                    self.on_certificate(peer, response);
                }
            },
            E::InboundFailure { peer, error, .. } => {
                // Malformed frames never get here: the codec counts those.
                debug!(%peer, "inbound introduction failed: {error}");
            }
            E::OutboundFailure { peer, error, .. } => {
                debug!(%peer, "introduction failed: {error}");
            }
            E::ResponseSent { .. } => {}
        }
    }

    /// A peer presented its device certificate (already signature-checked by
    /// the decoder). Remember it if it is really the device we are talking to;
    /// returns whether it was accepted.
    fn on_certificate(&mut self, peer: PeerId, cert: DeviceCertificate) -> bool {
        let _span = tracing::info_span!("peer", %peer).entered();
        if peer_id_of(&cert.device) != Some(peer) {
            self.metrics.rejected_frames.inc();
            warn!(device_in_certificate = ?cert.device, "rejected a certificate for another device");
            return false;
        }
        let changes = match self.book.remember(peer, cert.account, &cert.name, now_ms()) {
            Ok(c) => c,
            Err(mismatch) => {
                self.metrics.rejected_frames.inc();
                warn!(known = %mismatch.known.short(), claimed = %cert.account.short(),
                    "rejected a certificate moving this device to another account");
                return false;
            }
        };
        if let Some(evicted) = changes.evicted {
            let _ = self.peers_ks.remove_soon(&evicted.to_bytes());
        }
        self.refresh_addrs(&peer);
        if changes.changed {
            self.persist_peer(&peer);
        }
        self.metrics.known_peers.set(self.book.len() as i64);
        if changes.changed {
            info!(account = %cert.account.short(), name = %cert.name, "identified");
            self.bus.emit(Event::PeerIdentified {
                peer_id: peer.to_string(),
                account_id: cert.account.to_string(),
                name: cert.name,
            });
        }
        // Now that we know whose device it is, ask for its account record.
        self.swarm
            .behaviour_mut()
            .account
            .send_request(&peer, AccountQuery);
        true
    }

    fn persist_peer(&self, peer: &PeerId) {
        if let Some(entry) = self.book.get(peer) {
            // Flushed in the background: the event loop never waits for disk,
            // and a node killed a moment later still knows its peers.
            if let Err(e) = self
                .peers_ks
                .insert_record_soon(&peer.to_bytes(), &entry.record())
            {
                warn!(%peer, "cannot save peer: {e}");
            }
        }
    }
}

fn has_zero_port(a: &Multiaddr) -> bool {
    a.iter()
        .any(|p| matches!(p, Protocol::Tcp(0) | Protocol::Udp(0)))
}

fn with_port(a: &Multiaddr, port: u16) -> Multiaddr {
    a.iter()
        .map(|p| match p {
            Protocol::Tcp(0) => Protocol::Tcp(port),
            Protocol::Udp(0) => Protocol::Udp(port),
            other => other,
        })
        .collect()
}

/// Whether nothing else listens on `port` at `spec`'s IP. libp2p's TCP
/// listeners set SO_REUSEPORT, so binding through libp2p would succeed even
/// if another node now holds the port (and the two would split its
/// connections); a plain bind without it tells the truth.
fn port_is_free(spec: &Multiaddr, port: u16) -> bool {
    let ip: Option<std::net::IpAddr> = spec.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    });
    let Some(ip) = ip else {
        return true; // not an IP address: let libp2p decide
    };
    if spec.iter().any(|p| matches!(p, Protocol::Tcp(_))) {
        std::net::TcpListener::bind((ip, port)).is_ok()
    } else {
        std::net::UdpSocket::bind((ip, port)).is_ok()
    }
}

fn port_of(a: &Multiaddr) -> Option<u16> {
    a.iter().find_map(|p| match p {
        Protocol::Tcp(port) | Protocol::Udp(port) => Some(port),
        _ => None,
    })
}

/// One of `peer`'s inbound requests was answered: it may send another.
fn release_inbound(waiting: &mut HashMap<PeerId, usize>, peer: &PeerId) {
    if let Some(n) = waiting.get_mut(peer) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            waiting.remove(peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_held_by_another_listener_is_not_free() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let spec: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        assert!(!port_is_free(&spec, port));
        drop(held);
        assert!(port_is_free(&spec, port));
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let uport = udp.local_addr().unwrap().port();
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
        assert!(!port_is_free(&quic, uport));
    }

    #[test]
    fn zero_ports_are_replaced_by_the_remembered_port() {
        let spec: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
        assert!(has_zero_port(&spec));
        let fixed = with_port(&spec, 4242);
        assert_eq!(fixed.to_string(), "/ip4/127.0.0.1/udp/4242/quic-v1");
        assert!(!has_zero_port(&fixed));
        assert_eq!(port_of(&fixed), Some(4242));
    }
}
