//! Harness for end-to-end tests over real `tern` processes.
//!
//! Every process started here is killed when its guard drops, every wait is
//! a poll for a condition with a generous deadline (CI is a loaded 2-core
//! machine), and every node uses loopback, ephemeral ports and a temporary
//! data directory.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long any single condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(120);

pub fn tern_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tern"))
}

/// Flags that keep a node on loopback with ephemeral ports and off the LAN.
pub const LOOPBACK: &[&str] = &[
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
    "--listen",
    "/ip4/127.0.0.1/udp/0/quic-v1",
    "--no-mdns",
];

/// Runs `tern --data-dir DIR ARGS…` to completion.
pub fn tern(dir: &Path, args: &[&str]) -> Output {
    Command::new(tern_bin())
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run tern")
}

/// Runs a `tern` command that must succeed and print one JSON document.
pub fn tern_json(dir: &Path, args: &[&str]) -> Value {
    let out = tern(dir, args);
    assert!(
        out.status.success(),
        "tern {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tern {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

thread_local! {
    /// Data directories of the nodes this test started, for failure reports.
    static NODE_DIRS: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The end of each log of the nodes this test started. With
/// `TERN_TEST_LOGS=DIR` set, each whole log is also copied into DIR.
pub fn node_logs() -> String {
    let keep = std::env::var_os("TERN_TEST_LOGS").map(PathBuf::from);
    NODE_DIRS.with(|dirs| {
        let mut out = String::new();
        for (k, dir) in dirs.borrow().iter().enumerate() {
            let log = std::fs::read_to_string(dir.join("test-node.log")).unwrap_or_default();
            if let Some(keep) = &keep {
                let name = format!("{k}-{}.log", dir.file_name().unwrap_or_default().display());
                let _ = std::fs::create_dir_all(keep);
                let _ = std::fs::write(keep.join(name), &log);
            }
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            out.push_str(&format!("\n--- {} ---\n{}", dir.display(), tail.join("\n")));
        }
        out
    })
}

/// Polls `f` every 50 ms until it yields a value; fails the test at the
/// deadline, showing the logs of the nodes the test started.
pub fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() >= DEADLINE {
            panic!(
                "timed out after {DEADLINE:?} waiting for {what}; node logs:{}",
                node_logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn init(dir: &Path, name: &str) {
    let out = tern(dir, &["init", "--name", name]);
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `tern node` process; killed (SIGKILL) when dropped.
pub struct NodeProcess {
    pub dir: PathBuf,
    child: Child,
}

impl NodeProcess {
    /// Starts `tern node` on `dir` with `args` and waits until its API answers.
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("test-node.log"))
            .expect("open node log");
        NODE_DIRS.with(|d| d.borrow_mut().push(dir.to_owned()));
        let child = Command::new(tern_bin())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,tern_node::secret=debug".into()),
            )
            .arg("--data-dir")
            .arg(dir)
            .arg("node")
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn tern node");
        let mut node = Self {
            dir: dir.to_owned(),
            child,
        };
        node.wait_serving();
        node
    }

    fn wait_serving(&mut self) {
        let pid = self.child.id();
        let dir = self.dir.clone();
        poll(
            &format!("node in {} to serve its API", dir.display()),
            || {
                if let Ok(Some(exit)) = self.child.try_wait() {
                    panic!("node exited early ({exit}): {}", self.log());
                }
                let endpoint: Value =
                    serde_json::from_slice(&std::fs::read(dir.join("api.json")).ok()?).ok()?;
                if endpoint["pid"].as_u64() != Some(u64::from(pid)) {
                    return None; // a stale file from an earlier run
                }
                let out = tern(&dir, &["status", "--json"]);
                out.status.success().then_some(())
            },
        );
    }

    pub fn status(&self) -> Value {
        tern_json(&self.dir, &["status", "--json"])
    }

    pub fn connected_peers(&self) -> u64 {
        self.status()["connected_peers"]
            .as_u64()
            .expect("connected_peers")
    }

    pub fn peer_id(&self) -> String {
        self.status()["peer_id"]
            .as_str()
            .expect("peer_id")
            .to_owned()
    }

    pub fn tcp_addr(&self) -> String {
        dial_addr(&self.status())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("test-node.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        signal(self.child.id(), libc::SIGTERM);
        poll("node to exit after SIGTERM", || {
            self.child.try_wait().ok().flatten()
        })
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid of a process this test started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Kills a process by pid with SIGKILL and waits until it is gone.
pub fn kill9(pid: u32) {
    signal(pid, libc::SIGKILL);
    poll("killed process to disappear", || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        // Gone, or a zombie waiting for its parent to reap it.
        match stat {
            None => Some(()),
            Some(s) => s
                .split_whitespace()
                .nth(2)
                .filter(|st| *st == "Z")
                .map(|_| ()),
        }
    });
}

/// A `tern testnet` process; interrupted (then killed) when dropped.
pub struct TestnetProcess {
    pub dir: PathBuf,
    child: Child,
    lines: mpsc::Receiver<String>,
    pub printed: Vec<String>,
}

impl TestnetProcess {
    pub fn start(dir: &Path, nodes: usize) -> Self {
        let mut child = Command::new(tern_bin())
            .args(["testnet", "--nodes", &nodes.to_string(), "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tern testnet");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut t = Self {
            dir: dir.to_owned(),
            child,
            lines,
            printed: Vec::new(),
        };
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match t.lines.recv_timeout(left) {
                Ok(line) if line == "ready" => break,
                Ok(line) => t.printed.push(line),
                Err(_) => panic!(
                    "testnet never printed `ready`; printed so far: {:?}",
                    t.printed
                ),
            }
        }
        t
    }

    pub fn node_dir(&self, k: usize) -> PathBuf {
        self.dir.join(format!("node-{k}"))
    }

    pub fn status(&self, k: usize) -> Value {
        tern_json(&self.node_dir(k), &["status", "--json"])
    }

    /// Interrupts the testnet like Ctrl-C and waits for it to exit.
    pub fn interrupt(mut self) -> std::process::ExitStatus {
        signal(self.child.id(), libc::SIGINT);
        poll("testnet to exit after Ctrl-C", || {
            self.child.try_wait().ok().flatten()
        })
    }
}

impl Drop for TestnetProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), libc::SIGINT);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Node pids from `tern status` in each node dir, for cleanup checks.
pub fn pid_of(dir: &Path) -> Option<u32> {
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("api.json")).ok()?).ok()?;
    v["pid"].as_u64().map(|p| p as u32)
}

pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) != Some("Z"))
        .unwrap_or(false)
}

