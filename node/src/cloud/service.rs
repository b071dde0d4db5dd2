//! The cloud-chat service: one thread that owns every chat this node keeps
//! ([`Replicas`]), whether it keeps it as a storage peer, as a member
//! device, or both.
//!
//! It works in rounds. A round takes everything waiting (requests from
//! peers, commands from the control API, answers to its own requests),
//! verifies and appends, commits once, and only then answers, acknowledges,
//! emits events and sends what the round produced. Nothing is acknowledged
//! before it is on disk.
//!
//! Towards other nodes it keeps one `Link` per peer with at most one
//! request in flight: pushes of new entries first, then pulls, compares and
//! notifications. A compare (`Summary`) tells what the peer holds, so the
//! same step repairs in both directions: push what it lacks, pull what it
//! has more of. Members and storage peers run the same compares against
//! every other peer of a chat's storage set, every few seconds and at once
//! when a peer connects, so replicas converge after crashes, partitions and
//! new-replica joins without anyone asking.
//!
//! The write quorum is counted from what peers have said they hold: a
//! `Stored` or `Duplicate` answer, or a summary, for the entry's author
//! device and sequence number (an entry is only accepted after that
//! device's previous one, so counts are contiguous).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::{Duration, Instant},
};

use ed25519_dalek::SigningKey;
use libp2p::{Multiaddr, PeerId, request_response::ResponseChannel};
use rand::RngCore;
use tern_protocol::{
    AccountId, DeviceCertificate, DevicePublicKey,
    cloud::{
        AccountEncryptionKey, ChatId, ChatLog, ChatMember, ChatSummary, Composed, Content, Draft,
        EntryHash, EntryKind, SyncRequest, account::StoragePeer, missing_order, they_have_more,
    },
    collections::{HashMap, HashSet},
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{
    ChatInfo, CloudError, MessageView, ReplicaView, SendReceipt,
    account_keys::AccountKeys,
    hosting::Hosting,
    replica::{Outcome, ReplicaError, Replicas},
    wire::{
        EncodedPush, MAX_CHAT_LIST, MAX_PUSH, MAX_PUSH_BYTES, PushResult, StoreRequest,
        StoreResponse,
    },
};
use crate::{
    events::{Event, EventBus},
    hex::hex,
    keys::{device_of_peer, peer_id_of},
    net::{
        NetworkHandle,
        event_loop::direct_ip,
        lane::{Lane, LaneServer},
    },
    service_thread::{self, MainRuntime},
    store::Keyspace,
};

/// Requests from peers waiting for the service.
pub const INBOUND_QUEUE: usize = 256;
/// Commands from the control API waiting for the service.
const COMMAND_QUEUE: usize = 256;
/// Most requests answered by one commit.
const MAX_BATCH: usize = 256;
/// Most peers this node keeps links to.
const MAX_LINKS: usize = 1024;
/// Most entries waiting to be pushed to one peer; beyond that the peer is
/// compared instead (which finds the same entries from its summary).
const MAX_LINK_QUEUE: usize = 20_000;
/// Most requests in flight on one link. Beyond the first, only pushes go,
/// and only while they go out full: a new peer catching up gets the next
/// pushes while it verifies and commits the last ones (two arriving during
/// a flush are committed by the next one together), and a streaming
/// writer's small pushes are not split into more requests and commits.
const MAX_IN_FLIGHT: usize = 4;
/// A round of peers' pushes whose appends reach this many bytes has its
/// flush run on a blocking thread while the next round is verified.
const OFFLOAD_MIN_BYTES: usize = 256 * 1024;
/// How long a peer that refused a lane, or could not be reached on one,
/// gets its pushes over libp2p before it is asked again.
const LANE_RETRY: Duration = Duration::from_secs(300);
/// Most chats one peer may ask this node to pull or notify at once.
const MAX_LINK_CHATS: usize = 1024;
/// How often each storage peer of a chat is compared with.
const COMPARE_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Most storage peers a chat gets by default.
const DEFAULT_STORAGE_PEERS: usize = 5;
/// Most messages one clear may delete.
const MAX_CLEAR: usize = 100_000;

type Reply<T> = oneshot::Sender<Result<T, CloudError>>;

/// A `/tern/store/1` request from a peer, handed over by the event loop
/// (or by a lane, `crate::net::lane`).
pub struct InboundStore {
    pub peer: PeerId,
    pub request: StoreRequest,
    pub answer: Answer,
}

/// Where the answer to a peer's request goes: back over libp2p, or back
/// on the lane it came on.
pub enum Answer {
    Libp2p(ResponseChannel<StoreResponse>),
    Lane(oneshot::Sender<StoreResponse>),
}

/// A new chat's members, as their signed account records (this account's
/// own first: its storage choices come first).
pub struct NewChat {
    pub with: Vec<tern_protocol::cloud::account::AccountRecord>,
    pub title: Option<String>,
    /// `None`: the members' chosen storage peers.
    pub storage: Option<Vec<StoragePeer>>,
    pub quorum: Option<u8>,
}

enum Command {
    New(NewChat, Reply<ChatInfo>),
    List(Reply<Vec<ChatInfo>>),
    Send {
        chat: String,
        text: String,
        reply_to: Option<String>,
        reply: Reply<SendReceipt>,
    },
    Status {
        chat: String,
        message: String,
        /// Also find out whether it was read (decrypts the history).
        with_read: bool,
        reply: Reply<SendReceipt>,
    },
    History {
        chat: String,
        limit: Option<usize>,
        reply: Reply<Vec<MessageView>>,
    },
    Edit {
        chat: String,
        message: String,
        text: String,
        reply: Reply<SendReceipt>,
    },
    Delete {
        chat: String,
        messages: Vec<String>,
        for_everyone: bool,
        reply: Reply<usize>,
    },
    Clear {
        chat: String,
        for_everyone: bool,
        reply: Reply<usize>,
    },
    Read {
        chat: String,
        reply: Reply<Option<SendReceipt>>,
    },
    Probe {
        chat: String,
        reply: Reply<String>,
    },
    Replicas {
        chat: String,
        reply: Reply<Vec<ReplicaView>>,
    },
    Storage {
        chat: String,
        peers: Vec<StoragePeer>,
        quorum: Option<u8>,
        reply: Reply<ChatInfo>,
    },
    RevokeKeys {
        keep: Vec<DevicePublicKey>,
        revoked: Vec<DevicePublicKey>,
        reply: Reply<usize>,
    },
}

/// What one of our requests to a peer was.
#[derive(Debug)]
enum Asked {
    Push {
        chat: ChatId,
        hashes: Vec<EntryHash>,
        /// Compare again afterwards: the push was one batch of several.
        then_compare: bool,
    },
    Summary(ChatId),
    Pull(ChatId),
    Notify,
    ChatsOf,
}

impl Asked {
    /// What it was, in a few words, for logs.
    fn what(&self) -> String {
        match self {
            Asked::Push { chat, hashes, .. } => {
                format!("push of {} to chat {}", hashes.len(), short(chat))
            }
            Asked::Summary(chat) => format!("compare of chat {}", short(chat)),
            Asked::Pull(chat) => format!("pull of chat {}", short(chat)),
            Asked::Notify => "notify".into(),
            Asked::ChatsOf => "chats of".into(),
        }
    }
}

struct Done {
    peer: PeerId,
    asked: Asked,
    result: Result<StoreResponse, String>,
    /// Sent on a lane rather than over libp2p.
    on_lane: bool,
}

/// Why a request to a peer came back with nothing to act on.
enum Failed {
    /// The peer answered, refusing (its reason): it is reachable.
    Refused(String),
    /// No answer: the peer, the connection or the lane failed.
    Unanswered(String),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(reason) => write!(f, "refused: {reason}"),
            Self::Unanswered(why) => f.write_str(why),
        }
    }
}

/// This node's traffic with one peer.
#[derive(Default)]
struct Link {
    addrs: Vec<Multiaddr>,
    /// Requests sent and not answered yet.
    in_flight: usize,
    /// Whether the last push was as large as a push may be.
    last_push_full: bool,
    /// Entries to push, per chat, in causal (lamport) order.
    pushes: BTreeMap<ChatId, BTreeSet<(u64, EntryHash)>>,
    queued: usize,
    /// Chats to pull from it, compare with it, notify it about.
    pull: BTreeSet<ChatId>,
    compare: BTreeSet<ChatId>,
    notify: BTreeSet<ChatId>,
    chats_of: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// `None` until the first answer or failure.
    reachable: Option<bool>,
    last_error: Option<String>,
    lane: LaneState,
}

/// A lane to a peer (`crate::net::lane`): pushes go on it while it is
/// open, over libp2p otherwise.
#[derive(Default)]
enum LaneState {
    #[default]
    Closed,
    Opening,
    Open(Lane),
    /// The peer refused one or could not be reached on it: not asked again
    /// before then.
    Refused(Instant),
}

impl Link {
    fn idle(&self) -> bool {
        self.pushes.is_empty()
            && self.pull.is_empty()
            && self.compare.is_empty()
            && self.notify.is_empty()
            && !self.chats_of
    }
}

/// What one peer holds of one chat, as far as this node knows.
#[derive(Default, Clone)]
struct View {
    /// Entries held per author device (contiguous from seq 0).
    counts: HashMap<DevicePublicKey, u64>,
    entries: u64,
    heads_hash: Option<[u8; 32]>,
    /// When it last answered a compare.
    seen: Option<Instant>,
    compared: Option<Instant>,
    refused: Option<String>,
    in_sync: Option<bool>,
    /// The counts of the summary before the last, and when it came: what
    /// the peer held one compare ago (see [`CloudService::on_summary`]).
    before: Option<(Instant, HashMap<DevicePublicKey, u64>)>,
}

pub struct CloudParts {
    pub replicas: Replicas,
    pub hosting: Hosting,
    pub net: NetworkHandle,
    pub bus: EventBus,
    pub inbound: mpsc::Receiver<InboundStore>,
    /// The account's encryption key derived from the account key: what
    /// chat keys are wrapped to until a device is revoked.
    pub encryption: AccountEncryptionKey,
    /// Where the account's later keys are kept, and those kept so far.
    pub account_keys: (AccountKeys, Vec<(u32, AccountEncryptionKey)>),
    pub signing_key: SigningKey,
    pub certificate: DeviceCertificate,
    /// Messages hidden on this device only (`delete` without
    /// `--for-everyone`).
    pub hidden: Keyspace,
    /// Where peers open lanes to this node; `None` where lanes are off.
    pub lanes: Option<LaneServer>,
}

