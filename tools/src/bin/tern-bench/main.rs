//! End-to-end benchmarks of whole flows over real `tern` processes, each
//! printed next to a reference measured in the same run on the same machine.
//!
//!     cargo build --release -p tern-node -p tern-tools
//!     target/release/tern-bench all
//!
//! Results and the machine they came from go in BENCHMARKS.md.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures::StreamExt;
use libp2p::{Multiaddr, identify, noise, ping, swarm::SwarmEvent, tcp, yamux};
use tern_node::{api::StatusResponse, client::ApiClient, data_dir::DataDir};
use tern_tools::stats::{ms, percentile};

mod cloud;

#[derive(Parser)]
#[command(about = "End-to-end benchmarks over real tern processes")]
struct Args {
    /// The tern binary to measure [default: next to this one]
    #[arg(long)]
    tern: Option<PathBuf>,
    /// Repetitions for timing benchmarks.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Keep each node's log as DIR/node-PID.log (by default nodes log at
    /// `info` and the lines are dropped).
    #[arg(long, value_name = "DIR")]
    node_logs: Option<PathBuf>,
    /// The nodes' `RUST_LOG` filter, e.g. `info,tern_node::cloud=debug`.
    #[arg(long, default_value = DEFAULT_NODE_LOG_FILTER)]
    node_log_filter: String,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Clone, Copy)]
enum Bench {
    /// Process start to listening, empty store.
    ColdStart,
    /// Time for `connect` between two nodes on loopback.
    Connect,
    /// Idle RSS of one node, and extra memory per idle connection.
    Memory {
        /// Idle connections to open.
        #[arg(long, default_value_t = 128)]
        connections: usize,
    },
    /// Secret chat set-up on loopback: start on one node until active on
    /// both (Noise XX, identity proofs, request and acceptance over libp2p).
    SecretHandshake,
    /// Secret messages per second between two nodes: sent through one
    /// node's API, counted as they arrive on the other's event stream.
    SecretThroughput {
        #[arg(long, default_value_t = 2000)]
        messages: usize,
        /// Requests to the sending node's API in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Cloud chat, 3 nodes storing with a write quorum of 2: from send on
    /// node 1's API until the answer says `stored`, one after another.
    CloudSend {
        #[arg(long, default_value_t = 500)]
        sends: usize,
        /// Text bytes per message.
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
    },
    /// Cloud-chat messages per second through node 1's API (`wait_ms: 0`),
    /// 3 nodes storing with a write quorum of 2, until the last is stored.
    CloudThroughput {
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// API requests in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 900)]
        limit_secs: u64,
        /// Send on the event socket (`{"type": "send"}` commands) instead of
        /// one HTTP request per message.
        #[arg(long)]
        socket: bool,
    },
    /// A new storage peer joins a chat whose log one peer holds, timed
    /// until it holds the whole log.
    CloudCatchup {
        /// Size of the log, MiB (encoded entries).
        #[arg(long, default_value_t = 1024)]
        mib: u64,
        /// Text bytes per message.
        #[arg(long, default_value_t = 1024)]
        text_bytes: usize,
        /// Give up after this many seconds of catching up.
        #[arg(long, default_value_t = 1800)]
        limit_secs: u64,
    },
    /// Everything above but the cloud benchmarks (`cloud-*` run alone).
    All,
}

const LOOPBACK: &[&str] = &[
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
    "--listen",
    "/ip4/127.0.0.1/udp/0/quic-v1",
    "--no-mdns",
];

struct Node {
    child: Child,
    dir: DataDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn init(tern: &Path, dir: &Path, name: &str) -> anyhow::Result<()> {
    let out = Command::new(tern)
        .arg("--data-dir")
        .arg(dir)
        .args(["init", "--name", name])
        .output()?;
    if !out.status.success() {
        bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Starts a node and returns it with the time from spawn to its first
/// "listening on" log line (read from its stderr as it is written).
fn start_node(tern: &Path, dir: &Path) -> anyhow::Result<(Node, Duration)> {
    start_node_with(tern, dir, &[])
}

/// [`start_node`] with extra `tern node` flags.
fn start_node_with(tern: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<(Node, Duration)> {
    let t0 = Instant::now();
    let mut child = Command::new(tern)
        .arg("--data-dir")
        .arg(dir)
        .arg("node")
        .args(LOOPBACK)
        .args(extra)
        .env("RUST_LOG", &node_logs().filter)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut kept = match &node_logs().dir {
        Some(dir) => {
            let path = dir.join(format!("node-{}.log", child.id()));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            Some(std::io::BufWriter::new(file))
        }
        None => None,
    };
    let mut keep = move |line: &str| {
        if let Some(f) = kept.as_mut() {
            // A full disk loses log lines, not the run.
            let _ = writeln!(f, "{line}");
        }
    };
    let listening = loop {
        match lines.next() {
            Some(Ok(l)) => {
                keep(&l);
                if l.contains("listening on") {
                    break t0.elapsed();
                }
            }
            _ => bail!("node exited before listening"),
        }
    };
    // Keep draining stderr so the node never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            keep(&line);
        }
    });
    let node = Node {
        child,
        dir: DataDir::new(dir),
    };
    wait_api(&node)?;
    Ok((node, listening))
}

const DEFAULT_NODE_LOG_FILTER: &str = "info";

/// Where nodes' logs go ([`Args::node_logs`], [`Args::node_log_filter`]).
struct NodeLogs {
    dir: Option<PathBuf>,
    filter: String,
}

static NODE_LOGS: std::sync::OnceLock<NodeLogs> = std::sync::OnceLock::new();

fn node_logs() -> &'static NodeLogs {
    NODE_LOGS.get_or_init(|| NodeLogs {
        dir: None,
        filter: DEFAULT_NODE_LOG_FILTER.into(),
    })
}

fn wait_api(node: &Node) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(c) = ApiClient::new(&node.dir)
            && c.endpoint().pid == node.child.id()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("node API did not come up")
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

fn time_command(cmd: &mut Command) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let status = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    let d = t0.elapsed();
    if !status.success() {
        bail!("{cmd:?} failed");
    }
    Ok(d)
}