/// The TCP listen address in a `status --json` document.
pub fn tcp_listen_addr(status: &Value) -> String {
    status["listen_addrs"]
        .as_array()
        .expect("listen_addrs")
        .iter()
        .filter_map(Value::as_str)
        .find(|a| a.contains("/tcp/"))
        .expect("a TCP listen address")
        .to_owned()
}

/// The address to dial a node at, with its peer id, from its status.
pub fn dial_addr(status: &Value) -> String {
    format!(
        "{}/p2p/{}",
        tcp_listen_addr(status),
        status["peer_id"].as_str().expect("peer_id")
    )
}

/// A metric's value from the node's `/metrics` (0 if absent).
pub fn metric(dir: &std::path::Path, name: &str) -> f64 {
    let endpoint: Value =
        serde_json::from_slice(&std::fs::read(dir.join("api.json")).unwrap()).unwrap();
    let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
    let mut s = std::net::TcpStream::connect(endpoint["address"].as_str().unwrap()).unwrap();
    std::io::Write::write_fmt(
        &mut s,
        format_args!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
        token.trim()
    ))
    .unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).unwrap();
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .unwrap_or_default()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                found.push(p);
            }
        }
    }
    found
}

/// Starts a relay on `dir`: a node with a fixed loopback port declared as
/// its external address (a relay serves only with one). Returns it and its
/// circuit address (`…/p2p/RELAY/p2p-circuit`).
pub fn start_relay(dir: &Path) -> (NodeProcess, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port();
    let addr = format!("/ip4/127.0.0.1/tcp/{port}");
    let relay = NodeProcess::start(dir, &["--listen", &addr, "--external", &addr, "--no-mdns"]);
    poll("the relay's external address", || {
        relay.status()["external_addrs"]
            .as_array()?
            .iter()
            .any(|a| a == addr.as_str())
            .then_some(())
    });
    let circuit = format!("{}/p2p-circuit", relay.tcp_addr());
    (relay, circuit)
}

