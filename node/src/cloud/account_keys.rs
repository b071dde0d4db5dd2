//! The account's encryption keys beyond the one derived from the account
//! key: one for each revocation of a device (`tern device revoke`), taken
//! by the revoking device or found by another device of the account in a
//! chat's `AccountKey` entry.
//!
//! Each is kept in the store sealed to this device's own key (the same
//! sealing the log uses to hand the key to a device), so it is as safe at
//! rest as the device key itself: with a passphrase, sealed under it.

use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use tern_protocol::cloud::{AccountEncryptionKey, ChatId, EncryptionPublicKey, WrappedKey};
use tern_protocol::{AccountKeypair, Record};
use tracing::warn;
use zeroize::Zeroizing;

use crate::store::Keyspace;

/// What a key at rest is bound to in place of a chat.
const AT_REST: ChatId = ChatId(*b"tern key at rest");

pub struct AccountKeys {
    keyspace: Keyspace,
    device: SigningKey,
    linkable: LinkableKeys,
}

/// The kept keys as a linker hands them to a new device of the account
/// (`LinkGrant::account_keys`), shared with the network's event loop.
#[derive(Clone, Default)]
pub struct LinkableKeys(Arc<Mutex<Vec<KeptSecret>>>);

/// A key's generation and its secret, wiped when dropped.
type KeptSecret = (u32, Zeroizing<[u8; 32]>);

impl LinkableKeys {
    fn add(&self, generation: u32, key: &AccountEncryptionKey) {
        if let Ok(mut keys) = self.0.lock() {
            let secret = key.secret_bytes();
            if !keys.iter().any(|(_, k)| **k == *secret) {
                keys.push((generation, secret));
            }
        }
    }

    /// The newest [`tern_protocol::link::MAX_LINKED_KEYS`] keys.
    pub fn for_grant(&self) -> Vec<(u32, [u8; 32])> {
        let Ok(keys) = self.0.lock() else {
            return Vec::new();
        };
        let mut out: Vec<(u32, [u8; 32])> = keys.iter().map(|(g, k)| (*g, **k)).collect();
        out.sort_by_key(|(g, _)| std::cmp::Reverse(*g));
        out.truncate(tern_protocol::link::MAX_LINKED_KEYS);
        out
    }
}

impl AccountKeys {
    /// The keys kept so far, oldest generation first. One that does not
    /// open (damaged, or sealed to another device key) is skipped with a
    /// warning: the others still serve.
    pub fn load(
        keyspace: Keyspace,
        device: SigningKey,
    ) -> (Self, Vec<(u32, AccountEncryptionKey)>) {
        let mut keys = Vec::new();
        for item in keyspace.iter() {
            let opened = item.map_err(|e| e.to_string()).and_then(|(k, v)| {
                let (generation, public) = parse_key(&k).ok_or("a malformed key name")?;
                let sealed = WrappedKey::decode(&v).map_err(|e| e.to_string())?;
                AccountEncryptionKey::open_from_device(
                    &device, &sealed, &public, AT_REST, generation,
                )
                .map(|key| (generation, key))
                .map_err(|e| e.to_string())
            });
            match opened {
                Ok(key) => keys.push(key),
                Err(e) => warn!("an account encryption key in the store does not open: {e}"),
            }
        }
        keys.sort_by_key(|(g, _)| *g);
        let linkable = LinkableKeys::default();
        for (generation, key) in &keys {
            linkable.add(*generation, key);
        }
        (
            Self {
                keyspace,
                device,
                linkable,
            },
            keys,
        )
    }

    pub fn linkable(&self) -> LinkableKeys {
        self.linkable.clone()
    }

    /// Keeps `key` at `generation`, on disk before it returns.
    pub fn keep(&self, generation: u32, key: &AccountEncryptionKey) -> Result<(), String> {
        let mut random = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut random);
        let device =
            tern_protocol::DevicePublicKey::from_bytes(self.device.verifying_key().to_bytes())
                .map_err(|e| e.to_string())?;
        let sealed = key
            .seal_to_device(&device, AT_REST, generation, &random)
            .map_err(|e| e.to_string())?;
        self.keyspace
            .insert_now(&key_name(generation, &key.public()), &sealed.encode())
            .map_err(|e| format!("cannot keep the account's new encryption key: {e}"))?;
        self.linkable.add(generation, key);
        Ok(())
    }
}

/// The current encryption key of an account: the highest generation kept,
/// else the one derived from the account key.
pub fn current_public(
    account: &AccountKeypair,
    kept: &[(u32, AccountEncryptionKey)],
) -> EncryptionPublicKey {
    kept.iter()
        .max_by_key(|(g, k)| (*g, k.public()))
        .map_or_else(
            || AccountEncryptionKey::derive(account).public(),
            |(_, k)| k.public(),
        )
}

fn key_name(generation: u32, public: &EncryptionPublicKey) -> Vec<u8> {
    let mut name = generation.to_be_bytes().to_vec();
    name.extend_from_slice(&public.0);
    name
}

fn parse_key(name: &[u8]) -> Option<(u32, EncryptionPublicKey)> {
    let generation = u32::from_be_bytes(name.get(..4)?.try_into().ok()?);
    let public: [u8; 32] = name.get(4..)?.try_into().ok()?;
    Some((generation, EncryptionPublicKey(public)))
}
