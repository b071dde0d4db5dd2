//! The node's identity on disk: the account key, the device key (its libp2p
//! identity) and the device certificate binding the two.
//!
//! Private keys are stored as [`SealedSecret`]s when the user gave a
//! passphrase, raw otherwise; either way the files are mode 0600.

use std::path::Path;

use libp2p::{PeerId, identity};
use rand::RngCore;
use tern_protocol::{
    AccountId, AccountKeypair, DeviceCertificate, DevicePublicKey, KdfParams, Record, SealedSecret,
};
use zeroize::Zeroizing;

use crate::{
    data_dir::{DataDir, create_private, read_bounded},
    events::now_ms,
};

/// First byte of a key file: how the 32 secret bytes that follow are kept.
const PLAIN: u8 = 0;
const SEALED: u8 = 1;
const MAX_KEY_FILE: u64 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0} already holds a Tern identity; refusing to overwrite it (use another --data-dir)")]
    AlreadyInitialized(String),
    #[error("{0} has no Tern identity yet; run `tern init --data-dir {0}` first")]
    NotInitialized(String),
    #[error("the keys in {0} are protected by a passphrase; pass --passphrase-file")]
    PassphraseRequired(String),
    #[error("{0}")]
    Seal(#[from] tern_protocol::SealError),
    #[error("key file {path} is damaged: {why}")]
    Damaged { path: String, why: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A loaded identity.
pub struct Identity {
    pub account: AccountKeypair,
    pub device: identity::Keypair,
    pub certificate: DeviceCertificate,
}

impl Identity {
    pub fn peer_id(&self) -> PeerId {
        self.device.public().to_peer_id()
    }
    pub fn account_id(&self) -> AccountId {
        self.account.id()
    }
}

/// The device's public key in the form `protocol/` speaks.
pub fn device_public_key(key: &identity::PublicKey) -> Option<DevicePublicKey> {
    let ed = key.clone().try_into_ed25519().ok()?;
    DevicePublicKey::from_bytes(ed.to_bytes()).ok()
}

/// The device key inside a PeerId (Ed25519 PeerIds carry the key itself).
pub fn device_of_peer(peer: &PeerId) -> Option<DevicePublicKey> {
    let hash = peer.as_ref();
    if hash.code() != 0 {
        return None; // a hashed key: not one of ours
    }
    device_public_key(&identity::PublicKey::try_decode_protobuf(hash.digest()).ok()?)
}

/// The device's signing key in the form `protocol/` signs with.
pub fn device_signing_key(device: &identity::Keypair) -> Option<ed25519_dalek::SigningKey> {
    let ed = device.clone().try_into_ed25519().ok()?;
    let secret: [u8; 32] = ed.secret().as_ref().try_into().ok()?;
    Some(ed25519_dalek::SigningKey::from_bytes(&secret))
}

/// The PeerId of a device key from `protocol/`.
pub fn peer_id_of(device: &DevicePublicKey) -> Option<PeerId> {
    let ed = identity::ed25519::PublicKey::try_from_bytes(device.as_bytes()).ok()?;
    Some(identity::PublicKey::from(ed).to_peer_id())
}

/// `tern init`: creates the account and device keys and the certificate.
pub fn create(dir: &DataDir, name: &str, passphrase: Option<&[u8]>) -> Result<Identity, KeyError> {
    if dir.is_initialized() {
        return Err(KeyError::AlreadyInitialized(
            dir.root().display().to_string(),
        ));
    }
    let mut account_secret = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(account_secret.as_mut());
    let account = AccountKeypair::from_secret_bytes(&account_secret);
    let device = identity::Keypair::generate_ed25519();
    let device_pub = device_public_key(&device.public()).ok_or_else(|| KeyError::Damaged {
        path: "device key".into(),
        why: "not an Ed25519 key".into(),
    })?;
    let certificate =
        account
            .certify(device_pub, name, now_ms())
            .map_err(|e| KeyError::Damaged {
                path: "device certificate".into(),
                why: e.to_string(),
            })?;
    let identity = Identity {
        account,
        device,
        certificate,
    };
    write_identity(dir, &identity, passphrase)?;
    Ok(identity)
}

/// `tern init --link`: writes an identity whose account key and
/// certificate came from another device of the account.
pub fn create_linked(
    dir: &DataDir,
    identity: Identity,
    passphrase: Option<&[u8]>,
) -> Result<Identity, KeyError> {
    if dir.is_initialized() {
        return Err(KeyError::AlreadyInitialized(
            dir.root().display().to_string(),
        ));
    }
    let matches = identity.certificate.account == identity.account.id()
        && device_public_key(&identity.device.public()) == Some(identity.certificate.device)
        && identity.certificate.verify().is_ok();
    if !matches {
        return Err(KeyError::Damaged {
            path: "device certificate".into(),
            why: "the certificate received does not match this device's keys".into(),
        });
    }
    write_identity(dir, &identity, passphrase)?;
    Ok(identity)
}

fn write_identity(
    dir: &DataDir,
    identity: &Identity,
    passphrase: Option<&[u8]>,
) -> Result<(), KeyError> {
    crate::data_dir::create_private_dir(dir.root()).map_err(io_err(dir.root()))?;
    let device_secret = device_secret_bytes(&identity.device)?;
    write_key(
        &dir.account_key(),
        &identity.account.secret_bytes(),
        passphrase,
    )?;
    write_key(&dir.device_key(), &device_secret, passphrase)?;
    create_private(&dir.device_cert(), &identity.certificate.encode())
        .map_err(io_err(&dir.device_cert()))
}

/// Loads the identity written by [`create`].
pub fn load(dir: &DataDir, passphrase: Option<&[u8]>) -> Result<Identity, KeyError> {
    if !dir.is_initialized() {
        return Err(KeyError::NotInitialized(dir.root().display().to_string()));
    }
    let account_secret = read_key(dir, &dir.account_key(), passphrase)?;
    let device_secret = read_key(dir, &dir.device_key(), passphrase)?;
    let account = AccountKeypair::from_secret_bytes(&account_secret);
    let mut device_bytes = *device_secret;
    let device = identity::Keypair::ed25519_from_bytes(&mut device_bytes).map_err(|e| {
        KeyError::Damaged {
            path: dir.device_key().display().to_string(),
            why: e.to_string(),
        }
    })?;

    let cert_path = dir.device_cert();
    let cert_bytes = read_bounded(&cert_path, MAX_KEY_FILE).map_err(io_err(&cert_path))?;
    let certificate = DeviceCertificate::decode(&cert_bytes).map_err(|e| KeyError::Damaged {
        path: cert_path.display().to_string(),
        why: e.to_string(),
    })?;
    let matches = certificate.account == account.id()
        && device_public_key(&device.public()) == Some(certificate.device);
    if !matches {
        return Err(KeyError::Damaged {
            path: cert_path.display().to_string(),
            why: "certificate does not match this directory's keys".into(),
        });
    }
    Ok(Identity {
        account,
        device,
        certificate,
    })
}

/// Re-issues the device certificate under a new name.
pub fn rename(dir: &DataDir, identity: &mut Identity, name: &str) -> Result<(), KeyError> {
    let cert = identity
        .account
        .certify(identity.certificate.device, name, now_ms())
        .map_err(|e| KeyError::Damaged {
            path: "device name".into(),
            why: e.to_string(),
        })?;
    crate::data_dir::write_atomic(&dir.device_cert(), &cert.encode(), true)
        .map_err(io_err(&dir.device_cert()))?;
    identity.certificate = cert;
    Ok(())
}

fn device_secret_bytes(device: &identity::Keypair) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let ed = device
        .clone()
        .try_into_ed25519()
        .map_err(|e| KeyError::Damaged {
            path: "device key".into(),
            why: e.to_string(),
        })?;
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(ed.secret().as_ref());
    Ok(out)
}

fn write_key(path: &Path, secret: &[u8; 32], passphrase: Option<&[u8]>) -> Result<(), KeyError> {
    let contents = match passphrase {
        None => {
            let mut v = Zeroizing::new(vec![PLAIN]);
            v.extend_from_slice(secret);
            v
        }
        Some(pass) => {
            let mut salt = [0u8; 16];
            let mut nonce = [0u8; 24];
            rand::rngs::OsRng.fill_bytes(&mut salt);
            rand::rngs::OsRng.fill_bytes(&mut nonce);
            let sealed = SealedSecret::seal(pass, secret, KdfParams::DEFAULT, salt, nonce)?;
            let mut v = Zeroizing::new(vec![SEALED]);
            v.extend_from_slice(&sealed.encode());
            v
        }
    };
    create_private(path, &contents).map_err(io_err(path))
}

fn read_key(
    dir: &DataDir,
    path: &Path,
    passphrase: Option<&[u8]>,
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let bytes = Zeroizing::new(read_bounded(path, MAX_KEY_FILE).map_err(io_err(path))?);
    let damaged = |why: &str| KeyError::Damaged {
        path: path.display().to_string(),
        why: why.into(),
    };
    let (&kind, body) = bytes.split_first().ok_or_else(|| damaged("empty"))?;
    let secret: Zeroizing<Vec<u8>> = match kind {
        PLAIN => Zeroizing::new(body.to_vec()),
        SEALED => {
            let pass = passphrase
                .ok_or_else(|| KeyError::PassphraseRequired(dir.root().display().to_string()))?;
            SealedSecret::decode(body)
                .map_err(|e| damaged(&e.to_string()))?
                .open(pass)?
        }
        _ => return Err(damaged("unknown key format")),
    };
    let mut out = Zeroizing::new([0u8; 32]);
    if secret.len() != 32 {
        return Err(damaged("wrong key length"));
    }
    out.copy_from_slice(&secret);
    Ok(out)
}

/// Reads a passphrase file: the first line, without its line ending.
pub fn read_passphrase_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let raw = Zeroizing::new(read_bounded(path, 4096).map_err(io_err(path))?);
    let line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(KeyError::Damaged {
            path: path.display().to_string(),
            why: "passphrase file is empty".into(),
        });
    }
    Ok(Zeroizing::new(line.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_gives_the_same_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let made = create(&dir, "laptop", None).unwrap();
        let loaded = load(&dir, None).unwrap();
        assert_eq!(made.peer_id(), loaded.peer_id());
        assert_eq!(made.account_id(), loaded.account_id());
        assert_eq!(loaded.certificate.name, "laptop");
    }

    #[test]
    fn a_linked_identity_is_written_like_a_new_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let account = AccountKeypair::from_secret_bytes(&[3; 32]);
        let device = identity::Keypair::generate_ed25519();
        let pk = device_public_key(&device.public()).unwrap();
        let cert = account.certify(pk, "phone", 1).unwrap();
        // A certificate for another device is refused, and nothing is written.
        let other = identity::Keypair::generate_ed25519();
        let wrong = Identity {
            account: AccountKeypair::from_secret_bytes(&[3; 32]),
            device: other,
            certificate: cert.clone(),
        };
        assert!(matches!(
            create_linked(&dir, wrong, None),
            Err(KeyError::Damaged { .. })
        ));
        assert!(!dir.is_initialized());
        let made = create_linked(
            &dir,
            Identity {
                account,
                device,
                certificate: cert,
            },
            Some(b"pw"),
        )
        .unwrap();
        let loaded = load(&dir, Some(b"pw")).unwrap();
        assert_eq!(loaded.account_id(), made.account_id());
        assert_eq!(loaded.peer_id(), made.peer_id());
        assert_eq!(loaded.certificate.name, "phone");
    }

    #[test]
    fn refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let first = create(&dir, "a", None).unwrap();
        assert!(matches!(
            create(&dir, "b", None),
            Err(KeyError::AlreadyInitialized(_))
        ));
        assert_eq!(load(&dir, None).unwrap().peer_id(), first.peer_id());
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        create(&dir, "a", None).unwrap();
        for p in [dir.account_key(), dir.device_key()] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    #[test]
    fn passphrase_protected_keys_need_the_passphrase() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let made = create(&dir, "a", Some(b"hunter2")).unwrap();
        let secret = made.account.secret_bytes();
        let on_disk = std::fs::read(dir.account_key()).unwrap();
        assert!(
            !on_disk.windows(32).any(|w| w == secret.as_ref()),
            "plaintext key on disk"
        );
        assert!(matches!(
            load(&dir, None),
            Err(KeyError::PassphraseRequired(_))
        ));
        assert!(matches!(load(&dir, Some(b"nope")), Err(KeyError::Seal(_))));
        assert_eq!(
            load(&dir, Some(b"hunter2")).unwrap().peer_id(),
            made.peer_id()
        );
    }

    #[test]
    fn damaged_key_files_give_errors_not_panics() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        create(&dir, "a", None).unwrap();
        for contents in [&b""[..], &[0u8; 5][..], &[9u8; 33][..], &[1u8; 40][..]] {
            std::fs::write(dir.device_key(), contents).unwrap();
            assert!(load(&dir, None).is_err());
        }
    }
}
