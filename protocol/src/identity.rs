//! Accounts, devices and the certificate that binds a device to its account.
//!
//! An *account* is an Ed25519 key a person owns. A *device* is a node's
//! transport identity (its libp2p Ed25519 key, hence its PeerId). The account
//! signs a [`DeviceCertificate`] for each of its devices; any peer can check
//! that certificate without asking anyone.

use std::{fmt, str::FromStr};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Record, bytes64};

/// Longest device name, in bytes.
pub const MAX_DEVICE_NAME: usize = 64;

/// Keys [`checked_key`] remembers per thread.
const MAX_CHECKED_KEYS: usize = 1024;

/// The Ed25519 key behind `bytes`, if they encode one. Decompressing a key
/// costs a few microseconds, and the same few keys come in every entry a
/// node decodes and verifies, so keys already checked are remembered (per
/// thread, bounded; bytes that fail are never remembered).
pub(crate) fn checked_key(bytes: &[u8; 32]) -> Result<VerifyingKey, IdentityError> {
    thread_local! {
        static CHECKED: std::cell::RefCell<std::collections::HashMap<[u8; 32], VerifyingKey>> =
            std::cell::RefCell::default();
    }
    CHECKED.with(|checked| {
        if let Some(key) = checked.borrow().get(bytes) {
            return Ok(*key);
        }
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| IdentityError::BadPublicKey)?;
        let mut checked = checked.borrow_mut();
        if checked.len() >= MAX_CHECKED_KEYS {
            checked.clear();
        }
        checked.insert(*bytes, key);
        Ok(key)
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("not a valid account id: {0}")]
    BadAccountId(String),
    #[error("not a valid Ed25519 public key")]
    BadPublicKey,
    #[error("device name is {0} bytes; at most {MAX_DEVICE_NAME} are allowed")]
    NameTooLong(usize),
    #[error("device certificate signature does not verify")]
    BadSignature,
}

/// The public identity of an account: its Ed25519 public key.
///
/// Printed as 52 lowercase base32 characters. The id *is* the key, so anything
/// signed by the account can be checked from the id alone, with no directory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "[u8; 32]")]
pub struct AccountId([u8; 32]);

impl TryFrom<[u8; 32]> for AccountId {
    type Error = IdentityError;
    fn try_from(bytes: [u8; 32]) -> Result<Self, IdentityError> {
        Self::from_bytes(bytes)
    }
}

impl AccountId {
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, IdentityError> {
        checked_key(&bytes)?;
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first characters of the id: enough to tell accounts apart in logs.
    pub fn short(&self) -> String {
        self.to_string()[..10].to_owned()
    }

    pub(crate) fn verifying_key(&self) -> Result<VerifyingKey, IdentityError> {
        checked_key(&self.0)
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base32_lower(&self.0))
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({})", self.short())
    }
}

impl FromStr for AccountId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 52 {
            return Err(IdentityError::BadAccountId(format!(
                "expected 52 characters, got {}",
                s.len()
            )));
        }
        let bytes = base32_decode(s)
            .ok_or_else(|| IdentityError::BadAccountId("not base32".into()))?
            .try_into()
            .map_err(|_| IdentityError::BadAccountId("wrong length".into()))?;
        Self::from_bytes(bytes)
    }
}

/// A device's Ed25519 public key (the key behind its libp2p PeerId).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "[u8; 32]")]
pub struct DevicePublicKey([u8; 32]);

impl TryFrom<[u8; 32]> for DevicePublicKey {
    type Error = IdentityError;
    fn try_from(bytes: [u8; 32]) -> Result<Self, IdentityError> {
        Self::from_bytes(bytes)
    }
}

impl DevicePublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, IdentityError> {
        checked_key(&bytes)?;
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn verifying_key(&self) -> Result<VerifyingKey, IdentityError> {
        checked_key(&self.0)
    }
}

impl fmt::Debug for DevicePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevicePublicKey({})", &base32_lower(&self.0)[..10])
    }
}

/// An account's private key. Zeroized when dropped.
pub struct AccountKeypair(SigningKey);

impl AccountKeypair {
    /// Builds the key from 32 secret bytes. Callers draw them from an RNG;
    /// this crate has none of its own.
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(secret))
    }

    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    pub fn id(&self) -> AccountId {
        AccountId(self.0.verifying_key().to_bytes())
    }

    /// Signs `message` with the account key (domain separation is the
    /// caller's: every signed record starts with its own domain string).
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Certifies `device` as a device of this account.
    pub fn certify(
        &self,
        device: DevicePublicKey,
        name: &str,
        issued_at_ms: u64,
    ) -> Result<DeviceCertificate, IdentityError> {
        if name.len() > MAX_DEVICE_NAME {
            return Err(IdentityError::NameTooLong(name.len()));
        }
        let mut cert = DeviceCertificate {
            account: self.id(),
            device,
            name: name.to_owned(),
            issued_at_ms,
            signature: [0; 64],
        };
        cert.signature = self.0.sign(&cert.signed_bytes()).to_bytes();
        Ok(cert)
    }
}