fn report(name: &str, samples: &[Duration], reference_name: &str, reference: &[Duration]) {
    let (p50, p99) = (
        percentile(samples, 50.0).unwrap_or_default(),
        percentile(samples, 99.0).unwrap_or_default(),
    );
    let r50 = percentile(reference, 50.0).unwrap_or_default();
    println!(
        "| {name} | p50 {} / p99 {} | {reference_name}: p50 {} | {:.1}× |",
        ms(p50),
        ms(p99),
        ms(r50),
        p50.as_secs_f64() / r50.as_secs_f64().max(1e-9)
    );
}

fn cold_start(tern: &Path, runs: usize) -> anyhow::Result<()> {
    let mut samples = Vec::with_capacity(runs);
    let mut reference = Vec::with_capacity(runs);
    for i in 0..runs {
        let tmp = tempfile::tempdir()?;
        init(tern, tmp.path(), &format!("bench-{i}"))?;
        let (node, listening) = start_node(tern, tmp.path())?;
        samples.push(listening);
        drop(node);
        // Same-run reference: starting the same binary and having it print
        // its version (process spawn, dynamic loading, exit).
        reference.push(time_command(Command::new(tern).arg("--version"))?);
    }
    report(
        "cold start → listening (empty store)",
        &samples,
        "`tern --version` spawn+exit",
        &reference,
    );
    Ok(())
}

fn connect(tern: &Path, runs: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let mut samples = Vec::with_capacity(runs);
    let mut reference = Vec::with_capacity(runs);
    for i in 0..runs {
        let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
        init(tern, a.path(), &format!("a{i}"))?;
        init(tern, b.path(), &format!("b{i}"))?;
        let (na, _) = start_node(tern, a.path())?;
        let (nb, _) = start_node(tern, b.path())?;
        let elapsed = rt.block_on(async {
            let cb = ApiClient::new(&nb.dir)?;
            let sb: StatusResponse = cb.get("/v1/status").await?;
            let tcp = sb
                .listen_addrs
                .iter()
                .find(|a| a.contains("/tcp/"))
                .context("tcp addr")?;
            let target = format!("{tcp}/p2p/{}", sb.peer_id);
            let port: u16 = tcp.rsplit('/').next().context("port")?.parse()?;
            // Reference: a bare TCP handshake to the same listener.
            let t0 = Instant::now();
            let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            reference.push(t0.elapsed());
            drop(s);
            let ca = ApiClient::new(&na.dir)?;
            let t0 = Instant::now();
            let _: serde_json::Value = ca
                .post("/v1/connect", &serde_json::json!({ "target": target }))
                .await?;
            anyhow::Ok(t0.elapsed())
        })?;
        samples.push(elapsed);
    }
    report(
        "connect two nodes (TCP+Noise+Yamux, via API)",
        &samples,
        "bare TCP connect",
        &reference,
    );
    Ok(())
}

