//! Device linking: a one-time code that makes a new device part of an
//! account.
//!
//! An existing device (the *linker*) issues a [`LinkCode`]: its device key,
//! the addresses it listens on, a code id and 32 secret bytes. The new device
//! (the *joiner*) dials the linker, whose device key the transport handshake
//! proves, and runs two request-response rounds on `/tern/link/1`:
//!
//! 1. [`LinkRequest::Hello`] with the code id and the joiner's fresh nonce,
//!    answered by [`LinkResponse::Challenge`] with the linker's fresh nonce;
//! 2. [`LinkRequest::Proof`] with a MAC over both, answered by
//!    [`LinkResponse::Granted`] or [`LinkResponse::Refused`].
//!
//! The MAC ([`link_proof`]) is keyed by a key derived from the code's secret
//! and covers a domain label, the code id, both device keys and both
//! nonces. A proof therefore holds for one pair of devices and one challenge
//! only: it cannot be replayed on another connection or to another device.
//! The linker burns a code at the first proof it receives, right or wrong,
//! so every guess costs the guesser the code and the secret cannot be found
//! by trying. Codes live only in the linker's memory and expire after
//! [`CODE_TTL_MS`].
//!
//! [`Linker`] is the linker's side as a state machine; time and random bytes
//! are inputs.

use std::{collections::VecDeque, fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::{
    AccountKeypair, DeviceCertificate, DevicePublicKey,
    cloud::account::MAX_DEVICES,
    codec::{DecodeError, Record},
    identity::{MAX_DEVICE_NAME, base32_decode, base32_lower},
};

/// Every link code starts with this.
pub const CODE_PREFIX: &str = "tern-link:";
/// How long a code stays usable: ten minutes.
pub const CODE_TTL_MS: u64 = 10 * 60 * 1000;
/// Most codes waiting to be used at once, per linker.
pub const MAX_OPEN_CODES: usize = 4;
/// Most linker addresses a code carries.
pub const MAX_CODE_ADDRS: usize = 8;
/// Longest address (a binary multiaddr), in bytes.
pub const MAX_ADDR_LEN: usize = 128;
/// Most bootstrap addresses a grant carries.
pub const MAX_BOOTSTRAP: usize = 16;
/// How many used or expired codes the linker remembers, to tell the joiner
/// why a code no longer works.
const MAX_SPENT: usize = 16;

/// Names one code among the linker's open codes.
pub type CodeId = [u8; 8];

const PROOF_KEY_CONTEXT: &str = "tern link code v1 proof key";
const PROOF_DOMAIN: &[u8] = b"tern link proof v1\0";

/// A one-time link code, printed as one line: [`CODE_PREFIX`] followed by the
/// lowercase base32 of the versioned record. The secret is wiped when the
/// value is dropped and never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCode {
    /// The linker's device key (its libp2p identity).
    pub linker: DevicePublicKey,
    /// Binary multiaddrs at which the linker listens, best first.
    pub addrs: Vec<Vec<u8>>,
    pub id: CodeId,
    pub secret: [u8; 32],
}

impl Drop for LinkCode {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl fmt::Debug for LinkCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkCode")
            .field("linker", &self.linker)
            .field("addrs", &self.addrs.len())
            .field("id", &base32_lower(&self.id))
            .field("secret", &"<hidden>")
            .finish()
    }
}

impl LinkCode {
    /// Builds a code, keeping the first [`MAX_CODE_ADDRS`] addresses that
    /// fit.
    pub fn new(linker: DevicePublicKey, addrs: Vec<Vec<u8>>, id: CodeId, secret: [u8; 32]) -> Self {
        let addrs = addrs
            .into_iter()
            .filter(|a| a.len() <= MAX_ADDR_LEN)
            .take(MAX_CODE_ADDRS)
            .collect();
        Self {
            linker,
            addrs,
            id,
            secret,
        }
    }
}

