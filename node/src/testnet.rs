//! `tern testnet`: N nodes on loopback, each a real `tern node` process with
//! its own account in `DIR/node-K`, wired to each other.
//!
//! Running it again on the same DIR restarts the same identities (and, since
//! nodes reuse their ports, the same addresses). Each node is an ordinary
//! data directory: every other `tern` command works with `--data-dir DIR/node-K`.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use tokio::process::{Child, Command};

use crate::{
    api::StatusResponse,
    cli::{StopSignal, init_with},
    client::ApiClient,
    config::Config,
    data_dir::DataDir,
};

const MAX_NODES: usize = 64;

#[derive(Args, Debug)]
pub struct TestnetArgs {
    /// How many nodes to run.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Directory holding node-1 … node-N.
    #[arg(long, default_value = "tern-testnet")]
    pub dir: PathBuf,
    /// Seconds to wait for all nodes to connect before giving up.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

struct TestnetNode {
    name: String,
    dir: DataDir,
    child: Child,
    status: StatusResponse,
}

impl TestnetNode {
    /// The TCP address others dial, with this node's peer id.
    fn dial_addr(&self) -> Option<String> {
        self.status
            .listen_addrs
            .iter()
            .find(|a| a.contains("/tcp/"))
            .map(|a| format!("{a}/p2p/{}", self.status.peer_id))
    }
}

/// How many testnet nodes each node names as its storage peers.
const STORAGE_PEERS: usize = 3;

/// The config a testnet node gets on first start: loopback only, no mDNS
/// (nodes are wired explicitly, and nothing is announced to the LAN).
pub fn node_config(name: &str) -> Config {
    Config {
        name: name.to_owned(),
        listen: vec![
            "/ip4/127.0.0.1/tcp/0".parse().expect("valid literal"),
            "/ip4/127.0.0.1/udp/0/quic-v1"
                .parse()
                .expect("valid literal"),
        ],
        mdns: false,
        // The nodes of one testnet keep each other's chats.
        host_open: true,
        ..Config::default()
    }
}

pub async fn run(args: TestnetArgs) -> anyhow::Result<()> {
    if !(1..=MAX_NODES).contains(&args.nodes) {
        bail!("--nodes must be between 1 and {MAX_NODES}");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let exe = std::env::current_exe().context("cannot find the tern executable")?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);

    let mut stop = StopSignal::new()?;
    let mut nodes: Vec<TestnetNode> = Vec::with_capacity(args.nodes);
    let started = tokio::select! {
        r = start_all(&exe, &args, deadline, &mut nodes) => r,
        _ = stop.recv() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = started {
        stop_all(&mut nodes).await;
        return Err(e);
    }

    for n in &nodes {
        println!(
            "{:<8} {}  {}  --data-dir {}",
            n.name,
            n.status.peer_id,
            n.dial_addr().unwrap_or_default(),
            n.dir.root().display()
        );
    }
    println!("ready");

    let mut reported = vec![false; nodes.len()];
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            _ = poll.tick() => {
                for (i, n) in nodes.iter_mut().enumerate() {
                    if reported[i] {
                        continue;
                    }
                    if let Ok(Some(exit)) = n.child.try_wait() {
                        reported[i] = true;
                        eprintln!(
                            "{} exited ({exit}); restart it with: {} node --data-dir {}",
                            n.name,
                            exe.display(),
                            n.dir.root().display()
                        );
                    }
                }
            }
        }
    }
    eprintln!("stopping {} nodes", nodes.len());
    stop_all(&mut nodes).await;
    Ok(())
}