/// "This device belongs to this account", signed by the account key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCertificate {
    pub account: AccountId,
    pub device: DevicePublicKey,
    /// A human name for the device, chosen at `tern init`.
    pub name: String,
    pub issued_at_ms: u64,
    #[serde(with = "bytes64")]
    pub signature: [u8; 64],
}

impl DeviceCertificate {
    const DOMAIN: &'static [u8] = b"tern device certificate v1\0";

    fn signed_bytes(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(Self::DOMAIN.len() + 80 + self.name.len());
        m.extend_from_slice(Self::DOMAIN);
        m.extend_from_slice(self.account.as_bytes());
        m.extend_from_slice(self.device.as_bytes());
        m.extend_from_slice(&self.issued_at_ms.to_le_bytes());
        m.extend_from_slice(&(self.name.len() as u32).to_le_bytes());
        m.extend_from_slice(self.name.as_bytes());
        m
    }

    /// Checks the name bound and the account's signature.
    pub fn verify(&self) -> Result<(), IdentityError> {
        if self.name.len() > MAX_DEVICE_NAME {
            return Err(IdentityError::NameTooLong(self.name.len()));
        }
        let key = self.account.verifying_key()?;
        let sig = Signature::from_bytes(&self.signature);
        key.verify_strict(&self.signed_bytes(), &sig)
            .map_err(|_| IdentityError::BadSignature)
    }
}

impl Record for DeviceCertificate {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 256;

    fn validate(&self) -> Result<(), DecodeError> {
        self.verify()
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    }
}

pub(crate) fn base32_lower(bytes: &[u8]) -> String {
    data_encoding::BASE32_NOPAD
        .encode(bytes)
        .to_ascii_lowercase()
}

pub(crate) fn base32_decode(s: &str) -> Option<Vec<u8>> {
    data_encoding::BASE32_NOPAD
        .decode(s.to_ascii_uppercase().as_bytes())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(seed: u8) -> AccountKeypair {
        AccountKeypair::from_secret_bytes(&[seed; 32])
    }

    fn device(seed: u8) -> DevicePublicKey {
        let k = SigningKey::from_bytes(&[seed; 32]);
        DevicePublicKey::from_bytes(k.verifying_key().to_bytes()).unwrap()
    }

    #[test]
    fn account_id_round_trips_through_its_printed_form() {
        let id = account(1).id();
        let printed = id.to_string();
        assert_eq!(printed.len(), 52);
        assert!(
            printed
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_eq!(printed.parse::<AccountId>().unwrap(), id);
        // People paste ids with stray case and whitespace.
        assert_eq!(
            format!(" {} ", printed.to_uppercase())
                .parse::<AccountId>()
                .unwrap(),
            id
        );
    }

    #[test]
    fn malformed_account_ids_are_rejected() {
        assert!("".parse::<AccountId>().is_err());
        assert!("abc".parse::<AccountId>().is_err());
        assert!("1".repeat(52).parse::<AccountId>().is_err());
    }

    #[test]
    fn certificate_verifies_and_survives_encoding() {
        let cert = account(1)
            .certify(device(2), "laptop", 1_700_000_000_000)
            .unwrap();
        cert.verify().unwrap();
        let decoded = DeviceCertificate::decode(&cert.encode()).unwrap();
        assert_eq!(decoded, cert);
    }

    #[test]
    fn tampered_certificates_are_rejected() {
        let cert = account(1).certify(device(2), "laptop", 5).unwrap();

        let mut other_device = cert.clone();
        other_device.device = device(3);
        assert_eq!(other_device.verify(), Err(IdentityError::BadSignature));

        let mut other_account = cert.clone();
        other_account.account = account(9).id();
        assert_eq!(other_account.verify(), Err(IdentityError::BadSignature));

        let mut renamed = cert.clone();
        renamed.name = "phone".into();
        assert_eq!(renamed.verify(), Err(IdentityError::BadSignature));

        // A flipped bit anywhere in the encoding never yields a valid certificate
        // that differs from the original.
        let bytes = cert.encode();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(c) = DeviceCertificate::decode(&b) {
                    assert_eq!(c, cert, "bit {bit} of byte {i} forged a certificate");
                }
            }
        }
    }

    #[test]
    fn names_are_bounded() {
        let long = "x".repeat(MAX_DEVICE_NAME + 1);
        assert!(matches!(
            account(1).certify(device(2), &long, 0),
            Err(IdentityError::NameTooLong(_))
        ));
    }
}