impl Record for LinkCode {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 1 + 32 + 1 + MAX_CODE_ADDRS * (2 + MAX_ADDR_LEN) + 8 + 32;

    fn validate(&self) -> Result<(), DecodeError> {
        check_addrs(&self.addrs, MAX_CODE_ADDRS)
    }
}

fn check_addrs(addrs: &[Vec<u8>], max: usize) -> Result<(), DecodeError> {
    if addrs.len() > max {
        return Err(DecodeError::Invalid(format!(
            "{} addresses, at most {max}",
            addrs.len()
        )));
    }
    if let Some(a) = addrs.iter().find(|a| a.len() > MAX_ADDR_LEN) {
        return Err(DecodeError::Invalid(format!(
            "an address of {} bytes, at most {MAX_ADDR_LEN}",
            a.len()
        )));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkCodeError {
    #[error("a link code starts with \"{CODE_PREFIX}\" (it comes from `tern device link`)")]
    MissingPrefix,
    #[error("a link code is at most {max} characters; this is {0}", max = max_code_chars())]
    TooLong(usize),
    #[error("the link code is not valid base32 (was it cut off when copied?)")]
    BadEncoding,
    #[error("the link code is damaged (was it cut off when copied?): {0}")]
    Decode(#[from] DecodeError),
}

fn max_code_chars() -> usize {
    // Base32 takes 8 characters per 5 bytes.
    CODE_PREFIX.len() + LinkCode::MAX_LEN.div_ceil(5) * 8
}

impl fmt::Display for LinkCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = Zeroizing::new(self.encode());
        write!(f, "{CODE_PREFIX}{}", base32_lower(&bytes))
    }
}

impl FromStr for LinkCode {
    type Err = LinkCodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() > max_code_chars() {
            return Err(LinkCodeError::TooLong(s.len()));
        }
        let body = s
            .strip_prefix(CODE_PREFIX)
            .ok_or(LinkCodeError::MissingPrefix)?;
        let bytes = Zeroizing::new(base32_decode(body).ok_or(LinkCodeError::BadEncoding)?);
        Ok(Self::decode(&bytes)?)
    }
}

/// The joiner's proof that it knows the code's secret, bound to the code,
/// to both devices and to both nonces.
pub fn link_proof(
    secret: &[u8; 32],
    code: &CodeId,
    linker: &DevicePublicKey,
    joiner: &DevicePublicKey,
    joiner_nonce: &[u8; 32],
    linker_nonce: &[u8; 32],
) -> [u8; 32] {
    let key = Zeroizing::new(blake3::derive_key(PROOF_KEY_CONTEXT, secret));
    let mut mac = blake3::Hasher::new_keyed(&key);
    // Every field has a fixed length, so the concatenation is unambiguous.
    mac.update(PROOF_DOMAIN);
    mac.update(code);
    mac.update(linker.as_bytes());
    mac.update(joiner.as_bytes());
    mac.update(joiner_nonce);
    mac.update(linker_nonce);
    *mac.finalize().as_bytes()
}

/// Checks a proof in constant time (`blake3::Hash` compares that way).
pub fn check_link_proof(
    secret: &[u8; 32],
    code: &CodeId,
    linker: &DevicePublicKey,
    joiner: &DevicePublicKey,
    joiner_nonce: &[u8; 32],
    linker_nonce: &[u8; 32],
    mac: &[u8; 32],
) -> bool {
    let expected = link_proof(secret, code, linker, joiner, joiner_nonce, linker_nonce);
    blake3::Hash::from(expected) == blake3::Hash::from(*mac)
}

/// What the joiner sends on `/tern/link/1`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkRequest {
    /// "I have code `code`; here is my nonce."
    Hello { code: CodeId, nonce: [u8; 32] },
    /// The proof over both nonces, and the name the new device wants.
    Proof {
        code: CodeId,
        mac: [u8; 32],
        name: String,
    },
}