async fn start_all(
    exe: &Path,
    args: &TestnetArgs,
    deadline: Instant,
    nodes: &mut Vec<TestnetNode>,
) -> anyhow::Result<()> {
    // Every node first, so that each can name the others as its storage
    // peers: a newcomer's first chat is kept by the testnet.
    let mut made = Vec::new();
    for k in 1..=args.nodes {
        let name = format!("node-{k}");
        let dir = DataDir::new(args.dir.join(&name));
        if !dir.is_initialized() {
            init_with(&dir, node_config(&name), None)
                .with_context(|| format!("cannot set up {}", dir.root().display()))?;
            made.push(k - 1);
        }
    }
    let peers: Vec<String> = (1..=args.nodes)
        .map(|k| {
            let dir = DataDir::new(args.dir.join(format!("node-{k}")));
            crate::keys::load(&dir, None).map(|i| i.peer_id().to_string())
        })
        .collect::<Result<_, _>>()?;
    for k in made {
        let dir = DataDir::new(args.dir.join(format!("node-{}", k + 1)));
        let mut config = Config::load(&dir.config())?;
        // This node first, then the next ones round the ring.
        config.storage_peers = (0..peers.len().min(STORAGE_PEERS))
            .map(|i| peers[(k + i) % peers.len()].clone())
            .collect();
        config.save(&dir.config())?;
    }
    for k in 1..=args.nodes {
        let name = format!("node-{k}");
        let dir = DataDir::new(args.dir.join(&name));
        let bootstrap: Vec<String> = nodes.iter().filter_map(TestnetNode::dial_addr).collect();
        let mut child = spawn_node(exe, &dir, &bootstrap)?;
        let status = match wait_until_serving(&dir, &mut child, deadline).await {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill().await;
                return Err(e.context(format!("{name} did not start")));
            }
        };
        nodes.push(TestnetNode {
            name,
            dir,
            child,
            status,
        });
    }

    // Wait until every node sees all the others.
    let want = args.nodes - 1;
    loop {
        let mut lagging = Vec::new();
        for n in nodes.iter_mut() {
            if let Ok(Some(exit)) = n.child.try_wait() {
                bail!(
                    "{} exited ({exit}); see {}/node.log",
                    n.name,
                    n.dir.root().display()
                );
            }
            let connected = match ApiClient::new(&n.dir) {
                Ok(c) => c
                    .get::<StatusResponse>("/v1/status")
                    .await
                    .map(|s| s.connected_peers)
                    .unwrap_or(0),
                Err(_) => 0,
            };
            if connected < want {
                lagging.push(format!("{} ({connected}/{want})", n.name));
            }
        }
        if lagging.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nodes not fully connected in time: {}", lagging.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spawn_node(exe: &Path, dir: &DataDir, bootstrap: &[String]) -> anyhow::Result<Child> {
    let log_path = dir.root().join("node.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--data-dir").arg(dir.root()).arg("node");
    for b in bootstrap {
        cmd.arg("--bootstrap").arg(b);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to send
    // SIGTERM to the child if the testnet process dies, so no node outlives it.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", exe.display()))
}

/// Polls until the node we just started (not a stale `api.json`) answers.
async fn wait_until_serving(
    dir: &DataDir,
    child: &mut Child,
    deadline: Instant,
) -> anyhow::Result<StatusResponse> {
    let pid = child.id();
    loop {
        if let Some(exit) = child.try_wait()? {
            bail!("exited ({exit}); see {}/node.log", dir.root().display());
        }
        if let Ok(client) = ApiClient::new(dir)
            && Some(client.endpoint().pid) == pid
            && let Ok(s) = client.get::<StatusResponse>("/v1/status").await
            && !s.listen_addrs.is_empty()
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("no answer in time; see {}/node.log", dir.root().display());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// SIGTERM every node, give each up to 10 s to stop cleanly, then SIGKILL.
async fn stop_all(nodes: &mut [TestnetNode]) {
    for n in nodes.iter() {
        if let Some(pid) = n.child.id() {
            // SAFETY: plain kill(2) on a child we spawned and still own.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for n in nodes.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), n.child.wait())
            .await
            .is_err()
        {
            eprintln!("{} did not stop in 10 s; killing it", n.name);
            let _ = n.child.kill().await;
        }
    }
}
