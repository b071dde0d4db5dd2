//! The event loop's part in device linking and the account's device list:
//! it answers `/tern/link/1`, issues link codes, lists and revokes devices,
//! merges the devices of its own account's records and keeps this device's
//! signed record up to date. Everything here is cheap (a MAC, a signature,
//! a background store write), so it runs inline; nothing waits on disk.

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol, request_response};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tern_protocol::{
    cloud::{
        AccountEncryptionKey, DeviceKeyGrant, EncryptionPublicKey,
        account::{AccountRecord, RECORD_KEY_CHAT},
    },
    link::{
        CodeId, LinkCode, LinkGrant, LinkRefusal, LinkRequest, LinkResponse, MAX_ADDR_LEN,
        MAX_BOOTSTRAP,
    },
};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::{Command, EventLoop, NetError, NetworkHandle};
use crate::{
    devices::{DeviceView, RevokeError},
    events::now_ms,
    keys::device_of_peer,
};

/// Most of the bootstrap addresses of one other peer put in a grant.
const BOOTSTRAP_PER_PEER: usize = 2;

/// A freshly issued link code.
#[derive(Clone, Serialize, Deserialize)]
pub struct IssuedCode {
    /// One line: `tern-link:…`.
    pub code: String,
    pub expires_at_ms: u64,
}

/// Requests about the account's devices, for the event loop.
pub enum DevicesCommand {
    NewCode {
        reply: oneshot::Sender<Result<IssuedCode, String>>,
    },
    List {
        reply: oneshot::Sender<Vec<DeviceView>>,
    },
    Revoke {
        device: String,
        reply: oneshot::Sender<Result<DeviceView, RevokeError>>,
    },
    /// The account took a new encryption key: this device's record names
    /// it from now on.
    EncryptionKey {
        key: (u32, EncryptionPublicKey),
        reply: oneshot::Sender<()>,
    },
}

impl NetworkHandle {
    /// Issues a one-time link code (`tern device link`).
    pub async fn link_code(&self) -> Result<Result<IssuedCode, String>, NetError> {
        self.call(|reply| Command::Devices(DevicesCommand::NewCode { reply }))
            .await
    }

    /// The account's devices as this device knows them.
    pub async fn account_devices(&self) -> Result<Vec<DeviceView>, NetError> {
        self.call(|reply| Command::Devices(DevicesCommand::List { reply }))
            .await
    }

    /// Publishes `key` (generation, public half) as the account's
    /// encryption key in this device's record (signed anew).
    pub async fn publish_encryption_key(
        &self,
        key: (u32, EncryptionPublicKey),
    ) -> Result<(), NetError> {
        self.call(|reply| Command::Devices(DevicesCommand::EncryptionKey { key, reply }))
            .await
    }

    /// Revokes the device whose id starts with `device`; answers once the
    /// revocation is on disk.
    pub async fn revoke_device(
        &self,
        device: String,
    ) -> Result<Result<DeviceView, RevokeError>, NetError> {
        self.call(|reply| Command::Devices(DevicesCommand::Revoke { device, reply }))
            .await
    }
}

impl EventLoop {
    pub(super) fn on_devices_command(&mut self, cmd: DevicesCommand) {
        match cmd {
            DevicesCommand::NewCode { reply } => {
                let _ = reply.send(self.new_link_code());
            }
            DevicesCommand::List { reply } => {
                let _ = reply.send(self.devices.list());
            }
            DevicesCommand::EncryptionKey {
                key: (generation, key),
                reply,
            } => {
                let body = &self.own_record.body;
                if (body.key_generation, body.encryption_key) != (generation, key) {
                    self.own_record.body.encryption_key = key;
                    self.own_record.body.key_generation = generation;
                    self.refresh_own_record();
                    info!("this account's record names its new encryption key");
                }
                let _ = reply.send(());
            }
            DevicesCommand::Revoke { device, reply } => {
                let revoked = self.devices.revoke(&device, now_ms());
                if revoked.is_ok() {
                    self.refresh_own_record();
                }
                // Answer once the revocation is on disk, without holding up
                // the event loop.
                let ks = self.devices.keyspace();
                tokio::spawn(async move {
                    let answer = match (revoked, ks.flush().await) {
                        (Ok(_), Err(e)) => Err(RevokeError::Store(e.to_string())),
                        (answer, _) => answer,
                    };
                    let _ = reply.send(answer);
                });
            }
        }
    }