impl Record for LinkRequest {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 1 + 1 + 8 + 32 + 1 + MAX_DEVICE_NAME;

    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            LinkRequest::Proof { name, .. } if name.is_empty() || name.len() > MAX_DEVICE_NAME => {
                Err(DecodeError::Invalid(format!(
                    "a device name of {} bytes, 1 to {MAX_DEVICE_NAME} allowed",
                    name.len()
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Why the linker refused. The texts are written for the joiner's user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LinkRefusal {
    #[error(
        "the device that made this link code does not know it (did its node restart?); run `tern device link` there for a new code"
    )]
    Unknown,
    #[error(
        "this link code has expired (codes last 10 minutes); run `tern device link` for a new one"
    )]
    Expired,
    #[error(
        "this link code was already used (a code works once, and a wrong try uses it up); run `tern device link` for a new one"
    )]
    Used,
    #[error(
        "the link code is wrong (mistyped or cut off?) and is now used up; run `tern device link` for a new one"
    )]
    WrongProof,
    #[error(
        "the account already has {MAX_DEVICES} devices, the most its record lists; revoke one with `tern device revoke` first"
    )]
    TooManyDevices,
}

/// What the linker gives a joiner that proved it holds the code. The account
/// key travels inside the libp2p connection, which is encrypted and bound to
/// both devices' keys. Wiped when dropped; never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkGrant {
    pub account_secret: [u8; 32],
    /// The joiner's certificate, signed by the account.
    pub certificate: DeviceCertificate,
    /// Every device of the account, the joiner included.
    pub devices: Vec<DeviceCertificate>,
    /// Binary multiaddrs (with `/p2p/`) to start from: the linker's and its
    /// peers'.
    pub bootstrap: Vec<Vec<u8>>,
    /// The account's encryption keys taken since the one derived from the
    /// account key (one per revoked device), by generation: without them
    /// the new device could not read what followed a revocation.
    pub account_keys: Vec<(u32, [u8; 32])>,
}

/// Most account encryption keys a grant carries: the newest are kept.
pub const MAX_LINKED_KEYS: usize = 64;

impl Drop for LinkGrant {
    fn drop(&mut self) {
        self.account_secret.zeroize();
        for (_, key) in &mut self.account_keys {
            key.zeroize();
        }
    }
}

impl fmt::Debug for LinkGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkGrant")
            .field("account_secret", &"<hidden>")
            .field("certificate", &self.certificate)
            .field("devices", &self.devices.len())
            .field("bootstrap", &self.bootstrap.len())
            .field("account_keys", &self.account_keys.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkGrantError {
    #[error("the certificate the linker sent is for another device")]
    NotForThisDevice,
    #[error("the linker sent a certificate of another account")]
    ForeignCertificate,
    #[error("the linker's device list does not include this device")]
    NotListed,
}

impl LinkGrant {
    /// Checks the grant for `joiner` and returns the account key. The
    /// signatures were checked when the grant was decoded.
    pub fn check(&self, joiner: &DevicePublicKey) -> Result<AccountKeypair, LinkGrantError> {
        let account = AccountKeypair::from_secret_bytes(&self.account_secret);
        if self.certificate.device != *joiner {
            return Err(LinkGrantError::NotForThisDevice);
        }
        let id = account.id();
        if self.certificate.account != id || self.devices.iter().any(|c| c.account != id) {
            return Err(LinkGrantError::ForeignCertificate);
        }
        if !self.devices.iter().any(|c| c.device == *joiner) {
            return Err(LinkGrantError::NotListed);
        }
        Ok(account)
    }
}

/// What the linker answers on `/tern/link/1`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkResponse {
    Challenge { nonce: [u8; 32] },
    Granted(Box<LinkGrant>),
    Refused(LinkRefusal),
}

