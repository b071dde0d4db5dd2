//! The secret-chat service: one task that owns every secret chat of this
//! device. It serves commands from the control API, requests from peers
//! (handed over by the network event loop) and its own timers, and talks to
//! the network only through the [`NetworkHandle`].
//!
//! Delivery is reliable and ordered per chat: sealed frames wait in the
//! chat's outbox (on disk) and go out one request at a time, at most
//! [`super::wire::MAX_FRAMES`] (or 1 MiB) per request; the peer acknowledges how far it got, and the
//! sender resends from there. An unreachable peer is retried with backoff,
//! and at once when it connects again.
//!
//! The service runs on a thread of its own, so the fsyncs of the erasable
//! store never hold up the network.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use ed25519_dalek::SigningKey;
use libp2p::{Multiaddr, PeerId};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tern_protocol::{
    AccountId, DeviceCertificate, Record, Ticket,
    secret::{
        ChatError, ChatEvent, ChatState, Fingerprint, Handshake, LocalDevice, MessageId,
        SasInitiator, SasMessage, SasResponder, SecretChat, SecretFrame, SecretPayload,
        SecretSession, SessionError, ShortCode, chat::MAX_IDS, sas::SasStep,
    },
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{
    store::{ChatRecord, ChatStore, Pending, StoredMessage},
    time::rfc3339,
    wire::{SecretId, SecretRequest, SecretResponse, pack},
};
use crate::{
    events::{Event, EventBus, now_ms},
    hex::hex,
    keys::{device_of_peer, peer_id_of},
    metrics::NodeMetrics,
    net::{InboundSecret, NetError, NetworkHandle},
    service_thread::{self, MainRuntime},
};

/// Most secret chats one device keeps.
pub const MAX_CHATS: usize = 1000;
/// Most cancelled or closed chats kept for the user to see; beyond this the
/// oldest are erased, so declined requests cannot pile up on disk.
pub const MAX_ENDED: usize = 100;
/// Most requests one peer may have waiting for an answer here.
pub const MAX_PENDING_PER_PEER: usize = 16;
/// Most frames waiting to be sent in one chat; sending beyond is refused.
pub const MAX_OUTBOX: usize = 10_000;
/// Commands waiting for the service.
pub const COMMAND_QUEUE: usize = 64;
/// Requests from peers waiting for the service.
pub const INBOUND_QUEUE: usize = 256;
/// Longest wait between retries to an unreachable peer.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Most extra items handled before one commit.
const MAX_BATCH: usize = 256;
/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("no secret chat {0}; see `tern secret list`")]
    NoSuchChat(String),
    #[error("{0:?} matches several secret chats; give more of the id")]
    Ambiguous(String),
    #[error("{0}")]
    Chat(#[from] ChatError),
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot save the secret chat: {0}")]
    Store(String),
    #[error("the node is shutting down")]
    Stopped,
}

impl From<super::store::StoreError> for SecretError {
    fn from(e: super::store::StoreError) -> Self {
        Self::Store(e.to_string())
    }
}

/// Whom to start a secret chat with.
pub enum StartTarget {
    Account(AccountId),
    Ticket(Ticket),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretInfo {
    pub secret_id: String,
    /// `pending`, `active`, `cancelled` or `closed`.
    pub state: String,
    /// Whether this device started it.
    pub initiator: bool,
    /// The other person's account id, when known.
    pub peer: Option<String>,
    pub peer_device: String,
    pub peer_name: String,
    pub created_at: String,
    pub messages: usize,
    pub timer_ms: Option<u64>,
    /// Frames waiting to reach the other device.
    pub outbox: usize,
    pub epoch: Option<u32>,
    /// Completed Diffie-Hellman re-keys.
    pub rekeys: u32,
    /// The 5-emoji short code, once both sides have exchanged it.
    pub short_code: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryItem {
    pub id: String,
    pub text: String,
    pub from_me: bool,
    pub read: bool,
    pub timer_ms: Option<u64>,
    pub expires_at: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyInfo {
    pub secret_id: String,
    /// The 256-bit fingerprint, hex; pictures are drawn from it.
    pub hex: String,
    pub emoji: String,
    pub short_code: Option<String>,
    /// Set when the short-code exchange was tampered with.
    pub short_code_failed: bool,
}

type Reply<T> = oneshot::Sender<Result<T, SecretError>>;
/// An answer to the API, told whether the batch it belongs to was saved.
type DeferredReply = Box<dyn FnOnce(Result<(), String>) + Send>;

enum Command {
    Start(StartTarget, Reply<SecretInfo>),
    Accept(String, Reply<SecretInfo>),
    Decline(String, Reply<SecretInfo>),
    Close(String, Reply<SecretInfo>),
    List(Reply<Vec<SecretInfo>>),
    Key(String, Reply<KeyInfo>),
    Send(String, String, Reply<String>),
    History(String, Reply<Vec<HistoryItem>>),
    Timer(String, Option<u64>, Reply<SecretInfo>),
    Delete(String, Vec<String>, Reply<usize>),
    Clear(String, Reply<usize>),
    Forward(String, String, Reply<()>),
    Logout(Reply<usize>),
    Resolve(String, Reply<String>),
}

/// A cheap, cloneable handle to the service.
#[derive(Clone)]
pub struct SecretHandle {
    tx: mpsc::Sender<Command>,
}

impl SecretHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, SecretError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| SecretError::Stopped)?;
        rx.await.map_err(|_| SecretError::Stopped)?
    }

    pub async fn start(&self, target: StartTarget) -> Result<SecretInfo, SecretError> {
        self.call(|r| Command::Start(target, r)).await
    }
    pub async fn accept(&self, id: String) -> Result<SecretInfo, SecretError> {
        self.call(|r| Command::Accept(id, r)).await
    }
    pub async fn decline(&self, id: String) -> Result<SecretInfo, SecretError> {
        self.call(|r| Command::Decline(id, r)).await
    }
    pub async fn close(&self, id: String) -> Result<SecretInfo, SecretError> {
        self.call(|r| Command::Close(id, r)).await
    }
    pub async fn list(&self) -> Result<Vec<SecretInfo>, SecretError> {
        self.call(Command::List).await
    }
    pub async fn key(&self, id: String) -> Result<KeyInfo, SecretError> {
        self.call(|r| Command::Key(id, r)).await
    }
    pub async fn send(&self, id: String, text: String) -> Result<String, SecretError> {
        self.call(|r| Command::Send(id, text, r)).await
    }
    pub async fn history(&self, id: String) -> Result<Vec<HistoryItem>, SecretError> {
        self.call(|r| Command::History(id, r)).await
    }
    pub async fn timer(&self, id: String, ms: Option<u64>) -> Result<SecretInfo, SecretError> {
        self.call(|r| Command::Timer(id, ms, r)).await
    }
    pub async fn delete(&self, id: String, msgs: Vec<String>) -> Result<usize, SecretError> {
        self.call(|r| Command::Delete(id, msgs, r)).await
    }
    pub async fn clear(&self, id: String) -> Result<usize, SecretError> {
        self.call(|r| Command::Clear(id, r)).await
    }
    pub async fn forward(&self, id: String, msg: String) -> Result<(), SecretError> {
        self.call(|r| Command::Forward(id, msg, r)).await
    }
    pub async fn logout(&self) -> Result<usize, SecretError> {
        self.call(Command::Logout).await
    }
    /// The full id of the chat `id` (a unique prefix is enough).
    pub async fn resolve(&self, id: String) -> Result<String, SecretError> {
        self.call(|r| Command::Resolve(id, r)).await
    }
}

/// The outcome of one request to a peer.
struct Delivered {
    id: SecretId,
    request: SecretRequest,
    result: Result<SecretResponse, NetError>,
}

/// One chat in memory.
struct Chat {
    record: ChatRecord,
    chat: SecretChat,
    seqs: HashMap<MessageId, u64>,
    next_seq: u64,
    session: Option<SecretSession>,
    /// This side's handshake while it waits for the peer's next message.
    handshake: Option<Handshake>,
    outbox: VecDeque<SecretFrame>,
    in_flight: bool,
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
}

impl Chat {
    fn peer(&self) -> Option<PeerId> {
        peer_id_of(&self.record.peer_device)
    }

    fn peer_addrs(&self) -> Vec<Multiaddr> {
        self.record
            .peer_addrs
            .iter()
            .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
            .collect()
    }

    /// Adds frames just sealed, keeping the outbox in frame order whatever
    /// order they come in: a batch goes out consecutive, as the other
    /// device requires, or it is refused whole.
    fn enqueue(&mut self, frames: Vec<SecretFrame>) {
        for f in frames {
            let at = self.outbox.partition_point(|g| g.n < f.n);
            self.outbox.insert(at, f);
        }
    }