/// Two connected nodes, with their API clients.
fn connected_pair(
    tern: &Path,
) -> anyhow::Result<(Node, Node, tempfile::TempDir, tempfile::TempDir)> {
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    init(tern, a.path(), "alice")?;
    init(tern, b.path(), "bob")?;
    let (na, _) = start_node(tern, a.path())?;
    let (nb, _) = start_node(tern, b.path())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let sb: StatusResponse = ApiClient::new(&nb.dir)?.get("/v1/status").await?;
        let tcp = sb
            .listen_addrs
            .iter()
            .find(|a| a.contains("/tcp/"))
            .context("tcp addr")?;
        let target = format!("{tcp}/p2p/{}", sb.peer_id);
        let _: serde_json::Value = ApiClient::new(&na.dir)?
            .post("/v1/connect", &serde_json::json!({ "target": target }))
            .await?;
        anyhow::Ok(())
    })?;
    Ok((na, nb, a, b))
}

/// Waits on an event stream for the first event of `kind` about `id`.
async fn next_event(
    events: &mut (
             impl futures::Stream<Item = Result<serde_json::Value, tern_node::client::ClientError>>
             + Unpin
         ),
    kind: &str,
    id: &str,
) -> anyhow::Result<()> {
    let wait = async {
        while let Some(e) = events.next().await {
            let e = e?;
            if e["type"] == kind && e["secret_id"] == id {
                return anyhow::Ok(());
            }
        }
        bail!("event stream ended")
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .context("no event within 60 s")?
}

/// A asks B (by B's ticket) for a secret chat and B accepts; returns the
/// chat's id once A reports it active.
async fn open_secret_chat<S>(
    ca: &ApiClient,
    cb: &ApiClient,
    ea: &mut S,
    eb: &mut S,
    ticket: &str,
) -> anyhow::Result<String>
where
    S: futures::Stream<Item = Result<serde_json::Value, tern_node::client::ClientError>> + Unpin,
{
    let started: serde_json::Value = ca
        .post("/v1/secret", &serde_json::json!({ "peer": ticket }))
        .await?;
    let id = started["secret_id"]
        .as_str()
        .context("secret_id")?
        .to_owned();
    next_event(eb, "secret_request", &id).await?;
    let _: serde_json::Value = cb
        .post(&format!("/v1/secret/{id}/accept"), &serde_json::json!({}))
        .await?;
    next_event(ea, "secret_accepted", &id).await?;
    Ok(id)
}

/// The handshake's cryptography alone, both sides in one process.
fn handshake_in_process() -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    session_pair()?;
    Ok(t0.elapsed())
}

fn secret_handshake(tern: &Path, runs: usize) -> anyhow::Result<()> {
    let (na, nb, _ta, _tb) = connected_pair(tern)?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut samples = Vec::with_capacity(runs);
    let mut reference = Vec::with_capacity(runs);
    let ticket: serde_json::Value =
        rt.block_on(async { ApiClient::new(&nb.dir)?.get("/v1/ticket").await })?;
    let ticket = ticket["ticket"].as_str().context("ticket")?.to_owned();
    for _ in 0..runs {
        reference.push(handshake_in_process()?);
        let elapsed = rt.block_on(async {
            let (ca, cb) = (ApiClient::new(&na.dir)?, ApiClient::new(&nb.dir)?);
            let mut ea = Box::pin(ca.events().await?);
            let mut eb = Box::pin(cb.events().await?);
            let t0 = Instant::now();
            open_secret_chat(&ca, &cb, &mut ea, &mut eb, &ticket).await?;
            anyhow::Ok(t0.elapsed())
        })?;
        samples.push(elapsed);
    }
    report(
        "secret chat start → active on both (loopback)",
        &samples,
        "its Noise XX + proofs in one process",
        &reference,
    );
    Ok(())
}

