//! Cloud-chat benchmarks over real `tern` processes:
//!
//! - `cloud-send`: one message, from `POST /v1/chats/{id}/messages` until
//!   the answer says `stored` (a write quorum of storage peers has it on
//!   disk), one after another;
//! - `cloud-throughput`: many 1 KiB messages through one node's API at once
//!   (`wait_ms: 0`), until the last is `stored`;
//! - `cloud-catchup`: a large log on one storage peer; a new storage peer
//!   joins the set and is timed until it holds all of it.
//!
//! Each prints its references, measured in the same run.

use std::{
    collections::{BTreeMap, HashSet},
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use futures::{Future, StreamExt};
use libp2p::{Multiaddr, PeerId, Swarm, request_response, swarm::SwarmEvent};
use serde_json::{Value, json};
use tern_node::{
    api::StatusResponse,
    client::ApiClient,
    cloud::{
        service::parse_storage_peer,
        wire::{PushResult, StoreRequest, StoreResponse},
    },
    net::codec::RecordCodec,
};
use tern_protocol::{
    AccountKeypair, DevicePublicKey, Record,
    cloud::{ChatId, ChatLog, ChatMember, ChatSummary, Draft, Entry},
};
use tern_tools::stats::{ms, percentile};
use tokio::runtime::Runtime;

use super::{Node, init, start_node_with};

/// Nodes that store any account's chats, with room for a large log.
const STORAGE_FLAGS: &[&str] = &["--host-open", "--storage-quota-mib", "16384"];

/// How long any setup condition may take.
const SETUP_LIMIT: Duration = Duration::from_secs(60);

/// Fresh bytes for the protocol's `random` inputs (key and nonce
/// derivation): std's randomly keyed hasher over a counter. Unique per
/// call, which is all a benchmark's chats need; not for real keys.
fn random_bytes<const N: usize>() -> [u8; N] {
    use std::{
        hash::{BuildHasher, Hasher},
        sync::atomic::{AtomicU64, Ordering},
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let state = std::collections::hash_map::RandomState::new();
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let mut h = state.build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
    }
    out
}

fn random32() -> [u8; 32] {
    random_bytes()
}

/// Polls `f` every 20 ms until it yields a value.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------ processes

/// The 1-minute load average: other work on this machine skews a run.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn print_load(at_start: &str) {
    println!(
        "| (same run) 1-minute load average at the start / end (2 vCPUs) | {at_start} / {} | | |",
        load()
    );
}

/// CPU seconds (user + system) a process has used, per thread name.
/// A process's resident memory in MiB (`VmRSS`), 0 if unreadable.
fn resident_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn thread_cpu(pid: u32) -> BTreeMap<String, f64> {
    // /proc reports CPU time in USER_HZ ticks, 100 a second on Linux.
    let hz = 100.0;
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ppid …": fields after the name, utime 14th and
        // stime 15th of the whole line.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|i| f.get(*i)?.parse::<f64>().ok())
            .sum();
        *out.entry(name).or_default() += ticks / hz;
    }
    out
}

fn cpu_total(pid: u32) -> f64 {
    thread_cpu(pid).values().sum()
}

