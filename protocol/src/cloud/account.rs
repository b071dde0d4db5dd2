//! The signed account record: what an account tells the world about itself,
//! published on the DHT and on its storage peers.
//!
//! It names the account's devices (each with its certificate), the
//! encryption key others wrap chat keys to, and the storage peers the
//! account chose to keep its chats. The account key signs all of it, so a
//! storage peer or a DHT node that passes it on cannot change a key or
//! slip in a device or a storage peer. A record with a higher `seq`
//! replaces an older one; nothing else decides between two records.

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};

#[cfg(doc)]
use super::keys::AccountEncryptionKey;
use super::{
    entry::{ChatId, DeviceKeyGrant},
    keys::EncryptionPublicKey,
};

/// What an account key sealed into a record is bound to in place of a chat.
pub const RECORD_KEY_CHAT: ChatId = ChatId(*b"tern record keys");
use crate::{
    AccountId, AccountKeypair, DeviceCertificate, DevicePublicKey,
    codec::{DecodeError, Record, bytes64},
};

/// Most devices one record lists.
pub const MAX_DEVICES: usize = 16;
/// Most revoked devices one record names.
pub const MAX_REVOKED: usize = 64;
/// Most storage peers one account chooses.
pub const MAX_STORAGE_PEERS: usize = 8;
/// Most addresses per storage peer, and the longest address in bytes.
pub const MAX_ADDRS: usize = 4;
pub const MAX_ADDR_LEN: usize = 128;

/// A node that keeps this account's chats: its device key (which is its
/// libp2p identity) and where to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoragePeer {
    pub node: DevicePublicKey,
    /// Multiaddrs in binary form.
    pub addrs: Vec<Vec<u8>>,
}

/// What the account signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecordBody {
    pub account: AccountId,
    /// Higher replaces lower.
    pub seq: u64,
    pub issued_at_ms: u64,
    pub encryption_key: EncryptionPublicKey,
    /// The encryption key's generation: 0 for the key derived from the
    /// account key, then one more per revocation of a device.
    pub key_generation: u32,
    /// From generation 1: the key sealed to each other device of the
    /// account ([`AccountEncryptionKey::seal_to_device`] for
    /// [`RECORD_KEY_CHAT`] at the generation), so a device of the account
    /// that meets this one gets it even where no chat carries it.
    pub key_grants: Vec<DeviceKeyGrant>,
    /// Devices of the account revoked (the newest [`MAX_REVOKED`]): the
    /// account's other devices take the revocation from here.
    pub revoked: Vec<DevicePublicKey>,
    pub devices: Vec<DeviceCertificate>,
    pub storage_peers: Vec<StoragePeer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub body: AccountRecordBody,
    #[serde(with = "bytes64")]
    pub signature: [u8; 64],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccountRecordError {
    #[error("{what}: {got} given, at most {max} allowed")]
    TooMany {
        what: &'static str,
        got: usize,
        max: usize,
    },
    #[error("a storage peer address is {0} bytes, more than {MAX_ADDR_LEN}")]
    AddressTooLong(usize),
    #[error("device certificate for {0:?} belongs to another account")]
    ForeignDevice(DevicePublicKey),
    #[error("device certificate does not verify: {0}")]
    BadDevice(String),
    #[error("the same device or storage peer is listed twice")]
    Duplicate,
    #[error("the account's signature does not verify")]
    BadSignature,
}

const DOMAIN: &[u8] = b"tern account record v1\0";

fn signed_bytes(body: &AccountRecordBody) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    // postcard is deterministic for these types: one encoding per body.
    m.extend_from_slice(&postcard::to_allocvec(body).expect("plain structs serialise"));
    m
}

