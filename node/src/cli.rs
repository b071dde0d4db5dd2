//! The `tern` command line: `tern node` runs a node, the other subcommands
//! are clients of a running node (contract: CLI.md).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use libp2p::Multiaddr;
use rand::RngCore;
use serde_json::Value;

use crate::{
    api::{ConnectRequest, ConnectResponse, StatusResponse, TicketResponse},
    client::ApiClient,
    config::Config,
    data_dir::{DataDir, create_private},
    keys,
    net::PeerInfo,
    node::{Node, NodeOptions},
    testnet,
};

#[derive(Parser, Debug)]
#[command(
    name = "tern",
    version,
    about = "Tern: peer-to-peer messaging node",
    propagate_version = true
)]
pub struct Cli {
    /// Data directory of the node [default: $TERN_DATA_DIR, else ~/.local/share/tern]
    #[arg(long, global = true, env = "TERN_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create this device's account and keys, config and API token.
    Init(InitArgs),
    /// Run the node in the foreground until Ctrl-C or SIGTERM.
    Node(NodeArgs),
    /// Show this node's identity, addresses and peer count.
    Status(JsonFlag),
    /// List connected peers.
    Peers(JsonFlag),
    /// Print this node's ticket: one line that lets others connect to it.
    Ticket,
    /// Dial a peer (ticket or multiaddr) and remember it.
    Connect {
        /// A ticket from `tern ticket`, or a multiaddr.
        target: String,
    },
    /// Secret chats: device-to-device, end-to-end, self-destructing.
    #[command(subcommand)]
    Secret(crate::secret::cli::SecretCommand),
    /// Close and erase all of this device's secret chats and their keys.
    Logout,
    /// Whom this node stores cloud chats for.
    #[command(subcommand)]
    Host(crate::cloud::cli::HostCommand),
    /// Cloud chats: end-to-end encrypted, kept by storage peers, on every device.
    #[command(subcommand)]
    Chat(crate::cloud::cli::ChatCommand),
    /// Stream events from the node.
    Watch(JsonFlag),
    /// Start a local testnet of N nodes on loopback.
    Testnet(testnet::TestnetArgs),
    /// This account's devices: link a new one, list, revoke.
    #[command(subcommand)]
    Device(crate::devices::cli::DeviceCommand),
}

#[derive(Args, Debug)]
pub struct JsonFlag {
    /// Print one JSON document (for scripts).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// This device's name, shown to peers [default: the host name]
    #[arg(long)]
    pub name: Option<String>,
    /// Encrypt the private keys at rest with the passphrase in this file.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Make this data directory a new device of an existing account, with a
    /// code from `tern device link` on one of its devices.
    #[arg(long, value_name = "CODE")]
    pub link: Option<String>,
}

/// `tern node` flags; each overrides the same setting in config.toml.
#[derive(Args, Debug, Default, Clone)]
pub struct NodeArgs {
    /// Listen address (repeatable) [default: TCP and QUIC on all interfaces, ephemeral ports]
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<Multiaddr>,
    /// Peer to dial at start and seed the DHT from (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<Multiaddr>,
    /// Address at which others reach this node, e.g. a server's public
    /// address (repeatable). Enables the relay service.
    #[arg(long, value_name = "MULTIADDR")]
    pub external: Vec<Multiaddr>,
    /// Control API address; loopback only [default: 127.0.0.1:0]
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<String>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Most established connections.
    #[arg(long)]
    pub max_connections: Option<u32>,
    /// Keep dialling remembered and discovered peers while fewer are connected.
    #[arg(long)]
    pub target_peers: Option<u32>,
    /// Seconds an idle connection is kept.
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// Store page cache, in MiB.
    #[arg(long, value_name = "MIB")]
    pub store_cache_mib: Option<u64>,
    /// Device name shown to peers.
    #[arg(long)]
    pub name: Option<String>,
    /// File holding the passphrase, if the keys are encrypted.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Store cloud chats for any account not denied (for testnets).
    #[arg(long)]
    pub host_open: bool,
    /// Most MiB of other people's chats to store.
    #[arg(long, value_name = "MIB")]
    pub storage_quota_mib: Option<u64>,
    /// Push only over libp2p: open no lanes to peers and accept none.
    #[arg(long)]
    pub no_lanes: bool,
    /// TCP port for peers' lanes [default: a free port]
    #[arg(long, value_name = "PORT")]
    pub lane_port: Option<u16>,
}