/// Per-thread CPU used between two snapshots, largest first, as text.
fn cpu_breakdown(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let mut used: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v >= 0.05)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    used.iter()
        .map(|(k, v)| format!("{k} {v:.1} s"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Nodes on loopback, all connected to each other, storing for anyone.
struct Cluster {
    nodes: Vec<Node>,
    clients: Vec<ApiClient>,
    status: Vec<StatusResponse>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn start(tern: &Path, n: usize, rt: &Runtime) -> anyhow::Result<Self> {
        let (mut nodes, mut clients, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
        for k in 1..=n {
            let d = tempfile::tempdir()?;
            init(tern, d.path(), &format!("node-{k}"))?;
            let (node, _) = start_node_with(tern, d.path(), STORAGE_FLAGS)?;
            clients.push(ApiClient::new(&node.dir)?);
            nodes.push(node);
            dirs.push(d);
        }
        let status = rt.block_on(async {
            let mut status = Vec::new();
            for c in &clients {
                status.push(c.get::<StatusResponse>("/v1/status").await?);
            }
            for (a, client) in clients.iter().enumerate() {
                for s in &status[a + 1..] {
                    let _: Value = client
                        .post("/v1/connect", &json!({ "target": dial_addr(s)? }))
                        .await?;
                }
            }
            anyhow::Ok(status)
        })?;
        Ok(Self {
            nodes,
            clients,
            status,
            _dirs: dirs,
        })
    }

    fn pid(&self, k: usize) -> u32 {
        self.nodes[k].child.id()
    }

    fn data_dir(&self, k: usize) -> &Path {
        self._dirs[k].path()
    }

    /// A chat between the accounts of nodes 1 and 2, stored on all nodes
    /// with a write quorum of `quorum`, known to both members.
    async fn open_chat(&self, quorum: u8) -> anyhow::Result<String> {
        let bob = self.status[1].account_id.clone();
        wait_for("node 1 to learn node 2's account", SETUP_LIMIT, || async {
            self.clients[0]
                .get::<Value>(&format!("/v1/accounts/{bob}"))
                .await
                .ok()
        })
        .await?;
        let peers: Vec<&str> = self.status.iter().map(|s| s.peer_id.as_str()).collect();
        let info: Value = self.clients[0]
            .post(
                "/v1/chats",
                &json!({ "with": [bob], "title": "bench", "storage": peers, "quorum": quorum }),
            )
            .await?;
        let chat = info["chat_id"].as_str().context("chat_id")?.to_owned();
        wait_for("node 2 to have the chat", SETUP_LIMIT, || async {
            let list: Value = self.clients[1].get("/v1/chats").await.ok()?;
            list.as_array()?
                .iter()
                .any(|c| c["chat_id"] == chat.as_str())
                .then_some(())
        })
        .await?;
        Ok(chat)
    }
}

/// A ratio with two significant digits, however small.
fn ratio(r: f64) -> String {
    let digits = if r > 0.0 {
        (1 - r.log10().floor() as i32).max(0) as usize
    } else {
        2
    };
    format!("{r:.digits$}×")
}

/// A chat id from its 32 hex characters.
fn chat_id(hex: &str) -> anyhow::Result<ChatId> {
    ensure!(hex.len() == 32, "{hex:?} is not a full chat id");
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(ChatId(id))
}

fn dial_addr(s: &StatusResponse) -> anyhow::Result<String> {
    let tcp = s
        .listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .context("tcp addr")?;
    Ok(format!("{tcp}/p2p/{}", s.peer_id))
}

// ------------------------------------------------- a /tern/store/1 client

/// A bare libp2p peer speaking `/tern/store/1` to one node.
struct StoreClient {
    swarm: Swarm<request_response::Behaviour<RecordCodec<StoreRequest, StoreResponse>>>,
    peer: PeerId,
}

impl StoreClient {
    async fn connect(target: &str) -> anyhow::Result<Self> {
        let target: Multiaddr = target.parse()?;
        // The codec counts rejected frames in a metrics counter; a fresh one.
        let codec = RecordCodec::new(Default::default());
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default().nodelay(true),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )?
            .with_behaviour(|_| {
                request_response::Behaviour::with_codec(
                    codec,
                    [(
                        libp2p::StreamProtocol::new("/tern/store/1"),
                        request_response::ProtocolSupport::Outbound,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(120)),
                )
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        swarm.dial(target)?;
        let peer = tokio::time::timeout(SETUP_LIMIT, async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } => return Ok(peer_id),
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        bail!("cannot reach the node: {error}")
                    }
                    _ => {}
                }
            }
        })
        .await
        .context("no connection")??;
        Ok(Self { swarm, peer })
    }

    async fn ask(&mut self, request: StoreRequest) -> anyhow::Result<StoreResponse> {
        use request_response::{Event, Message};
        let id = self.swarm.behaviour_mut().send_request(&self.peer, request);
        loop {
            match self.swarm.select_next_some().await {
                SwarmEvent::Behaviour(Event::Message {
                    message:
                        Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == id => return Ok(response),
                SwarmEvent::Behaviour(Event::OutboundFailure {
                    request_id, error, ..
                }) if request_id == id => bail!("store request failed: {error}"),
                _ => {}
            }
        }
    }

    async fn summary(&mut self, chat: ChatId) -> anyhow::Result<Option<ChatSummary>> {
        match self.ask(StoreRequest::Summary { chat }).await? {
            StoreResponse::Summary(s) => Ok(s),
            other => bail!("expected a summary, got {other:?}"),
        }
    }

    /// Pushes entries; every one must come back `Stored`.
    async fn push_stored(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        let n = entries.len();
        match self.ask(StoreRequest::Push { entries }).await? {
            StoreResponse::Pushed { results } => {
                ensure!(
                    results.len() == n,
                    "{} results for {n} entries",
                    results.len()
                );
                if let Some(bad) = results.iter().find(|r| **r != PushResult::Stored) {
                    bail!("a pushed entry was not stored: {bad:?}");
                }
                Ok(())
            }
            other => bail!("expected push results, got {other:?}"),
        }
    }
}

// ------------------------------------------------------------ references

/// 1 KiB appends to one file, each followed by `fdatasync`: what one
/// durable commit of a small record costs on this disk.
struct FsyncProbe {
    _dir: tempfile::TempDir,
    file: std::fs::File,
}

impl FsyncProbe {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir_in(dir)?;
        let file = std::fs::File::create(dir.path().join("fsync-reference"))?;
        Ok(Self { _dir: dir, file })
    }

    fn sample(&mut self) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        self.file.write_all(&[7u8; 1024])?;
        self.file.sync_data()?;
        Ok(t0.elapsed())
    }
}