impl AccountRecordBody {
    fn check_shape(&self) -> Result<(), AccountRecordError> {
        let too_many = |what, got, max| AccountRecordError::TooMany { what, got, max };
        if self.devices.len() > MAX_DEVICES {
            return Err(too_many("devices", self.devices.len(), MAX_DEVICES));
        }
        if self.key_grants.len() > MAX_DEVICES {
            return Err(too_many("key grants", self.key_grants.len(), MAX_DEVICES));
        }
        if self.revoked.len() > MAX_REVOKED {
            return Err(too_many("revoked devices", self.revoked.len(), MAX_REVOKED));
        }
        if self.storage_peers.len() > MAX_STORAGE_PEERS {
            return Err(too_many(
                "storage peers",
                self.storage_peers.len(),
                MAX_STORAGE_PEERS,
            ));
        }
        for p in &self.storage_peers {
            if p.addrs.len() > MAX_ADDRS {
                return Err(too_many(
                    "addresses of a storage peer",
                    p.addrs.len(),
                    MAX_ADDRS,
                ));
            }
            if let Some(a) = p.addrs.iter().find(|a| a.len() > MAX_ADDR_LEN) {
                return Err(AccountRecordError::AddressTooLong(a.len()));
            }
        }
        let mut devices: Vec<_> = self.devices.iter().map(|c| c.device).collect();
        devices.sort_by_key(|d| *d.as_bytes());
        devices.dedup();
        let mut peers: Vec<_> = self.storage_peers.iter().map(|p| p.node).collect();
        peers.sort_by_key(|d| *d.as_bytes());
        peers.dedup();
        if devices.len() != self.devices.len() || peers.len() != self.storage_peers.len() {
            return Err(AccountRecordError::Duplicate);
        }
        for c in &self.devices {
            if c.account != self.account {
                return Err(AccountRecordError::ForeignDevice(c.device));
            }
            c.verify()
                .map_err(|e| AccountRecordError::BadDevice(e.to_string()))?;
        }
        Ok(())
    }
}

impl AccountRecord {
    /// Signs `body` with the account key (whose id must be `body.account`).
    pub fn sign(
        account: &AccountKeypair,
        body: AccountRecordBody,
    ) -> Result<Self, AccountRecordError> {
        if account.id() != body.account {
            return Err(AccountRecordError::BadSignature);
        }
        body.check_shape()?;
        let signature = account.sign(&signed_bytes(&body));
        Ok(Self { body, signature })
    }

    /// Checks the bounds, every device certificate and the signature.
    pub fn verify(&self) -> Result<(), AccountRecordError> {
        self.body.check_shape()?;
        let key = self
            .body
            .account
            .verifying_key()
            .map_err(|_| AccountRecordError::BadSignature)?;
        key.verify_strict(
            &signed_bytes(&self.body),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| AccountRecordError::BadSignature)
    }

    /// Whether this record should replace `other` (same account, newer).
    /// A record names a later key generation, or the same one with a
    /// higher `seq`. The generation comes first: a revoked device, which
    /// never gets the new key, would otherwise replace everyone's copy of
    /// the record (and the key others wrap to) by restarting.
    pub fn supersedes(&self, other: &AccountRecord) -> bool {
        self.body.account == other.body.account
            && (self.body.key_generation, self.body.seq)
                > (other.body.key_generation, other.body.seq)
    }

    /// Whether `device` is one of this account's devices.
    pub fn has_device(&self, device: &DevicePublicKey) -> bool {
        self.body.devices.iter().any(|c| &c.device == device)
    }
}

impl Record for AccountRecord {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 64
        + MAX_DEVICES * 256
        + MAX_DEVICES * (40 + 96)
        + MAX_REVOKED * 40
        + MAX_STORAGE_PEERS * (40 + MAX_ADDRS * (MAX_ADDR_LEN + 2));

    fn validate(&self) -> Result<(), DecodeError> {
        self.verify()
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    }
}

/// "Send me your account record": the request of `/tern/account/1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountQuery;

impl Record for AccountQuery {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 8;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::keys::AccountEncryptionKey;

    fn device(account: &AccountKeypair, seed: u8) -> DeviceCertificate {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let public = DevicePublicKey::from_bytes(key.verifying_key().to_bytes()).unwrap();
        account
            .certify(public, &format!("device {seed}"), 1)
            .unwrap()
    }

    fn body(account: &AccountKeypair, seq: u64) -> AccountRecordBody {
        AccountRecordBody {
            account: account.id(),
            seq,
            issued_at_ms: 1000 + seq,
            encryption_key: AccountEncryptionKey::derive(account).public(),
            key_generation: 0,
            key_grants: Vec::new(),
            revoked: Vec::new(),
            devices: vec![device(account, 1), device(account, 2)],
            storage_peers: vec![StoragePeer {
                node: device(account, 9).device,
                addrs: vec![vec![4, 127, 0, 0, 1, 6, 0x1f, 0x90]],
            }],
        }
    }

    #[test]
    fn a_signed_record_round_trips_and_verifies() {
        let alice = AccountKeypair::from_secret_bytes(&[7; 32]);
        let r = AccountRecord::sign(&alice, body(&alice, 1)).unwrap();
        let back = AccountRecord::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        assert!(back.has_device(&device(&alice, 2).device));
        let newer = AccountRecord::sign(&alice, body(&alice, 2)).unwrap();
        assert!(newer.supersedes(&r) && !r.supersedes(&newer));
        // A later key generation wins whatever the seq: a revoked device
        // restarting signs a fresh seq with the old key.
        let mut rotated = body(&alice, 3);
        rotated.key_generation = 1;
        let rotated = AccountRecord::sign(&alice, rotated).unwrap();
        let restarted = AccountRecord::sign(&alice, body(&alice, 1_000_000)).unwrap();
        assert!(rotated.supersedes(&restarted) && !restarted.supersedes(&rotated));
    }

