//! The devices of this node's account: every certificate it knows, which
//! ones are revoked, and the signed account record that lists the others.
//!
//! Kept in the store's `devices` keyspace, one entry per device. A device
//! learns of the others when it links one (`tern device link`), when it is
//! linked (`tern init --link` writes the linker's list), and from any record
//! of its own account that another of its devices sends on
//! `/tern/account/1`. Merging only ever adds: a certificate signed by the
//! account key is a device of the account whichever record carried it.
//! Revoking is local and sticky: a revoked device is left out of this
//! device's record and is never added back by a merge.

pub mod api;
pub mod cli;
pub mod join;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tern_protocol::{
    AccountKeypair, DecodeError, DeviceCertificate, DevicePublicKey, Record,
    cloud::account::{AccountRecord, AccountRecordBody, MAX_DEVICES},
    link::Linker,
};
use tracing::warn;
use zeroize::Zeroizing;

use crate::{
    keys::peer_id_of,
    store::{Keyspace, StoreError},
};

/// The store keyspace holding the account's devices.
pub const KEYSPACE: &str = "devices";
/// Most devices kept, revoked ones included.
const MAX_KEPT: usize = 256;

/// One device as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDevice {
    pub certificate: DeviceCertificate,
    pub revoked_at_ms: Option<u64>,
}

impl Record for StoredDevice {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = DeviceCertificate::MAX_LEN + 16;

    fn validate(&self) -> Result<(), DecodeError> {
        self.certificate
            .verify()
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    }
}

/// A device as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// The device's peer id.
    pub device: String,
    pub name: String,
    pub this_device: bool,
    pub revoked: bool,
    pub certified_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RevokeError {
    #[error("no device of this account matches {0:?} (see `tern device list`)")]
    NotFound(String),
    #[error("{count} devices match {prefix:?}; give more of the device id")]
    Ambiguous { prefix: String, count: usize },
    #[error(
        "{0} is this device; revoke it from another device of the account, or use `tern logout` here"
    )]
    ThisDevice(String),
    #[error("cannot save the revocation: {0}")]
    Store(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the account already has {MAX_DEVICES} devices, the most its record lists; revoke one with `tern device revoke` first"
)]
pub struct TooManyDevices;

/// The account's devices, the key that signs for them and the open link
/// codes. Owned by the network event loop, which serves `/tern/link/1` and
/// `/tern/account/1`.
pub struct AccountDevices {
    account: AccountKeypair,
    own: DevicePublicKey,
    ks: Keyspace,
    /// In the order first learned; this device first.
    devices: Vec<StoredDevice>,
    /// The link codes this device issued.
    pub linker: Linker,
}

