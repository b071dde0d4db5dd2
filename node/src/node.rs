//! A running node: identity, store, network event loop and control API,
//! started together and stopped together.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use libp2p::PeerId;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tern_protocol::{
    AccountId, AccountKeypair,
    cloud::{
        AccountEncryptionKey, EncryptionPublicKey,
        account::{AccountRecord, AccountRecordBody},
    },
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::{
    api::{self, ApiState},
    cloud::{
        self,
        hosting::Hosting,
        replica::Replicas,
        service::{CloudParts, CloudService},
    },
    config::Config,
    data_dir::{DataDir, read_bounded, write_atomic},
    devices::AccountDevices,
    erasable::ErasableStore,
    events::EventBus,
    keys,
    metrics::NodeMetrics,
    net::{EventLoop, EventLoopParts, behaviour::build_swarm, lane::LaneServer},
    secret::{self, SecretService, service::ServiceParts, store::ChatStore},
    store::Store,
};

/// What a running node writes to `api.json` so clients can find it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiEndpoint {
    pub address: SocketAddr,
    pub pid: u32,
    pub peer_id: String,
}

pub struct NodeOptions {
    pub data_dir: DataDir,
    pub config: Config,
    pub passphrase: Option<Zeroizing<Vec<u8>>>,
}

pub struct Node {
    pub peer_id: PeerId,
    pub account_id: AccountId,
    pub api_addr: SocketAddr,
    data_dir: DataDir,
    store: Store,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    flusher: JoinHandle<()>,
}

/// Reads the API token written by `tern init`.
pub fn read_token(dir: &DataDir) -> anyhow::Result<String> {
    let path = dir.api_token();
    let bytes = read_bounded(&path, 1024).with_context(|| {
        format!(
            "cannot read the API token {}; was `tern init` run?",
            path.display()
        )
    })?;
    let token = String::from_utf8(bytes).context("API token is not text")?;
    let token = token.trim().to_owned();
    // An empty or short token would let anyone on this machine in.
    if token.len() < MIN_TOKEN_LEN {
        anyhow::bail!(
            "the API token in {} is damaged (shorter than {MIN_TOKEN_LEN} characters); write a new random one, e.g. `openssl rand -hex 32`",
            path.display()
        );
    }
    Ok(token)
}