    #[test]
    fn any_change_by_whoever_passes_it_on_is_caught() {
        let alice = AccountKeypair::from_secret_bytes(&[7; 32]);
        let mallory = AccountKeypair::from_secret_bytes(&[8; 32]);
        let r = AccountRecord::sign(&alice, body(&alice, 1)).unwrap();

        let mut swapped_key = r.clone();
        swapped_key.body.encryption_key = AccountEncryptionKey::derive(&mallory).public();
        let mut extra_peer = r.clone();
        extra_peer.body.storage_peers.push(StoragePeer {
            node: device(&mallory, 3).device,
            addrs: vec![],
        });
        let mut newer_seq = r.clone();
        newer_seq.body.seq = 99;
        for forged in [swapped_key, extra_peer, newer_seq] {
            assert_eq!(forged.verify(), Err(AccountRecordError::BadSignature));
            assert!(AccountRecord::decode(&forged.encode()).is_err());
        }
        // A device of another account cannot be listed, even by the owner.
        let mut b = body(&alice, 1);
        b.devices.push(device(&mallory, 4));
        assert!(matches!(
            AccountRecord::sign(&alice, b),
            Err(AccountRecordError::ForeignDevice(_))
        ));
        // Nor can someone else sign for Alice.
        assert_eq!(
            AccountRecord::sign(&mallory, body(&alice, 1)),
            Err(AccountRecordError::BadSignature)
        );
    }

    #[test]
    fn bounds_hold_before_and_after_decoding() {
        let alice = AccountKeypair::from_secret_bytes(&[7; 32]);
        let mut b = body(&alice, 1);
        b.devices = (0..=MAX_DEVICES as u8)
            .map(|i| device(&alice, i + 10))
            .collect();
        assert!(matches!(
            AccountRecord::sign(&alice, b),
            Err(AccountRecordError::TooMany { .. })
        ));
        let mut b = body(&alice, 1);
        b.devices.push(device(&alice, 1));
        assert_eq!(
            AccountRecord::sign(&alice, b),
            Err(AccountRecordError::Duplicate)
        );
        let mut b = body(&alice, 1);
        b.storage_peers[0].addrs = vec![vec![0; MAX_ADDR_LEN + 1]];
        assert!(AccountRecord::sign(&alice, b).is_err());
        assert!(AccountRecord::decode(&vec![1; AccountRecord::MAX_LEN + 1]).is_err());
        // The largest valid record fits the decoder's bound.
        let mut b = body(&alice, 1);
        b.devices = (0..MAX_DEVICES as u8)
            .map(|i| device(&alice, i + 10))
            .collect();
        for d in b.devices.iter_mut() {
            *d = alice.certify(d.device, &"n".repeat(64), u64::MAX).unwrap();
        }
        b.storage_peers = (0..MAX_STORAGE_PEERS as u8)
            .map(|i| StoragePeer {
                node: device(&alice, 100 + i).device,
                addrs: vec![vec![0xff; MAX_ADDR_LEN]; MAX_ADDRS],
            })
            .collect();
        b.key_generation = u32::MAX;
        b.key_grants = b
            .devices
            .iter()
            .map(|c| DeviceKeyGrant {
                device: c.device,
                wrapped_key: crate::cloud::WrappedKey {
                    ephemeral: [0xff; 32],
                    ciphertext: [0xff; 32],
                    tag: [0xff; 16],
                },
            })
            .collect();
        b.revoked = (0..MAX_REVOKED as u8)
            .map(|i| device(&alice, 120 + i).device)
            .collect();
        let big = AccountRecord::sign(&alice, b.clone()).unwrap();
        assert!(big.encode().len() <= AccountRecord::MAX_LEN);
        assert!(AccountRecord::decode(&big.encode()).is_ok());
        // One more grant or revoked device is refused.
        let mut more = b.clone();
        more.revoked.push(device(&alice, 250).device);
        assert!(AccountRecord::sign(&alice, more).is_err());
        let mut more = b;
        more.key_grants.push(more.key_grants[0].clone());
        assert!(AccountRecord::sign(&alice, more).is_err());
    }
}