fn secret_throughput(tern: &Path, messages: usize, concurrency: usize) -> anyhow::Result<()> {
    use tern_protocol::{Record, secret::SecretPayload};
    let (na, nb, ta, _tb) = connected_pair(tern)?;
    let rt = tokio::runtime::Runtime::new()?;
    let text = "x".repeat(1024);
    let (elapsed, id) = rt.block_on(async {
        let (ca, cb) = (ApiClient::new(&na.dir)?, ApiClient::new(&nb.dir)?);
        let ticket: serde_json::Value = cb.get("/v1/ticket").await?;
        let ticket = ticket["ticket"].as_str().context("ticket")?;
        let mut ea = Box::pin(ca.events().await?);
        let mut eb = Box::pin(cb.events().await?);
        let id = open_secret_chat(&ca, &cb, &mut ea, &mut eb, ticket).await?;

        let t0 = Instant::now();
        let path = format!("/v1/secret/{id}/messages");
        let sends = futures::stream::iter(0..messages)
            .map(|_| {
                let (ca, path, text) = (&ca, &path, &text);
                async move {
                    let r: serde_json::Value =
                        ca.post(path, &serde_json::json!({ "text": text })).await?;
                    anyhow::Ok(r)
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>();
        let receive = async {
            let mut got = 0;
            while got < messages {
                match eb.next().await {
                    Some(Ok(e)) if e["type"] == "secret_message" && e["secret_id"] == id => {
                        got += 1
                    }
                    Some(Ok(e)) if e["type"] == "lagged" => bail!("event stream lagged"),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("event stream ended"),
                }
            }
            anyhow::Ok(())
        };
        let (sent, received) = tokio::join!(sends, receive);
        for r in sent {
            r?;
        }
        received?;
        anyhow::Ok((t0.elapsed(), id))
    })?;
    let rate = messages as f64 / elapsed.as_secs_f64();

    // Reference: the same messages sealed and opened by the session alone.
    let payload = SecretPayload::Message {
        id: tern_protocol::secret::MessageId([0; 16]),
        text,
        timer_ms: None,
    }
    .encode();
    let (mut a, mut b) = session_pair()?;
    let t0 = Instant::now();
    for _ in 0..messages {
        for f in a.seal(&payload, 0, [5; 32])? {
            for r in b.open(&f, 0, [6; 32])?.reply {
                a.open(&r, 0, [0; 32])?;
            }
        }
    }
    let reference = messages as f64 / t0.elapsed().as_secs_f64();
    // Second reference: how many durable 1 KiB writes per second this disk
    // does one at a time (what a commit per message would allow).
    let disk = tempfile::tempdir_in(ta.path())?;
    let t0 = Instant::now();
    for i in 0..200 {
        use std::io::Write;
        let mut f = std::fs::File::create(disk.path().join(format!("f{i}")))?;
        f.write_all(&[0u8; 1024])?;
        f.sync_all()?;
    }
    let fsyncs = 200.0 / t0.elapsed().as_secs_f64();
    println!(
        "| fsynced 1 KiB file writes, one at a time, same disk | {fsyncs:.0} writes/s | | secret msg/s ÷ this: {:.1}× |",
        rate / fsyncs
    );
    println!(
        "| secret messages, 1 KiB, node to node ({messages}, {concurrency} in flight; chat {}) | {rate:.0} msg/s | session seal+open in one process: {reference:.0} msg/s | {:.3}× |",
        &id[..8],
        rate / reference
    );
    Ok(())
}

fn session_pair() -> anyhow::Result<(
    tern_protocol::secret::SecretSession,
    tern_protocol::secret::SecretSession,
)> {
    use tern_protocol::{
        AccountKeypair, DevicePublicKey,
        secret::{Handshake, LocalDevice},
    };
    let keys = [
        ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
        ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
    ];
    let mut certs = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let public = DevicePublicKey::from_bytes(k.verifying_key().to_bytes())?;
        certs.push(AccountKeypair::from_secret_bytes(&[i as u8 + 10; 32]).certify(public, "b", 0)?);
    }
    let a = LocalDevice {
        signing_key: &keys[0],
        certificate: &certs[0],
    };
    let b = LocalDevice {
        signing_key: &keys[1],
        certificate: &certs[1],
    };
    let (hs_a, m1) = Handshake::initiate([0; 16], &a, certs[1].device, [3; 32])?;
    let (hs_b, m2) = Handshake::respond([0; 16], &b, certs[0].device, [4; 32], &m1)?;
    let done_a = hs_a.on_message(&m2, 0)?;
    let done_b = hs_b.on_message(&done_a.reply.context("third message")?, 0)?;
    Ok((done_a.session, done_b.session))
}

fn memory(tern: &Path, connections: usize) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    init(tern, tmp.path(), "memory")?;
    let (node, _) = start_node(tern, tmp.path())?;
    let pid = node.child.id();
    std::thread::sleep(Duration::from_secs(3));
    let idle = rss_kib(pid)?;

    let rt = tokio::runtime::Runtime::new()?;
    let status: StatusResponse =
        rt.block_on(async { ApiClient::new(&node.dir)?.get("/v1/status").await })?;
    let target: Multiaddr = format!(
        "{}/p2p/{}",
        status
            .listen_addrs
            .iter()
            .find(|a| a.contains("/tcp/"))
            .context("tcp addr")?,
        status.peer_id
    )
    .parse()?;

    // Many light peers in this process, each its own identity and TCP
    // connection, speaking identify and ping like any peer would.
    let peers = rt.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..connections {
            let target = target.clone();
            let mut swarm = libp2p::SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_tcp(
                    tcp::Config::default(),
                    noise::Config::new,
                    yamux::Config::default,
                )?
                .with_behaviour(|key| PeerBehaviour {
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/tern/1".into(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::default(),
                })?
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
                .build();
            swarm.dial(target)?;
            handles.push(tokio::spawn(async move {
                loop {
                    if let SwarmEvent::OutgoingConnectionError { error, .. } =
                        swarm.select_next_some().await
                    {
                        eprintln!("bench peer could not connect: {error}");
                    }
                }
            }));
        }
        anyhow::Ok(handles)
    })?;

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s: StatusResponse =
            rt.block_on(async { ApiClient::new(&node.dir)?.get("/v1/status").await })?;
        if s.connected_peers >= connections {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {connections} peers connected",
                s.connected_peers
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(5)); // let identify, kad and introductions settle
    let loaded = rss_kib(pid)?;
    let per_conn = (loaded.saturating_sub(idle) as f64) / connections as f64;
    // Reference: the RSS of an idle `sleep` process, the floor of any process here.
    let mut sleeper = Command::new("sleep").arg("5").spawn()?;
    std::thread::sleep(Duration::from_millis(200));
    let floor = rss_kib(sleeper.id())?;
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    println!(
        "| idle RSS, one node | {:.1} MiB | idle `sleep` process: {:.1} MiB | {:.1}× |",
        idle as f64 / 1024.0,
        floor as f64 / 1024.0,
        idle as f64 / floor as f64
    );
    println!(
        "| extra memory per idle connection ({connections} connections) | {per_conn:.1} KiB | node RSS {:.1} → {:.1} MiB | |",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0
    );
    for h in peers {
        h.abort();
    }
    Ok(())
}