impl Record for LinkResponse {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 1
        + 1
        + 32
        + DeviceCertificate::MAX_LEN
        + 1
        + MAX_DEVICES * DeviceCertificate::MAX_LEN
        + 1
        + MAX_BOOTSTRAP * (2 + MAX_ADDR_LEN)
        + 1
        + MAX_LINKED_KEYS * (5 + 32);

    fn validate(&self) -> Result<(), DecodeError> {
        let LinkResponse::Granted(g) = self else {
            return Ok(());
        };
        if g.devices.len() > MAX_DEVICES {
            return Err(DecodeError::Invalid(format!(
                "{} devices, at most {MAX_DEVICES}",
                g.devices.len()
            )));
        }
        check_addrs(&g.bootstrap, MAX_BOOTSTRAP)?;
        if g.account_keys.len() > MAX_LINKED_KEYS {
            return Err(DecodeError::Invalid(format!(
                "{} account keys, at most {MAX_LINKED_KEYS}",
                g.account_keys.len()
            )));
        }
        // Certificates nested in a record are not checked by their own
        // decoder: check them here.
        for c in std::iter::once(&g.certificate).chain(&g.devices) {
            c.verify()
                .map_err(|e| DecodeError::Invalid(e.to_string()))?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IssueError {
    #[error(
        "{MAX_OPEN_CODES} link codes are already waiting to be used; use one, or wait until they expire (10 minutes)"
    )]
    TooManyCodes,
    #[error("a code with this id is already open")]
    DuplicateId,
}

struct OpenCode {
    id: CodeId,
    secret: Zeroizing<[u8; 32]>,
    expires_at_ms: u64,
    challenge: Option<Challenge>,
}

struct Challenge {
    joiner: DevicePublicKey,
    joiner_nonce: [u8; 32],
    linker_nonce: [u8; 32],
}

struct Spent {
    id: CodeId,
    why: LinkRefusal,
    forget_at_ms: u64,
}

/// The linker's side: its open codes and the challenges it handed out.
pub struct Linker {
    device: DevicePublicKey,
    open: Vec<OpenCode>,
    spent: VecDeque<Spent>,
}

impl Linker {
    /// A linker for the device `device` (the key in its codes).
    pub fn new(device: DevicePublicKey) -> Self {
        Self {
            device,
            open: Vec::new(),
            spent: VecDeque::new(),
        }
    }

    /// Opens a code with `id` and `secret` (both random, from the caller);
    /// returns when it expires.
    pub fn issue(&mut self, now_ms: u64, id: CodeId, secret: [u8; 32]) -> Result<u64, IssueError> {
        let secret = Zeroizing::new(secret);
        self.expire(now_ms);
        if self.open.len() >= MAX_OPEN_CODES {
            return Err(IssueError::TooManyCodes);
        }
        if self.open.iter().any(|c| c.id == id) || self.spent.iter().any(|s| s.id == id) {
            return Err(IssueError::DuplicateId);
        }
        let expires_at_ms = now_ms.saturating_add(CODE_TTL_MS);
        self.open.push(OpenCode {
            id,
            secret,
            expires_at_ms,
            challenge: None,
        });
        Ok(expires_at_ms)
    }

    /// Codes still waiting to be used.
    pub fn open_codes(&mut self, now_ms: u64) -> usize {
        self.expire(now_ms);
        self.open.len()
    }

    /// A joiner names a code and sends its nonce: remember both with
    /// `linker_nonce` (fresh random bytes from the caller) as the challenge,
    /// replacing any earlier one for this code. Returns the nonce to send.
    pub fn on_hello(
        &mut self,
        now_ms: u64,
        code: &CodeId,
        joiner: DevicePublicKey,
        joiner_nonce: [u8; 32],
        linker_nonce: [u8; 32],
    ) -> Result<[u8; 32], LinkRefusal> {
        self.expire(now_ms);
        let Some(open) = self.open.iter_mut().find(|c| c.id == *code) else {
            return Err(self.why_not_open(code));
        };
        open.challenge = Some(Challenge {
            joiner,
            joiner_nonce,
            linker_nonce,
        });
        Ok(linker_nonce)
    }