impl NodeArgs {
    /// Applies the flags given on top of the config file.
    pub fn apply(&self, c: &mut Config) -> anyhow::Result<()> {
        if !self.listen.is_empty() {
            c.listen = self.listen.clone();
        }
        if !self.bootstrap.is_empty() {
            c.bootstrap = self.bootstrap.clone();
        }
        if !self.external.is_empty() {
            c.external = self.external.clone();
        }
        if let Some(api) = &self.api {
            c.api = api
                .parse()
                .with_context(|| format!("--api {api}: expected HOST:PORT, e.g. 127.0.0.1:7070"))?;
        }
        if self.no_mdns {
            c.mdns = false;
        }
        if let Some(v) = self.max_connections {
            c.max_connections = v;
        }
        if let Some(v) = self.target_peers {
            c.target_peers = v;
        }
        if let Some(v) = self.idle_timeout {
            c.idle_timeout_secs = v;
        }
        if let Some(v) = self.store_cache_mib {
            c.store_cache_mib = v;
        }
        if let Some(v) = &self.name {
            c.name = v.clone();
        }
        if self.host_open {
            c.host_open = true;
        }
        if let Some(v) = self.storage_quota_mib {
            c.storage_quota_mib = v;
        }
        if self.no_lanes {
            c.lanes = false;
        }
        if let Some(v) = self.lane_port {
            c.lane_port = v;
        }
        c.validate()?;
        Ok(())
    }
}

pub fn data_dir(cli: &Cli) -> DataDir {
    DataDir::new(cli.data_dir.clone().unwrap_or_else(DataDir::default_root))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = data_dir(&cli);
    match cli.command {
        Command::Init(args) if args.link.is_some() => {
            crate::devices::cli::init_linked(&dir, args).await
        }
        Command::Init(args) => init(&dir, args),
        Command::Node(args) => run_node(dir, args).await,
        Command::Status(f) => status(&dir, f.json).await,
        Command::Peers(f) => peers(&dir, f.json).await,
        Command::Ticket => {
            let t: TicketResponse = ApiClient::new(&dir)?.get("/v1/ticket").await?;
            println!("{}", t.ticket);
            Ok(())
        }
        Command::Connect { target } => {
            let r: ConnectResponse = ApiClient::new(&dir)?
                .post("/v1/connect", &ConnectRequest { target })
                .await?;
            println!("connected to {}", r.peer_id);
            Ok(())
        }
        Command::Secret(cmd) => crate::secret::cli::run(&dir, cmd).await,
        Command::Logout => crate::secret::cli::logout(&dir).await,
        Command::Host(cmd) => crate::cloud::cli::run(&dir, cmd).await,
        Command::Chat(cmd) => crate::cloud::cli::run_chat(&dir, cmd).await,
        Command::Watch(f) => watch(&dir, f.json).await,
        Command::Testnet(args) => testnet::run(args).await,
        Command::Device(cmd) => crate::devices::cli::run(&dir, cmd).await,
    }
}

pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().chars().take(64).collect::<String>())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tern".into())
}

pub fn init(dir: &DataDir, args: InitArgs) -> anyhow::Result<()> {
    let name = args.name.unwrap_or_else(host_name);
    let passphrase = args
        .passphrase_file
        .as_deref()
        .map(keys::read_passphrase_file)
        .transpose()?;
    let config = Config {
        name: name.clone(),
        ..Config::default()
    };
    let identity = init_with(dir, config, passphrase.as_deref().map(|p| p.as_slice()))?;
    println!("account   {}", identity.account_id());
    println!("device    {} ({name})", identity.peer_id());
    println!("data dir  {}", dir.root().display());
    println!("next      tern node --data-dir {}", dir.root().display());
    Ok(())
}

/// Creates keys, the API token and the config file. Shared by `tern init` and
/// `tern testnet`.
pub fn init_with(
    dir: &DataDir,
    config: Config,
    passphrase: Option<&[u8]>,
) -> anyhow::Result<keys::Identity> {
    init_with_identity(dir, config, passphrase, |dir, config, passphrase| {
        Ok(keys::create(dir, &config.name, passphrase)?)
    })
}

/// [`init_with`], with `make` writing the keys; on any failure every file
/// `tern init` creates is removed again.
pub fn init_with_identity(
    dir: &DataDir,
    config: Config,
    passphrase: Option<&[u8]>,
    make: impl FnOnce(&DataDir, &Config, Option<&[u8]>) -> anyhow::Result<keys::Identity>,
) -> anyhow::Result<keys::Identity> {
    config.validate()?;
    if dir.is_initialized() {
        // Checked here too, so the clean-up below never touches an existing identity.
        return Err(keys::KeyError::AlreadyInitialized(dir.root().display().to_string()).into());
    }
    let made = init_files(dir, config, passphrase, make);
    if made.is_err() {
        // Leave nothing half-made: a later `tern init` must be able to start over.
        for f in dir.init_files() {
            let _ = std::fs::remove_file(f);
        }
    }
    made
}

fn init_files(
    dir: &DataDir,
    config: Config,
    passphrase: Option<&[u8]>,
    make: impl FnOnce(&DataDir, &Config, Option<&[u8]>) -> anyhow::Result<keys::Identity>,
) -> anyhow::Result<keys::Identity> {
    let identity = make(dir, &config, passphrase)?;
    let mut token = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut token);
    create_private(&dir.api_token(), crate::hex::hex(&token).as_bytes())
        .with_context(|| format!("cannot write {}", dir.api_token().display()))?;
    config
        .save(&dir.config())
        .with_context(|| format!("cannot write {}", dir.config().display()))?;
    Ok(identity)
}