impl AccountDevices {
    /// Loads the stored devices and records this device's own (current)
    /// certificate among them.
    pub fn open(
        ks: Keyspace,
        account: AccountKeypair,
        own: DeviceCertificate,
    ) -> Result<Self, StoreError> {
        let mut devices = vec![StoredDevice {
            certificate: own.clone(),
            revoked_at_ms: None,
        }];
        let mut damaged = Vec::new();
        for item in ks.iter() {
            let (k, v) = item?;
            match StoredDevice::decode(&v) {
                Ok(d)
                    if d.certificate.account == account.id()
                        && d.certificate.device != own.device =>
                {
                    if devices.len() < MAX_KEPT {
                        devices.push(d);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!("dropping a damaged device entry: {e}");
                    damaged.push(k);
                }
            }
        }
        for k in damaged {
            ks.remove_soon(&k)?;
        }
        let this = Self {
            linker: Linker::new(own.device),
            own: own.device,
            account,
            ks,
            devices,
        };
        this.persist(&this.devices[0])?;
        Ok(this)
    }

    fn persist(&self, d: &StoredDevice) -> Result<(), StoreError> {
        self.ks
            .insert_record_soon(d.certificate.device.as_bytes(), d)
    }

    /// The keyspace, for waiting on a flush outside the event loop.
    pub fn keyspace(&self) -> Keyspace {
        self.ks.clone()
    }

    pub fn own_device(&self) -> DevicePublicKey {
        self.own
    }

    /// The account's secret key, for a device being linked.
    pub fn account_secret(&self) -> Zeroizing<[u8; 32]> {
        self.account.secret_bytes()
    }

    /// The devices a record lists: every one not revoked, this one first.
    pub fn active(&self) -> Vec<DeviceCertificate> {
        self.devices
            .iter()
            .filter(|d| d.revoked_at_ms.is_none())
            .map(|d| d.certificate.clone())
            .take(MAX_DEVICES)
            .collect()
    }

    fn active_count(&self) -> usize {
        self.devices
            .iter()
            .filter(|d| d.revoked_at_ms.is_none())
            .count()
    }

    /// Whether another device can be linked.
    pub fn has_room(&self) -> bool {
        self.active_count() < MAX_DEVICES
    }

    pub fn list(&self) -> Vec<DeviceView> {
        self.devices.iter().map(|d| self.view(d)).collect()
    }

    fn view(&self, d: &StoredDevice) -> DeviceView {
        DeviceView {
            device: show(&d.certificate.device),
            name: d.certificate.name.clone(),
            this_device: d.certificate.device == self.own,
            revoked: d.revoked_at_ms.is_some(),
            certified_at_ms: d.certificate.issued_at_ms,
            revoked_at_ms: d.revoked_at_ms,
        }
    }

    /// Certifies `device` as a new device of the account (or again, if it
    /// was revoked) and keeps it.
    pub fn certify(
        &mut self,
        device: DevicePublicKey,
        name: &str,
        now_ms: u64,
    ) -> Result<DeviceCertificate, TooManyDevices> {
        let known = self
            .devices
            .iter()
            .position(|d| d.certificate.device == device);
        let active = known.is_some_and(|i| self.devices[i].revoked_at_ms.is_none());
        if !active && !self.has_room() {
            return Err(TooManyDevices);
        }
        if known.is_none() && self.devices.len() >= MAX_KEPT {
            // Make room by forgetting the oldest revoked device.
            if let Some(i) = self.devices.iter().position(|d| d.revoked_at_ms.is_some()) {
                let gone = self.devices.remove(i);
                let _ = self.ks.remove_soon(gone.certificate.device.as_bytes());
            } else {
                return Err(TooManyDevices);
            }
        }
        // The name was bounded by the request's decoder.
        let certificate = self
            .account
            .certify(device, name, now_ms)
            .map_err(|_| TooManyDevices)?;
        let entry = StoredDevice {
            certificate: certificate.clone(),
            revoked_at_ms: None,
        };
        if let Err(e) = self.persist(&entry) {
            warn!("cannot save the new device: {e}");
        }
        match self
            .devices
            .iter()
            .position(|d| d.certificate.device == device)
        {
            Some(i) => self.devices[i] = entry,
            None => self.devices.push(entry),
        }
        Ok(certificate)
    }

    /// Marks the device whose id starts with `prefix` revoked.
    pub fn revoke(&mut self, prefix: &str, now_ms: u64) -> Result<DeviceView, RevokeError> {
        let prefix = prefix.trim();
        let matching: Vec<usize> = self
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| !prefix.is_empty() && show(&d.certificate.device).starts_with(prefix))
            .map(|(i, _)| i)
            .collect();
        let i = match matching.as_slice() {
            [] => return Err(RevokeError::NotFound(prefix.to_owned())),
            [i] => *i,
            many => {
                return Err(RevokeError::Ambiguous {
                    prefix: prefix.to_owned(),
                    count: many.len(),
                });
            }
        };
        if self.devices[i].certificate.device == self.own {
            return Err(RevokeError::ThisDevice(show(&self.own)));
        }
        if self.devices[i].revoked_at_ms.is_none() {
            self.devices[i].revoked_at_ms = Some(now_ms);
            self.persist(&self.devices[i])
                .map_err(|e| RevokeError::Store(e.to_string()))?;
        }
        Ok(self.view(&self.devices[i]))
    }