#[derive(libp2p::swarm::NetworkBehaviour)]
struct PeerBehaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = NODE_LOGS.set(NodeLogs {
        dir: args.node_logs.clone(),
        filter: args.node_log_filter.clone(),
    });
    let tern = match args.tern {
        Some(t) => t,
        None => std::env::current_exe()?
            .parent()
            .context("no parent dir")?
            .join("tern"),
    };
    if !tern.exists() {
        bail!(
            "{} not found; build it with `cargo build --release -p tern-node` or pass --tern",
            tern.display()
        );
    }
    println!("| benchmark | result | same-run reference | ratio |");
    println!("|---|---|---|---|");
    match args.bench {
        Bench::ColdStart => cold_start(&tern, args.runs)?,
        Bench::Connect => connect(&tern, args.runs)?,
        Bench::Memory { connections } => memory(&tern, connections)?,
        Bench::SecretHandshake => secret_handshake(&tern, args.runs)?,
        Bench::SecretThroughput {
            messages,
            concurrency,
        } => secret_throughput(&tern, messages, concurrency)?,
        Bench::CloudSend { sends, bytes } => cloud::cloud_send(&tern, sends, bytes)?,
        Bench::CloudThroughput {
            messages,
            concurrency,
            bytes,
            limit_secs,
            socket,
        } => cloud::cloud_throughput(
            &tern,
            messages,
            concurrency,
            bytes,
            Duration::from_secs(limit_secs),
            socket,
        )?,
        Bench::CloudCatchup {
            mib,
            text_bytes,
            limit_secs,
        } => cloud::cloud_catchup(&tern, mib, text_bytes, Duration::from_secs(limit_secs))?,
        Bench::All => {
            cold_start(&tern, args.runs)?;
            connect(&tern, args.runs)?;
            memory(&tern, 128)?;
            secret_handshake(&tern, args.runs)?;
            secret_throughput(&tern, 2000, 16)?;
        }
    }
    Ok(())
}