pub struct CloudService {
    replicas: Replicas,
    hosting: Hosting,
    net: NetworkHandle,
    bus: EventBus,
    inbound: mpsc::Receiver<InboundStore>,
    commands: mpsc::Receiver<Command>,
    member: ChatMember,
    account_keys: AccountKeys,
    account: AccountId,
    device: DevicePublicKey,
    me: PeerId,
    hidden: Keyspace,
    done_tx: mpsc::Sender<Done>,
    /// Where requests to peers run (see [`crate::service_thread`]).
    io: MainRuntime,
    done_rx: mpsc::Receiver<Done>,
    links: HashMap<PeerId, Link>,
    views: HashMap<(ChatId, PeerId), View>,
    /// Chats whose peers acknowledged more of this device's entries since
    /// the last save ([`super::acks`]).
    acks_dirty: BTreeSet<ChatId>,
    /// Connected peers and the account each proved.
    connected: HashMap<PeerId, Option<AccountId>>,
    /// This device's entries not yet at their write quorum.
    /// By sequence number: a peer holding one holds all before it.
    unstored: BTreeMap<ChatId, BTreeMap<u64, EntryHash>>,
    /// Texts this device just sent, for their `chat_message` event once
    /// committed (instead of decrypting them again); at most one round's.
    sent_texts: HashMap<EntryHash, Content>,
    /// Chats whose new entries storage peers should be told about, with
    /// the peer that brought them (not told).
    to_notify: BTreeMap<ChatId, BTreeSet<PeerId>>,
    /// Peer ids of storage peers' device keys.
    peer_ids: std::cell::RefCell<HashMap<DevicePublicKey, PeerId>>,
    /// The previous round's commit, flushing on a blocking thread while
    /// this thread takes the next round's pushes.
    committing: Option<Committing>,
    lanes: Option<LaneServer>,
    /// Lanes this node opened to peers, or why not.
    lane_tx: mpsc::Sender<(PeerId, Result<Lane, String>)>,
    lane_rx: mpsc::Receiver<(PeerId, Result<Lane, String>)>,
}

/// A round whose writes are being flushed, and what it holds back until
/// they are on disk.
struct Committing {
    flush: tokio::task::JoinHandle<Result<(), String>>,
    answers: Vec<(PeerId, Answer, StoreResponse)>,
    appended: Vec<(ChatId, EntryHash)>,
    replies: Vec<Pending>,
}

/// The control API's handle on the service.
#[derive(Clone)]
pub struct CloudHandle {
    tx: mpsc::Sender<Command>,
}

impl CloudHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, CloudError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| CloudError::Stopped)?;
        rx.await.map_err(|_| CloudError::Stopped)?
    }

    pub async fn new_chat(&self, new: NewChat) -> Result<ChatInfo, CloudError> {
        self.call(|r| Command::New(new, r)).await
    }
    pub async fn list(&self) -> Result<Vec<ChatInfo>, CloudError> {
        self.call(Command::List).await
    }
    pub async fn send(
        &self,
        chat: String,
        text: String,
        reply_to: Option<String>,
    ) -> Result<SendReceipt, CloudError> {
        self.call(|reply| Command::Send {
            chat,
            text,
            reply_to,
            reply,
        })
        .await
    }
    /// Where a message stands; `with_read` also looks for receipts, which
    /// costs a pass over the history.
    pub async fn status(
        &self,
        chat: String,
        message: String,
        with_read: bool,
    ) -> Result<SendReceipt, CloudError> {
        self.call(|reply| Command::Status {
            chat,
            message,
            with_read,
            reply,
        })
        .await
    }
    pub async fn history(
        &self,
        chat: String,
        limit: Option<usize>,
    ) -> Result<Vec<MessageView>, CloudError> {
        self.call(|reply| Command::History { chat, limit, reply })
            .await
    }
    pub async fn edit(
        &self,
        chat: String,
        message: String,
        text: String,
    ) -> Result<SendReceipt, CloudError> {
        self.call(|reply| Command::Edit {
            chat,
            message,
            text,
            reply,
        })
        .await
    }
    pub async fn delete(
        &self,
        chat: String,
        messages: Vec<String>,
        for_everyone: bool,
    ) -> Result<usize, CloudError> {
        self.call(|reply| Command::Delete {
            chat,
            messages,
            for_everyone,
            reply,
        })
        .await
    }
    pub async fn clear(&self, chat: String, for_everyone: bool) -> Result<usize, CloudError> {
        self.call(|reply| Command::Clear {
            chat,
            for_everyone,
            reply,
        })
        .await
    }
    pub async fn read(&self, chat: String) -> Result<Option<SendReceipt>, CloudError> {
        self.call(|reply| Command::Read { chat, reply }).await
    }
    /// Asks every storage peer of the chat for its summary now; returns the
    /// chat's full id.
    pub async fn probe(&self, chat: String) -> Result<String, CloudError> {
        self.call(|reply| Command::Probe { chat, reply }).await
    }
    pub async fn replicas(&self, chat: String) -> Result<Vec<ReplicaView>, CloudError> {
        self.call(|reply| Command::Replicas { chat, reply }).await
    }
    /// After `revoked` devices of this account were revoked: a new account
    /// encryption key, kept on disk and sealed to this device and to each
    /// of `keep`, and a new chat key wrapped to it in every chat of the
    /// account. Returns how many chats.
    pub async fn revoke_keys(
        &self,
        keep: Vec<DevicePublicKey>,
        revoked: Vec<DevicePublicKey>,
    ) -> Result<usize, CloudError> {
        self.call(|reply| Command::RevokeKeys {
            keep,
            revoked,
            reply,
        })
        .await
    }
    pub async fn set_storage(
        &self,
        chat: String,
        peers: Vec<StoragePeer>,
        quorum: Option<u8>,
    ) -> Result<ChatInfo, CloudError> {
        self.call(|reply| Command::Storage {
            chat,
            peers,
            quorum,
            reply,
        })
        .await
    }
}

fn chat_hex(chat: &ChatId) -> String {
    hex(&chat.0)
}

fn short(chat: &ChatId) -> String {
    hex(&chat.0[..2])
}

fn random32() -> [u8; 32] {
    let mut r = [0; 32];
    rand::rngs::OsRng.fill_bytes(&mut r);
    r
}

/// The majority of `n` peers.
pub fn majority(n: usize) -> u8 {
    (n / 2 + 1).min(u8::MAX as usize) as u8
}

/// A storage peer as the protocol names it, from a libp2p peer id.
pub fn storage_peer(peer: &PeerId, addrs: Vec<Vec<u8>>) -> Option<StoragePeer> {
    Some(StoragePeer {
        node: device_of_peer(peer)?,
        addrs,
    })
}

/// A storage peer from a peer id or a multiaddr ending in `/p2p/PEER`.
pub fn parse_storage_peer(s: &str) -> Result<StoragePeer, String> {
    use libp2p::multiaddr::Protocol;
    let s = s.trim();
    let (peer, addrs) = if let Ok(peer) = s.parse::<PeerId>() {
        (peer, Vec::new())
    } else {
        let addr: Multiaddr = s.parse().map_err(|_| {
            format!("{s:?} is neither a peer id nor a multiaddr ending in /p2p/PEER")
        })?;
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(format!("{s:?} does not end in /p2p/PEER"));
        };
        let bare: Multiaddr = addr
            .iter()
            .filter(|p| !matches!(p, Protocol::P2p(_)))
            .collect();
        (peer, vec![bare.to_vec()])
    };
    storage_peer(&peer, addrs).ok_or_else(|| format!("{s:?}: that peer id carries no key"))
}

fn addrs_of(peer: &StoragePeer) -> Vec<Multiaddr> {
    peer.addrs
        .iter()
        .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
        .collect()
}

impl CloudService {
    pub fn new(parts: CloudParts) -> Result<(Self, CloudHandle), CloudError> {
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let (done_tx, done_rx) = mpsc::channel(MAX_LINKS * MAX_IN_FLIGHT);
        let (lane_tx, lane_rx) = mpsc::channel(MAX_LINKS);
        let device = parts.certificate.device;
        let me = peer_id_of(&device).ok_or_else(|| CloudError::Store("bad device key".into()))?;
        let mut member = ChatMember::new(parts.encryption, parts.signing_key, parts.certificate)
            .map_err(|e| CloudError::Store(e.to_string()))?;
        let (account_keys, kept) = parts.account_keys;
        for (generation, key) in kept {
            member.add_encryption_key(generation, key);
        }
        let mut this = Self {
            replicas: parts.replicas,
            hosting: parts.hosting,
            net: parts.net,
            bus: parts.bus,
            inbound: parts.inbound,
            commands,
            account: member.account(),
            member,
            account_keys,
            device,
            me,
            hidden: parts.hidden,
            done_tx,
            done_rx,
            io: MainRuntime::default(),
            links: HashMap::default(),
            views: HashMap::default(),
            acks_dirty: BTreeSet::new(),
            connected: HashMap::default(),
            unstored: BTreeMap::new(),
            sent_texts: HashMap::default(),
            to_notify: BTreeMap::new(),
            peer_ids: Default::default(),
            committing: None,
            lanes: parts.lanes,
            lane_tx,
            lane_rx,
        };
        // What peers acknowledged before the restart still holds; the rest
        // is "sending" until compares find out what is stored.
        let chats: Vec<ChatId> = this.replicas.chats().copied().collect();
        for chat in &chats {
            let Some(dir) = this.replicas.chat_dir(chat) else {
                continue;
            };
            for (peer, count) in super::acks::load(&dir) {
                let view = this.views.entry((*chat, peer)).or_default();
                view.counts.insert(this.device, count);
                view.entries = count;
            }
        }
        for chat in chats {
            if let Some(log) = this.replicas.log(&chat) {
                let mine: BTreeMap<u64, EntryHash> = log
                    .device_entries_from(&this.device, 0)
                    .iter()
                    .enumerate()
                    .map(|(seq, h)| (seq as u64, *h))
                    .collect();
                if !mine.is_empty() {
                    this.unstored.insert(chat, mine);
                }
            }
            this.check_stored(chat);
        }
        Ok((this, CloudHandle { tx }))
    }