    /// Adds the devices of `record`, a record of this account, that this
    /// device did not know, and newer certificates (renames) of those it
    /// knows. Revoked devices stay revoked. Returns whether anything
    /// changed.
    pub fn merge(&mut self, record: &AccountRecord) -> bool {
        if record.body.account != self.account.id() {
            return false;
        }
        let mut changed = false;
        for cert in &record.body.devices {
            if cert.account != self.account.id() || cert.device == self.own {
                continue;
            }
            match self
                .devices
                .iter()
                .position(|d| d.certificate.device == cert.device)
            {
                Some(i) => {
                    let d = &mut self.devices[i];
                    if d.revoked_at_ms.is_none() && cert.issued_at_ms > d.certificate.issued_at_ms {
                        d.certificate = cert.clone();
                        changed = true;
                        let d = d.clone();
                        if let Err(e) = self.persist(&d) {
                            warn!("cannot save a device: {e}");
                        }
                    }
                }
                None if self.devices.len() < MAX_KEPT && self.has_room() => {
                    let d = StoredDevice {
                        certificate: cert.clone(),
                        revoked_at_ms: None,
                    };
                    if let Err(e) = self.persist(&d) {
                        warn!("cannot save a device: {e}");
                    }
                    self.devices.push(d);
                    changed = true;
                }
                None => {}
            }
        }
        // Revocations made on the other device hold here too (never this
        // device's own: it cannot revoke itself).
        for device in &record.body.revoked {
            if *device == self.own {
                continue;
            }
            if let Some(d) = self
                .devices
                .iter_mut()
                .find(|d| d.certificate.device == *device && d.revoked_at_ms.is_none())
            {
                d.revoked_at_ms = Some(record.body.issued_at_ms);
                changed = true;
                let d = d.clone();
                if let Err(e) = self.persist(&d) {
                    warn!("cannot save a device: {e}");
                }
            }
        }
        changed
    }

    /// `current` signed anew with the devices as they are now, every other
    /// field kept, and a sequence number above both the time and the
    /// current one.
    pub fn resign(&self, current: &AccountRecord, now_ms: u64) -> Option<AccountRecord> {
        let mut revoked: Vec<&StoredDevice> = self
            .devices
            .iter()
            .filter(|d| d.revoked_at_ms.is_some())
            .collect();
        revoked.sort_by_key(|d| std::cmp::Reverse(d.revoked_at_ms));
        let body = AccountRecordBody {
            seq: now_ms.max(current.body.seq.saturating_add(1)),
            issued_at_ms: now_ms,
            devices: self.active(),
            revoked: revoked
                .iter()
                .take(tern_protocol::cloud::account::MAX_REVOKED)
                .map(|d| d.certificate.device)
                .collect(),
            ..current.body.clone()
        };
        match AccountRecord::sign(&self.account, body) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!("cannot sign this account's record: {e}");
                None
            }
        }
    }
}