    fn has_work(&self) -> bool {
        self.record.pending.is_some() || (!self.outbox.is_empty() && self.session.is_some())
    }

    fn info(&self) -> SecretInfo {
        SecretInfo {
            secret_id: hex(&self.record.secret_id),
            state: state_name(self.chat.state).into(),
            initiator: self.record.initiator,
            peer: self.record.peer_account.map(|a| a.to_string()),
            peer_device: peer_id_of(&self.record.peer_device)
                .map(|p| p.to_string())
                .unwrap_or_default(),
            peer_name: self.record.peer_name.clone(),
            created_at: rfc3339(self.record.created_ms),
            messages: self.chat.len(),
            timer_ms: self.chat.timer_ms,
            outbox: self.outbox.len(),
            epoch: self.session.as_ref().map(SecretSession::epoch),
            rekeys: self.record.rekeys,
            short_code: self
                .record
                .short_code
                .map(|c| ShortCode::from_bytes(c).emoji()),
        }
    }
}

/// A chat's id in logs: 4 hex digits, enough to tell chats apart in a log,
/// not enough to keep a record of which chats existed.
fn tag(id: &SecretId) -> String {
    hex(&id[..2])
}

fn hex_ids(ids: &[MessageId]) -> Vec<String> {
    ids.iter().map(|m| hex(&m.0)).collect()
}

fn state_name(s: ChatState) -> &'static str {
    match s {
        ChatState::Pending { .. } => "pending",
        ChatState::Active => "active",
        ChatState::Cancelled => "cancelled",
        ChatState::Closed => "closed",
    }
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

fn parse_message_id(s: &str) -> Result<MessageId, SecretError> {
    let bytes = data_encoding::HEXLOWER_PERMISSIVE
        .decode(s.trim().as_bytes())
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .ok_or_else(|| {
            SecretError::BadInput(format!(
                "{s:?} is not a message id (32 hex characters, as `tern secret history` shows)"
            ))
        })?;
    Ok(MessageId(bytes))
}

pub struct SecretService {
    net: NetworkHandle,
    bus: EventBus,
    metrics: NodeMetrics,
    store: ChatStore,
    signing_key: SigningKey,
    certificate: DeviceCertificate,
    chats: HashMap<SecretId, Chat>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Receiver<InboundSecret>,
    delivered_tx: mpsc::Sender<Delivered>,
    /// Where requests to the other device run (see [`crate::service_thread`]).
    io: MainRuntime,
    delivered: mpsc::Receiver<Delivered>,
    /// Effects held back until the batch's writes are on disk.
    replies: Vec<DeferredReply>,
    responses: Vec<(
        PeerId,
        libp2p::request_response::ResponseChannel<SecretResponse>,
        SecretResponse,
    )>,
    events_out: Vec<Event>,
    to_kick: std::collections::BTreeSet<SecretId>,
    /// Set when a batch could not be saved. Memory is then ahead of disk,
    /// so the service stops acting until a restart reloads from disk.
    failed: Option<String>,
}

pub struct ServiceParts {
    pub net: NetworkHandle,
    pub bus: EventBus,
    pub metrics: NodeMetrics,
    pub store: ChatStore,
    pub signing_key: SigningKey,
    pub certificate: DeviceCertificate,
    pub inbound: mpsc::Receiver<InboundSecret>,
}

impl SecretService {
    /// Loads every secret chat from disk.
    pub fn new(parts: ServiceParts) -> anyhow::Result<(Self, SecretHandle)> {
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let (delivered_tx, delivered) = mpsc::channel(MAX_CHATS + MAX_ENDED);
        let mut this = Self {
            net: parts.net,
            bus: parts.bus,
            metrics: parts.metrics,
            store: parts.store,
            signing_key: parts.signing_key,
            certificate: parts.certificate,
            chats: HashMap::new(),
            commands,
            inbound: parts.inbound,
            delivered_tx,
            io: MainRuntime::default(),
            delivered,
            replies: Vec::new(),
            responses: Vec::new(),
            events_out: Vec::new(),
            to_kick: Default::default(),
            failed: None,
        };
        for loaded in this.store.load_all()? {
            let session = loaded.session.as_ref().map(SecretSession::restore);
            let next_send = session.as_ref().map_or(0, SecretSession::next_send);
            let mut outbox = VecDeque::new();
            for f in loaded.outbox {
                if f.n < next_send {
                    outbox.push_back(f);
                } else {
                    // Sealed by a session that was never saved: never sent.
                    let _ = this.store.delete_frame(&loaded.record.secret_id, f.n);
                }
            }
            let seqs = loaded
                .messages
                .iter()
                .map(|m| (m.message.id, m.seq))
                .collect();
            let next_seq = loaded.messages.last().map_or(0, |m| m.seq + 1);
            let chat = SecretChat::restore(
                loaded.record.state,
                loaded.record.timer_ms,
                loaded.messages.into_iter().map(|m| m.message).collect(),
            );
            let mut c = Chat {
                record: loaded.record,
                chat,
                seqs,
                next_seq,
                session,
                handshake: None,
                outbox,
                in_flight: false,
                retry_at: None,
                backoff: Duration::from_secs(1),
            };
            this.rebuild_handshake(&mut c);
            this.chats.insert(c.record.secret_id, c);
        }
        if !this.chats.is_empty() {
            info!(chats = this.chats.len(), "restored secret chats");
        }
        Ok((this, SecretHandle { tx }))
    }