    /// Runs on a thread of its own until `shutdown` flips.
    pub fn spawn(mut self, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        self.io = MainRuntime::current();
        service_thread::start("tern-cloud", move || self.run(shutdown))
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut events = self.bus.subscribe_peers();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.schedule_compares(true);
        loop {
            let mut round = Round::default();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                // A finished flush lets its round's answers out at once.
                flushed = async {
                    match self.committing.as_mut() {
                        Some(c) => (&mut c.flush).await,
                        None => std::future::pending().await,
                    }
                } => self.settle(Some(flushed)).await,
                Some(r) = self.inbound.recv() => round.inbound.push(r),
                Some(c) = self.commands.recv() => round.commands.push(c),
                Some(d) = self.done_rx.recv() => round.done.push(d),
                Some((peer, lane)) = self.lane_rx.recv() => self.on_lane(peer, lane),
                e = events.recv() => match e {
                    Ok(e) => self.on_event(e.event).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.schedule_compares(true),
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    let lost = self.replicas.forget_lost_bodies();
                    self.schedule_compares(lost);
                    self.save_acks();
                }
            }
            // A round that must wait for the flush in flight waits before
            // it takes what else is waiting: whatever came meanwhile joins
            // it, and one flush covers all of it.
            if !round.done.is_empty() || !round.commands.is_empty() {
                self.settle(None).await;
            }
            // Everything else already waiting joins this round.
            while round.len() < MAX_BATCH {
                if let Ok(r) = self.inbound.try_recv() {
                    round.inbound.push(r);
                } else if let Ok(d) = self.done_rx.try_recv() {
                    round.done.push(d);
                } else if let Ok(c) = self.commands.try_recv() {
                    round.commands.push(c);
                } else {
                    break;
                }
            }
            if !round.is_empty() {
                self.round(round).await;
            }
            self.refresh_changed_accounts();
            self.take_keys_from_records();
            self.keep_learned_keys();
            self.pump();
        }
        self.settle(None).await;
        self.save_acks();
        debug!("cloud-chat service stopped");
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            // A device met for the first time.
            Event::PeerIdentified {
                peer_id,
                account_id,
                ..
            } => {
                if let (Ok(peer), Ok(account)) =
                    (PeerId::from_str(&peer_id), AccountId::from_str(&account_id))
                {
                    self.met(peer, account);
                }
            }
            Event::PeerConnected { peer_id, .. } => {
                let Ok(peer) = PeerId::from_str(&peer_id) else {
                    return;
                };
                self.connected.entry(peer).or_insert(None);
                self.peer_back(peer);
                // A device met before: its account is known already.
                if let Ok(Some(known)) = self.net.device(peer).await
                    && let Some(account) = known.account
                {
                    self.met(peer, account);
                }
            }
            Event::PeerDisconnected { peer_id } => {
                if let Ok(peer) = PeerId::from_str(&peer_id) {
                    self.connected.remove(&peer);
                }
            }
            _ => {}
        }
    }

    /// `peer` is connected and proved `account`.
    fn met(&mut self, peer: PeerId, account: AccountId) {
        let first = self.connected.insert(peer, Some(account)) != Some(Some(account));
        if !first {
            return;
        }
        self.peer_back(peer);
        // A storage peer may keep chats of this account that this device
        // has not seen yet (a new device, or one that was offline when a
        // chat began).
        if let Some(link) = self.link(peer) {
            link.chats_of = true;
        }
    }

    /// A peer (re)connected: retry at once, and compare every shared chat.
    fn peer_back(&mut self, peer: PeerId) {
        let chats: Vec<ChatId> = self
            .replicas
            .chats()
            .copied()
            .filter(|c| self.compare_peers(c).contains(&peer))
            .collect();
        if let Some(link) = self.links.get_mut(&peer) {
            link.backoff = Duration::ZERO;
            link.retry_at = None;
            debug!(%peer, in_flight = link.in_flight, chats = chats.len(), "storage peer back");
        }
        if !chats.is_empty()
            && let Some(link) = self.link(peer)
        {
            link.compare.extend(chats);
        }
    }

    fn link(&mut self, peer: PeerId) -> Option<&mut Link> {
        if peer == self.me {
            return None;
        }
        if !self.links.contains_key(&peer) && self.links.len() >= MAX_LINKS {
            // Forget an idle link to make room.
            let idle = self
                .links
                .iter()
                .find(|(_, l)| l.idle() && l.in_flight == 0)
                .map(|(p, _)| *p)?;
            self.links.remove(&idle);
        }
        Some(self.links.entry(peer).or_default())
    }

    /// Whether this device's account is a member of `chat` now.
    fn is_member(&self, chat: &ChatId) -> bool {
        self.replicas
            .log(chat)
            .is_some_and(|l| l.current_membership().is_member(&self.account))
    }

    /// The chat's storage set, as peer ids with addresses, and its quorum.
    fn storage_of(
        &self,
        log: &ChatLog,
        at: Option<&EntryHash>,
    ) -> (Vec<(PeerId, StoragePeer)>, u8) {
        // The genesis comes before any storage entry: it is kept where the
        // chat is.
        let set = match at {
            Some(h) => log
                .storage_set_counting(h)
                .map(|(peers, quorum)| (peers.into_owned(), quorum)),
            None => log.storage_set(),
        };
        let Some((peers, quorum)) = set else {
            return (Vec::new(), 1);
        };
        let peers = peers
            .into_iter()
            .filter_map(|p| Some((self.peer_of(&p.node)?, p)))
            .collect();
        (peers, quorum)
    }

    /// The libp2p peer id of a device key, remembered: deriving it costs a
    /// point decompression, and the quorum is counted on every answer.
    fn peer_of(&self, device: &DevicePublicKey) -> Option<PeerId> {
        if let Some(p) = self.peer_ids.borrow().get(device) {
            return Some(*p);
        }
        let peer = peer_id_of(device)?;
        let mut cache = self.peer_ids.borrow_mut();
        if cache.len() >= MAX_LINKS {
            cache.clear();
        }
        cache.insert(*device, peer);
        Some(peer)
    }

    /// The peers this node compares `chat` with: the other storage peers,
    /// if this node is a member or one of them.
    fn compare_peers(&self, chat: &ChatId) -> Vec<PeerId> {
        let Some(log) = self.replicas.log(chat) else {
            return Vec::new();
        };
        let (set, _) = self.storage_of(log, None);
        let in_set = set.iter().any(|(p, _)| *p == self.me);
        if !in_set && !self.is_member(chat) {
            return Vec::new();
        }
        set.into_iter()
            .map(|(p, _)| p)
            .filter(|p| *p != self.me)
            .collect()
    }

    /// Queues compares that are due (all of them with `now`).
    fn schedule_compares(&mut self, now: bool) {
        let at = Instant::now();
        let chats: Vec<ChatId> = self.replicas.chats().copied().collect();
        for chat in chats {
            self.schedule_chat_compares(chat, at, |compared| {
                now || compared.is_none_or(|t| at.duration_since(t) >= COMPARE_EVERY)
            });
        }
    }

    /// Compares `chat` with each of its peers for which `due` holds, given
    /// when they were last compared.
    fn schedule_chat_compares(
        &mut self,
        chat: ChatId,
        at: Instant,
        due: impl Fn(Option<Instant>) -> bool,
    ) {
        for peer in self.compare_peers(&chat) {
            if due(self.views.get(&(chat, peer)).and_then(|v| v.compared)) {
                self.remember_addrs(&chat, peer);
                if let Some(link) = self.link(peer) {
                    link.compare.insert(chat);
                }
                self.views.entry((chat, peer)).or_default().compared = Some(at);
            }
        }
    }

    /// Addresses the storage set names for `peer`, for dialling it.
    fn remember_addrs(&mut self, chat: &ChatId, peer: PeerId) {
        let Some(log) = self.replicas.log(chat) else {
            return;
        };
        let (set, _) = self.storage_of(log, None);
        let addrs: Vec<Multiaddr> = set
            .iter()
            .filter(|(p, _)| *p == peer)
            .flat_map(|(_, s)| addrs_of(s))
            .collect();
        if let Some(link) = self.link(peer)
            && !addrs.is_empty()
        {
            link.addrs = addrs;
        }
    }

    // ---------------------------------------------------------------- rounds

    /// Takes one round of work. Pushes from peers are taken while the
    /// previous round's commit flushes; answers to peers' results and to
    /// commands count what is durable, so those first wait for it.
    async fn round(&mut self, round: Round) {
        let only_peers = round.done.is_empty() && round.commands.is_empty();
        if !only_peers {
            self.settle(None).await;
        }
        let policy = self.hosting.policy().await;
        let mut answers = Vec::new();
        for InboundStore {
            peer,
            request,
            answer,
        } in round.inbound
        {
            let response = self.answer(peer, request, &policy);
            answers.push((peer, answer, response));
        }
        for done in round.done {
            self.on_done(done, &policy);
        }
        let mut replies = Vec::new();
        for command in round.commands {
            replies.push(self.command(command));
        }

        // This device's entries of the round are signed, a run per chat,
        // and written. Nothing is acknowledged before it is on disk: the
        // round's effects wait for its flush, which starts once the
        // previous one is done (so effects go out in order).
        let signed = self.replicas.sign_composed(&self.member);
        let appended = self.replicas.take_appended();
        let started = signed.and_then(|()| self.replicas.start_commit());
        self.settle(None).await;
        match started {
            // Nothing would overlap the flush, or it is small: flushing
            // here costs less than handing it to another thread.
            Ok(job) if !only_peers || job.bytes() < OFFLOAD_MIN_BYTES => {
                let committed = self.replicas.finish_commit(job.run());
                if let Err(e) = &committed {
                    warn!("cannot commit cloud chats: {e}");
                }
                self.release(committed, answers, appended, replies).await;
            }
            Ok(job) => {
                self.committing = Some(Committing {
                    flush: tokio::task::spawn_blocking(move || job.run()),
                    answers,
                    appended,
                    replies,
                });
            }
            Err(e) => {
                warn!("cannot commit cloud chats: {e}");
                self.release(Err(e), answers, appended, replies).await;
            }
        }
    }

    /// Waits for the commit in flight, if any (or takes its result), and
    /// lets out what it held back.
    async fn settle(
        &mut self,
        flushed: Option<Result<Result<(), String>, tokio::task::JoinError>>,
    ) {
        let Some(c) = self.committing.take() else {
            return;
        };
        let flushed = match flushed {
            Some(r) => r,
            None => c.flush.await,
        };
        let flushed = flushed.unwrap_or_else(|e| Err(format!("the flush did not finish: {e}")));
        let committed = self.replicas.finish_commit(flushed);
        if let Err(e) = &committed {
            warn!("cannot commit cloud chats: {e}");
        }
        self.release(committed, c.answers, c.appended, c.replies)
            .await;
    }

    async fn release(
        &mut self,
        committed: Result<(), ReplicaError>,
        answers: Vec<(PeerId, Answer, StoreResponse)>,
        appended: Vec<(ChatId, EntryHash)>,
        replies: Vec<Pending>,
    ) {
        for (peer, answer, response) in answers {
            let response = match (&committed, response) {
                (Ok(()), r) => r,
                // Entries served from memory are verified whatever the disk
                // did; a summary's counts would be taken as acknowledgements
                // of what this node could not flush.
                (Err(_), r @ StoreResponse::Synced(_)) => r,
                (Err(_), _) => StoreResponse::refused("this node cannot store right now"),
            };
            match answer {
                Answer::Libp2p(channel) => {
                    let _ = self.net.store_respond(peer, channel, response).await;
                }
                Answer::Lane(reply) => {
                    let _ = reply.send(response);
                }
            }
        }
        if committed.is_ok() {
            self.after_commit(appended);
        }
        let failed = committed.err().map(|e| e.to_string());
        for reply in replies {
            self.finish(reply, failed.clone());
        }
    }

    /// Answers a command once its round is on disk.
    fn finish(&mut self, pending: Pending, failed: Option<String>) {
        let fail = |r: Result<(), CloudError>| match (&failed, r) {
            (Some(e), _) => Err(CloudError::Store(e.clone())),
            (None, r) => r,
        };
        match pending {
            Pending::Ready(f) => f(failed),
            Pending::Info(r, reply) => {
                let r = r.and_then(|c| {
                    fail(Ok(()))?;
                    self.info(c)
                        .ok_or_else(|| CloudError::NoSuchChat(chat_hex(&c)))
                });
                let _ = reply.send(r);
            }
            Pending::Receipt(r, reply) => {
                let r = r.and_then(|(c, h)| {
                    fail(Ok(()))?;
                    Ok(self.receipt(c, h, false))
                });
                let _ = reply.send(r);
            }
            Pending::MaybeReceipt(r, reply) => {
                let r = r.and_then(|m| {
                    fail(Ok(()))?;
                    Ok(m.map(|(c, h)| self.receipt(c, h, false)))
                });
                let _ = reply.send(r);
            }
        }
    }

    /// What a peer's request gets.
    fn answer(
        &mut self,
        peer: PeerId,
        request: StoreRequest,
        policy: &super::hosting::HostPolicy,
    ) -> StoreResponse {
        match request {
            StoreRequest::Push { entries } => {
                let chats: BTreeSet<ChatId> =
                    entries.iter().map(|e| e.header.header.chat).collect();
                // This device keeps its own account's chats whatever the
                // policy says, new ones included (their genesis names it).
                let account = self.account;
                let own = chats.len() == 1
                    && chats.iter().all(|c| {
                        self.is_member(c)
                            || (self.replicas.log(c).is_none()
                                && entries
                                    .first()
                                    .is_some_and(|e| match &e.header.header.kind {
                                        EntryKind::Genesis { members, .. } => {
                                            members.iter().any(|m| m.account == account)
                                        }
                                        _ => false,
                                    }))
                    });
                match self
                    .replicas
                    .accept(if own { None } else { Some(policy) }, entries)
                {
                    Ok(outcomes) => {
                        if outcomes.contains(&Outcome::Stored) {
                            for chat in &chats {
                                self.to_notify.entry(*chat).or_default().insert(peer);
                            }
                        }
                        if outcomes.iter().any(|o| matches!(o, Outcome::Missing(_))) {
                            // The pusher has what this node lacks: compare.
                            for chat in &chats {
                                if let Some(link) = self.link(peer) {
                                    link.compare.insert(*chat);
                                }
                            }
                        }
                        StoreResponse::Pushed {
                            results: outcomes
                                .into_iter()
                                .map(|o| match o {
                                    Outcome::Stored => PushResult::Stored,
                                    Outcome::Duplicate => PushResult::Duplicate,
                                    Outcome::Missing(_) => PushResult::Missing,
                                    Outcome::Refused(r) => PushResult::refused(&r.to_string()),
                                    Outcome::Rejected(r) => PushResult::rejected(&r),
                                })
                                .collect(),
                        }
                    }
                    Err(e) => {
                        warn!("cannot store pushed entries: {e}");
                        StoreResponse::refused("this node cannot store right now")
                    }
                }
            }
            StoreRequest::Sync(req) => match self.replicas.serve(&req) {
                Ok(r) => StoreResponse::Synced(r),
                Err(e) => StoreResponse::refused(&e.to_string()),
            },
            StoreRequest::Summary { chat } => StoreResponse::Summary(self.replicas.summary(&chat)),
            StoreRequest::Notify { chat } => {
                if let Some(link) = self.link(peer)
                    && link.pull.len() < MAX_LINK_CHATS
                {
                    link.pull.insert(chat);
                }
                StoreResponse::Noted
            }
            StoreRequest::OpenLane => match self.lanes.as_ref().map(|l| l.offer(peer)) {
                Some(Some(offer)) => StoreResponse::Lane(offer),
                Some(None) => {
                    StoreResponse::refused("too many lanes waiting to open; push over libp2p")
                }
                None => StoreResponse::refused("this node does not open lanes"),
            },
            StoreRequest::ChatsOf => {
                let Some(Some(account)) = self.connected.get(&peer).copied() else {
                    return StoreResponse::refused("this node does not know your account yet");
                };
                let chats = self
                    .replicas
                    .chats()
                    .filter(|c| {
                        self.replicas
                            .log(c)
                            .is_some_and(|l| l.current_membership().is_member(&account))
                    })
                    .take(MAX_CHAT_LIST)
                    .copied()
                    .collect();
                StoreResponse::Chats(chats)
            }
            // Sent as a `Push`, and so decoded as one.
            StoreRequest::EncodedPush(_) => StoreResponse::refused("not a request"),
        }
    }

    /// One of this node's requests came back.
    fn on_done(&mut self, done: Done, policy: &super::hosting::HostPolicy) {
        let Done {
            peer,
            asked,
            result,
            on_lane,
        } = done;
        let response = match result {
            Ok(StoreResponse::Refused { reason }) => Err(Failed::Refused(reason)),
            Ok(r) => Ok(r),
            Err(e) => Err(Failed::Unanswered(e)),
        };
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        link.in_flight = link.in_flight.saturating_sub(1);
        let response = match response {
            Ok(r) => {
                debug!(%peer, in_flight = link.in_flight, "storage request answered: {}", asked.what());
                link.backoff = Duration::ZERO;
                link.retry_at = None;
                link.last_error = None;
                self.set_reachable(peer, true);
                r
            }
            Err(Failed::Unanswered(why)) if on_lane => {
                // The lane failed, not necessarily the peer: what it
                // carried is compared again and pushed over libp2p.
                info!(%peer, "lane failed; pushes go over libp2p: {why}");
                link.lane = LaneState::Refused(Instant::now() + LANE_RETRY);
                if let Asked::Push { chat, .. } = asked {
                    link.compare.insert(chat);
                }
                return;
            }
            Err(failed) => {
                let unreachable = matches!(failed, Failed::Unanswered(_));
                let why = failed.to_string();
                debug!(%peer, ?asked, "storage request failed: {why}");
                link.backoff = (link.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                link.retry_at = Some(Instant::now() + link.backoff);
                link.last_error = Some(why.clone());
                match asked {
                    Asked::Push { chat, .. } | Asked::Summary(chat) => {
                        link.compare.insert(chat);
                        if let Some(v) = self.views.get_mut(&(chat, peer)) {
                            v.refused = Some(why);
                        }
                    }
                    Asked::Pull(chat) => {
                        link.pull.insert(chat);
                    }
                    Asked::Notify | Asked::ChatsOf => {}
                }
                if unreachable {
                    self.set_reachable(peer, false);
                }
                return;
            }
        };
        match (asked, response) {
            (
                Asked::Push {
                    chat,
                    hashes,
                    then_compare,
                },
                StoreResponse::Pushed { results },
            ) => {
                let mut missing = then_compare;
                let mut refused = None;
                for (hash, result) in hashes.iter().zip(results) {
                    match result {
                        PushResult::Stored | PushResult::Duplicate => self.held(chat, peer, hash),
                        PushResult::Missing => missing = true,
                        PushResult::Refused(r) | PushResult::Rejected(r) => {
                            refused = Some(r);
                        }
                    }
                }
                if let Some(r) = &refused {
                    warn!(%peer, chat = %short(&chat), "a storage peer did not take an entry: {r}");
                }
                let view = self.views.entry((chat, peer)).or_default();
                if refused.is_some() {
                    view.refused = refused;
                } else if view.counts.values().any(|c| *c > 0) {
                    view.refused = None;
                }
                if missing && let Some(link) = self.links.get_mut(&peer) {
                    link.compare.insert(chat);
                }
                self.check_stored(chat);
            }
            (Asked::Summary(chat), StoreResponse::Summary(summary)) => {
                self.on_summary(chat, peer, summary);
            }
            (Asked::Pull(chat), StoreResponse::Synced(response)) => {
                self.on_pulled(chat, peer, response, policy);
            }
            (Asked::Notify, StoreResponse::Noted) => {}
            (Asked::ChatsOf, StoreResponse::Chats(chats)) => {
                let unknown: Vec<ChatId> = chats
                    .into_iter()
                    .filter(|c| self.replicas.log(c).is_none())
                    .take(MAX_LINK_CHATS)
                    .collect();
                if !unknown.is_empty() {
                    info!(%peer, chats = unknown.len(), "a storage peer keeps chats this device lacks; pulling them");
                }
                if let Some(link) = self.links.get_mut(&peer) {
                    link.pull.extend(unknown);
                }
            }
            (asked, response) => {
                warn!(%peer, ?asked, "a storage peer answered with something else: {response:?}");
            }
        }
    }

    fn set_reachable(&mut self, peer: PeerId, reachable: bool) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if link.reachable == Some(reachable) {
            return;
        }
        link.reachable = Some(reachable);
        let chats: Vec<ChatId> = self
            .replicas
            .chats()
            .copied()
            .filter(|c| self.compare_peers(c).contains(&peer))
            .collect();
        for chat in chats {
            let view = self.views.get(&(chat, peer)).cloned().unwrap_or_default();
            self.bus.emit(Event::ReplicaHealth {
                chat_id: chat_hex(&chat),
                peer_id: peer.to_string(),
                reachable,
                in_sync: view.in_sync.unwrap_or(false),
                entries: view.entries,
            });
        }
    }

    /// `peer` holds `hash` (and so everything of its author device before it).
    fn held(&mut self, chat: ChatId, peer: PeerId, hash: &EntryHash) {
        let Some(entry) = self.replicas.log(&chat).and_then(|l| l.get(hash)) else {
            return;
        };
        let device = entry.header.author_device();
        let count = entry.header.header.seq + 1;
        let view = self.views.entry((chat, peer)).or_default();
        let c = view.counts.entry(device).or_default();
        if *c < count {
            view.entries += count - *c;
            *c = count;
            if device == self.device {
                self.acks_dirty.insert(chat);
            }
        }
    }

    /// Saves what peers acknowledged of this device's entries, for the
    /// chats where that grew.
    fn save_acks(&mut self) {
        for chat in std::mem::take(&mut self.acks_dirty) {
            let Some(dir) = self.replicas.chat_dir(&chat) else {
                continue;
            };
            let counts: HashMap<PeerId, u64> = self
                .views
                .iter()
                .filter(|((c, _), _)| *c == chat)
                .filter_map(|((_, p), v)| Some((*p, *v.counts.get(&self.device)?)))
                .collect();
            if let Err(e) = super::acks::save(&dir, &counts) {
                warn!(chat = %short(&chat), "cannot save acknowledgements: {e}");
            }
        }
    }

    fn on_summary(&mut self, chat: ChatId, peer: PeerId, summary: Option<ChatSummary>) {
        let Some(log) = self.replicas.log(&chat) else {
            return;
        };
        let theirs = summary.unwrap_or_else(|| ChatSummary::of(&ChatLog::new(chat)));
        let ours = ChatSummary::of(log);
        let in_sync = ours.heads_hash == theirs.heads_hash;
        let now = Instant::now();
        // Repair only what is not on its way. While a writer streams, every
        // storage peer is a little behind some other: pulling that gap, or
        // pushing another writer's entries, would send each entry twice.
        // So this node pulls what the peer held one compare ago and still
        // lacks here (or anything, when it has no recent earlier summary:
        // after a start, a partition or joining), and pushes only its own
        // entries (their writer's retry), unless the peer keeps nothing of
        // the chat's current membership and storage set yet: it cannot
        // know it should pull.
        // (An earlier summary younger than a second says nothing yet: the
        // next compare decides.)
        let before = self
            .views
            .get(&(chat, peer))
            .and_then(|v| v.before.as_ref())
            .filter(|(at, _)| now.duration_since(*at) <= COMPARE_EVERY * 3);
        let settled =
            before.is_none_or(|(at, _)| now.duration_since(*at) >= Duration::from_secs(1));
        let pull = match before {
            Some((_, counts)) => settled && counts.iter().any(|(d, c)| *c > log.next_seq(d)),
            None => they_have_more(log, &theirs),
        };
        // Entries held without a body that was not purged (it came without,
        // or was found damaged here): a pull asks for them.
        let pull = pull || (settled && log.missing_bodies().next().is_some());
        // What one compare may queue for the peer.
        let room = self
            .links
            .get(&peer)
            .map_or(0, |l| MAX_LINK_QUEUE.saturating_sub(l.queued))
            .min(MAX_LINK_QUEUE / 4);
        let knows_state = {
            let counts: HashMap<&DevicePublicKey, u64> = theirs
                .devices
                .iter()
                .map(|d| (&d.device, d.count))
                .collect();
            log.state_changes()
                .all(|(d, seq)| counts.get(&d).is_some_and(|c| *c > seq))
        };
        let (lacking, more) = if !knows_state {
            // What it lacks, queued for pushes back to back (parents first);
            // compare again after them.
            missing_order(log, &theirs, room)
        } else {
            let has = theirs
                .devices
                .iter()
                .find(|d| d.device == self.device)
                .map_or(0, |d| d.count);
            let run = log.device_entries_from(&self.device, has);
            let take = run.len().min(room);
            let lacking = run[..take]
                .iter()
                .filter_map(|h| Some((log.lamport(h)?, *h)))
                .collect();
            (lacking, take < run.len())
        };
        let counts: HashMap<DevicePublicKey, u64> =
            theirs.devices.iter().map(|d| (d.device, d.count)).collect();
        let view = self.views.entry((chat, peer)).or_default();
        if view.counts.get(&self.device) != counts.get(&self.device) {
            self.acks_dirty.insert(chat);
        }
        if settled {
            view.before = Some((now, counts.clone()));
        }
        view.counts = counts;
        view.entries = theirs.entries;
        view.heads_hash = Some(theirs.heads_hash);
        view.seen = Some(Instant::now());
        let was = view.in_sync.replace(in_sync);
        if was != Some(in_sync) {
            self.bus.emit(Event::ReplicaHealth {
                chat_id: chat_hex(&chat),
                peer_id: peer.to_string(),
                reachable: true,
                in_sync,
                entries: theirs.entries,
            });
        }
        if let Some(link) = self.links.get_mut(&peer) {
            if pull && link.pull.len() < MAX_LINK_CHATS {
                link.pull.insert(chat);
            }
            if !lacking.is_empty() {
                let queue = link.pushes.entry(chat).or_default();
                let before = queue.len();
                queue.extend(lacking);
                link.queued += queue.len() - before;
                if more {
                    link.compare.insert(chat);
                }
            }
        }
        self.check_stored(chat);
    }

    fn on_pulled(
        &mut self,
        chat: ChatId,
        peer: PeerId,
        response: tern_protocol::cloud::SyncResponse,
        policy: &super::hosting::HostPolicy,
    ) {
        if response.chat != chat || response.entries.is_empty() {
            return;
        }
        let known = self.replicas.log(&chat).is_some();
        if !known {
            // A chat this device does not hold yet: only if it is a member.
            let member = response
                .entries
                .first()
                .is_some_and(|e| match &e.header.header.kind {
                    EntryKind::Genesis { members, .. } => {
                        e.header.header.chat == chat
                            && members.iter().any(|m| m.account == self.account)
                    }
                    _ => false,
                });
            if !member {
                debug!(%peer, chat = %short(&chat), "not pulling a chat this account is not in");
                return;
            }
        }
        let own = !known || self.is_member(&chat);
        let more = response.more;
        match self
            .replicas
            .accept(if own { None } else { Some(policy) }, response.entries)
        {
            Ok(outcomes) => {
                for o in &outcomes {
                    if let Outcome::Rejected(why) = o {
                        warn!(%peer, chat = %short(&chat), "rejected a pulled entry: {why}");
                    }
                }
                let progressed = outcomes.contains(&Outcome::Stored);
                if progressed {
                    // Pulled from one storage peer: tell the others' members.
                    self.to_notify.entry(chat).or_default().insert(peer);
                }
                if more
                    && progressed
                    && let Some(link) = self.links.get_mut(&peer)
                {
                    link.pull.insert(chat);
                }
                if let Some(link) = self.links.get_mut(&peer) {
                    // Pushing what the peer lacks, and counting the quorum,
                    // needs a fresh summary.
                    link.compare.insert(chat);
                }
            }
            Err(e) => warn!("cannot keep pulled entries: {e}"),
        }
    }

    /// After a commit: events for this device's chats, notifications to
    /// other members' devices, the write quorum.
    fn after_commit(&mut self, appended: Vec<(ChatId, EntryHash)>) {
        let mut sent_texts = std::mem::take(&mut self.sent_texts);
        let mut chats = BTreeSet::new();
        for (chat, hash) in appended {
            chats.insert(chat);
            self.announce(chat, hash, sent_texts.remove(&hash));
        }
        // A peer the chat was never compared with (a storage peer that
        // just joined its set) is compared at once, not at the next tick:
        // its catch-up starts without waiting up to half a second.
        let at = Instant::now();
        for chat in chats {
            self.check_stored(chat);
            self.schedule_chat_compares(chat, at, |compared| compared.is_none());
        }
        let to_notify = std::mem::take(&mut self.to_notify);
        for (chat, skip) in to_notify {
            let Some(log) = self.replicas.log(&chat) else {
                continue;
            };
            let (set, _) = self.storage_of(log, None);
            if !set.iter().any(|(p, _)| *p == self.me) {
                continue;
            }
            let membership = log.current_membership();
            let targets: Vec<PeerId> = self
                .connected
                .iter()
                .filter(|(p, a)| {
                    !skip.contains(p)
                        && a.is_some_and(|a| membership.is_member(&a))
                        && !set.iter().any(|(s, _)| s == *p)
                })
                .map(|(p, _)| *p)
                .collect();
            for peer in targets {
                if let Some(link) = self.link(peer)
                    && link.notify.len() < MAX_LINK_CHATS
                {
                    link.notify.insert(chat);
                }
            }
        }
    }

    /// Events for one new entry of a chat this device is a member of.
    /// `sent`: the content, where this device just wrote it.
    fn announce(&mut self, chat: ChatId, hash: EntryHash, sent: Option<Content>) {
        let Some(log) = self.replicas.log(&chat) else {
            return;
        };
        if !log.current_membership().is_member(&self.account) {
            return;
        }
        let Some(entry) = log.get(&hash) else {
            return;
        };
        let author = entry.header.author_account();
        let from_me = entry.header.author_device() == self.device;
        let chat_id = chat_hex(&chat);
        match &entry.header.header.kind {
            EntryKind::Purge { targets } => {
                self.bus.emit(Event::ChatDeleted {
                    chat_id,
                    message_ids: targets.iter().map(|t| hex(&t.0)).collect(),
                    by: author.to_string(),
                });
            }
            EntryKind::Message => match sent.map_or_else(|| self.member.decrypt(log, &hash), Ok) {
                Ok(Content::Text { text, reply_to }) => self.bus.emit(Event::ChatMessage {
                    chat_id,
                    message_id: hex(&hash.0),
                    author: author.to_string(),
                    text,
                    from_me,
                    reply_to: reply_to.map(|r| hex(&r.0)),
                }),
                Ok(Content::Edit { target, text }) => self.bus.emit(Event::ChatEdited {
                    chat_id,
                    message_id: hex(&target.0),
                    text,
                }),
                Ok(Content::Read { .. }) if !from_me => self.bus.emit(Event::ChatReceipt {
                    chat_id,
                    reader: author.to_string(),
                }),
                _ => {}
            },
            EntryKind::Genesis { .. } => self.bus.emit(Event::ChatCreated {
                chat_id,
                by: author.to_string(),
            }),
            _ => {}
        }
    }

    /// Marks this device's entries that reached their quorum as stored.
    fn check_stored(&mut self, chat: ChatId) {
        let Some(waiting) = self.unstored.get(&chat) else {
            return;
        };
        let Some(log) = self.replicas.log(&chat) else {
            return;
        };
        // Oldest first; the first one short of its quorum ends the scan
        // (unless the storage set changed in between, later ones cannot be
        // held more widely).
        let mut done = Vec::new();
        for (seq, hash) in waiting {
            let (acked, quorum, _) = self.acks(log, &chat, hash);
            if acked < quorum {
                break;
            }
            done.push((*seq, *hash));
        }
        if done.is_empty() {
            return;
        }
        let chat_id = chat_hex(&chat);
        for (_, hash) in &done {
            let is_message = log
                .get(hash)
                .is_some_and(|e| matches!(e.header.header.kind, EntryKind::Message));
            if is_message {
                self.bus.emit(Event::ChatStatus {
                    chat_id: chat_id.clone(),
                    message_id: hex(&hash.0),
                    status: "stored".into(),
                });
            }
        }
        if let Some(waiting) = self.unstored.get_mut(&chat) {
            for (seq, _) in done {
                waiting.remove(&seq);
            }
            if waiting.is_empty() {
                self.unstored.remove(&chat);
            }
        }
    }

    /// Storage peers holding `hash` durably, the quorum, and the set size.
    fn acks(&self, log: &ChatLog, chat: &ChatId, hash: &EntryHash) -> (usize, usize, usize) {
        let Some(entry) = log.get(hash) else {
            return (0, 1, 0);
        };
        let device = entry.header.author_device();
        let seq = entry.header.header.seq;
        let Some((peers, quorum)) = log.storage_set_counting(hash) else {
            return (0, 1, 0);
        };
        let holds = |p: &PeerId| {
            *p == self.me
                || self
                    .views
                    .get(&(*chat, *p))
                    .and_then(|v| v.counts.get(&device))
                    .is_some_and(|c| *c > seq)
        };
        let (mut acked, mut of) = (0, 0);
        for p in peers.iter().filter_map(|s| self.peer_of(&s.node)) {
            of += 1;
            acked += usize::from(holds(&p));
        }
        (acked, quorum.max(1) as usize, of)
    }

    // ------------------------------------------------------------- requests

    /// Starts the next requests on every link with room for them.
    fn pump(&mut self) {
        let now = Instant::now();
        let peers: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(_, l)| {
                l.in_flight < MAX_IN_FLIGHT && !l.idle() && l.retry_at.is_none_or(|t| t <= now)
            })
            .map(|(p, _)| *p)
            .collect();
        for peer in peers {
            while let Some((asked, request)) = self.next_request(peer) {
                let link = self.links.get_mut(&peer).expect("listed above");
                link.in_flight += 1;
                debug!(%peer, in_flight = link.in_flight, "storage request: {}", asked.what());
                let push = matches!(
                    request,
                    StoreRequest::Push { .. } | StoreRequest::EncodedPush(_)
                );
                match &link.lane {
                    // Closed after 30 s without a push; a failure is
                    // handled with its request's answer.
                    LaneState::Open(lane) if lane.is_closed() => link.lane = LaneState::Closed,
                    LaneState::Refused(until) if *until <= now => link.lane = LaneState::Closed,
                    _ => {}
                }
                // More than one full push to go: worth a lane.
                if push
                    && link.last_push_full
                    && matches!(link.lane, LaneState::Closed)
                    && self.lanes.is_some()
                {
                    self.open_lane(peer);
                }
                let link = self.links.get_mut(&peer).expect("listed above");
                let lane = match &link.lane {
                    LaneState::Open(lane) if push => Some(lane.clone()),
                    _ => None,
                };
                let addrs = link.addrs.clone();
                let net = self.net.clone();
                let done = self.done_tx.clone();
                let on_lane = lane.is_some();
                let task = async move {
                    let result = match lane {
                        Some(lane) => lane.ask(request).await,
                        None => net
                            .store_request(peer, addrs, request)
                            .await
                            .map_err(|e| e.to_string()),
                    };
                    let _ = done
                        .send(Done {
                            peer,
                            asked,
                            result,
                            on_lane,
                        })
                        .await;
                };
                self.io.spawn(task);
            }
        }
    }

    /// Asks `peer` for a lane and connects to it, in the background; the
    /// outcome comes back to [`Self::on_lane`].
    fn open_lane(&mut self, peer: PeerId) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        link.lane = LaneState::Opening;
        let (net, addrs, me, opened) = (
            self.net.clone(),
            link.addrs.clone(),
            self.me,
            self.lane_tx.clone(),
        );
        let addrs_ips: Vec<IpAddr> = addrs.iter().filter_map(direct_ip).collect();
        self.io.spawn(async move {
            let lane = async {
                let answer = net
                    .store_request(peer, addrs, StoreRequest::OpenLane)
                    .await
                    .map_err(|e| e.to_string())?;
                match answer {
                    StoreResponse::Lane(offer) => {
                        // Where the connection to it comes from, then its
                        // addresses known here.
                        let mut ips = net.remote_ips(peer).await.unwrap_or_default();
                        for ip in addrs_ips {
                            if !ips.contains(&ip) {
                                ips.push(ip);
                            }
                        }
                        let mut why = "no direct address".to_string();
                        for ip in ips {
                            match Lane::connect(SocketAddr::new(ip, offer.port), me, peer, &offer)
                                .await
                            {
                                Ok(lane) => return Ok(lane),
                                Err(e) => why = format!("{ip}: {e}"),
                            }
                        }
                        Err(why)
                    }
                    StoreResponse::Refused { reason } => Err(format!("refused: {reason}")),
                    _ => Err("answered something else".into()),
                }
            };
            let _ = opened.send((peer, lane.await)).await;
        });
    }

    fn on_lane(&mut self, peer: PeerId, lane: Result<Lane, String>) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        link.lane = match lane {
            Ok(lane) => {
                info!(%peer, "lane open: pushes to this peer go on it");
                LaneState::Open(lane)
            }
            Err(why) => {
                info!(%peer, "no lane to this peer; pushes go over libp2p: {why}");
                LaneState::Refused(Instant::now() + LANE_RETRY)
            }
        };
    }

    /// The link's next request. With one in flight already, only another
    /// full push: a compare or pull answered meanwhile would count entries
    /// still on their way as lacking.
    fn next_request(&mut self, peer: PeerId) -> Option<(Asked, StoreRequest)> {
        let link = self.links.get_mut(&peer)?;
        if link.in_flight >= MAX_IN_FLIGHT || (link.in_flight > 0 && !link.last_push_full) {
            return None;
        }
        let pushes_only = link.in_flight > 0;
        if !pushes_only {
            // Only a full push starting now lets another follow it.
            link.last_push_full = false;
        }
        if !pushes_only && let Some(chat) = link.notify.pop_first() {
            return Some((Asked::Notify, StoreRequest::Notify { chat }));
        }
        while let Some(mut entry) = link.pushes.first_entry() {
            let chat = *entry.key();
            let Some(log) = self.replicas.log(&chat) else {
                link.queued -= entry.get().len();
                entry.remove();
                continue;
            };
            let mut batch = Vec::new();
            let mut hashes = Vec::new();
            let mut bytes = 0;
            link.last_push_full = false;
            while let Some((lamport, hash)) = entry.get_mut().pop_first() {
                link.queued -= 1;
                let Some(size) = log.encoded_len(&hash) else {
                    continue;
                };
                if !batch.is_empty() && (batch.len() == MAX_PUSH || bytes + size > MAX_PUSH_BYTES) {
                    entry.get_mut().insert((lamport, hash));
                    link.queued += 1;
                    link.last_push_full = true;
                    break;
                }
                let e = match self.replicas.piece_for_peer(&chat, &hash) {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(e) => {
                        warn!(chat = %short(&chat), "cannot read a kept entry to push it: {e}");
                        continue;
                    }
                };
                bytes += size;
                batch.push(e);
                hashes.push(hash);
            }
            let then_compare = !entry.get().is_empty() && link.compare.contains(&chat);
            if entry.get().is_empty() {
                entry.remove();
            }
            if batch.is_empty() {
                continue;
            }
            return Some((
                Asked::Push {
                    chat,
                    hashes,
                    then_compare,
                },
                StoreRequest::EncodedPush(EncodedPush::new(&batch)),
            ));
        }
        if pushes_only {
            return None;
        }
        if let Some(chat) = link.pull.pop_first() {
            let request = match self.replicas.log(&chat) {
                Some(log) => SyncRequest::for_log(log),
                None => SyncRequest::for_log(&ChatLog::new(chat)),
            };
            return Some((Asked::Pull(chat), StoreRequest::Sync(request)));
        }
        if let Some(chat) = link.compare.pop_first() {
            return Some((Asked::Summary(chat), StoreRequest::Summary { chat }));
        }
        if link.chats_of {
            link.chats_of = false;
            return Some((Asked::ChatsOf, StoreRequest::ChatsOf));
        }
        None
    }

    /// Queues this device's new entry for every other storage peer of its
    /// chat.
    fn push_out(&mut self, chat: ChatId, hash: EntryHash, extra: &[(PeerId, StoragePeer)]) {
        let Some(log) = self.replicas.log(&chat) else {
            return;
        };
        let Some(lamport) = log.lamport(&hash) else {
            return;
        };
        let (mut set, _) = self.storage_of(log, None);
        set.extend(extra.iter().cloned());
        for (peer, sp) in set {
            if peer == self.me {
                continue;
            }
            let addrs = addrs_of(&sp);
            let Some(link) = self.link(peer) else {
                continue;
            };
            if !addrs.is_empty() {
                link.addrs = addrs;
            }
            if link.queued >= MAX_LINK_QUEUE {
                link.compare.insert(chat);
                continue;
            }
            if link.pushes.entry(chat).or_default().insert((lamport, hash)) {
                link.queued += 1;
            }
        }
    }

    // ------------------------------------------------------------- commands

    fn command(&mut self, command: Command) -> Pending {
        match command {
            Command::New(new, reply) => Pending::Info(self.new_chat(new), reply),
            Command::List(reply) => Pending::ready(Ok(self.list()), reply),
            Command::Send {
                chat,
                text,
                reply_to,
                reply,
            } => {
                let r = self.resolve_chat(&chat).and_then(|chat| {
                    let reply_to = reply_to
                        .map(|m| self.resolve_message(&chat, &m))
                        .transpose()?;
                    self.write(chat, Draft::Text { text, reply_to })
                });
                Pending::Receipt(r, reply)
            }
            Command::Status {
                chat,
                message,
                with_read,
                reply,
            } => {
                let r = self.resolve_chat(&chat).and_then(|c| {
                    let m = self.resolve_message(&c, &message)?;
                    let log = self.replicas.log(&c).expect("resolved");
                    let read = with_read
                        && self
                            .member
                            .history(log)
                            .messages
                            .iter()
                            .any(|d| d.entry == m && !d.read_by.is_empty());
                    Ok(self.receipt(c, m, read))
                });
                Pending::ready(r, reply)
            }
            Command::History { chat, limit, reply } => Pending::ready(
                self.resolve_chat(&chat).map(|c| self.history(c, limit)),
                reply,
            ),
            Command::Edit {
                chat,
                message,
                text,
                reply,
            } => {
                let r = self.resolve_chat(&chat).and_then(|c| {
                    let target = self.resolve_message(&c, &message)?;
                    self.write(c, Draft::Edit { target, text })
                });
                Pending::Receipt(r, reply)
            }
            Command::Delete {
                chat,
                messages,
                for_everyone,
                reply,
            } => {
                let r = self.resolve_chat(&chat).and_then(|c| {
                    let targets = messages
                        .iter()
                        .map(|m| self.resolve_message(&c, m))
                        .collect::<Result<Vec<_>, _>>()?;
                    self.delete(c, targets, for_everyone)
                });
                Pending::ready(r, reply)
            }
            Command::Clear {
                chat,
                for_everyone,
                reply,
            } => {
                let r = self.resolve_chat(&chat).and_then(|c| {
                    let targets: Vec<EntryHash> = {
                        let log = self.replicas.log(&c).expect("resolved");
                        self.member
                            .history(log)
                            .messages
                            .iter()
                            .map(|m| m.entry)
                            .take(MAX_CLEAR)
                            .collect()
                    };
                    self.delete(c, targets, for_everyone)
                });
                Pending::ready(r, reply)
            }
            Command::Read { chat, reply } => {
                let r = self.resolve_chat(&chat).and_then(|c| {
                    let log = self.replicas.log(&c).expect("resolved");
                    // Nothing new since this device's last receipt?
                    let heads = log.heads();
                    if let Some(last) = log.last_of_device(&self.device)
                        && heads == [last]
                        && matches!(self.member.decrypt(log, &last), Ok(Content::Read { .. }))
                    {
                        return Ok(None);
                    }
                    self.write(c, Draft::Read).map(Some)
                });
                Pending::MaybeReceipt(r, reply)
            }
            Command::Probe { chat, reply } => {
                let r = self.resolve_chat(&chat).map(|c| {
                    for peer in self.compare_peers(&c) {
                        self.remember_addrs(&c, peer);
                        if let Some(link) = self.link(peer) {
                            link.compare.insert(c);
                            // Try now, even if backing off.
                            link.retry_at = None;
                        }
                    }
                    chat_hex(&c)
                });
                Pending::ready(r, reply)
            }
            Command::RevokeKeys {
                keep,
                revoked,
                reply,
            } => Pending::ready(self.revoke_keys(keep, revoked), reply),
            Command::Replicas { chat, reply } => Pending::ready(
                self.resolve_chat(&chat).map(|c| self.replica_views(c)),
                reply,
            ),
            Command::Storage {
                chat,
                peers,
                quorum,
                reply,
            } => Pending::Info(
                self.resolve_chat(&chat)
                    .and_then(|c| self.set_storage(c, peers, quorum)),
                reply,
            ),
        }
    }

    /// A full chat id from a full id or a unique prefix of 4 or more hex
    /// characters, among chats this account is a member of.
    fn resolve_chat(&self, given: &str) -> Result<ChatId, CloudError> {
        let given = given.trim().to_ascii_lowercase();
        if given.len() < 4 || !given.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CloudError::BadInput(format!(
                "{given:?} is not a chat id (4 or more hex characters)"
            )));
        }
        let mut found = self
            .replicas
            .chats()
            .filter(|c| chat_hex(c).starts_with(&given) && self.is_member(c));
        match (found.next(), found.next()) {
            (Some(c), None) => Ok(*c),
            (Some(_), Some(_)) => Err(CloudError::Ambiguous(given)),
            (None, _) => Err(CloudError::NoSuchChat(given)),
        }
    }

    fn resolve_message(&self, chat: &ChatId, given: &str) -> Result<EntryHash, CloudError> {
        let given = given.trim().to_ascii_lowercase();
        if given.len() < 4 || !given.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CloudError::BadInput(format!(
                "{given:?} is not a message id (4 or more hex characters)"
            )));
        }
        let log = self
            .replicas
            .log(chat)
            .ok_or_else(|| CloudError::NoSuchChat(chat_hex(chat)))?;
        // A full id needs no scan.
        if let Some(hash) = data_encoding::HEXLOWER
            .decode(given.as_bytes())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(EntryHash)
        {
            return match log.get(&hash) {
                Some(e) if matches!(e.header.header.kind, EntryKind::Message) => Ok(hash),
                _ => Err(CloudError::NoSuchMessage(given)),
            };
        }
        let mut found = log
            .in_display_order()
            .filter(|(h, e)| {
                matches!(e.header.header.kind, EntryKind::Message) && hex(&h.0).starts_with(&given)
            })
            .map(|(h, _)| h);
        match (found.next(), found.next()) {
            (Some(h), None) => Ok(h),
            (Some(_), Some(_)) => Err(CloudError::Ambiguous(given)),
            (None, _) => Err(CloudError::NoSuchMessage(given)),
        }
    }

    /// Composes, keeps locally (committed with the round) and queues the
    /// push of one entry of this device.
    fn write(&mut self, chat: ChatId, draft: Draft) -> Result<(ChatId, EntryHash), CloudError> {
        let log = self
            .replicas
            .log(&chat)
            .ok_or_else(|| CloudError::NoSuchChat(chat_hex(&chat)))?;
        let text = match &draft {
            Draft::Text { text, reply_to } => Some(Content::Text {
                text: text.clone(),
                reply_to: *reply_to,
            }),
            _ => None,
        };
        let entry = self
            .member
            .compose_unsigned(log, draft, random32())
            .map_err(|e| CloudError::Refused(e.to_string()))?;
        let hash = self.keep(entry)?;
        if let Some(text) = text {
            self.sent_texts.insert(hash, text);
        }
        self.push_out(chat, hash, &[]);
        Ok((chat, hash))
    }

    /// See [`CloudHandle::revoke_keys`].
    fn revoke_keys(
        &mut self,
        keep: Vec<DevicePublicKey>,
        revoked: Vec<DevicePublicKey>,
    ) -> Result<usize, CloudError> {
        let generation =
            self.member.key_generation().checked_add(1).ok_or_else(|| {
                CloudError::Refused("this account has no key generation left".into())
            })?;
        let key = AccountEncryptionKey::generate(&random32());
        // On disk before any chat is wrapped to it: a key lost to a crash
        // would lock this device out of everything that follows.
        self.account_keys
            .keep(generation, &key)
            .map_err(CloudError::Store)?;
        self.member.add_encryption_key(generation, key);
        self.publish_encryption_key();
        let chats: Vec<ChatId> = self
            .replicas
            .chats()
            .copied()
            .filter(|c| self.is_member(c))
            .collect();
        // Every chat is tried: one that fails must not leave the others
        // readable by the revoked device.
        let mut rekeyed = 0;
        let mut failed = Vec::new();
        for chat in chats {
            let draft = Draft::AccountKey {
                keep: keep.clone(),
                revoked: revoked.clone(),
            };
            match self.write(chat, draft) {
                Ok(_) => rekeyed += 1,
                Err(e) => {
                    warn!(chat = %chat_hex(&chat), "cannot rotate the key after a revocation: {e}");
                    failed.push(format!("{}: {e}", chat_hex(&chat)));
                }
            }
        }
        if failed.is_empty() {
            Ok(rekeyed)
        } else {
            Err(CloudError::Refused(format!(
                "new keys in {rekeyed} chat(s), but not in {} (revoke again to retry): {}",
                failed.len(),
                failed.join("; ")
            )))
        }
    }

    /// Keys the network found sealed to this device in records of the
    /// account's other devices: kept, and used from now on.
    fn take_keys_from_records(&mut self) {
        for (generation, key) in self.account_keys.shared().take_found() {
            if let Err(e) = self.account_keys.keep(generation, &key) {
                warn!("{e}");
            }
            self.member.add_encryption_key(generation, key);
        }
    }

    /// Keeps the keys this device found sealed to it in chats (another
    /// device of the account revoked one), and publishes the current one
    /// in this device's account record: new chats are wrapped to it.
    fn keep_learned_keys(&mut self) {
        let learned = self.member.take_learned_keys();
        if learned.is_empty() {
            return;
        }
        for (generation, key) in &learned {
            info!(
                generation,
                "took the account's new encryption key from a chat"
            );
            if let Err(e) = self.account_keys.keep(*generation, key) {
                // Still held in memory; found again in the chat after a
                // restart.
                warn!("{e}");
            }
        }
        self.publish_encryption_key();
    }

    /// An account revoked devices and took a new encryption key. Another
    /// account's: ask its devices for its record now, so that a chat
    /// created with it from here on is wrapped to the new key, not the one
    /// in the record held since they last met. This account's (revoked on
    /// another of its devices): revoke them here too, so this device's
    /// record stops listing them.
    fn refresh_changed_accounts(&mut self) {
        let mut others = BTreeSet::new();
        let mut revoked = BTreeSet::new();
        for change in self.replicas.take_key_changes() {
            if change.account != self.account {
                others.insert(change.account);
                continue;
            }
            let Some(log) = self.replicas.log(&change.chat) else {
                continue;
            };
            let heads = log.heads();
            if log
                .membership_for_parents(&heads)
                .is_revoked_device(&change.by, &change.account)
            {
                // A concurrent branch of a device revoked before it in the
                // chat's order: its change does not hold.
                warn!(chat = %chat_hex(&change.chat), "ignored a key change written by a revoked device");
                continue;
            }
            // Take the key sealed to this device now, not at the next
            // message: new chats must be wrapped to it.
            self.member.refresh_keys(log);
            if change.by != self.device {
                revoked.extend(change.revoked.into_iter().filter(|d| *d != self.device));
            }
        }
        if others.is_empty() && revoked.is_empty() {
            return;
        }
        let net = self.net.clone();
        self.io.spawn(async move {
            for account in others {
                if let Err(e) = net.refresh_account(account).await {
                    debug!("cannot ask for an account's record: {e}");
                }
            }
            for device in revoked.iter().filter_map(peer_id_of) {
                match net.revoke_device(device.to_string()).await {
                    Ok(Ok(_)) => info!(%device, "revoked on another device of this account"),
                    Ok(Err(e)) => debug!(%device, "not revoked here: {e}"),
                    Err(e) => debug!("cannot revoke a device: {e}"),
                }
            }
        });
    }

    fn publish_encryption_key(&self) {
        let net = self.net.clone();
        let key = (self.member.key_generation(), self.member.encryption_key());
        self.io.spawn(async move {
            if let Err(e) = net.publish_encryption_key(key).await {
                warn!("cannot publish the account's encryption key: {e}");
            }
        });
    }

    /// Appends this device's own entry to its copy.
    fn keep(&mut self, entry: Composed) -> Result<EntryHash, CloudError> {
        let chat = entry.header.header.chat;
        let hash = entry.hash();
        let outcome = self
            .replicas
            .accept_composed(entry)
            .map_err(|e| CloudError::Store(e.to_string()))?;
        match outcome {
            Outcome::Stored => {
                let seq = self
                    .replicas
                    .log(&chat)
                    .and_then(|l| l.get(&hash))
                    .map_or(0, |e| e.header.header.seq);
                self.unstored.entry(chat).or_default().insert(seq, hash);
                // Where this node is a storage peer too, it tells the other
                // members' devices itself.
                self.to_notify.entry(chat).or_default();
                Ok(hash)
            }
            other => Err(CloudError::Store(format!(
                "this device's own entry was not kept: {other:?}"
            ))),
        }
    }

    /// Where one entry stands; `read`: another member's receipt covers it.
    fn receipt(&self, chat: ChatId, hash: EntryHash, read: bool) -> SendReceipt {
        let log = self.replicas.log(&chat).expect("caller resolved the chat");
        let (acked, quorum, of) = self.acks(log, &chat, &hash);
        let status = if acked < quorum {
            "sending"
        } else if read {
            "read"
        } else {
            "stored"
        };
        let (set, _) = self.storage_of(log, Some(&hash));
        let problems = set
            .iter()
            .filter(|(p, _)| *p != self.me)
            .filter_map(|(p, _)| {
                let why = self
                    .views
                    .get(&(chat, *p))
                    .and_then(|v| v.refused.clone())
                    .or_else(|| self.links.get(p).and_then(|l| l.last_error.clone()))?;
                Some(format!("{p}: {why}"))
            })
            .collect();
        SendReceipt {
            chat_id: chat_hex(&chat),
            message_id: hex(&hash.0),
            status: status.into(),
            acknowledged: acked,
            quorum,
            storage_peers: of,
            problems,
        }
    }

    fn history(&mut self, chat: ChatId, limit: Option<usize>) -> Vec<MessageView> {
        let Some(log) = self.replicas.log(&chat) else {
            return Vec::new();
        };
        let shown = self.member.history(log);
        let hidden = self.hidden_in(&chat);
        let mut out: Vec<MessageView> = shown
            .messages
            .into_iter()
            .filter(|m| !hidden.contains(&m.entry))
            .map(|m| {
                let from_me = m.author == self.account;
                let status = if !m.read_by.is_empty() {
                    "read"
                } else {
                    let (acked, quorum, _) = self.acks(log, &chat, &m.entry);
                    if acked >= quorum { "stored" } else { "sending" }
                };
                MessageView {
                    id: hex(&m.entry.0),
                    author: m.author.to_string(),
                    text: m.text,
                    status: status.into(),
                    edited: m.edited,
                    from_me,
                    reply_to: m.reply_to.map(|r| hex(&r.0)),
                    read_by: m.read_by.iter().map(ToString::to_string).collect(),
                }
            })
            .collect();
        if let Some(limit) = limit
            && out.len() > limit
        {
            out.drain(..out.len() - limit);
        }
        out
    }

    fn hidden_in(&self, chat: &ChatId) -> HashSet<EntryHash> {
        self.hidden
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.len() == 48 && k[..16] == chat.0)
            .filter_map(|(k, _)| Some(EntryHash(k[16..].try_into().ok()?)))
            .collect()
    }

    fn delete(
        &mut self,
        chat: ChatId,
        targets: Vec<EntryHash>,
        for_everyone: bool,
    ) -> Result<usize, CloudError> {
        let mut n = 0;
        for target in targets {
            if for_everyone {
                self.write(chat, Draft::Delete { target })?;
            } else {
                let mut key = chat.0.to_vec();
                key.extend_from_slice(&target.0);
                self.hidden
                    .insert_soon(&key, &[])
                    .map_err(|e| CloudError::Store(e.to_string()))?;
            }
            n += 1;
        }
        Ok(n)
    }

    fn replica_views(&self, chat: ChatId) -> Vec<ReplicaView> {
        let Some(log) = self.replicas.log(&chat) else {
            return Vec::new();
        };
        let ours = ChatSummary::of(log);
        let (set, _) = self.storage_of(log, None);
        set.iter()
            .map(|(p, _)| {
                if *p == self.me {
                    return ReplicaView {
                        peer_id: p.to_string(),
                        entries: log.len() as u64,
                        in_sync: true,
                        reachable: true,
                        this_node: true,
                        last_seen_ms: Some(0),
                        error: None,
                    };
                }
                let view = self.views.get(&(chat, *p)).cloned().unwrap_or_default();
                let link = self.links.get(p);
                ReplicaView {
                    peer_id: p.to_string(),
                    entries: view.entries,
                    in_sync: view.heads_hash == Some(ours.heads_hash),
                    reachable: link.and_then(|l| l.reachable).unwrap_or(false),
                    this_node: false,
                    last_seen_ms: view.seen.map(|t| t.elapsed().as_millis() as u64),
                    error: view
                        .refused
                        .clone()
                        .or_else(|| link.and_then(|l| l.last_error.clone())),
                }
            })
            .collect()
    }

    fn list(&mut self) -> Vec<ChatInfo> {
        let chats: Vec<ChatId> = self
            .replicas
            .chats()
            .copied()
            .filter(|c| self.is_member(c))
            .collect();
        let mut out: Vec<ChatInfo> = chats.into_iter().filter_map(|c| self.info(c)).collect();
        out.sort_by(|a, b| a.chat_id.cmp(&b.chat_id));
        out
    }

    fn info(&mut self, chat: ChatId) -> Option<ChatInfo> {
        let log = self.replicas.log(&chat)?;
        let history = self.member.history(log);
        let (set, quorum) = self.storage_of(log, None);
        let mut members: Vec<String> = log
            .current_membership()
            .members()
            .map(|(a, _)| a.to_string())
            .collect();
        members.sort();
        Some(ChatInfo {
            chat_id: chat_hex(&chat),
            title: history.title,
            members,
            messages: history.messages.len(),
            entries: log.len(),
            storage: set.iter().map(|(p, _)| p.to_string()).collect(),
            quorum,
        })
    }

    fn new_chat(&mut self, new: NewChat) -> Result<ChatId, CloudError> {
        let NewChat {
            with,
            title,
            storage,
            quorum,
        } = new;
        if with.is_empty() {
            return Err(CloudError::BadInput(
                "a chat needs at least one other account (--with)".into(),
            ));
        }
        let others: Vec<_> = with
            .iter()
            .filter(|r| r.body.account != self.account)
            .map(|r| (r.body.account, r.body.encryption_key))
            .collect();
        if others.is_empty() {
            return Err(CloudError::BadInput(
                "a chat needs at least one account other than this one".into(),
            ));
        }
        let peers = match storage {
            Some(p) => p,
            None => {
                // The members' choices, this account's first.
                let mut peers: Vec<StoragePeer> = Vec::new();
                for p in with.iter().flat_map(|r| {
                    if r.body.storage_peers.is_empty() {
                        r.body
                            .devices
                            .iter()
                            .map(|d| StoragePeer {
                                node: d.device,
                                addrs: Vec::new(),
                            })
                            .collect::<Vec<_>>()
                    } else {
                        r.body.storage_peers.clone()
                    }
                }) {
                    if !peers.iter().any(|q| q.node == p.node) {
                        peers.push(p);
                    }
                }
                peers.truncate(DEFAULT_STORAGE_PEERS);
                peers
            }
        };
        let quorum = quorum.unwrap_or_else(|| majority(peers.len()));
        tern_protocol::cloud::check_storage_set(&peers, quorum)
            .map_err(|e| CloudError::BadInput(format!("storage set: {e}")))?;
        let chat = {
            let mut id = [0; 16];
            rand::rngs::OsRng.fill_bytes(&mut id);
            ChatId(id)
        };
        let genesis = self
            .member
            .create(chat, &others, Vec::new(), title.as_deref(), random32())
            .map_err(|e| CloudError::BadInput(e.to_string()))?;
        let genesis_hash = self.keep(genesis)?;
        let log = self.replicas.log(&chat).expect("just kept");
        let entry = self
            .member
            .compose_unsigned(log, Draft::Storage { peers, quorum }, random32())
            .map_err(|e| CloudError::BadInput(e.to_string()))?;
        let storage_hash = self.keep(entry)?;
        self.push_out(chat, genesis_hash, &[]);
        self.push_out(chat, storage_hash, &[]);
        info!(chat = %short(&chat), "new cloud chat");
        Ok(chat)
    }

    fn set_storage(
        &mut self,
        chat: ChatId,
        peers: Vec<StoragePeer>,
        quorum: Option<u8>,
    ) -> Result<ChatId, CloudError> {
        let quorum = quorum.unwrap_or_else(|| majority(peers.len()));
        tern_protocol::cloud::check_storage_set(&peers, quorum)
            .map_err(|e| CloudError::BadInput(format!("storage set: {e}")))?;
        let log = self.replicas.log(&chat).expect("resolved");
        let (old, _) = self.storage_of(log, None);
        let (_, hash) = self.write(chat, Draft::Storage { peers, quorum })?;
        // The old set learns of the change too, and new peers get the
        // whole log from the compares that follow.
        self.push_out(chat, hash, &old);
        for peer in self.compare_peers(&chat) {
            self.remember_addrs(&chat, peer);
            if let Some(link) = self.link(peer) {
                link.compare.insert(chat);
            }
        }
        Ok(chat)
    }
}

/// Work taken in one round.
#[derive(Default)]
struct Round {
    inbound: Vec<InboundStore>,
    commands: Vec<Command>,
    done: Vec<Done>,
}

impl Round {
    fn len(&self) -> usize {
        self.inbound.len() + self.commands.len() + self.done.len()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A command's answer, held until the round's commit.
enum Pending {
    /// Computed already; only a failed commit changes it.
    Ready(Box<dyn FnOnce(Option<String>) + Send>),
    Info(Result<ChatId, CloudError>, Reply<ChatInfo>),
    Receipt(Result<(ChatId, EntryHash), CloudError>, Reply<SendReceipt>),
    MaybeReceipt(
        Result<Option<(ChatId, EntryHash)>, CloudError>,
        Reply<Option<SendReceipt>>,
    ),
}

impl Pending {
    fn ready<T: Send + 'static>(r: Result<T, CloudError>, reply: Reply<T>) -> Self {
        Self::Ready(Box::new(move |failed| {
            let r = match (failed, r) {
                (Some(e), Ok(_)) => Err(CloudError::Store(e)),
                (_, r) => r,
            };
            let _ = reply.send(r);
        }))
    }
}