    fn new_link_code(&mut self) -> Result<IssuedCode, String> {
        if !self.devices.has_room() {
            return Err(LinkRefusal::TooManyDevices.to_string());
        }
        let mut id: CodeId = [0; 8];
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut id);
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let expires_at_ms = self
            .devices
            .linker
            .issue(now_ms(), id, secret)
            .map_err(|e| e.to_string())?;
        let addrs = self
            .own_addrs()
            .into_iter()
            // The new device dials directly: it has no relay client.
            .filter(|a| !a.iter().any(|p| matches!(p, Protocol::P2pCircuit)))
            .map(|a| a.to_vec())
            .collect();
        let code = LinkCode::new(self.devices.own_device(), addrs, id, secret);
        secret.fill(0);
        info!("issued a device link code");
        Ok(IssuedCode {
            code: code.to_string(),
            expires_at_ms,
        })
    }

    /// This node's addresses, best first: declared external ones, then
    /// what it listens on (loopback last).
    fn own_addrs(&self) -> Vec<Multiaddr> {
        let is_loopback = |a: &Multiaddr| {
            a.iter().any(|p| match p {
                Protocol::Ip4(ip) => ip.is_loopback(),
                Protocol::Ip6(ip) => ip.is_loopback(),
                _ => false,
            })
        };
        let mut listen: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
        listen.sort_by_key(|a| (is_loopback(a), a.to_string()));
        let mut out: Vec<Multiaddr> = self.swarm.external_addresses().cloned().collect();
        for a in listen {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    pub(super) fn on_link(&mut self, event: request_response::Event<LinkRequest, LinkResponse>) {
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
                let response = self.answer_link(peer, request);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .link
                    .send_response(channel, response);
            }
            E::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound link request failed: {error}");
            }
            E::Message { .. } | E::OutboundFailure { .. } | E::ResponseSent { .. } => {}
        }
    }

    fn answer_link(&mut self, peer: PeerId, request: LinkRequest) -> LinkResponse {
        let _span = tracing::info_span!("link", %peer).entered();
        let Some(joiner) = device_of_peer(&peer) else {
            return LinkResponse::Refused(LinkRefusal::Unknown);
        };
        let now = now_ms();
        match request {
            LinkRequest::Hello { code, nonce } => {
                let mut fresh = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut fresh);
                match self
                    .devices
                    .linker
                    .on_hello(now, &code, joiner, nonce, fresh)
                {
                    Ok(nonce) => LinkResponse::Challenge { nonce },
                    Err(why) => {
                        debug!(?why, "refused a link hello");
                        LinkResponse::Refused(why)
                    }
                }
            }
            LinkRequest::Proof { code, mac, name } => {
                if let Err(why) = self.devices.linker.on_proof(now, &code, &joiner, &mac) {
                    warn!(?why, "refused to link a device");
                    return LinkResponse::Refused(why);
                }
                let certificate = match self.devices.certify(joiner, &name, now) {
                    Ok(c) => c,
                    Err(_) => return LinkResponse::Refused(LinkRefusal::TooManyDevices),
                };
                self.refresh_own_record();
                info!(%name, "linked a new device to this account");
                LinkResponse::Granted(Box::new(LinkGrant {
                    account_secret: *self.devices.account_secret(),
                    certificate,
                    devices: self.devices.active(),
                    bootstrap: self.bootstrap_for(&peer),
                    account_keys: self.account_keys.for_grant(),
                }))
            }
        }
    }

    /// Where a new device can start: this node's addresses, then those of
    /// the peers it is connected to, each with its `/p2p/` id.
    fn bootstrap_for(&self, joiner: &PeerId) -> Vec<Vec<u8>> {
        let local = *self.swarm.local_peer_id();
        let mut out: Vec<Vec<u8>> = Vec::new();
        let add = |addr: &Multiaddr, peer: PeerId, out: &mut Vec<Vec<u8>>| {
            let full = with_p2p(addr, peer).to_vec();
            if full.len() <= MAX_ADDR_LEN && out.len() < MAX_BOOTSTRAP && !out.contains(&full) {
                out.push(full);
            }
        };
        for a in self.own_addrs().iter().take(MAX_BOOTSTRAP / 2) {
            add(a, local, &mut out);
        }
        let mut peers: Vec<_> = self
            .connected
            .iter()
            .filter(|(p, _)| *p != joiner)
            .collect();
        peers.sort_by_key(|(p, _)| p.to_bytes());
        for (peer, c) in peers {
            for a in c
                .listen_addrs
                .iter()
                .chain(&c.dialed_addrs)
                .take(BOOTSTRAP_PER_PEER)
            {
                add(a, *peer, &mut out);
            }
        }
        out
    }

    /// Signs this device's record anew with the account's current devices
    /// and, from key generation 1, the key sealed to each of the others.
    pub(super) fn refresh_own_record(&mut self) {
        let mut current = self.own_record.clone();
        current.body.key_grants = self.key_grants(&current);
        if let Some(r) = self.devices.resign(&current, now_ms()) {
            self.own_record = r;
        }
    }

    fn key_grants(&self, record: &AccountRecord) -> Vec<DeviceKeyGrant> {
        let generation = record.body.key_generation;
        if generation == 0 {
            return Vec::new();
        }
        let Some(key) = self
            .account_keys
            .key(generation, &record.body.encryption_key)
        else {
            return Vec::new();
        };
        let own = self.devices.own_device();
        self.devices
            .active()
            .iter()
            .filter(|c| c.device != own)
            .filter_map(|c| {
                let mut random = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut random);
                let wrapped_key = key
                    .seal_to_device(&c.device, RECORD_KEY_CHAT, generation, &random)
                    .ok()?;
                Some(DeviceKeyGrant {
                    device: c.device,
                    wrapped_key,
                })
            })
            .collect()
    }

    /// A record of this device's own account, sent by another of its
    /// devices: take the devices it lists that this one lacks, and a newer
    /// encryption key sealed to this device (a revocation made there that
    /// no chat brought here).
    pub(super) fn merge_own_record(&mut self, record: &AccountRecord) {
        if record.body.account != self.own_record.body.account {
            return;
        }
        let mut changed = false;
        if self.devices.merge(record) {
            info!("learned of other devices of this account");
            changed = true;
        }
        let body = &record.body;
        let own = self.devices.own_device();
        if body.key_generation > self.own_record.body.key_generation
            && let Some(grant) = body.key_grants.iter().find(|g| g.device == own)
        {
            match AccountEncryptionKey::open_from_device(
                &self.signing_key,
                &grant.wrapped_key,
                &body.encryption_key,
                RECORD_KEY_CHAT,
                body.key_generation,
            ) {
                Ok(key) => {
                    info!(
                        generation = body.key_generation,
                        "took the account's new encryption key from another of its devices"
                    );
                    self.account_keys.found_in_record(body.key_generation, &key);
                    self.own_record.body.encryption_key = body.encryption_key;
                    self.own_record.body.key_generation = body.key_generation;
                    changed = true;
                }
                Err(e) => warn!("an account key in a record of this account does not open: {e}"),
            }
        }
        if changed {
            self.refresh_own_record();
        }
    }
}

fn with_p2p(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(_)) => addr.clone(),
        _ => addr.clone().with(Protocol::P2p(peer)),
    }
}