    /// A joiner proves it holds the code. The code is burnt whatever the
    /// outcome: `Ok` means the proof was right and the joiner is to be
    /// granted the account.
    pub fn on_proof(
        &mut self,
        now_ms: u64,
        code: &CodeId,
        joiner: &DevicePublicKey,
        mac: &[u8; 32],
    ) -> Result<(), LinkRefusal> {
        self.expire(now_ms);
        let Some(at) = self.open.iter().position(|c| c.id == *code) else {
            return Err(self.why_not_open(code));
        };
        let open = self.open.swap_remove(at);
        self.remember_spent(open.id, LinkRefusal::Used, open.expires_at_ms);
        // A proof without a challenge, or from another device than the one
        // challenged, is a guess like any other.
        let right = open.challenge.as_ref().is_some_and(|c| {
            c.joiner == *joiner
                && check_link_proof(
                    &open.secret,
                    &open.id,
                    &self.device,
                    joiner,
                    &c.joiner_nonce,
                    &c.linker_nonce,
                    mac,
                )
        });
        if right {
            Ok(())
        } else {
            Err(LinkRefusal::WrongProof)
        }
    }

    fn why_not_open(&self, code: &CodeId) -> LinkRefusal {
        self.spent
            .iter()
            .find(|s| s.id == *code)
            .map_or(LinkRefusal::Unknown, |s| s.why)
    }

    fn remember_spent(&mut self, id: CodeId, why: LinkRefusal, until_ms: u64) {
        if self.spent.len() >= MAX_SPENT {
            self.spent.pop_front();
        }
        self.spent.push_back(Spent {
            id,
            why,
            forget_at_ms: until_ms.saturating_add(CODE_TTL_MS),
        });
    }