/// A device's id as users see it: its peer id.
pub fn show(device: &DevicePublicKey) -> String {
    peer_id_of(device).map_or_else(|| format!("{device:?}"), |p: PeerId| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use tern_protocol::cloud::AccountEncryptionKey;

    fn device(seed: u8) -> DevicePublicKey {
        let k = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        DevicePublicKey::from_bytes(k.verifying_key().to_bytes()).unwrap()
    }

    fn account() -> AccountKeypair {
        AccountKeypair::from_secret_bytes(&[42; 32])
    }

    fn open(store: &Store) -> AccountDevices {
        let own = account().certify(device(1), "laptop", 1).unwrap();
        AccountDevices::open(store.keyspace(KEYSPACE).unwrap(), account(), own).unwrap()
    }

    fn record(devices: Vec<DeviceCertificate>, seq: u64) -> AccountRecord {
        let a = account();
        AccountRecord::sign(
            &a,
            AccountRecordBody {
                account: a.id(),
                seq,
                issued_at_ms: seq,
                encryption_key: AccountEncryptionKey::derive(&a).public(),
                key_generation: 0,
                key_grants: Vec::new(),
                revoked: Vec::new(),
                devices,
                storage_peers: Vec::new(),
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn linked_and_revoked_devices_survive_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path(), 1 << 20).unwrap();
            let mut d = open(&store);
            d.certify(device(2), "phone", 5).unwrap();
            d.certify(device(3), "tablet", 6).unwrap();
            let tablet = show(&device(3));
            assert!(d.revoke(&tablet[..20], 7).unwrap().revoked);
            store.flush().await.unwrap();
        }
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        let d = open(&store);
        let list = d.list();
        assert_eq!(list.len(), 3);
        assert!(list[0].this_device && !list[0].revoked);
        let by_name = |n: &str| list.iter().find(|v| v.name == n).unwrap();
        assert!(!by_name("phone").revoked && by_name("tablet").revoked);
        let active: Vec<_> = d.active().into_iter().map(|c| c.device).collect();
        assert_eq!(active, vec![device(1), device(2)]);
    }

    #[test]
    fn revoking_needs_one_other_device() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        let mut d = open(&store);
        d.certify(device(2), "phone", 5).unwrap();
        assert!(matches!(
            d.revoke(&show(&device(1)), 9),
            Err(RevokeError::ThisDevice(_))
        ));
        assert!(matches!(
            d.revoke("12D3KooW", 9),
            Err(RevokeError::Ambiguous { count: 2, .. })
        ));
        assert!(matches!(d.revoke("nope", 9), Err(RevokeError::NotFound(_))));
        assert!(matches!(d.revoke("", 9), Err(RevokeError::NotFound(_))));
        assert_eq!(d.active().len(), 2);
    }

    #[test]
    fn merging_adds_devices_but_never_brings_back_a_revoked_one() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        let mut d = open(&store);
        let a = account();
        let phone = a.certify(device(2), "phone", 5).unwrap();
        let tablet = a.certify(device(3), "tablet", 5).unwrap();
        assert!(d.merge(&record(vec![phone.clone(), tablet.clone()], 10)));
        assert_eq!(d.active().len(), 3);
        assert!(!d.merge(&record(vec![phone.clone()], 11)), "nothing new");
        d.revoke(&show(&device(3)), 12).unwrap();
        assert!(!d.merge(&record(vec![phone, tablet], 13)));
        assert_eq!(d.active().len(), 2);
        // A rename (a newer certificate) is taken.
        let renamed = a.certify(device(2), "new phone", 20).unwrap();
        assert!(d.merge(&record(vec![renamed], 21)));
        assert!(d.list().iter().any(|v| v.name == "new phone"));
        // Another account's record changes nothing.
        let other = AccountKeypair::from_secret_bytes(&[43; 32]);
        let theirs = AccountRecord::sign(
            &other,
            AccountRecordBody {
                account: other.id(),
                seq: 1,
                issued_at_ms: 1,
                encryption_key: AccountEncryptionKey::derive(&other).public(),
                key_generation: 0,
                key_grants: Vec::new(),
                revoked: Vec::new(),
                devices: vec![other.certify(device(9), "x", 1).unwrap()],
                storage_peers: Vec::new(),
            },
        )
        .unwrap();
        assert!(!d.merge(&theirs));
    }

    #[test]
    fn the_record_lists_active_devices_and_only_grows_in_seq() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        let mut d = open(&store);
        let first = record(d.active(), 1000);
        d.certify(device(2), "phone", 5).unwrap();
        // A clock behind the current record still moves seq forward.
        let next = d.resign(&first, 10).unwrap();
        assert_eq!(next.body.seq, 1001);
        assert_eq!(next.body.devices.len(), 2);
        assert!(next.supersedes(&first));
        next.verify().unwrap();
    }

    #[test]
    fn linking_stops_at_the_most_a_record_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        let mut d = open(&store);
        for i in 0..MAX_DEVICES as u8 - 1 {
            d.certify(device(10 + i), "d", 1).unwrap();
        }
        assert!(!d.has_room());
        assert_eq!(d.certify(device(100), "d", 1), Err(TooManyDevices));
        d.revoke(&show(&device(10)), 2).unwrap();
        assert!(d.certify(device(100), "d", 1).is_ok());
        assert_eq!(d.active().len(), MAX_DEVICES);
        assert!(record(d.active(), 5).verify().is_ok());
    }
}