/// Latencies of `n` fsynced 1 KiB appends in `dir`, one after another.
fn fsync_latencies(dir: &Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut probe = FsyncProbe::new(dir)?;
    (0..n).map(|_| probe.sample()).collect()
}

/// Sequential write of `bytes` in 1 MiB writes, then one `fdatasync`, in
/// `dir`; bytes per second.
fn disk_write_rate(dir: &Path, bytes: usize) -> anyhow::Result<f64> {
    let tmp = tempfile::tempdir_in(dir)?;
    let mut f = std::fs::File::create(tmp.path().join("write-reference"))?;
    let chunk = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])?;
        left -= n;
    }
    f.sync_data()?;
    Ok(bytes as f64 / t0.elapsed().as_secs_f64())
}

/// Copies `bytes` over one loopback TCP connection (64 KiB writes) inside
/// this process; bytes per second.
async fn tcp_copy_rate(bytes: usize) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0usize;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        anyhow::Ok(got)
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let chunk = vec![0xa5u8; 1 << 16];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await?;
        left -= n;
    }
    s.shutdown().await?;
    let got = reader.await??;
    ensure!(got == bytes, "copied {got} of {bytes} bytes");
    Ok(bytes as f64 / t0.elapsed().as_secs_f64())
}

/// A member device built in this process from fixed seeds.
fn member(seed: u8) -> anyhow::Result<(AccountKeypair, ChatMember)> {
    let account = AccountKeypair::from_secret_bytes(&[seed; 32]);
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed ^ 0x5a; 32]);
    let public = DevicePublicKey::from_bytes(key.verifying_key().to_bytes())?;
    let cert = account.certify(public, "bench", 1)?;
    let member = ChatMember::for_account(&account, key, cert)?;
    Ok((account, member))
}

/// A chat of two in-process members, its genesis and first storage set
/// (`peers`, quorum 1) already in `log`.
fn in_process_chat(
    peers: Vec<tern_protocol::cloud::account::StoragePeer>,
) -> anyhow::Result<(ChatMember, ChatLog, Vec<Entry>)> {
    let (_, mut alice) = member(1)?;
    let (bob_account, bob) = member(2)?;
    let chat = ChatId(random_bytes());
    let genesis = alice.create(
        chat,
        &[(bob_account.id(), bob.encryption_key())],
        Vec::new(),
        Some("bench"),
        random32(),
    )?;
    let mut log = ChatLog::new(chat);
    log.insert_composed(genesis.clone())?;
    let storage = alice.compose(&log, Draft::Storage { peers, quorum: 1 }, random32())?;
    log.insert_composed(storage.clone())?;
    Ok((alice, log, vec![genesis.into(), storage.into()]))
}

fn text_draft(text: &str) -> Draft {
    Draft::Text {
        text: text.to_owned(),
        reply_to: None,
    }
}

/// What one message costs in one process: composed (encrypt, sign) and
/// kept (verified) by its author, as a member node does; and verified
/// alone into a fresh log, as a storage peer does. Messages per second.
fn in_process_rates(n: usize, bytes: usize) -> anyhow::Result<(f64, f64)> {
    let somewhere = tern_protocol::cloud::account::StoragePeer {
        node: DevicePublicKey::from_bytes(
            ed25519_dalek::SigningKey::from_bytes(&[9; 32])
                .verifying_key()
                .to_bytes(),
        )?,
        addrs: Vec::new(),
    };
    let (mut alice, mut log, first) = in_process_chat(vec![somewhere])?;
    let text = "x".repeat(bytes);
    let mut written = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let e = alice.compose(&log, text_draft(&text), random32())?;
        log.insert_composed(e.clone())?;
        written.push(e.into_entry());
    }
    let member_rate = n as f64 / t0.elapsed().as_secs_f64();
    let mut fresh = ChatLog::new(log.chat());
    for e in first {
        fresh.insert(e)?;
    }
    let t0 = Instant::now();
    for e in written {
        fresh.insert(e)?;
    }
    let storage_rate = n as f64 / t0.elapsed().as_secs_f64();
    Ok((member_rate, storage_rate))
}

// ------------------------------------------------------------ cloud-send