    fn local(&self) -> LocalDevice<'_> {
        LocalDevice {
            signing_key: &self.signing_key,
            certificate: &self.certificate,
        }
    }

    /// After a restart, a handshake waiting for the peer is rebuilt from its
    /// seed: the same seed gives the same keys and messages.
    fn rebuild_handshake(&self, c: &mut Chat) {
        let Some(seed) = c.record.handshake_seed else {
            return;
        };
        let id = c.record.secret_id;
        let peer = c.record.peer_device;
        let built = if c.record.initiator {
            Handshake::initiate(id, &self.local(), peer, seed).map(|(hs, _)| hs)
        } else if let Some(first) = c.record.peer_handshake.clone() {
            Handshake::respond(id, &self.local(), peer, seed, &first).map(|(hs, _)| hs)
        } else {
            return;
        };
        match built {
            Ok(hs) => c.handshake = Some(hs),
            Err(e) => warn!(secret = %tag(&id), "cannot rebuild the handshake: {e}"),
        }
    }

    /// Runs the service on a thread of its own until `shutdown` flips.
    pub fn spawn(mut self, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        self.io = MainRuntime::current();
        service_thread::start("tern-secret", move || self.run(shutdown))
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut events = self.bus.subscribe_peers();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let ids: Vec<SecretId> = self.chats.keys().copied().collect();
        for id in ids {
            self.kick(&id);
        }
        loop {
            let expiry = self.next_expiry();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(cmd) = self.commands.recv() => self.on_command(cmd).await,
                Some(d) = self.delivered.recv() => self.on_delivered(d),
                Some(req) = self.inbound.recv() => self.on_inbound(req).await,
                _ = sleep_until_ms(expiry) => self.expire(),
                event = events.recv() => {
                    // A device met again: what waits for it goes out now.
                    if let Ok(stamped) = event
                        && let Event::PeerIdentified { peer_id, .. }
                        | Event::PeerConnected { peer_id, .. } = stamped.event
                    {
                        self.on_peer_back(&peer_id);
                    }
                }
                _ = tick.tick() => self.retry_due(),
            }
            // Whatever else is already waiting joins this batch: one commit
            // covers all of it.
            for _ in 0..MAX_BATCH {
                if let Ok(d) = self.delivered.try_recv() {
                    self.on_delivered(d);
                } else if let Ok(cmd) = self.commands.try_recv() {
                    self.on_command(cmd).await;
                } else if let Ok(req) = self.inbound.try_recv() {
                    self.on_inbound(req).await;
                } else {
                    break;
                }
            }
            self.flush().await;
        }
        self.flush().await;
        debug!("secret-chat service stopped");
    }

    /// Commits the batch's writes, then lets its effects out: answers to
    /// the API and to peers, events, and frames to send. Nothing anyone
    /// is told about is lost to a crash.
    async fn flush(&mut self) {
        if self.failed.is_none() {
            self.prune_ended();
        }
        let committed = if self.store.has_pending() {
            self.store.commit().map_err(|e| {
                tracing::error!(
                    "cannot save secret chats ({e}); they are stopped until the node restarts"
                );
                let why = format!(
                    "secret chats are stopped after a storage failure ({e}); free disk space and restart the node"
                );
                self.failed = Some(why.clone());
                why
            })
        } else {
            Ok(())
        };
        for reply in self.replies.drain(..) {
            reply(committed.clone());
        }
        for (peer, channel, response) in std::mem::take(&mut self.responses) {
            let response = match &committed {
                Ok(()) => response,
                Err(_) => SecretResponse::refused("this device cannot save right now"),
            };
            let _ = self.net.secret_respond(peer, channel, response).await;
        }
        if committed.is_ok() {
            for e in self.events_out.drain(..) {
                self.bus.emit(e);
            }
            for id in std::mem::take(&mut self.to_kick) {
                self.kick_now(&id);
            }
        } else {
            self.events_out.clear();
            self.to_kick.clear();
        }
    }

    fn emit(&mut self, event: Event) {
        self.events_out.push(event);
    }

    /// Answers an API command once the batch is on disk (or with the
    /// storage error if it could not be saved).
    fn reply<T: Send + 'static>(&mut self, r: Reply<T>, result: Result<T, SecretError>) {
        self.replies.push(Box::new(move |committed| {
            let _ = r.send(committed.map_err(SecretError::Store).and(result));
        }));
    }

    // ----- commands -----

    async fn on_command(&mut self, cmd: Command) {
        if let Some(why) = self.failed.clone() {
            return self.refuse_command(cmd, why);
        }
        match cmd {
            Command::Start(target, r) => {
                let res = self.start(target).await;
                self.reply(r, res);
            }
            Command::Accept(id, r) => {
                let res = self.resolve(&id).and_then(|id| self.accept(&id));
                self.reply(r, res);
            }
            Command::Decline(id, r) => {
                let res = self.resolve(&id).and_then(|id| self.decline(&id));
                self.reply(r, res);
            }
            Command::Close(id, r) => {
                let res = self.resolve(&id).and_then(|id| self.close(&id));
                self.reply(r, res);
            }
            Command::List(r) => {
                let mut all: Vec<&Chat> = self.chats.values().collect();
                all.sort_by_key(|c| (c.record.created_ms, c.record.secret_id));
                self.reply(r, Ok(all.into_iter().map(Chat::info).collect()));
            }
            Command::Key(id, r) => {
                let res = self.resolve(&id).and_then(|id| self.key(&id));
                self.reply(r, res);
            }
            Command::Send(id, text, r) => {
                let res = self.resolve(&id).and_then(|id| self.send(&id, &text));
                self.reply(r, res);
            }
            Command::History(id, r) => {
                let res = self.resolve(&id).and_then(|id| self.history(&id));
                self.reply(r, res);
            }
            Command::Timer(id, ms, r) => {
                let res = self.resolve(&id).and_then(|id| self.set_timer(&id, ms));
                self.reply(r, res);
            }
            Command::Delete(id, msgs, r) => {
                let res = self.resolve(&id).and_then(|id| self.delete(&id, &msgs));
                self.reply(r, res);
            }
            Command::Clear(id, r) => {
                let res = self.resolve(&id).and_then(|id| self.clear(&id));
                self.reply(r, res);
            }
            Command::Forward(id, msg, r) => {
                let res = self.resolve(&id).and_then(|id| self.forward(&id, &msg));
                self.reply(r, res);
            }
            Command::Logout(r) => {
                let res = self.logout().await;
                self.reply(r, res);
            }
            Command::Resolve(id, r) => {
                let res = self.resolve(&id).map(|id| hex(&id));
                self.reply(r, res);
            }
        }
    }

    fn refuse_command(&mut self, cmd: Command, why: String) {
        fn err<T>(why: &str) -> Result<T, SecretError> {
            Err(SecretError::Store(why.to_owned()))
        }
        match cmd {
            Command::Start(_, r) => self.reply(r, err(&why)),
            Command::Accept(_, r)
            | Command::Decline(_, r)
            | Command::Close(_, r)
            | Command::Timer(_, _, r) => self.reply(r, err(&why)),
            Command::List(r) => self.reply(r, err(&why)),
            Command::Key(_, r) => self.reply(r, err(&why)),
            Command::Send(_, _, r) | Command::Resolve(_, r) => self.reply(r, err(&why)),
            Command::History(_, r) => self.reply(r, err(&why)),
            Command::Delete(_, _, r) | Command::Clear(_, r) | Command::Logout(r) => {
                self.reply(r, err(&why))
            }
            Command::Forward(_, _, r) => self.reply(r, err(&why)),
        }
    }

    fn live_chats(&self) -> usize {
        self.chats
            .values()
            .filter(|c| matches!(c.chat.state, ChatState::Pending { .. } | ChatState::Active))
            .count()
    }

    /// Erases the oldest ended chats beyond [`MAX_ENDED`] (once nothing of
    /// theirs waits to be delivered).
    fn prune_ended(&mut self) {
        let mut ended: Vec<(u64, SecretId)> = self
            .chats
            .values()
            .filter(|c| matches!(c.chat.state, ChatState::Cancelled | ChatState::Closed))
            .filter(|c| !c.has_work() && !c.in_flight)
            .map(|c| (c.record.created_ms, c.record.secret_id))
            .collect();
        if ended.len() <= MAX_ENDED {
            return;
        }
        ended.sort();
        for (_, id) in &ended[..ended.len() - MAX_ENDED] {
            if self.store.delete_chat(id).is_ok() {
                self.chats.remove(id);
            }
        }
    }

    /// A full id or a unique prefix of at least 4 hex characters.
    fn resolve(&self, given: &str) -> Result<SecretId, SecretError> {
        let given = given.trim().to_ascii_lowercase();
        if given.len() < 4 || !given.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SecretError::NoSuchChat(given));
        }
        let mut found = self
            .chats
            .keys()
            .filter(|id| hex(id.as_slice()).starts_with(&given));
        match (found.next(), found.next()) {
            (Some(id), None) => Ok(*id),
            (Some(_), Some(_)) => Err(SecretError::Ambiguous(given)),
            (None, _) => Err(SecretError::NoSuchChat(given)),
        }
    }

    fn chat(&mut self, id: &SecretId) -> Result<&mut Chat, SecretError> {
        self.chats
            .get_mut(id)
            .ok_or_else(|| SecretError::NoSuchChat(hex(id)))
    }

    async fn start(&mut self, target: StartTarget) -> Result<SecretInfo, SecretError> {
        if self.live_chats() >= MAX_CHATS {
            return Err(SecretError::Refused(format!(
                "this device already has {MAX_CHATS} pending or active secret chats; close some first"
            )));
        }
        let (device, account, addrs) = match target {
            StartTarget::Ticket(t) => (t.device, Some(t.account), t.addrs),
            StartTarget::Account(account) => {
                let devices = self
                    .net
                    .devices_of(account)
                    .await
                    .map_err(|_| SecretError::Stopped)?;
                let peer = devices.first().ok_or_else(|| {
                    SecretError::BadInput(format!(
                        "no device of account {} is known here; connect to it first (`tern connect TICKET`) or start with its ticket",
                        account.short()
                    ))
                })?;
                let device = device_of_peer(peer).ok_or_else(|| {
                    SecretError::BadInput("that device's id carries no key".into())
                })?;
                (device, Some(account), Vec::new())
            }
        };
        if device == self.certificate.device {
            return Err(SecretError::BadInput(
                "that is this device itself; a secret chat needs another device".into(),
            ));
        }
        let peer = peer_id_of(&device).ok_or_else(|| {
            SecretError::BadInput("the device key in the ticket is invalid".into())
        })?;
        let name = match self.net.device(peer).await {
            Ok(Some(known)) => {
                if let (Some(expected), Some(seen)) = (account, known.account)
                    && expected != seen
                {
                    return Err(SecretError::BadInput(format!(
                        "that device belongs to account {}, not {}; check the ticket",
                        seen.short(),
                        expected.short()
                    )));
                }
                known.name
            }
            _ => String::new(),
        };
        let mut id = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        let seed = random32();
        let (hs, _first) = Handshake::initiate(id, &self.local(), device, seed)
            .map_err(|e| SecretError::Refused(e.to_string()))?;
        let record = ChatRecord {
            secret_id: id,
            initiator: true,
            peer_device: device,
            peer_account: account,
            peer_name: name,
            peer_addrs: addrs,
            created_ms: now_ms(),
            state: ChatState::Pending { by_me: true },
            timer_ms: None,
            pending: Some(Pending::Offer),
            handshake_seed: Some(seed),
            peer_handshake: None,
            our_handshake: None,
            sas_nonce: None,
            sas_responder: None,
            short_code: None,
            sas_failed: false,
            fingerprint: None,
            rekeys: 0,
        };
        self.store.put_record(&record)?;
        let chat = Chat {
            chat: SecretChat::requested_by_me(),
            record,
            seqs: HashMap::new(),
            next_seq: 0,
            session: None,
            handshake: Some(hs),
            outbox: VecDeque::new(),
            in_flight: false,
            retry_at: None,
            backoff: Duration::from_secs(1),
        };
        let info = chat.info();
        self.chats.insert(id, chat);
        info!(secret = %tag(&id), "secret chat requested");
        self.kick(&id);
        Ok(info)
    }

    fn accept(&mut self, id: &SecretId) -> Result<SecretInfo, SecretError> {
        let local_signing = self.signing_key.clone();
        let local_cert = self.certificate.clone();
        let c = self.chat(id)?;
        if c.chat.state != (ChatState::Pending { by_me: false }) {
            return Err(ChatError::NotPendingForMe.into());
        }
        if c.record.pending == Some(Pending::Accept) {
            return Ok(c.info()); // already accepted, waiting for the peer
        }
        let first = c
            .record
            .peer_handshake
            .clone()
            .ok_or_else(|| SecretError::Refused("the request is incomplete".into()))?;
        let seed = random32();
        let local = LocalDevice {
            signing_key: &local_signing,
            certificate: &local_cert,
        };
        let (hs, second) = Handshake::respond(*id, &local, c.record.peer_device, seed, &first)
            .map_err(|e| SecretError::Refused(format!("the request cannot be answered: {e}")))?;
        c.record.handshake_seed = Some(seed);
        c.record.our_handshake = Some(second);
        c.record.pending = Some(Pending::Accept);
        c.handshake = Some(hs);
        self.store.put_record(&self.chats[id].record)?;
        self.kick(id);
        Ok(self.chats[id].info())
    }

    fn decline(&mut self, id: &SecretId) -> Result<SecretInfo, SecretError> {
        let c = self.chat(id)?;
        if c.chat.state != (ChatState::Pending { by_me: false }) {
            return Err(ChatError::NotPendingForMe.into());
        }
        c.chat.cancel();
        c.record.state = c.chat.state;
        c.record.pending = Some(Pending::Decline);
        c.record.handshake_seed = None;
        c.record.peer_handshake = None;
        c.record.our_handshake = None;
        c.handshake = None;
        self.store.put_record(&self.chats[id].record)?;
        self.emit(Event::SecretCancelled { secret_id: hex(id) });
        self.kick(id);
        Ok(self.chats[id].info())
    }

    fn close(&mut self, id: &SecretId) -> Result<SecretInfo, SecretError> {
        let c = self.chat(id)?;
        match c.chat.state {
            ChatState::Pending { by_me: true } => {
                // Withdrawn before an answer: the other side sees it cancelled.
                c.chat.cancel();
                c.record.state = ChatState::Closed;
                c.chat = SecretChat::restore(ChatState::Closed, None, Vec::new());
                c.record.pending = Some(Pending::Decline);
                c.record.handshake_seed = None;
                c.handshake = None;
                self.store.put_record(&self.chats[id].record)?;
            }
            ChatState::Pending { by_me: false } => return self.decline(id),
            ChatState::Active => {
                let payload = c.chat.close();
                c.record.state = ChatState::Closed;
                self.queue(id, &payload)?;
                self.store.put_record(&self.chats[id].record)?;
            }
            ChatState::Cancelled | ChatState::Closed => {
                // Closing an ended chat removes it from this device.
                if c.has_work() || c.in_flight {
                    return Ok(c.info());
                }
                let info = c.info();
                self.store.delete_chat(id)?;
                self.chats.remove(id);
                return Ok(SecretInfo {
                    state: "removed".into(),
                    ..info
                });
            }
        }
        self.emit(Event::SecretClosed { secret_id: hex(id) });
        self.kick(id);
        Ok(self.chats[id].info())
    }

    fn key(&mut self, id: &SecretId) -> Result<KeyInfo, SecretError> {
        let c = self.chat(id)?;
        let fp = c.record.fingerprint.ok_or_else(|| {
            SecretError::Refused(
                "there is no key yet: the chat becomes active once the other device accepts".into(),
            )
        })?;
        let fp = Fingerprint::from_bytes(fp);
        Ok(KeyInfo {
            secret_id: hex(id),
            hex: fp.hex(),
            emoji: fp.emoji_line(),
            short_code: c
                .record
                .short_code
                .map(|s| ShortCode::from_bytes(s).emoji()),
            short_code_failed: c.record.sas_failed,
        })
    }

    fn send(&mut self, id: &SecretId, text: &str) -> Result<String, SecretError> {
        let c = self.chat(id)?;
        if c.outbox.len() >= MAX_OUTBOX {
            // Checked before the message exists, so a refusal leaves nothing.
            return Err(SecretError::Refused(format!(
                "{MAX_OUTBOX} frames are already waiting for the other device; wait until it is reachable"
            )));
        }
        let mut mid = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut mid);
        let mid = MessageId(mid);
        let payload = c.chat.compose(mid, text)?;
        self.save_message(id, &mid)?;
        self.queue(id, &payload)?;
        self.kick(id);
        Ok(hex(&mid.0))
    }

    /// Shows the chat: unread messages from the peer become read, their
    /// countdowns start, and a receipt goes out.
    fn history(&mut self, id: &SecretId) -> Result<Vec<HistoryItem>, SecretError> {
        let now = now_ms();
        let c = self.chat(id)?;
        for receipt in c.chat.mark_read(now) {
            if let SecretPayload::Read { ids } = &receipt {
                for mid in ids {
                    self.save_message(id, mid)?;
                }
            }
            if self.chats[id].session.is_some() && self.chats[id].chat.state == ChatState::Active {
                self.queue(id, &receipt)?;
                self.kick(id);
            }
        }
        let c = &self.chats[id];
        Ok(c.chat
            .history(now)
            .map(|m| HistoryItem {
                id: hex(&m.id.0),
                text: m.text.clone(),
                from_me: m.from_me,
                read: m.read_at_ms.is_some(),
                timer_ms: m.timer_ms,
                expires_at: m.expires_at_ms.map(rfc3339),
            })
            .collect())
    }

    fn set_timer(&mut self, id: &SecretId, ms: Option<u64>) -> Result<SecretInfo, SecretError> {
        let c = self.chat(id)?;
        let payload = c.chat.set_timer(ms)?;
        c.record.timer_ms = ms;
        self.store.put_record(&self.chats[id].record)?;
        self.queue(id, &payload)?;
        self.kick(id);
        Ok(self.chats[id].info())
    }

    fn delete(&mut self, id: &SecretId, msgs: &[String]) -> Result<usize, SecretError> {
        let ids = msgs
            .iter()
            .map(|m| parse_message_id(m))
            .collect::<Result<Vec<_>, _>>()?;
        if ids.is_empty() || ids.len() > MAX_IDS {
            return Err(SecretError::BadInput(format!(
                "name 1 to {MAX_IDS} messages at a time (or clear the chat)"
            )));
        }
        let c = self.chat(id)?;
        let payload = c.chat.delete(&ids)?;
        for mid in &ids {
            self.erase_message(id, mid)?;
        }
        if self.chats[id].chat.state == ChatState::Active {
            self.queue(id, &payload)?;
            self.kick(id);
        }
        Ok(ids.len())
    }

    fn clear(&mut self, id: &SecretId) -> Result<usize, SecretError> {
        let c = self.chat(id)?;
        let ids: Vec<MessageId> = c.seqs.keys().copied().collect();
        let payload = c.chat.clear();
        for mid in &ids {
            self.erase_message(id, mid)?;
        }
        if self.chats[id].chat.state == ChatState::Active {
            self.queue(id, &payload)?;
            self.kick(id);
        }
        Ok(ids.len())
    }

    fn forward(&mut self, id: &SecretId, msg: &str) -> Result<(), SecretError> {
        let mid = parse_message_id(msg)?;
        let c = self.chat(id)?;
        if c.chat.message(&mid).is_none() {
            return Err(ChatError::UnknownMessage(mid).into());
        }
        Err(SecretError::Refused(
            "messages of a secret chat cannot be forwarded: they exist on these two devices only"
                .into(),
        ))
    }

    /// Closes every secret chat and erases all of them with their keys,
    /// then tells the peers that can be reached (a pending request is
    /// declined, an active chat closed). The erasure is on disk before
    /// anything is sent.
    async fn logout(&mut self) -> Result<usize, SecretError> {
        let ids: Vec<SecretId> = self.chats.keys().copied().collect();
        let mut farewells = Vec::new();
        for id in &ids {
            let Some(c) = self.chats.get_mut(id) else {
                continue;
            };
            let Some(peer) = c.peer() else {
                continue;
            };
            let request = match (c.chat.state, c.session.as_mut()) {
                (ChatState::Active, Some(session)) => {
                    let Ok(frames) =
                        session.seal(&SecretPayload::Close.encode(), now_ms(), random32())
                    else {
                        continue;
                    };
                    // Frames still waiting go first, then the farewell.
                    let mut all: Vec<SecretFrame> = c.outbox.iter().cloned().collect();
                    all.extend(frames);
                    let all = pack(&all);
                    SecretRequest::Frames {
                        secret_id: *id,
                        frames: all,
                    }
                }
                (ChatState::Pending { .. }, _) => SecretRequest::Decline { secret_id: *id },
                _ => continue,
            };
            farewells.push((peer, c.peer_addrs(), request));
        }
        for id in &ids {
            self.store.delete_chat(id)?;
        }
        if let Err(e) = self.store.commit() {
            let why = format!("logout could not erase the secret chats: {e}");
            self.failed = Some(why.clone());
            return Err(SecretError::Store(why));
        }
        for id in &ids {
            self.chats.remove(id);
            self.emit(Event::SecretClosed { secret_id: hex(id) });
        }
        // The other sides learn it now if they can be reached, else when they
        // next write (this device answers "unknown chat").
        let net = self.net.clone();
        futures::future::join_all(farewells.into_iter().map(|(peer, addrs, request)| {
            let net = net.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(3),
                    net.secret_request(peer, addrs, request),
                )
                .await
            }
        }))
        .await;
        info!(chats = ids.len(), "logged out of all secret chats");
        Ok(ids.len())
    }

    // ----- persistence helpers -----

    fn save_message(&mut self, id: &SecretId, mid: &MessageId) -> Result<(), SecretError> {
        let c = self.chat(id)?;
        let Some(m) = c.chat.message(mid).cloned() else {
            return Ok(());
        };
        let seq = *c.seqs.entry(*mid).or_insert_with(|| {
            c.next_seq += 1;
            c.next_seq - 1
        });
        let evicted = c.chat.take_evicted();
        self.store
            .put_message(id, &StoredMessage { seq, message: m })?;
        for gone in evicted {
            self.erase_message(id, &gone)?;
        }
        Ok(())
    }

    fn erase_message(&mut self, id: &SecretId, mid: &MessageId) -> Result<(), SecretError> {
        if let Some(c) = self.chats.get_mut(id) {
            c.seqs.remove(mid);
        }
        self.store.delete_message(id, mid)?;
        Ok(())
    }

    /// Seals a payload, keeps the frames on disk, then the session that
    /// sealed them.
    fn queue(&mut self, id: &SecretId, payload: &SecretPayload) -> Result<(), SecretError> {
        let c = self.chat(id)?;
        if c.outbox.len() >= MAX_OUTBOX {
            return Err(SecretError::Refused(format!(
                "{MAX_OUTBOX} frames are already waiting for the other device; wait until it is reachable"
            )));
        }
        let session = c.session.as_mut().ok_or_else(|| {
            SecretError::Refused("the secret chat has no session (not accepted yet)".into())
        })?;
        let frames = session
            .seal(&payload.encode(), now_ms(), random32())
            .map_err(|e| SecretError::Refused(e.to_string()))?;
        let snapshot = session.snapshot();
        c.record.rekeys = session.rekeys();
        for f in &frames {
            self.store.put_frame(id, f)?;
        }
        self.store.put_session(id, &snapshot)?;
        self.chat(id)?.enqueue(frames);
        Ok(())
    }

    // ----- delivery -----

    fn on_peer_back(&mut self, peer_id: &str) {
        let due: Vec<SecretId> = self
            .chats
            .iter()
            .filter(|(_, c)| c.peer().is_some_and(|p| p.to_string() == peer_id))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(c) = self.chats.get_mut(&id) {
                c.retry_at = None;
                c.backoff = Duration::from_secs(1);
            }
            self.kick(&id);
        }
    }

    fn retry_due(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let now = tokio::time::Instant::now();
        let due: Vec<SecretId> = self
            .chats
            .iter()
            .filter(|(_, c)| !c.in_flight && c.has_work() && c.retry_at.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.kick(&id);
        }
    }

    /// Asks for the chat's next request once the batch is committed.
    fn kick(&mut self, id: &SecretId) {
        self.to_kick.insert(*id);
    }

    /// Starts the next request of a chat, unless one is in flight or the
    /// chat waits for its retry time.
    fn kick_now(&mut self, id: &SecretId) {
        let Some(c) = self.chats.get_mut(id) else {
            return;
        };
        if c.in_flight {
            return;
        }
        if c.retry_at.is_some_and(|t| t > tokio::time::Instant::now()) {
            return;
        }
        let Some(peer) = c.peer() else {
            return;
        };
        let addrs = c.peer_addrs();
        let Some(request) = self.next_request(id) else {
            return;
        };
        let Some(c) = self.chats.get_mut(id) else {
            return;
        };
        c.in_flight = true;
        let net = self.net.clone();
        let done = self.delivered_tx.clone();
        let id = *id;
        self.io.spawn(async move {
            let result = match tokio::time::timeout(
                REQUEST_TIMEOUT,
                net.secret_request(peer, addrs, request.clone()),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(NetError::Dial("timed out".into())),
            };
            let _ = done
                .send(Delivered {
                    id,
                    request,
                    result,
                })
                .await;
        });
    }

    /// What the chat asks of the other device next: the handshake step it
    /// waits on, or the frames at the front of its outbox.
    fn next_request(&self, id: &SecretId) -> Option<SecretRequest> {
        let c = self.chats.get(id)?;
        if !c.has_work() {
            return None;
        }
        Some(match c.record.pending {
            Some(Pending::Offer) => {
                let seed = c.record.handshake_seed?;
                let local = LocalDevice {
                    signing_key: &self.signing_key,
                    certificate: &self.certificate,
                };
                match Handshake::initiate(*id, &local, c.record.peer_device, seed) {
                    Ok((_, first)) => SecretRequest::Offer {
                        secret_id: *id,
                        handshake: first,
                    },
                    Err(e) => {
                        warn!(secret = %tag(id), "cannot build the offer: {e}");
                        return None;
                    }
                }
            }
            Some(Pending::Accept) => SecretRequest::Accept {
                secret_id: *id,
                handshake: c.record.our_handshake.clone()?,
            },
            Some(Pending::Decline) => SecretRequest::Decline { secret_id: *id },
            None => SecretRequest::Frames {
                secret_id: *id,
                frames: pack(&c.outbox),
            },
        })
    }

    fn backoff(&mut self, id: &SecretId, why: &str) {
        if let Some(c) = self.chats.get_mut(id) {
            debug!(secret = %tag(id), "delivery deferred: {why}");
            c.retry_at = Some(tokio::time::Instant::now() + c.backoff);
            c.backoff = (c.backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn on_delivered(&mut self, d: Delivered) {
        if self.failed.is_some() {
            return;
        }
        let id = d.id;
        let Some(c) = self.chats.get_mut(&id) else {
            return; // logged out meanwhile
        };
        c.in_flight = false;
        let response = match d.result {
            Ok(r) => r,
            Err(e) => {
                self.backoff(&id, &e.to_string());
                return;
            }
        };
        c.backoff = Duration::from_secs(1);
        c.retry_at = None;
        let outcome = match (d.request, response) {
            (SecretRequest::Frames { .. }, SecretResponse::Ack { next }) => {
                if !self.on_ack(&id, next) {
                    // The peer took none of them: sending the same frames
                    // again at once would only spin. Back off.
                    self.backoff(&id, "the other device refused the next frame");
                    return;
                }
                Ok(())
            }
            // Only if still waiting for exactly that: the user may have
            // withdrawn the offer while it was on its way.
            (SecretRequest::Offer { .. }, SecretResponse::Ok) => {
                if c.record.pending == Some(Pending::Offer) {
                    c.record.pending = None;
                }
                self.store.put_record(&c.record).map_err(SecretError::from)
            }
            (SecretRequest::Decline { .. }, SecretResponse::Ok | SecretResponse::Unknown) => {
                if c.record.pending == Some(Pending::Decline) {
                    c.record.pending = None;
                }
                self.store.put_record(&c.record).map_err(SecretError::from)
            }
            (SecretRequest::Accept { .. }, SecretResponse::Finish { handshake }) => {
                self.on_finish(&id, &handshake)
            }
            (_, SecretResponse::Unknown) => {
                info!(secret = %tag(&id), "the other device no longer has this secret chat");
                self.peer_closed(&id)
            }
            (_, SecretResponse::Refused { reason }) => {
                warn!(secret = %tag(&id), "the other device refused: {reason}");
                self.backoff(&id, &reason);
                return;
            }
            (_, other) => {
                warn!(secret = %tag(&id), ?other, "unexpected answer from the other device");
                self.backoff(&id, "unexpected answer");
                return;
            }
        };
        if let Err(e) = outcome {
            warn!(secret = %tag(&id), "{e}");
        }
        self.kick(&id);
    }

    /// Drops what the peer acknowledged; returns whether anything was.
    fn on_ack(&mut self, id: &SecretId, next: u64) -> bool {
        let Some(c) = self.chats.get_mut(id) else {
            return false;
        };
        let mut acked = Vec::new();
        while c.outbox.front().is_some_and(|f| f.n < next) {
            if let Some(f) = c.outbox.pop_front() {
                acked.push(f.n);
            }
        }
        if acked.is_empty() && c.outbox.front().is_some_and(|f| f.n > next) {
            // The peer lost frames we no longer have: nothing can repair it.
            warn!(secret = %tag(id), next, "the other device lost frames this device already dropped");
        }
        let progress = !acked.is_empty();
        for n in acked {
            if let Err(e) = self.store.delete_frame(id, n) {
                warn!("{e}");
            }
        }
        let Some(c) = self.chats.get_mut(id) else {
            return progress;
        };
        // Closed by us and everything delivered: the keys can go.
        if c.chat.state == ChatState::Closed && c.outbox.is_empty() && c.session.is_some() {
            c.session = None;
            if let Err(e) = self.store.delete_session(id) {
                warn!("{e}");
            }
        }
        progress
    }

    /// The initiator answered our acceptance: the handshake completes here.
    fn on_finish(&mut self, id: &SecretId, third: &[u8]) -> Result<(), SecretError> {
        let c = self.chat(id)?;
        let Some(hs) = c.handshake.take() else {
            return Ok(()); // already done
        };
        let established = match hs.on_message(third, now_ms()) {
            Ok(e) => e,
            Err(e) => {
                warn!(secret = %tag(id), "handshake failed: {e}");
                self.metrics.rejected_frames.inc();
                self.cancel_after_failed_handshake(id)?;
                return Ok(());
            }
        };
        let c = self.chat(id)?;
        c.record.peer_account = Some(established.peer.account);
        c.record.peer_name = established.peer.name.clone();
        let hh = established.session.short_code_key();
        c.record.fingerprint = Some(*established.session.fingerprint().as_bytes());
        c.record.sas_responder = Some(SasResponder::new(hh, random32()));
        c.record.handshake_seed = None;
        c.record.peer_handshake = None;
        c.record.our_handshake = None;
        c.record.pending = None;
        c.chat.activate();
        c.record.state = c.chat.state;
        self.store
            .put_session(id, &established.session.snapshot())?;
        let c = self.chat(id)?;
        c.session = Some(established.session);
        self.store.put_record(&self.chats[id].record)?;
        info!(secret = %tag(id), "secret chat active");
        self.emit(Event::SecretAccepted { secret_id: hex(id) });
        Ok(())
    }

    fn cancel_after_failed_handshake(&mut self, id: &SecretId) -> Result<(), SecretError> {
        let c = self.chat(id)?;
        c.chat.cancel();
        c.record.state = ChatState::Cancelled;
        c.record.pending = None;
        c.record.handshake_seed = None;
        c.handshake = None;
        self.store.put_record(&self.chats[id].record)?;
        self.emit(Event::SecretCancelled { secret_id: hex(id) });
        Ok(())
    }

    /// The peer closed the chat or no longer has it: drop the keys and what
    /// waits to be sent; the messages stay until the user clears them.
    fn peer_closed(&mut self, id: &SecretId) -> Result<(), SecretError> {
        let c = self.chat(id)?;
        let was = c.chat.state;
        let frames: Vec<u64> = c.outbox.drain(..).map(|f| f.n).collect();
        c.session = None;
        c.handshake = None;
        c.record.pending = None;
        c.record.handshake_seed = None;
        c.chat = SecretChat::restore(
            match was {
                ChatState::Pending { .. } => ChatState::Cancelled,
                ChatState::Cancelled => ChatState::Cancelled,
                _ => ChatState::Closed,
            },
            c.chat.timer_ms,
            c.chat.history(0).cloned().collect(),
        );
        c.record.state = c.chat.state;
        for n in frames {
            self.store.delete_frame(id, n)?;
        }
        self.store.delete_session(id)?;
        self.store.put_record(&self.chats[id].record)?;
        let event = match self.chats[id].chat.state {
            ChatState::Cancelled => Event::SecretCancelled { secret_id: hex(id) },
            _ => Event::SecretClosed { secret_id: hex(id) },
        };
        if state_name(was) != state_name(self.chats[id].chat.state) {
            self.emit(event);
        }
        Ok(())
    }

    // ----- requests from peers -----

    async fn on_inbound(&mut self, inbound: InboundSecret) {
        let InboundSecret {
            peer,
            request,
            channel,
        } = inbound;
        if self.failed.is_some() {
            let refusal = SecretResponse::refused("this device cannot save right now");
            self.responses.push((peer, channel, refusal));
            return;
        }
        let response = self.answer(peer, request).await;
        self.responses.push((peer, channel, response));
    }

    /// This device's answer to a request from `peer`.
    async fn answer(&mut self, peer: PeerId, request: SecretRequest) -> SecretResponse {
        let response = match request {
            SecretRequest::Offer {
                secret_id,
                handshake,
            } => self.on_offer(peer, secret_id, handshake).await,
            SecretRequest::Accept {
                secret_id,
                handshake,
            } => self.on_accept(peer, secret_id, &handshake),
            SecretRequest::Decline { secret_id } => self.on_decline(peer, secret_id),
            SecretRequest::Frames { secret_id, frames } => self.on_frames(peer, secret_id, frames),
        };
        response.unwrap_or_else(|e| {
            warn!("secret-chat request failed: {e}");
            SecretResponse::refused(&e.to_string())
        })
    }

    /// The chat `id` if it exists and belongs to `peer`.
    fn chat_with(&self, peer: &PeerId, id: &SecretId) -> Option<&Chat> {
        self.chats.get(id).filter(|c| c.peer() == Some(*peer))
    }

    async fn on_offer(
        &mut self,
        peer: PeerId,
        id: SecretId,
        first: Vec<u8>,
    ) -> Result<SecretResponse, SecretError> {
        if let Some(c) = self.chats.get(&id) {
            // A resend of an offer we have: fine. Anything else reuses an id.
            let same = c.peer() == Some(peer) && !c.record.initiator;
            return Ok(if same {
                SecretResponse::Ok
            } else {
                self.metrics.rejected_frames.inc();
                SecretResponse::refused("that secret chat id is taken")
            });
        }
        let Some(device) = device_of_peer(&peer) else {
            return Ok(SecretResponse::refused("this device id carries no key"));
        };
        let waiting = self
            .chats
            .values()
            .filter(|c| {
                c.peer() == Some(peer) && c.chat.state == (ChatState::Pending { by_me: false })
            })
            .count();
        if waiting >= MAX_PENDING_PER_PEER || self.live_chats() >= MAX_CHATS {
            return Ok(SecretResponse::refused(
                "too many secret chat requests waiting on this device",
            ));
        }
        let known = self.net.device(peer).await.ok().flatten();
        let record = ChatRecord {
            secret_id: id,
            initiator: false,
            peer_device: device,
            peer_account: known.as_ref().and_then(|k| k.account),
            peer_name: known.map(|k| k.name).unwrap_or_default(),
            peer_addrs: Vec::new(),
            created_ms: now_ms(),
            state: ChatState::Pending { by_me: false },
            timer_ms: None,
            pending: None,
            handshake_seed: None,
            peer_handshake: Some(first),
            our_handshake: None,
            sas_nonce: None,
            sas_responder: None,
            short_code: None,
            sas_failed: false,
            fingerprint: None,
            rekeys: 0,
        };
        self.store.put_record(&record)?;
        info!(secret = %tag(&id), "secret chat request");
        self.emit(Event::SecretRequest {
            secret_id: hex(&id),
            peer: record.peer_account.map(|a| a.to_string()),
            peer_device: peer.to_string(),
            name: record.peer_name.clone(),
        });
        self.chats.insert(
            id,
            Chat {
                record,
                chat: SecretChat::requested_by_peer(),
                seqs: HashMap::new(),
                next_seq: 0,
                session: None,
                handshake: None,
                outbox: VecDeque::new(),
                in_flight: false,
                retry_at: None,
                backoff: Duration::from_secs(1),
            },
        );
        Ok(SecretResponse::Ok)
    }

    fn on_accept(
        &mut self,
        peer: PeerId,
        id: SecretId,
        second: &[u8],
    ) -> Result<SecretResponse, SecretError> {
        let Some(c) = self.chat_with(&peer, &id) else {
            return Ok(SecretResponse::Unknown);
        };
        if !c.record.initiator {
            return Ok(SecretResponse::refused(
                "this device did not start that chat",
            ));
        }
        if c.chat.state == ChatState::Active {
            // Our answer was lost on the way: send it again.
            return Ok(match &c.record.our_handshake {
                Some(third) => SecretResponse::Finish {
                    handshake: third.clone(),
                },
                None => SecretResponse::refused("the chat is already active"),
            });
        }
        if c.chat.state != (ChatState::Pending { by_me: true }) {
            return Ok(SecretResponse::Unknown);
        }
        let c = self.chat(&id)?;
        let Some(hs) = c.handshake.take() else {
            return Ok(SecretResponse::refused("the handshake is not ready"));
        };
        let established = match hs.on_message(second, now_ms()) {
            Ok(e) => e,
            Err(e) => {
                // Nothing changes: a forged answer must not end a real offer.
                self.metrics.rejected_frames.inc();
                warn!(secret = %tag(&id), "rejected a handshake answer: {e}");
                self.rebuild_handshake_for(&id);
                return Ok(SecretResponse::refused(&format!("handshake failed: {e}")));
            }
        };
        let c = self.chat(&id)?;
        if let Some(expected) = c.record.peer_account
            && expected != established.peer.account
        {
            warn!(secret = %tag(&id), "the device answered for another account than asked for");
            self.metrics.rejected_frames.inc();
            self.cancel_after_failed_handshake(&id)?;
            return Ok(SecretResponse::refused("wrong account"));
        }
        let Some(third) = established.reply.clone() else {
            return Ok(SecretResponse::refused("handshake did not complete"));
        };
        let session = established.session;
        c.record.peer_account = Some(established.peer.account);
        c.record.peer_name = established.peer.name.clone();
        c.record.fingerprint = Some(*session.fingerprint().as_bytes());
        c.record.handshake_seed = None;
        c.record.our_handshake = Some(third.clone());
        c.record.pending = None;
        let nonce = random32();
        c.record.sas_nonce = Some(nonce);
        c.chat.activate();
        c.record.state = c.chat.state;
        let (_, commit) = SasInitiator::start(session.short_code_key(), nonce);
        self.store.put_session(&id, &session.snapshot())?;
        self.chat(&id)?.session = Some(session);
        self.store.put_record(&self.chats[&id].record)?;
        self.queue(&id, &SecretPayload::ShortCode(commit))?;
        info!(secret = %tag(&id), "secret chat active");
        self.emit(Event::SecretAccepted {
            secret_id: hex(&id),
        });
        self.kick(&id);
        Ok(SecretResponse::Finish { handshake: third })
    }

    fn rebuild_handshake_for(&mut self, id: &SecretId) {
        if let Some(mut c) = self.chats.remove(id) {
            self.rebuild_handshake(&mut c);
            self.chats.insert(*id, c);
        }
    }

    fn on_decline(&mut self, peer: PeerId, id: SecretId) -> Result<SecretResponse, SecretError> {
        let Some(c) = self.chat_with(&peer, &id) else {
            return Ok(SecretResponse::Unknown);
        };
        if !matches!(c.chat.state, ChatState::Pending { .. }) {
            return Ok(SecretResponse::Ok);
        }
        let c = self.chat(&id)?;
        c.chat.cancel();
        c.record.state = c.chat.state;
        c.record.pending = None;
        c.record.handshake_seed = None;
        c.record.peer_handshake = None;
        c.record.our_handshake = None;
        c.handshake = None;
        self.store.put_record(&self.chats[&id].record)?;
        info!(secret = %tag(&id), "secret chat cancelled by the other device");
        self.emit(Event::SecretCancelled {
            secret_id: hex(&id),
        });
        Ok(SecretResponse::Ok)
    }

    fn on_frames(
        &mut self,
        peer: PeerId,
        id: SecretId,
        frames: Vec<SecretFrame>,
    ) -> Result<SecretResponse, SecretError> {
        let Some(c) = self.chat_with(&peer, &id) else {
            self.metrics.rejected_frames.inc();
            return Ok(SecretResponse::Unknown);
        };
        if c.outbox.len() >= MAX_OUTBOX {
            // Answers to these frames could not be queued: let the peer wait
            // until ours have drained.
            return Ok(SecretResponse::refused(
                "too many frames waiting to go back",
            ));
        }
        if c.session.is_none() {
            // Accepted here, but the answer that completes the handshake is
            // still on its way back: the frames are early, not unknown.
            if c.handshake.is_some() {
                return Ok(SecretResponse::refused("the handshake is not finished yet"));
            }
            return Ok(SecretResponse::Unknown);
        }
        let now = now_ms();
        let mut payloads = Vec::new();
        let mut replies = Vec::new();
        let rejected = self.metrics.rejected_frames.clone();
        {
            let c = self.chat(&id)?;
            let session = c.session.as_mut().expect("checked above");
            for frame in &frames {
                match session.open(frame, now, random32()) {
                    Ok(opened) => {
                        payloads.extend(opened.payload);
                        replies.extend(opened.reply);
                    }
                    Err(SessionError::Replay { got }) => {
                        // Already received: a resend after a lost answer, or
                        // an attacker's replay. Either way, nothing to do.
                        debug!(secret = %tag(&id), got, "ignored a frame received before");
                        rejected.inc();
                    }
                    Err(e) => {
                        if !matches!(e, SessionError::Gap { .. }) {
                            warn!(secret = %tag(&id), n = frame.n, "rejected a frame: {e}");
                        }
                        rejected.inc();
                        break;
                    }
                }
            }
        }
        let opened_any = !payloads.is_empty() || !replies.is_empty();
        // The session's own answers (a re-key acceptance) were sealed while
        // opening, so they go into the outbox before anything the payloads
        // make this side send (a short-code step): frames leave in the order
        // they were numbered, or the other device refuses the batch.
        if !replies.is_empty() {
            let snapshot = self.chats[&id]
                .session
                .as_ref()
                .map(SecretSession::snapshot);
            for f in &replies {
                self.store.put_frame(&id, f)?;
            }
            if let Some(snapshot) = snapshot {
                self.store.put_session(&id, &snapshot)?;
            }
            self.chat(&id)?.enqueue(replies);
            self.kick(&id);
        }
        for bytes in payloads {
            match SecretPayload::decode(&bytes) {
                Ok(p) => self.apply(&id, p, now)?,
                Err(e) => {
                    self.metrics.rejected_frames.inc();
                    warn!(secret = %tag(&id), "rejected a payload: {e}");
                }
            }
        }
        let Some(c) = self.chats.get_mut(&id) else {
            return Ok(SecretResponse::Unknown);
        };
        let Some(session) = c.session.as_ref() else {
            // Closed by this batch.
            return Ok(SecretResponse::Ack { next: u64::MAX });
        };
        let next = session.next_expected();
        c.record.rekeys = session.rekeys();
        if opened_any {
            // The peer's frames prove it finished the handshake.
            c.record.our_handshake = None;
        }
        let snapshot = session.snapshot();
        self.store.put_session(&id, &snapshot)?;
        self.store.put_record(&self.chats[&id].record)?;
        Ok(SecretResponse::Ack { next })
    }

    /// Applies one decrypted payload from the peer.
    fn apply(
        &mut self,
        id: &SecretId,
        payload: SecretPayload,
        now: u64,
    ) -> Result<(), SecretError> {
        if let SecretPayload::ShortCode(step) = payload {
            return self.on_short_code(id, step);
        }
        let c = self.chat(id)?;
        let events = c.chat.on_payload(payload, now);
        let sid = hex(id);
        for event in events {
            match event {
                ChatEvent::Message(mid) => {
                    self.save_message(id, &mid)?;
                    let text = self.chats[id]
                        .chat
                        .message(&mid)
                        .map(|m| m.text.clone())
                        .unwrap_or_default();
                    self.emit(Event::SecretMessage {
                        secret_id: sid.clone(),
                        message_id: hex(&mid.0),
                        text,
                    });
                }
                ChatEvent::Read(ids) => {
                    for mid in &ids {
                        self.save_message(id, mid)?;
                    }
                    self.emit(Event::SecretRead {
                        secret_id: sid.clone(),
                        message_ids: hex_ids(&ids),
                    });
                }
                ChatEvent::Deleted(ids) => {
                    for mid in &ids {
                        self.erase_message(id, mid)?;
                    }
                    self.emit(Event::SecretDeleted {
                        secret_id: sid.clone(),
                        message_ids: hex_ids(&ids),
                    });
                }
                ChatEvent::Expired(ids) => {
                    for mid in &ids {
                        self.erase_message(id, mid)?;
                    }
                }
                ChatEvent::Cleared => {
                    let ids: Vec<MessageId> = self.chats[id].seqs.keys().copied().collect();
                    for mid in &ids {
                        self.erase_message(id, mid)?;
                    }
                    self.emit(Event::SecretCleared {
                        secret_id: sid.clone(),
                    });
                }
                ChatEvent::TimerChanged(ms) => {
                    self.chat(id)?.record.timer_ms = ms;
                    self.store.put_record(&self.chats[id].record)?;
                    self.emit(Event::SecretTimer {
                        secret_id: sid.clone(),
                        timer_ms: ms,
                    });
                }
                ChatEvent::Closed => {
                    info!(secret = %tag(id), "secret chat closed by the other device");
                    self.peer_closed(id)?;
                    self.emit(Event::SecretClosed {
                        secret_id: sid.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn on_short_code(&mut self, id: &SecretId, step: SasMessage) -> Result<(), SecretError> {
        let c = self.chat(id)?;
        let Some(hh) = c.session.as_ref().map(SecretSession::short_code_key) else {
            return Ok(());
        };
        let mut reply = None;
        if c.record.initiator {
            let Some(nonce) = c.record.sas_nonce.take() else {
                return Ok(()); // already done
            };
            match SasInitiator::start(hh, nonce).0.on_message(step) {
                Ok((reveal, code)) => {
                    c.record.short_code = Some(*code.as_bytes());
                    reply = Some(reveal);
                }
                Err(e) => {
                    warn!(secret = %tag(id), "short-code exchange failed: {e}");
                    c.record.sas_failed = true;
                }
            }
        } else {
            let Some(responder) = c.record.sas_responder.as_mut() else {
                return Ok(());
            };
            match responder.on_message(step) {
                Ok(SasStep::Send(m)) => reply = Some(m),
                Ok(SasStep::Done(code)) => {
                    c.record.short_code = Some(*code.as_bytes());
                    c.record.sas_responder = None;
                }
                Err(e) => {
                    warn!(secret = %tag(id), "short-code exchange failed: {e}");
                    c.record.sas_failed = true;
                    c.record.sas_responder = None;
                }
            }
        }
        self.store.put_record(&self.chats[id].record)?;
        if let Some(m) = reply {
            self.queue(id, &SecretPayload::ShortCode(m))?;
            self.kick(id);
        }
        Ok(())
    }

    // ----- timers -----

    fn next_expiry(&self) -> Option<u64> {
        self.chats
            .values()
            .filter_map(|c| c.chat.next_expiry())
            .min()
    }

    fn expire(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let now = now_ms();
        let ids: Vec<SecretId> = self.chats.keys().copied().collect();
        for id in ids {
            let Some(c) = self.chats.get_mut(&id) else {
                continue;
            };
            if let Some(ChatEvent::Expired(gone)) = c.chat.expire(now) {
                for mid in &gone {
                    if let Err(e) = self.erase_message(&id, mid) {
                        warn!("{e}");
                    }
                }
                debug!(secret = %tag(&id), count = gone.len(), "messages self-destructed");
                self.emit(Event::SecretExpired {
                    secret_id: hex(&id),
                    message_ids: hex_ids(&gone),
                });
            }
        }
    }
}

/// Sleeps until the wall-clock time `at_ms`, or forever without one.
async fn sleep_until_ms(at_ms: Option<u64>) {
    match at_ms {
        Some(at) => {
            let wait = at.saturating_sub(now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The service's delivery logic, two devices driven step by step: each
    //! request goes through the wire encoding, and the test decides when
    //! each answer arrives, which a network cannot be made to do on cue.

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{data_dir::DataDir, erasable::ErasableStore, keys};

    struct Device {
        svc: SecretService,
        peer: PeerId,
        ticket: Ticket,
        _dir: tempfile::TempDir,
    }

    fn device(name: &str) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let identity = keys::create(&data, name, None).unwrap();
        let (_, inbound) = mpsc::channel(1);
        let (svc, _) = SecretService::new(ServiceParts {
            net: NetworkHandle::detached(),
            bus: EventBus::default(),
            metrics: NodeMetrics::register(&mut Registry::default()),
            store: ChatStore::new(ErasableStore::open(data.erasable()).unwrap()),
            signing_key: keys::device_signing_key(&identity.device).unwrap(),
            certificate: identity.certificate.clone(),
            inbound,
        })
        .unwrap();
        Device {
            svc,
            peer: identity.peer_id(),
            ticket: Ticket {
                account: identity.account_id(),
                device: identity.certificate.device,
                addrs: Vec::new(),
            },
            _dir: dir,
        }
    }

    /// `from`'s next request for the chat, as the other side decodes it.
    fn next_on_wire(from: &Device, id: &SecretId) -> (SecretRequest, SecretRequest) {
        let request = from.svc.next_request(id).expect("a request to send");
        let wire = SecretRequest::decode(&request.encode())
            .unwrap_or_else(|e| panic!("the other device refuses {request:?}: {e}"));
        (request, wire)
    }

    /// One request from `from` to `to` and its answer back to `from`.
    async fn exchange(from: &mut Device, to: &mut Device, id: &SecretId) -> SecretResponse {
        let (request, wire) = next_on_wire(from, id);
        let response = to.svc.answer(from.peer, wire).await;
        from.svc.on_delivered(Delivered {
            id: *id,
            request,
            result: Ok(response.clone()),
        });
        response
    }

    /// Sends from `from` until its outbox is empty; every batch must be
    /// taken whole.
    async fn drain(from: &mut Device, to: &mut Device, id: &SecretId) {
        while !from.svc.chats[id].outbox.is_empty() {
            let waiting = from.svc.chats[id].outbox.len();
            let response = exchange(from, to, id).await;
            assert!(
                matches!(response, SecretResponse::Ack { .. })
                    && from.svc.chats[id].outbox.len() < waiting,
                "no progress: {response:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_batch_held_back_until_the_handshake_finished_is_answered_in_order() {
        let (mut a, mut b) = (device("alice"), device("bob"));
        a.svc
            .start(StartTarget::Ticket(b.ticket.clone()))
            .await
            .unwrap();
        let id = *a.svc.chats.keys().next().unwrap();
        assert_eq!(exchange(&mut a, &mut b, &id).await, SecretResponse::Ok);
        b.svc.accept(&id).unwrap();

        // Bob's acceptance reaches Alice, but her answer that completes the
        // handshake is slow to come back…
        let (accept, wire) = next_on_wire(&b, &id);
        let finish = a.svc.answer(b.peer, wire).await;
        assert!(
            matches!(finish, SecretResponse::Finish { .. }),
            "{finish:?}"
        );
        // …so her first frame (the short-code commitment) is refused early…
        let early = exchange(&mut a, &mut b, &id).await;
        assert_eq!(
            early,
            SecretResponse::refused("the handshake is not finished yet")
        );
        b.svc.on_delivered(Delivered {
            id,
            request: accept,
            result: Ok(finish),
        });
        assert!(b.svc.chats[&id].session.is_some());

        // …and goes again with the next 120 messages, which include a
        // re-key offer. Bob's answers to both travel in one batch.
        for i in 0..120 {
            a.svc.send(&id, &format!("m{i}")).unwrap();
        }
        drain(&mut a, &mut b, &id).await;
        assert_eq!(b.svc.chats[&id].chat.len(), 120);
        let bobs = &b.svc.chats[&id].outbox;
        assert!(
            bobs.len() >= 2,
            "Bob owes a re-key answer and a short-code step"
        );
        drain(&mut b, &mut a, &id).await;
        drain(&mut a, &mut b, &id).await;

        // The exchange completed: both show the same short code, the keys
        // were replaced, and the chat goes on both ways.
        let code = |d: &Device| d.svc.chats[&id].record.short_code;
        assert!(code(&a).is_some());
        assert_eq!(code(&a), code(&b));
        let epoch = |d: &Device| d.svc.chats[&id].session.as_ref().unwrap().epoch();
        assert_eq!((epoch(&a), epoch(&b)), (1, 1));
        b.svc.send(&id, "got them all").unwrap();
        drain(&mut b, &mut a, &id).await;
        let history = a.svc.history(&id).unwrap();
        assert_eq!(history.len(), 121);
        assert_eq!(history.last().unwrap().text, "got them all");
    }
}