/// This device's account record: for now the account's devices as this
/// device knows them (itself) and its encryption key. Signed anew at every
/// start, with the time as its sequence number.
fn own_account_record(
    identity: &keys::Identity,
    config: &Config,
    (key_generation, encryption_key): (u32, EncryptionPublicKey),
) -> anyhow::Result<AccountRecord> {
    let now = crate::events::now_ms();
    let mut storage_peers = config
        .storage_peers
        .iter()
        .map(|p| cloud::service::parse_storage_peer(p).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if storage_peers.is_empty() {
        storage_peers.push(tern_protocol::cloud::account::StoragePeer {
            node: identity.certificate.device,
            addrs: Vec::new(),
        });
    }
    AccountRecord::sign(
        &identity.account,
        AccountRecordBody {
            account: identity.account_id(),
            seq: now,
            issued_at_ms: now,
            encryption_key,
            key_generation,
            key_grants: Vec::new(),
            revoked: Vec::new(),
            devices: vec![identity.certificate.clone()],
            storage_peers,
        },
    )
    .map_err(|e| anyhow::anyhow!("cannot sign this account's record: {e}"))
}

/// `tern init` writes 64 hex characters; anything under 32 is refused.
pub const MIN_TOKEN_LEN: usize = 32;

impl Node {
    pub async fn start(opts: NodeOptions) -> anyhow::Result<Self> {
        let NodeOptions {
            data_dir,
            config,
            passphrase,
        } = opts;
        config.validate()?;
        let mut identity = keys::load(&data_dir, passphrase.as_deref().map(|p| p.as_slice()))?;
        if identity.certificate.name != config.name {
            // The name is part of the signed certificate: renaming re-signs it.
            keys::rename(&data_dir, &mut identity, &config.name)?;
            info!(name = %config.name, "device renamed");
        }
        let token = read_token(&data_dir)?;
        let store = Store::open(&data_dir.store(), config.store_cache_mib * 1024 * 1024).with_context(|| {
            format!(
                "cannot open the store in {} (is another `tern node` using this data directory?)",
                data_dir.root().display()
            )
        })?;

        let mut registry = Registry::default();
        let metrics = NodeMetrics::register(&mut registry);
        let swarm = build_swarm(
            identity.device.clone(),
            &config,
            &mut registry,
            metrics.rejected_frames.clone(),
        )?;
        let bus = EventBus::default();
        let peer_id = identity.peer_id();
        let (secret_inbound, inbound_rx) =
            tokio::sync::mpsc::channel(secret::service::INBOUND_QUEUE);
        let (store_inbound, store_rx) = tokio::sync::mpsc::channel(cloud::service::INBOUND_QUEUE);
        let lane_inbound = store_inbound.clone();
        let signing_key = keys::device_signing_key(&identity.device)
            .context("the device key is not an Ed25519 key")?;
        let account_keys = cloud::account_keys::AccountKeys::load(
            store.keyspace("account_keys")?,
            signing_key.clone(),
        );
        let encryption_key =
            cloud::account_keys::current_public(&identity.account, &account_keys.1);
        let devices = AccountDevices::open(
            store.keyspace(crate::devices::KEYSPACE)?,
            AccountKeypair::from_secret_bytes(&identity.account.secret_bytes()),
            identity.certificate.clone(),
        )?;
        let (mut event_loop, net) = EventLoop::new(EventLoopParts {
            swarm,
            devices,
            bus: bus.clone(),
            metrics: metrics.clone(),
            certificate: identity.certificate.clone(),
            peers_ks: store.keyspace("peers")?,
            state_ks: store.keyspace("state")?,
            target_peers: config.target_peers as usize,
            secret_inbound,
            store_inbound,
            own_record: own_account_record(&identity, &config, encryption_key)?,
            account_keys: account_keys.0.shared(),
            signing_key: signing_key.clone(),
        });
        let erasable = ErasableStore::open(data_dir.erasable())
            .with_context(|| format!("cannot open {}", data_dir.erasable().display()))?;
        let (secret_service, secret) = SecretService::new(ServiceParts {
            net: net.clone(),
            bus: bus.clone(),
            metrics: metrics.clone(),
            store: ChatStore::new(erasable),
            signing_key: signing_key.clone(),
            certificate: identity.certificate.clone(),
            inbound: inbound_rx,
        })?;
        for spec in &config.listen {
            event_loop.listen(spec)?;
        }
        for addr in &config.external {
            event_loop.add_external(addr.clone());
        }
        for addr in &config.bootstrap {
            event_loop.bootstrap(addr);
        }

        let listener = tokio::net::TcpListener::bind(config.api)
            .await
            .with_context(|| format!("cannot bind the control API on {}", config.api))?;
        let api_addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let lanes = match config.lane_addr() {
            Some(addr) => {
                let (server, task) = LaneServer::bind(
                    addr,
                    peer_id,
                    lane_inbound,
                    metrics.lanes.clone(),
                    shutdown_rx.clone(),
                )
                .await
                .with_context(|| format!("cannot listen for lanes on {addr}"))?;
                tasks.push(task);
                Some(server)
            }
            None => None,
        };
        let hosting = Hosting::load(
            store.keyspace("hosting")?,
            config.host_open,
            config.storage_quota_mib.saturating_mul(1024 * 1024),
        )?;
        let replicas = Replicas::open_as(data_dir.replicas(), Some(identity.account_id()))
            .with_context(|| format!("cannot open {}", data_dir.replicas().display()))?;
        let (cloud_service, cloud) = CloudService::new(CloudParts {
            replicas,
            hosting: hosting.clone(),
            net: net.clone(),
            bus: bus.clone(),
            inbound: store_rx,
            encryption: AccountEncryptionKey::derive(&identity.account),
            account_keys,
            signing_key,
            certificate: identity.certificate.clone(),
            hidden: store.keyspace("cloud_hidden")?,
            lanes,
        })?;
        let state = Arc::new(ApiState {
            net,
            secret,
            cloud,
            hosting,
            bus,
            token,
            registry,
            metrics,
            peer_id,
            account_id: identity.account_id(),
            device: identity.certificate.device,
            name: identity.certificate.name.clone(),
            started: std::time::Instant::now(),
            shutdown: shutdown_rx.clone(),
        });

        let flusher = store.spawn_background_flusher();
        tasks.extend([
            tokio::spawn(event_loop.run(shutdown_rx.clone())),
            secret_service.spawn(shutdown_rx.clone()),
            cloud_service.spawn(shutdown_rx.clone()),
        ]);
        let mut api_shutdown = shutdown_rx;
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(listener, api::router(state))
                .with_graceful_shutdown(async move {
                    let _ = api_shutdown.changed().await;
                })
                .await;
            if let Err(e) = served {
                warn!("control API stopped: {e}");
            }
        }));

        let endpoint = ApiEndpoint {
            address: api_addr,
            pid: std::process::id(),
            peer_id: peer_id.to_string(),
        };
        write_atomic(
            &data_dir.api_endpoint(),
            &serde_json::to_vec_pretty(&endpoint)?,
            false,
        )?;
        info!(%peer_id, account = %identity.account_id(), api = %api_addr, "node started");

        Ok(Self {
            peer_id,
            account_id: identity.account_id(),
            api_addr,
            data_dir,
            store,
            shutdown,
            tasks,
            flusher,
        })
    }

    /// Stops the API and the network, flushes the store and removes
    /// `api.json`.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                warn!("a task did not stop within 10 s");
            }
        }
        self.flusher.abort();
        if let Err(e) = self.store.flush().await {
            warn!("final store flush failed: {e}");
        }
        let path = self.data_dir.api_endpoint();
        let ours = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<ApiEndpoint>(&b).ok())
            .is_some_and(|e| e.pid == std::process::id());
        if ours {
            let _ = std::fs::remove_file(path);
        }
        info!("node stopped");
    }
}