async fn run_node(dir: DataDir, args: NodeArgs) -> anyhow::Result<()> {
    if !dir.is_initialized() {
        bail!(
            "{} has no Tern identity yet; run `tern init --data-dir {}` first",
            dir.root().display(),
            dir.root().display()
        );
    }
    let mut config = if dir.config().exists() {
        Config::load(&dir.config())?
    } else {
        Config::default()
    };
    args.apply(&mut config)?;
    let passphrase = args
        .passphrase_file
        .as_deref()
        .map(keys::read_passphrase_file)
        .transpose()?;
    let mut stop = StopSignal::new()?;
    let node = Node::start(NodeOptions {
        data_dir: dir,
        config,
        passphrase,
    })
    .await?;
    stop.recv().await;
    node.shutdown().await;
    Ok(())
}

/// Ctrl-C (SIGINT) and SIGTERM. Create it once, before the loop that waits
/// for it: a signal that arrives while no listener is registered is lost.
pub struct StopSignal {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignal {
    pub fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn status(dir: &DataDir, json: bool) -> anyhow::Result<()> {
    let s: Value = ApiClient::new(dir)?.get("/v1/status").await?;
    if json {
        println!("{s}");
        return Ok(());
    }
    let s: StatusResponse = serde_json::from_value(s)?;
    println!("name             {}", s.name);
    println!("account          {}", s.account_id);
    println!("peer id          {}", s.peer_id);
    println!("connected peers  {}", s.connected_peers);
    println!("known peers      {}", s.known_peers);
    for a in &s.listen_addrs {
        println!("listening on     {a}");
    }
    for a in &s.external_addrs {
        println!("reachable at     {a}");
    }
    Ok(())
}

async fn peers(dir: &DataDir, json: bool) -> anyhow::Result<()> {
    let peers: Value = ApiClient::new(dir)?.get("/v1/peers").await?;
    if json {
        println!("{peers}");
        return Ok(());
    }
    let peers: Vec<PeerInfo> = serde_json::from_value(peers)?;
    if peers.is_empty() {
        println!("no peers connected");
    }
    for p in peers {
        println!(
            "{}  {}  {}",
            p.peer_id,
            p.name.as_deref().unwrap_or("-"),
            p.addresses.first().map(String::as_str).unwrap_or("")
        );
    }
    Ok(())
}

async fn watch(dir: &DataDir, json: bool) -> anyhow::Result<()> {
    let client = ApiClient::new(dir)?;
    let mut events = Box::pin(client.events().await?);
    let mut stop = StopSignal::new()?;
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(ev) => {
                    let ev = ev?;
                    if json {
                        println!("{ev}");
                    } else {
                        println!("{}", describe(&ev));
                    }
                }
                None => bail!("the node closed the event stream (it is shutting down)"),
            },
            _ = stop.recv() => return Ok(()),
        }
    }
}

fn describe(ev: &Value) -> String {
    let s = |k: &str| ev.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    match ev.get("type").and_then(Value::as_str).unwrap_or("") {
        "subscribed" => "watching events (Ctrl-C to stop)".into(),
        "listening" => format!("listening on {}", s("address")),
        "peer_connected" => format!("connected     {} at {}", s("peer_id"), s("address")),
        "peer_identified" => format!(
            "identified    {} is {} ({})",
            s("peer_id"),
            s("name"),
            s("account_id")
        ),
        "peer_disconnected" => format!("disconnected  {}", s("peer_id")),
        "secret_request" => format!(
            "secret chat   {} requested by {} ({}); `tern secret accept {}`",
            s("secret_id"),
            s("name"),
            ev.get("peer")
                .and_then(Value::as_str)
                .unwrap_or("unknown account"),
            s("secret_id")
        ),
        "secret_accepted" => format!("secret chat   {} is active", s("secret_id")),
        "secret_cancelled" => format!("secret chat   {} cancelled", s("secret_id")),
        "secret_closed" => format!("secret chat   {} closed", s("secret_id")),
        "secret_message" => format!("secret        {}: {}", s("secret_id"), s("text")),
        "secret_read" | "secret_expired" | "secret_deleted" => {
            let n = ev
                .get("message_ids")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let what = match ev.get("type").and_then(Value::as_str) {
                Some("secret_read") => "read by the other device",
                Some("secret_expired") => "self-destructed",
                _ => "deleted by the other device",
            };
            format!("secret        {}: {n} message(s) {what}", s("secret_id"))
        }
        "secret_cleared" => format!("secret        {}: history cleared", s("secret_id")),
        "secret_timer" => format!(
            "secret        {}: timer {}",
            s("secret_id"),
            ev.get("timer_ms")
                .and_then(Value::as_u64)
                .map_or("off".to_owned(), |ms| format!("{ms} ms"))
        ),
        "lagged" => format!(
            "(missed {} events)",
            ev.get("missed").and_then(Value::as_u64).unwrap_or(0)
        ),
        _ => ev.to_string(),
    }
}