/// Starts a node on `dir` that listens only through the relay at
/// `circuit`, once its relayed address is active.
pub fn start_behind_relay(dir: &Path, circuit: &str) -> NodeProcess {
    let node = NodeProcess::start(dir, &["--listen", circuit, "--no-mdns"]);
    poll("the relayed address to be active", || {
        node.status()["listen_addrs"]
            .as_array()?
            .iter()
            .any(|a| a.as_str().is_some_and(|a| a.contains("p2p-circuit")))
            .then_some(())
    });
    node
}

/// A bare libp2p node that speaks one of Tern's record protocols, as a
/// test's stand-in for another device (or an attacker).
pub type RecordClient<Req, Resp> = libp2p::Swarm<
    libp2p::request_response::Behaviour<tern_node::net::codec::RecordCodec<Req, Resp>>,
>;

/// Connects a [`RecordClient`] with `identity` to `target`.
pub async fn record_client<Req, Resp>(
    identity: libp2p::identity::Keypair,
    protocol: &'static str,
    target: libp2p::Multiaddr,
) -> (RecordClient<Req, Resp>, libp2p::PeerId)
where
    Req: tern_protocol::Record + Send + Sync + 'static,
    Resp: tern_protocol::Record + Send + Sync + 'static,
{
    use futures::StreamExt;
    use libp2p::{request_response, swarm::SwarmEvent};
    let codec = tern_node::net::codec::RecordCodec::new(
        prometheus_client::metrics::counter::Counter::default(),
    );
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(identity)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .expect("tcp transport")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                codec,
                [(
                    libp2p::StreamProtocol::new(protocol),
                    request_response::ProtocolSupport::Outbound,
                )],
                request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    swarm.dial(target).expect("dial");
    let peer = loop {
        match swarm.select_next_some().await {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => break peer_id,
            SwarmEvent::OutgoingConnectionError { error, .. } => panic!("dial failed: {error}"),
            _ => {}
        }
    };
    (swarm, peer)
}

/// Sends one request and waits for its answer (or its failure).
pub async fn ask<Req, Resp>(
    swarm: &mut RecordClient<Req, Resp>,
    peer: libp2p::PeerId,
    request: Req,
) -> Result<Resp, String>
where
    Req: tern_protocol::Record + Send + Sync + 'static,
    Resp: tern_protocol::Record + Send + Sync + 'static,
{
    use futures::StreamExt;
    use libp2p::{request_response, swarm::SwarmEvent};
    swarm.behaviour_mut().send_request(&peer, request);
    tokio::time::timeout(DEADLINE, async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                }) => return Ok(response),
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    error, ..
                }) => return Err(error.to_string()),
                _ => {}
            }
        }
    })
    .await
    .expect("an answer within the deadline")
}

/// `tern watch --json` on a node, its events collected in the background.
pub struct Watcher {
    child: Child,
    events: mpsc::Receiver<Value>,
}

impl Watcher {
    pub fn start(dir: &Path) -> Self {
        let mut child = Command::new(tern_bin())
            .arg("--data-dir")
            .arg(dir)
            .args(["watch", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let w = Self { child, events };
        w.next_where("the subscription", |e| e["type"] == "subscribed");
        w
    }

    pub fn next_where(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match self.events.recv_timeout(left) {
                Ok(e) if f(&e) => return e,
                Ok(_) => {}
                Err(_) => panic!("no {what} event within {DEADLINE:?}"),
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
