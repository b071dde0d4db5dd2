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
    shared: SharedKeys,
}

/// The kept keys, shared with the network's event loop: a linker hands
/// them to a new device (`LinkGrant::account_keys`), this device's record
/// carries the current one sealed to the account's other devices, and a
/// key found in another device's record comes back to the cloud service
/// here.
#[derive(Clone, Default)]
pub struct SharedKeys(Arc<Mutex<Shared>>);

#[derive(Default)]
struct Shared {
    keys: Vec<KeptSecret>,
    /// Found in records of the account's other devices, for the cloud
    /// service to take.
    from_records: Vec<KeptSecret>,
}

/// A key's generation and its secret, wiped when dropped.
type KeptSecret = (u32, Zeroizing<[u8; 32]>);

impl SharedKeys {
    fn add(&self, generation: u32, key: &AccountEncryptionKey) -> bool {
        let Ok(mut shared) = self.0.lock() else {
            return false;
        };
        let secret = key.secret_bytes();
        if shared.keys.iter().any(|(_, k)| **k == *secret) {
            return false;
        }
        shared.keys.push((generation, secret));
        true
    }

    /// The key of `generation` whose public half is `public`, if kept.
    pub fn key(
        &self,
        generation: u32,
        public: &EncryptionPublicKey,
    ) -> Option<AccountEncryptionKey> {
        let shared = self.0.lock().ok()?;
        shared
            .keys
            .iter()
            .filter(|(g, _)| *g == generation)
            .map(|(_, k)| AccountEncryptionKey::from_secret_bytes(k))
            .find(|k| k.public() == *public)
    }

    /// A key found sealed to this device in another device's record.
    pub fn found_in_record(&self, generation: u32, key: &AccountEncryptionKey) {
        if self.add(generation, key)
            && let Ok(mut shared) = self.0.lock()
        {
            shared.from_records.push((generation, key.secret_bytes()));
        }
    }

    /// The keys found in records since the last call.
    pub fn take_found(&self) -> Vec<(u32, AccountEncryptionKey)> {
        let Ok(mut shared) = self.0.lock() else {
            return Vec::new();
        };
        std::mem::take(&mut shared.from_records)
            .into_iter()
            .map(|(g, k)| (g, AccountEncryptionKey::from_secret_bytes(&k)))
            .collect()
    }

    /// The newest [`tern_protocol::link::MAX_LINKED_KEYS`] keys.
    pub fn for_grant(&self) -> Vec<(u32, [u8; 32])> {
        let Ok(shared) = self.0.lock() else {
            return Vec::new();
        };
        let mut out: Vec<(u32, [u8; 32])> = shared.keys.iter().map(|(g, k)| (*g, **k)).collect();
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
        let shared = SharedKeys::default();
        for (generation, key) in &keys {
            shared.add(*generation, key);
        }
        (
            Self {
                keyspace,
                device,
                shared,
            },
            keys,
        )
    }

    pub fn shared(&self) -> SharedKeys {
        self.shared.clone()
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
        self.shared.add(generation, key);
        Ok(())
    }
}

/// The current encryption key of an account and its generation: the
/// current one kept, else the one derived from the account key (0).
pub fn current_public(
    account: &AccountKeypair,
    kept: &[(u32, AccountEncryptionKey)],
) -> (u32, EncryptionPublicKey) {
    AccountEncryptionKey::current(kept).map_or_else(
        || (0, AccountEncryptionKey::derive(account).public()),
        |(g, k)| (*g, k.public()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn all_bytes_under(dir: &std::path::Path) -> Vec<u8> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(all_bytes_under(&path));
            } else {
                out.extend(std::fs::read(&path).unwrap());
            }
        }
        out
    }

    #[test]
    fn kept_keys_are_sealed_on_disk_come_back_and_a_damaged_one_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("store");
        let device = SigningKey::from_bytes(&[3; 32]);
        let first = AccountEncryptionKey::generate(&[1; 32]);
        let second = AccountEncryptionKey::generate(&[2; 32]);
        {
            let store = Store::open(&path, 1 << 20).unwrap();
            let (keys, loaded) =
                AccountKeys::load(store.keyspace("account_keys").unwrap(), device.clone());
            assert!(loaded.is_empty());
            keys.keep(2, &second).unwrap();
            keys.keep(1, &first).unwrap();
            let granted = keys.shared().for_grant();
            assert_eq!(granted.iter().map(|(g, _)| *g).collect::<Vec<_>>(), [2, 1]);
            assert_eq!(granted[0].1, *second.secret_bytes());
        }
        // An attacker reading the data directory finds no key in the clear.
        let disk = all_bytes_under(&path);
        for key in [&first, &second] {
            let secret = key.secret_bytes();
            assert!(
                !disk.windows(32).any(|w| w == secret.as_slice()),
                "a key is on disk in the clear"
            );
        }

        // Back after a restart, oldest first; another device's key opens
        // none of them; a damaged one is skipped and the rest still load.
        let store = Store::open(&path, 1 << 20).unwrap();
        let ks = store.keyspace("account_keys").unwrap();
        let (_, loaded) = AccountKeys::load(ks.clone(), device.clone());
        let publics: Vec<_> = loaded.iter().map(|(g, k)| (*g, k.public())).collect();
        assert_eq!(publics, [(1, first.public()), (2, second.public())]);
        let (_, foreign) = AccountKeys::load(ks.clone(), SigningKey::from_bytes(&[4; 32]));
        assert!(foreign.is_empty());
        ks.insert_now(&key_name(1, &first.public()), b"\x01garbage")
            .unwrap();
        let (_, loaded) = AccountKeys::load(ks, device);
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].1.public(), second.public());
        let expected = AccountEncryptionKey::derive(&AccountKeypair::from_secret_bytes(&[9; 32]));
        assert_eq!(
            current_public(&AccountKeypair::from_secret_bytes(&[9; 32]), &[]),
            (0, expected.public())
        );
        assert_eq!(
            current_public(&AccountKeypair::from_secret_bytes(&[9; 32]), &loaded),
            (2, second.public())
        );
    }
}
