//! End-to-end benchmarks of whole flows over real `tern` processes, each
//! printed next to a reference measured in the same run on the same machine.
//!
//!     cargo build --release -p tern-node -p tern-tools
//!     target/release/tern-bench all
//!
//! Results and the machine they came from go in BENCHMARKS.md.

use std::{
    io::{BufRead, BufReader},
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

#[derive(Parser)]
#[command(about = "End-to-end benchmarks over real tern processes")]
struct Args {
    /// The tern binary to measure [default: next to this one]
    #[arg(long)]
    tern: Option<PathBuf>,
    /// Repetitions for timing benchmarks.
    #[arg(long, default_value_t = 30)]
    runs: usize,
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
    /// Everything above.
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
    let t0 = Instant::now();
    let mut child = Command::new(tern)
        .arg("--data-dir")
        .arg(dir)
        .arg("node")
        .args(LOOPBACK)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let listening = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("listening on") => break t0.elapsed(),
            Some(Ok(_)) => {}
            _ => bail!("node exited before listening"),
        }
    };
    // Keep draining stderr so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let node = Node {
        child,
        dir: DataDir::new(dir),
    };
    wait_api(&node)?;
    Ok((node, listening))
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
        Bench::All => {
            cold_start(&tern, args.runs)?;
            connect(&tern, args.runs)?;
            memory(&tern, 128)?;
        }
    }
    Ok(())
}