pub fn cloud_send(tern: &Path, sends: usize, bytes: usize) -> anyhow::Result<()> {
    let load_at_start = load();
    let rt = Runtime::new()?;
    let cluster = Cluster::start(tern, 3, &rt)?;
    let chat = rt.block_on(cluster.open_chat(2))?;
    eprintln!(
        "node pids: {:?}",
        (0..3).map(|k| cluster.pid(k)).collect::<Vec<_>>()
    );
    let text = "x".repeat(bytes);
    let path = format!("/v1/chats/{chat}/messages");
    let a = &cluster.clients[0];
    // The disk reference is sampled between sends, so both see the same
    // disk (this machine's virtual disk is shared and its latency drifts).
    let mut probe = FsyncProbe::new(cluster.data_dir(0))?;
    let mut fsync = Vec::with_capacity(sends);
    let (samples, not_stored, local, api) = rt.block_on(async {
        for _ in 0..20 {
            let _: Value = a.post(&path, &json!({ "text": text })).await?;
        }
        let mut samples = Vec::with_capacity(sends);
        let mut not_stored = 0;
        for _ in 0..sends {
            let t0 = Instant::now();
            let r: Value = a.post(&path, &json!({ "text": text })).await?;
            samples.push(t0.elapsed());
            if r["status"] != "stored" && r["status"] != "read" {
                not_stored += 1;
            }
            fsync.push(probe.sample()?);
        }
        // The local part alone: answered after node 1's own commit; a pause
        // after each lets its replication finish before the next.
        let mut local = Vec::new();
        for _ in 0..100 {
            let t0 = Instant::now();
            let _: Value = a
                .post(&path, &json!({ "text": text, "wait_ms": 0 }))
                .await?;
            local.push(t0.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut api = Vec::new();
        for _ in 0..200 {
            let t0 = Instant::now();
            let _: StatusResponse = a.get("/v1/status").await?;
            api.push(t0.elapsed());
        }
        anyhow::Ok((samples, not_stored, local, api))
    })?;
    // A /tern/store/1 round trip to node 2 that touches no disk: a summary.
    let store_rtt = rt.block_on(async {
        let mut c = StoreClient::connect(&dial_addr(&cluster.status[1])?).await?;
        let id = chat_id(&chat)?;
        let mut out = Vec::new();
        for _ in 0..200 {
            let t0 = Instant::now();
            c.summary(id).await?;
            out.push(t0.elapsed());
        }
        anyhow::Ok(out)
    })?;

    let p = |s: &[Duration], q| percentile(s, q).unwrap_or_default();
    let head = &samples[..samples.len().min(100)];
    let tail = &samples[samples.len().saturating_sub(100)..];
    let floor = p(&api, 50.0) + p(&fsync, 50.0) + p(&store_rtt, 50.0) + p(&fsync, 50.0);
    println!(
        "| cloud send → stored (3 storage peers, quorum 2, {bytes} B, {sends} sequential; {not_stored} answered before quorum) | p50 {} / p99 {} (first 100: p50 {}; last 100: p50 {}) | fsynced 1 KiB append, same disk, one after each send: p50 {} / p99 {} | {:.1}× |",
        ms(p(&samples, 50.0)),
        ms(p(&samples, 99.0)),
        ms(p(head, 50.0)),
        ms(p(tail, 50.0)),
        ms(p(&fsync, 50.0)),
        ms(p(&fsync, 99.0)),
        p(&samples, 50.0).as_secs_f64() / p(&fsync, 50.0).as_secs_f64().max(1e-9),
    );
    println!(
        "| (same run) send with `wait_ms: 0`: node 1's own commit only, 100 sends | p50 {} / p99 {} | | |",
        ms(p(&local, 50.0)),
        ms(p(&local, 99.0)),
    );
    println!(
        "| (same run) `GET /v1/status` round trip / `/tern/store/1` summary round trip to node 2 | p50 {} / p50 {} | floor: API + fsync + store RTT + fsync = {} | send p50 ÷ floor: {:.1}× |",
        ms(p(&api, 50.0)),
        ms(p(&store_rtt, 50.0)),
        ms(floor),
        p(&samples, 50.0).as_secs_f64() / floor.as_secs_f64().max(1e-9),
    );
    print_load(&load_at_start);
    Ok(())
}

// ------------------------------------------------------ cloud-throughput

pub fn cloud_throughput(
    tern: &Path,
    messages: usize,
    concurrency: usize,
    bytes: usize,
    limit: Duration,
    socket: bool,
) -> anyhow::Result<()> {
    let load_at_start = load();
    let rt = Runtime::new()?;
    let cluster = Cluster::start(tern, 3, &rt)?;
    let chat = rt.block_on(cluster.open_chat(2))?;
    let text = "x".repeat(bytes);
    let path = format!("/v1/chats/{chat}/messages");
    let pids: Vec<u32> = (0..3).map(|k| cluster.pid(k)).collect();
    eprintln!("node pids: {pids:?}");
    let before: Vec<_> = pids.iter().map(|p| thread_cpu(*p)).collect();
    let bench_before = cpu_total(std::process::id());
    let run = async {
        let a = &cluster.clients[0];
        if socket {
            return send_on_socket(a, &chat, &text, messages).await;
        }
        let mut events = Box::pin(a.events().await?);
        let t0 = Instant::now();
        let sends = async {
            let ids = futures::stream::iter(0..messages)
                .map(|_| async {
                    let r: Value = a
                        .post(&path, &json!({ "text": text, "wait_ms": 0 }))
                        .await?;
                    anyhow::Ok(r["message_id"].as_str().context("message_id")?.to_owned())
                })
                .buffer_unordered(concurrency)
                .collect::<Vec<_>>()
                .await;
            let answered = t0.elapsed();
            let ids = ids.into_iter().collect::<Result<HashSet<String>, _>>()?;
            anyhow::Ok((ids, answered))
        };
        // Counted from node 1's event stream: one `chat_status` `stored`
        // per message of this device once its quorum holds it.
        let receive = async {
            let mut stored = HashSet::new();
            while stored.len() < messages {
                let e = tokio::time::timeout(Duration::from_secs(120), events.next())
                    .await
                    .context("no event for 120 s")?;
                match e {
                    Some(Ok(e)) if e["type"] == "chat_status" && e["chat_id"] == chat.as_str() => {
                        stored.insert(e["message_id"].as_str().unwrap_or_default().to_owned());
                    }
                    Some(Ok(e)) if e["type"] == "lagged" => return anyhow::Ok(None),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("event stream ended"),
                }
            }
            anyhow::Ok(Some((stored, t0.elapsed())))
        };
        let (sent, received) = tokio::join!(sends, receive);
        let (ids, answered) = sent?;
        ensure!(ids.len() == messages, "{} distinct ids", ids.len());
        match received? {
            Some((stored, at)) => {
                ensure!(ids.is_subset(&stored), "stored events for other messages");
                anyhow::Ok((answered, at, false))
            }
            None => {
                // The stream lagged: ask the replicas instead (a quorum in
                // sync with node 1's copy holds every message).
                let replicas = format!("/v1/chats/{chat}/replicas");
                wait_for("a quorum in sync", Duration::from_secs(600), || async {
                    let r: Value = a.get(&replicas).await.ok()?;
                    let in_sync = r
                        .as_array()?
                        .iter()
                        .filter(|v| v["in_sync"] == true)
                        .count();
                    (in_sync >= 2).then_some(())
                })
                .await?;
                anyhow::Ok((answered, t0.elapsed(), true))
            }
        }
    };
    let (answered, stored, lagged) = rt.block_on(async {
        tokio::time::timeout(limit, run)
            .await
            .with_context(|| format!("not all stored within {limit:?}"))?
    })?;
    let bench_cpu = cpu_total(std::process::id()) - bench_before;
    let after: Vec<_> = pids.iter().map(|p| thread_cpu(*p)).collect();
    let node_cpu: Vec<f64> = (0..3)
        .map(|k| after[k].values().sum::<f64>() - before[k].values().sum::<f64>())
        .collect();
    let rate = messages as f64 / stored.as_secs_f64();

    let (member_rate, storage_rate) = in_process_rates(2000, bytes)?;
    let fsync = fsync_latencies(cluster.data_dir(0), 200)?;
    let fsync_rate = 200.0 / fsync.iter().sum::<Duration>().as_secs_f64();
    // What the node spends turning one storage peer's key into a peer id
    // (it does so per peer each time it counts an entry's acknowledgements).
    let key = DevicePublicKey::from_bytes(
        ed25519_dalek::SigningKey::from_bytes(&[3; 32])
            .verifying_key()
            .to_bytes(),
    )?;
    let t0 = Instant::now();
    for _ in 0..1000 {
        std::hint::black_box(tern_node::keys::peer_id_of(std::hint::black_box(&key)));
    }
    let peer_id_of = t0.elapsed() / 1000;
    println!(
        "| cloud messages through node 1, {bytes} B, {messages} messages, {concurrency} API requests in flight, until the last is stored at quorum 2 of 3{} | {rate:.0} msg/s ({:.2} s; all sends answered after {:.2} s: {:.0} msg/s) | compose + keep by the author in one process: {member_rate:.0} msg/s; verify into a fresh log (a storage peer): {storage_rate:.0} msg/s | {:.2}× / {:.2}× |",
        match (socket, lagged) {
            (true, _) => ", sent on the event socket",
            (false, true) => " (event stream lagged: end seen by replicas)",
            (false, false) => "",
        },
        stored.as_secs_f64(),
        answered.as_secs_f64(),
        messages as f64 / answered.as_secs_f64(),
        rate / member_rate,
        rate / storage_rate,
    );
    println!(
        "| (same run) fsynced 1 KiB appends one at a time, same disk | {fsync_rate:.0} /s | | |"
    );
    println!(
        "| (same run) CPU used: node 1 {:.1} s, node 2 {:.1} s, node 3 {:.1} s, bench client {bench_cpu:.1} s over {:.1} s on 2 vCPUs; per message {:.0} µs of node CPU | | | |",
        node_cpu[0],
        node_cpu[1],
        node_cpu[2],
        stored.as_secs_f64(),
        node_cpu.iter().sum::<f64>() / messages as f64 * 1e6,
    );
    println!(
        "| (same run) `tern_node::keys::peer_id_of`, one call (a point decompression) | {:.1} µs | | |",
        peer_id_of.as_secs_f64() * 1e6
    );
    print_load(&load_at_start);
    for k in 0..3 {
        eprintln!(
            "node {} threads: {}",
            k + 1,
            cpu_breakdown(&before[k], &after[k])
        );
    }
    Ok(())
}

/// Sends `messages` on node 1's event socket, counting `sent` answers and
/// `chat_status` `stored` events on the same socket. Returns when all sends
/// were answered and when the last was stored.
async fn send_on_socket(
    a: &ApiClient,
    chat: &str,
    text: &str,
    messages: usize,
) -> anyhow::Result<(Duration, Duration, bool)> {
    use futures::SinkExt;
    let (mut commands, events) = a.socket().await?;
    let mut events = Box::pin(events);
    let t0 = Instant::now();
    let feed = async {
        for n in 0..messages {
            let command =
                json!({"type": "send", "chat_id": chat, "text": text, "ref": n.to_string()});
            commands.feed(command).await?;
        }
        commands.flush().await?;
        anyhow::Ok(())
    };
    let count = async {
        let (mut sent, mut stored) = (HashSet::new(), HashSet::new());
        let mut answered = None;
        while stored.len() < messages || answered.is_none() {
            let e = tokio::time::timeout(Duration::from_secs(120), events.next())
                .await
                .context("no event for 120 s")?
                .context("event socket closed")??;
            match e["type"].as_str() {
                Some("sent") => {
                    sent.insert(e["message_id"].as_str().unwrap_or_default().to_owned());
                    if sent.len() == messages {
                        answered = Some(t0.elapsed());
                    }
                }
                Some("refused") => bail!("a send was refused: {e}"),
                Some("chat_status") if e["chat_id"] == chat && e["status"] == "stored" => {
                    stored.insert(e["message_id"].as_str().unwrap_or_default().to_owned());
                }
                Some("lagged") => bail!("the bench client lagged behind its event socket"),
                _ => {}
            }
        }
        ensure!(sent.is_subset(&stored), "stored events for other messages");
        anyhow::Ok((answered.unwrap_or_default(), t0.elapsed()))
    };
    let (fed, counted) = tokio::join!(feed, count);
    fed?;
    let (answered, at) = counted?;
    Ok((answered, at, false))
}

// --------------------------------------------------------- cloud-catchup

/// Largest push the bench sends (the node takes up to 1 MiB).
const PUSH_BYTES: usize = 900 * 1024;

/// The log the catch-up benchmark built.
struct Built {
    chat: ChatId,
    entries: u64,
    bytes: u64,
    /// The entry that adds the new peer to the storage set, not yet pushed.
    join: Entry,
    /// The first entries, to measure verification in this process.
    sample: Vec<Entry>,
    /// The last push, to time pushes the node already holds.
    last_push: Vec<Entry>,
}

/// Composes a log of about `target` bytes of `text_bytes` messages on a
/// thread of its own, in push-sized batches sent to `tx`.
fn compose_log(
    target: u64,
    text_bytes: usize,
    old: tern_protocol::cloud::account::StoragePeer,
    new: tern_protocol::cloud::account::StoragePeer,
    tx: tokio::sync::mpsc::Sender<Vec<Entry>>,
) -> anyhow::Result<Built> {
    let (mut alice, mut log, first) = in_process_chat(vec![old.clone()])?;
    let chat = log.chat();
    let mut bytes: u64 = first.iter().map(|e| e.encode().len() as u64).sum();
    let mut sample = first.clone();
    let mut batch = first;
    let mut batch_bytes = bytes as usize;
    let text = "y".repeat(text_bytes);
    while bytes < target {
        let e = alice.compose(&log, text_draft(&text), random32())?;
        log.insert_composed(e.clone())?;
        let e = e.into_entry();
        let size = e.encode().len();
        bytes += size as u64;
        if batch.len() == 1000 || batch_bytes + size > PUSH_BYTES {
            tx.blocking_send(std::mem::take(&mut batch))
                .ok()
                .context("pusher stopped")?;
            batch_bytes = 0;
        }
        if sample.len() < 4000 {
            sample.push(e.clone());
        }
        batch_bytes += size;
        batch.push(e);
    }
    let last_push = batch.clone();
    if !batch.is_empty() {
        tx.blocking_send(batch).ok().context("pusher stopped")?;
    }
    let quorum = 2;
    let join = alice.compose(
        &log,
        Draft::Storage {
            peers: vec![old, new],
            quorum,
        },
        random32(),
    )?;
    log.insert_composed(join.clone())?;
    let join = join.into_entry();
    Ok(Built {
        chat,
        entries: log.len() as u64,
        bytes: bytes + join.encode().len() as u64,
        join,
        sample,
        last_push,
    })
}

pub fn cloud_catchup(
    tern: &Path,
    mib: u64,
    text_bytes: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let load_at_start = load();
    let rt = Runtime::new()?;
    // Node 1 holds the log; node 2 is new.
    let cluster = Cluster::start(tern, 2, &rt)?;
    let (old_addr, new_addr) = (
        dial_addr(&cluster.status[0])?,
        dial_addr(&cluster.status[1])?,
    );
    let old = parse_storage_peer(&old_addr).map_err(anyhow::Error::msg)?;
    let new = parse_storage_peer(&new_addr).map_err(anyhow::Error::msg)?;
    let (pid_old, pid_new) = (cluster.pid(0), cluster.pid(1));
    eprintln!("node pids: source {pid_old}, new replica {pid_new}");

    // Build the log on node 1: composed here, pushed over /tern/store/1.
    let target = mib << 20;
    let t_build = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Entry>>(4);
    let composer = std::thread::spawn(move || compose_log(target, text_bytes, old, new, tx));
    let mut source = rt.block_on(StoreClient::connect(&old_addr))?;
    let pushed = rt.block_on(async {
        let mut pushed = 0usize;
        while let Some(batch) = rx.recv().await {
            pushed += batch.len();
            source.push_stored(batch).await?;
        }
        anyhow::Ok(pushed)
    });
    let built = composer
        .join()
        .map_err(|_| anyhow::anyhow!("composer panicked"))??;
    pushed?;
    let build = t_build.elapsed();
    eprintln!(
        "built {} entries, {:.1} MiB, on node 1 in {:.1} s ({:.1} MB/s)",
        built.entries,
        built.bytes as f64 / 1048576.0,
        build.as_secs_f64(),
        built.bytes as f64 / build.as_secs_f64() / 1e6,
    );
    let Built {
        chat,
        entries,
        bytes,
        join,
        sample,
        last_push,
    } = built;

    // The new peer joins the set: the member pushes the Storage entry to
    // node 1 and goes away; the storage peers converge by themselves.
    let before = [thread_cpu(pid_old), thread_cpu(pid_new)];
    let (elapsed, first_at, timeline) = rt.block_on(async {
        let mut watch = StoreClient::connect(&new_addr).await?;
        let t0 = Instant::now();
        source.push_stored(vec![join]).await?;
        let mut first_at = None;
        let mut timeline = Vec::new();
        let mut last_print = Instant::now();
        loop {
            let held = watch.summary(chat).await?.map_or(0, |s| s.entries);
            let at = t0.elapsed();
            if held > 0 && first_at.is_none() {
                first_at = Some(at);
            }
            timeline.push((at, held));
            if held >= entries {
                break;
            }
            if last_print.elapsed() >= Duration::from_secs(10) {
                eprintln!(
                    "  {:>6.1} s: {held} of {entries} entries on the new peer",
                    at.as_secs_f64()
                );
                last_print = Instant::now();
            }
            if at > limit {
                bail!(
                    "the new peer held {held} of {entries} entries after {:.0} s; giving up",
                    at.as_secs_f64()
                );
            }
            // Polled often: the end is seen within a few milliseconds of
            // the last entry's arrival, a fraction of a percent of a run.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (a, b) = (source.summary(chat).await?, watch.summary(chat).await?);
        ensure!(
            a.as_ref().map(|s| s.heads_hash) == b.as_ref().map(|s| s.heads_hash),
            "the new peer's heads differ from the source's"
        );
        anyhow::Ok((t0.elapsed(), first_at, timeline))
    })?;
    let after = [thread_cpu(pid_old), thread_cpu(pid_new)];
    let resident = [resident_mib(pid_old), resident_mib(pid_new)];
    let rate = bytes as f64 / elapsed.as_secs_f64();

    // Rate between 10% and 90% of the entries.
    let at_fraction = |f: f64| {
        timeline
            .iter()
            .find(|(_, n)| *n as f64 >= f * entries as f64)
            .map(|(t, n)| (*t, *n))
    };
    let steady = match (at_fraction(0.1), at_fraction(0.9)) {
        (Some((t1, n1)), Some((t2, n2))) if t2 > t1 => {
            (n2 - n1) as f64 * (bytes as f64 / entries as f64) / (t2 - t1).as_secs_f64()
        }
        _ => 0.0,
    };
    let deciles: Vec<String> = (1..=10)
        .filter_map(|d| at_fraction(d as f64 / 10.0))
        .map(|(t, _)| format!("{:.1}", t.as_secs_f64()))
        .collect();

    // References, same run. A push node 1 already holds: the transport,
    // framing and decoding of a push without verification or disk.
    let push_bytes: usize = last_push.iter().map(|e| e.encode().len()).sum();
    let duplicate_push = rt.block_on(async {
        let t0 = Instant::now();
        for _ in 0..20 {
            match source
                .ask(StoreRequest::Push {
                    entries: last_push.clone(),
                })
                .await?
            {
                StoreResponse::Pushed { results }
                    if results.iter().all(|r| *r == PushResult::Duplicate) => {}
                other => bail!("expected duplicates, got {other:?}"),
            }
        }
        anyhow::Ok(t0.elapsed() / 20)
    })?;
    let tcp = rt.block_on(tcp_copy_rate(bytes as usize))?;
    let disk = disk_write_rate(cluster.data_dir(1), (bytes as usize).min(1 << 30))?;
    let mut fresh = ChatLog::new(chat);
    let sample_bytes: usize = sample.iter().map(|e| e.encode().len()).sum();
    let sample_len = sample.len();
    let t0 = Instant::now();
    for e in sample {
        fresh.insert(e)?;
    }
    let verify = sample_bytes as f64 / t0.elapsed().as_secs_f64();

    println!(
        "| new storage peer catches up {:.0} MiB ({entries} entries of ~{} B, {text_bytes} B texts) from one peer | {:.1} MB/s ({:.1} s; first entry after {:.2} s; 10–90% at {:.1} MB/s) | loopback TCP copy: {:.0} MB/s; sequential write + fdatasync: {:.0} MB/s; `ChatLog::insert` of these entries on one core: {:.1} MB/s | {} / {} / {} |",
        bytes as f64 / 1048576.0,
        bytes / entries.max(1),
        rate / 1e6,
        elapsed.as_secs_f64(),
        first_at.unwrap_or_default().as_secs_f64(),
        steady / 1e6,
        tcp / 1e6,
        disk / 1e6,
        verify / 1e6,
        ratio(rate / tcp),
        ratio(rate / disk),
        ratio(rate / verify),
    );
    println!(
        "| (same run) building the log: composed in the bench, pushed to node 1 | {:.1} s ({:.1} MB/s) | | |",
        build.as_secs_f64(),
        bytes as f64 / build.as_secs_f64() / 1e6,
    );
    println!(
        "| (same run) time to reach each tenth of the entries (s) | {} | | |",
        deciles.join(", ")
    );
    println!(
        "| (same run) CPU during the catch-up: source {:.1} s, new peer {:.1} s over {:.1} s (`ChatLog::insert` sample: {sample_len} entries) | | | |",
        after[0].values().sum::<f64>() - before[0].values().sum::<f64>(),
        after[1].values().sum::<f64>() - before[1].values().sum::<f64>(),
        elapsed.as_secs_f64(),
    );
    println!(
        "| (same run) a push of {:.0} KiB that node 1 already holds (transport, framing, decoding; no verification, no disk) | {} per push, {:.0} MB/s | | |",
        push_bytes as f64 / 1024.0,
        ms(duplicate_push),
        push_bytes as f64 / duplicate_push.as_secs_f64() / 1e6,
    );
    println!(
        "| (same run) resident memory after the catch-up: source {:.0} MiB, new peer {:.0} MiB (log: {:.0} MiB) | | | |",
        resident[0],
        resident[1],
        bytes as f64 / 1048576.0,
    );
    print_load(&load_at_start);
    eprintln!("source threads: {}", cpu_breakdown(&before[0], &after[0]));
    eprintln!("new peer threads: {}", cpu_breakdown(&before[1], &after[1]));
    Ok(())
}