    fn expire(&mut self, now_ms: u64) {
        self.spent.retain(|s| s.forget_at_ms > now_ms);
        let mut i = 0;
        while i < self.open.len() {
            if self.open[i].expires_at_ms <= now_ms {
                let gone = self.open.swap_remove(i);
                self.remember_spent(gone.id, LinkRefusal::Expired, gone.expires_at_ms);
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> DevicePublicKey {
        let k = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        DevicePublicKey::from_bytes(k.verifying_key().to_bytes()).unwrap()
    }

    fn code() -> LinkCode {
        LinkCode::new(
            key(1),
            vec![
                vec![4, 127, 0, 0, 1, 6, 0x1f, 0x90],
                vec![4, 10, 0, 0, 1, 6, 0x1f, 0x90],
            ],
            [7; 8],
            [9; 32],
        )
    }

    #[test]
    fn codes_round_trip_through_one_line() {
        let c = code();
        let text = c.to_string();
        assert!(text.starts_with(CODE_PREFIX));
        assert!(!text.contains(char::is_whitespace));
        assert_eq!(text.parse::<LinkCode>().unwrap(), c);
        assert_eq!(format!("  {text}\n").parse::<LinkCode>().unwrap(), c);
        assert!(!format!("{c:?}").contains(&base32_lower(&c.secret)));
    }

    #[test]
    fn codes_keep_only_what_fits_and_refuse_more() {
        let c = LinkCode::new(
            key(1),
            std::iter::once(vec![0; MAX_ADDR_LEN + 1])
                .chain(std::iter::repeat_n(vec![1; MAX_ADDR_LEN], 40))
                .collect(),
            [1; 8],
            [2; 32],
        );
        assert_eq!(c.addrs.len(), MAX_CODE_ADDRS);
        // The largest code fits the bounds of its own decoder and parser.
        assert!(c.to_string().parse::<LinkCode>().is_ok());

        let mut over = c.clone();
        over.addrs.push(vec![1]);
        assert!(matches!(
            LinkCode::decode(&over.encode()),
            Err(DecodeError::Invalid(_) | DecodeError::TooLong { .. })
        ));
        let mut long = code();
        long.addrs[0] = vec![1; MAX_ADDR_LEN + 1];
        assert!(matches!(
            LinkCode::decode(&long.encode()),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn garbage_is_refused_with_a_clear_error() {
        let text = code().to_string();
        assert_eq!(
            "tern1234".parse::<LinkCode>(),
            Err(LinkCodeError::MissingPrefix)
        );
        assert_eq!(
            format!("{text}!").parse::<LinkCode>(),
            Err(LinkCodeError::BadEncoding)
        );
        assert!(matches!(
            "tern-link:".repeat(500).parse::<LinkCode>(),
            Err(LinkCodeError::TooLong(_))
        ));
        assert!(matches!(
            "tern-link:".parse::<LinkCode>(),
            Err(LinkCodeError::Decode(_))
        ));
        for cut in CODE_PREFIX.len() + 1..text.len() {
            assert!(text[..cut].parse::<LinkCode>().is_err(), "cut at {cut}");
        }
        // A device key off the curve.
        let bad = (0u8..=255)
            .map(|b| [b; 32])
            .find(|k| DevicePublicKey::from_bytes(*k).is_err())
            .unwrap();
        let mut bytes = code().encode();
        bytes[1..33].copy_from_slice(&bad);
        assert!(LinkCode::decode(&bytes).is_err());
    }

    #[test]
    fn the_proof_binds_secret_code_devices_and_nonces() {
        let (secret, id, linker, joiner) = ([9; 32], [7; 8], key(1), key(2));
        let (jn, ln) = ([3; 32], [4; 32]);
        let mac = link_proof(&secret, &id, &linker, &joiner, &jn, &ln);
        assert!(check_link_proof(
            &secret, &id, &linker, &joiner, &jn, &ln, &mac
        ));
        // Wrong secret.
        assert!(!check_link_proof(
            &[8; 32], &id, &linker, &joiner, &jn, &ln, &mac
        ));
        // Another code.
        assert!(!check_link_proof(
            &secret, &[6; 8], &linker, &joiner, &jn, &ln, &mac
        ));
        // Peer ids swapped, or another joiner or linker.
        assert!(!check_link_proof(
            &secret, &id, &joiner, &linker, &jn, &ln, &mac
        ));
        assert!(!check_link_proof(
            &secret,
            &id,
            &linker,
            &key(3),
            &jn,
            &ln,
            &mac
        ));
        assert!(!check_link_proof(
            &secret,
            &id,
            &key(3),
            &joiner,
            &jn,
            &ln,
            &mac
        ));
        // Replayed against a fresh challenge (either nonce changed), or
        // with the nonces swapped.
        assert!(!check_link_proof(
            &secret, &id, &linker, &joiner, &jn, &[5; 32], &mac
        ));
        assert!(!check_link_proof(
            &secret, &id, &linker, &joiner, &[5; 32], &ln, &mac
        ));
        assert!(!check_link_proof(
            &secret, &id, &linker, &joiner, &ln, &jn, &mac
        ));
    }

    /// Runs both rounds as a joiner with `secret` would; returns the outcome.
    fn join(
        linker: &mut Linker,
        now: u64,
        c: &LinkCode,
        joiner: DevicePublicKey,
        secret: [u8; 32],
    ) -> Result<(), LinkRefusal> {
        let ln = linker.on_hello(now, &c.id, joiner, [3; 32], [now as u8; 32])?;
        let mac = link_proof(&secret, &c.id, &c.linker, &joiner, &[3; 32], &ln);
        linker.on_proof(now, &c.id, &joiner, &mac)
    }

    #[test]
    fn a_code_works_once() {
        let c = code();
        let mut linker = Linker::new(c.linker);
        linker.issue(0, c.id, c.secret).unwrap();
        assert_eq!(join(&mut linker, 10, &c, key(2), c.secret), Ok(()));
        assert_eq!(
            join(&mut linker, 20, &c, key(3), c.secret),
            Err(LinkRefusal::Used)
        );
        assert_eq!(linker.open_codes(20), 0);
    }

    #[test]
    fn a_wrong_guess_burns_the_code() {
        let c = code();
        let mut linker = Linker::new(c.linker);
        linker.issue(0, c.id, c.secret).unwrap();
        assert_eq!(
            join(&mut linker, 10, &c, key(2), [1; 32]),
            Err(LinkRefusal::WrongProof)
        );
        assert_eq!(
            join(&mut linker, 20, &c, key(2), c.secret),
            Err(LinkRefusal::Used)
        );
    }

    #[test]
    fn a_proof_is_good_only_for_its_own_challenge() {
        let c = code();
        let joiner = key(2);
        // Captured from an earlier run against the same code.
        let old = link_proof(&c.secret, &c.id, &c.linker, &joiner, &[3; 32], &[1; 32]);
        let mut linker = Linker::new(c.linker);
        linker.issue(0, c.id, c.secret).unwrap();
        linker.on_hello(5, &c.id, joiner, [3; 32], [2; 32]).unwrap();
        assert_eq!(
            linker.on_proof(6, &c.id, &joiner, &old),
            Err(LinkRefusal::WrongProof)
        );

        // A right proof from a device other than the one challenged.
        let mut linker = Linker::new(c.linker);
        linker.issue(0, c.id, c.secret).unwrap();
        let ln = linker.on_hello(5, &c.id, joiner, [3; 32], [2; 32]).unwrap();
        let theirs = link_proof(&c.secret, &c.id, &c.linker, &joiner, &[3; 32], &ln);
        assert_eq!(
            linker.on_proof(6, &c.id, &key(4), &theirs),
            Err(LinkRefusal::WrongProof)
        );

        // A proof with no challenge at all.
        let mut linker = Linker::new(c.linker);
        linker.issue(0, c.id, c.secret).unwrap();
        assert_eq!(
            linker.on_proof(6, &c.id, &joiner, &theirs),
            Err(LinkRefusal::WrongProof)
        );
    }

    #[test]
    fn codes_expire_and_are_bounded() {
        let c = code();
        let mut linker = Linker::new(c.linker);
        let expires = linker.issue(1000, c.id, c.secret).unwrap();
        assert_eq!(expires, 1000 + CODE_TTL_MS);
        assert_eq!(
            join(&mut linker, expires, &c, key(2), c.secret),
            Err(LinkRefusal::Expired)
        );
        assert_eq!(
            join(&mut linker, 0, &code_with_id([0; 8]), key(2), c.secret),
            Err(LinkRefusal::Unknown)
        );

        let mut linker = Linker::new(c.linker);
        for i in 0..MAX_OPEN_CODES as u8 {
            linker.issue(0, [i; 8], [i; 32]).unwrap();
        }
        assert_eq!(
            linker.issue(0, [99; 8], [0; 32]),
            Err(IssueError::TooManyCodes)
        );
        assert_eq!(
            linker.issue(0, [0; 8], [0; 32]),
            Err(IssueError::TooManyCodes)
        );
        // Room again once they expire; long after, they are forgotten.
        assert!(linker.issue(CODE_TTL_MS, [99; 8], [0; 32]).is_ok());
        assert_eq!(linker.open_codes(CODE_TTL_MS), 1);
        let later = 3 * CODE_TTL_MS;
        assert_eq!(
            linker.on_hello(later, &[0; 8], key(2), [0; 32], [0; 32]),
            Err(LinkRefusal::Unknown)
        );
        assert!(linker.spent.len() <= MAX_SPENT);
    }

    fn code_with_id(id: CodeId) -> LinkCode {
        LinkCode::new(key(1), vec![], id, [9; 32])
    }

    fn grant(account: &AccountKeypair, joiner: DevicePublicKey) -> LinkGrant {
        let cert = account.certify(joiner, "new", 1).unwrap();
        LinkGrant {
            account_secret: *account.secret_bytes(),
            certificate: cert.clone(),
            devices: vec![account.certify(key(1), "old", 1).unwrap(), cert],
            bootstrap: vec![vec![4, 127, 0, 0, 1]],
            account_keys: vec![(1, [8; 32])],
        }
    }

    #[test]
    fn grants_round_trip_and_are_checked() {
        let alice = AccountKeypair::from_secret_bytes(&[5; 32]);
        let g = grant(&alice, key(2));
        let wire = LinkResponse::Granted(Box::new(g.clone())).encode();
        let LinkResponse::Granted(back) = LinkResponse::decode(&wire).unwrap() else {
            panic!("not a grant");
        };
        assert_eq!(*back, g);
        assert_eq!(back.check(&key(2)).unwrap().id(), alice.id());
        assert!(!format!("{g:?}").contains("account_secret: ["));
        assert!(!format!("{g:?}").contains("[8, 8"));

        assert_eq!(
            g.check(&key(3)).err(),
            Some(LinkGrantError::NotForThisDevice)
        );
        let mallory = AccountKeypair::from_secret_bytes(&[6; 32]);
        let mut other_key = g.clone();
        other_key.account_secret = *mallory.secret_bytes();
        assert_eq!(
            other_key.check(&key(2)).err(),
            Some(LinkGrantError::ForeignCertificate)
        );
        let mut unlisted = g.clone();
        unlisted.devices.pop();
        assert_eq!(
            unlisted.check(&key(2)).err(),
            Some(LinkGrantError::NotListed)
        );

        // A forged certificate inside a grant is caught by the decoder.
        let mut forged = g.clone();
        forged.devices[0].name = "renamed".into();
        assert!(LinkResponse::decode(&LinkResponse::Granted(Box::new(forged)).encode()).is_err());
    }

    #[test]
    fn the_largest_grant_fits_and_more_is_refused() {
        let alice = AccountKeypair::from_secret_bytes(&[5; 32]);
        let mut g = grant(&alice, key(2));
        g.certificate = alice.certify(key(2), &"n".repeat(64), u64::MAX).unwrap();
        g.devices = (0..MAX_DEVICES as u8)
            .map(|i| {
                alice
                    .certify(key(10 + i), &"n".repeat(64), u64::MAX)
                    .unwrap()
            })
            .collect();
        g.bootstrap = vec![vec![0xff; MAX_ADDR_LEN]; MAX_BOOTSTRAP];
        g.account_keys = vec![(u32::MAX, [0xff; 32]); MAX_LINKED_KEYS];
        let wire = LinkResponse::Granted(Box::new(g.clone())).encode();
        assert!(wire.len() <= LinkResponse::MAX_LEN);
        assert!(LinkResponse::decode(&wire).is_ok());

        let mut too_many = g.clone();
        too_many.bootstrap.push(vec![1]);
        assert!(LinkResponse::decode(&LinkResponse::Granted(Box::new(too_many)).encode()).is_err());
        let mut too_many = g.clone();
        too_many.account_keys.push((0, [1; 32]));
        assert!(LinkResponse::decode(&LinkResponse::Granted(Box::new(too_many)).encode()).is_err());
        assert!(LinkResponse::decode(&vec![1; LinkResponse::MAX_LEN + 1]).is_err());

        let long_name = LinkRequest::Proof {
            code: [0; 8],
            mac: [0; 32],
            name: "n".repeat(MAX_DEVICE_NAME + 1),
        };
        assert!(LinkRequest::decode(&long_name.encode()).is_err());
        let ok = LinkRequest::Proof {
            code: [0; 8],
            mac: [0; 32],
            name: "n".repeat(MAX_DEVICE_NAME),
        };
        assert_eq!(LinkRequest::decode(&ok.encode()).unwrap(), ok);
    }
}
