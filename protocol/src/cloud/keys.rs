//! The keys of cloud chats.
//!
//! - **Account encryption key.** An X25519 key derived from the account's
//!   Ed25519 secret, so every device holding the account key holds it too and
//!   a newly linked device can read the whole history with nothing else. Its
//!   public half travels in the chat log (genesis, add member), so wrapping a
//!   chat key for a member needs no directory. Revoking a device replaces it
//!   with a random one ([`AccountEncryptionKey::generate`]), which the log
//!   carries sealed to each device that stays
//!   ([`AccountEncryptionKey::seal_to_device`]).
//! - **Chat key.** One per key epoch. Genesis draws the first; every rotation
//!   (removal, re-key) draws a fresh secret and chains it onto the previous
//!   key (see [`ChatKey::rotate`]). Chaining means a member removed by one of
//!   two concurrent rotations still lacks the key that follows both.
//! - **Wrapping.** A chat key (or rotation secret) is sealed to a member's
//!   account encryption key with a one-time X25519 key and
//!   XChaCha20-Poly1305; chat id and epoch are bound in, so a wrapped key
//!   cannot be replayed into another chat or epoch.
//! - **Bodies.** Entry bodies are sealed under the chat key of their epoch
//!   with XChaCha20-Poly1305; the additional data binds chat id, epoch and
//!   author device, so a body cannot be moved to another chat, epoch or
//!   author.
//!
//! All randomness (one-time keys, nonces, fresh chat keys) is an input.

use std::fmt;

use chacha20poly1305::{
    AeadInPlace, KeyInit, Tag, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::entry::{ChatId, EntryBody};
use crate::identity::{AccountKeypair, DevicePublicKey};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the recipient's encryption key is a low-order point")]
    WeakPublicKey,
    #[error("the wrapped key is not for this account, or it was altered")]
    UnwrapFailed,
    #[error("the body does not decrypt under this key (wrong key, or altered)")]
    BodyDoesNotDecrypt,
}

const ACCOUNT_KEY_CONTEXT: &str = "tern account encryption key v1";
const WRAP_KEY_CONTEXT: &str = "tern chat key wrap v1";
const WRAP_EPHEMERAL_CONTEXT: &str = "tern chat key wrap ephemeral v1";
const EPOCH_CHAIN_CONTEXT: &str = "tern chat epoch key v1";
const BODY_AAD_DOMAIN: &[u8] = b"tern cloud body v1\0";
const GENERATED_KEY_CONTEXT: &str = "tern account encryption key generated v1";
const DEVICE_WRAP_CONTEXT: &str = "tern account key to device v1";

/// An account's X25519 key for receiving chat keys. Zeroized when dropped.
pub struct AccountEncryptionKey(StaticSecret);

impl AccountEncryptionKey {
    /// Derives the key from the account's Ed25519 secret: every device that
    /// holds the account key gets the same encryption key without any
    /// transfer, and no second secret has to be backed up.
    pub fn derive(account: &AccountKeypair) -> Self {
        let secret = account.secret_bytes();
        Self::from_account_secret(&secret)
    }

    /// The same derivation from the raw account secret bytes.
    pub fn from_account_secret(secret: &[u8; 32]) -> Self {
        let derived = Zeroizing::new(blake3::derive_key(ACCOUNT_KEY_CONTEXT, secret));
        Self(StaticSecret::from(*derived))
    }

    /// The X25519 secret itself, for handing to a newly linked device over
    /// an authenticated, encrypted channel (or sealing at rest).
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// A key received from [`Self::secret_bytes`].
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Self(StaticSecret::from(*secret))
    }

    /// A key no other secret derives: the one an account takes when it
    /// revokes a device, which holds the account key and so every derived
    /// key. `random` must be fresh.
    pub fn generate(random: &[u8; 32]) -> Self {
        let secret = Zeroizing::new(blake3::derive_key(GENERATED_KEY_CONTEXT, random));
        Self(StaticSecret::from(*secret))
    }

    pub fn public(&self) -> EncryptionPublicKey {
        EncryptionPublicKey(PublicKey::from(&self.0).to_bytes())
    }

    /// Seals this key to one device of the account (to the X25519 form of
    /// its Ed25519 device key), bound to the chat and epoch of the entry
    /// that carries it. `random` must be fresh.
    pub fn seal_to_device(
        &self,
        device: &DevicePublicKey,
        chat: ChatId,
        epoch: u32,
        random: &[u8; 32],
    ) -> Result<WrappedKey, KeyError> {
        let recipient = EncryptionPublicKey(device_x25519(device)?);
        let secret = self.secret_bytes();
        let public = self.public();
        let mut seed = Zeroizing::new(Vec::with_capacity(32 * 3));
        seed.extend_from_slice(random);
        seed.extend_from_slice(secret.as_ref());
        seed.extend_from_slice(&recipient.0);
        seal_secret(&secret, &recipient, &seed, |ephemeral| {
            wrap_context(
                DEVICE_WRAP_CONTEXT,
                ephemeral,
                &recipient,
                Some(&public),
                chat,
                epoch,
            )
        })
    }

    /// Opens a key sealed to this device by [`Self::seal_to_device`]. It
    /// must be the key `expected` names: a grant cannot swap in another.
    pub fn open_from_device(
        device_key: &SigningKey,
        wrapped: &WrappedKey,
        expected: &EncryptionPublicKey,
        chat: ChatId,
        epoch: u32,
    ) -> Result<Self, KeyError> {
        let own = StaticSecret::from(device_key.to_scalar_bytes());
        let recipient = EncryptionPublicKey(PublicKey::from(&own).to_bytes());
        let context = wrap_context(
            DEVICE_WRAP_CONTEXT,
            &wrapped.ephemeral,
            &recipient,
            Some(expected),
            chat,
            epoch,
        );
        let key = Self::from_secret_bytes(&*open_secret(&own, wrapped, &context)?);
        if key.public() != *expected {
            return Err(KeyError::UnwrapFailed);
        }
        Ok(key)
    }

    /// Opens a chat key wrapped to this account for `chat` at `epoch`.
    pub fn unwrap(
        &self,
        wrapped: &WrappedKey,
        chat: ChatId,
        epoch: u32,
    ) -> Result<ChatKey, KeyError> {
        let recipient = self.public();
        let context = wrap_context(
            WRAP_KEY_CONTEXT,
            &wrapped.ephemeral,
            &recipient,
            None,
            chat,
            epoch,
        );
        Ok(ChatKey(*open_secret(&self.0, wrapped, &context)?))
    }

    /// Opens a chat key with whichever of `keys` it was wrapped to (an
    /// account holds one key per revocation, and older epochs were wrapped
    /// to older keys).
    pub fn unwrap_any<'a>(
        keys: impl IntoIterator<Item = &'a AccountEncryptionKey>,
        wrapped: &WrappedKey,
        chat: ChatId,
        epoch: u32,
    ) -> Result<ChatKey, KeyError> {
        keys.into_iter()
            .find_map(|k| k.unwrap(wrapped, chat, epoch).ok())
            .ok_or(KeyError::UnwrapFailed)
    }

    /// An account's current key among `keys` (generation, key): the highest
    /// generation, and of two that raced to one generation, the higher
    /// public key, so every device picks the same.
    pub fn current(keys: &[(u32, AccountEncryptionKey)]) -> Option<&(u32, AccountEncryptionKey)> {
        keys.iter().max_by_key(|(g, k)| (*g, k.public()))
    }
}

impl fmt::Debug for AccountEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountEncryptionKey({:?})", self.public())
    }
}

/// The public half of an [`AccountEncryptionKey`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EncryptionPublicKey(pub [u8; 32]);

impl fmt::Debug for EncryptionPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionPublicKey({})", short_hex(&self.0))
    }
}

/// The symmetric key of one epoch of a chat, or a rotation's fresh secret.
/// Zeroized when dropped.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct ChatKey([u8; 32]);

impl ChatKey {
    /// A key from 32 fresh random bytes (drawn by the caller).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key of the epoch that follows a rotation: the previous key and
    /// the rotation's fresh secret, hashed together. Reading the new epoch
    /// needs both, so someone left out of any one rotation on the way (a
    /// removed member) stays out even when rotations were concurrent.
    pub fn rotate(&self, fresh: &ChatKey) -> ChatKey {
        let mut input = Zeroizing::new([0u8; 64]);
        input[..32].copy_from_slice(&self.0);
        input[32..].copy_from_slice(&fresh.0);
        ChatKey(blake3::derive_key(EPOCH_CHAIN_CONTEXT, input.as_ref()))
    }

    /// Seals `key` to `recipient` for `chat` at `epoch`. `random` must be
    /// fresh; the one-time key is derived from it together with the key and
    /// recipient, so even a repeated `random` never reuses a one-time key
    /// for two different keys or recipients.
    pub fn wrap_to(
        &self,
        recipient: &EncryptionPublicKey,
        chat: ChatId,
        epoch: u32,
        random: &[u8; 32],
    ) -> Result<WrappedKey, KeyError> {
        let mut seed = Zeroizing::new(Vec::with_capacity(32 * 3 + 16 + 4));
        seed.extend_from_slice(random);
        seed.extend_from_slice(&self.0);
        seed.extend_from_slice(&recipient.0);
        seed.extend_from_slice(&chat.0);
        seed.extend_from_slice(&epoch.to_le_bytes());
        seal_secret(&self.0, recipient, &seed, |ephemeral| {
            wrap_context(WRAP_KEY_CONTEXT, ephemeral, recipient, None, chat, epoch)
        })
    }

    /// Encrypts an entry body. `nonce` must be fresh random bytes.
    pub fn seal_body(&self, context: &BodyContext, nonce: [u8; 24], plaintext: &[u8]) -> EntryBody {
        let ciphertext = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &context.aad(),
                },
            )
            // XChaCha20-Poly1305 refuses only plaintexts over 256 GiB; bodies
            // are bounded by the content record's MAX_LEN.
            .expect("entry bodies are far below the AEAD's size limit");
        EntryBody { nonce, ciphertext }
    }

    /// Decrypts an entry body sealed with [`Self::seal_body`].
    pub fn open_body(
        &self,
        context: &BodyContext,
        body: &EntryBody,
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.cipher()
            .decrypt(
                XNonce::from_slice(&body.nonce),
                Payload {
                    msg: &body.ciphertext,
                    aad: &context.aad(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| KeyError::BodyDoesNotDecrypt)
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }
}

impl fmt::Debug for ChatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChatKey(..)")
    }
}

/// What a body is bound to: it opens only in this chat, at this epoch, as
/// written by this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyContext {
    pub chat: ChatId,
    pub epoch: u32,
    pub author: DevicePublicKey,
}

impl BodyContext {
    fn aad(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(BODY_AAD_DOMAIN.len() + 16 + 4 + 32);
        aad.extend_from_slice(BODY_AAD_DOMAIN);
        aad.extend_from_slice(&self.chat.0);
        aad.extend_from_slice(&self.epoch.to_le_bytes());
        aad.extend_from_slice(self.author.as_bytes());
        aad
    }
}

/// A chat key sealed to one account's encryption key: 80 bytes, fixed size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// The one-time X25519 public key.
    pub ephemeral: [u8; 32],
    pub ciphertext: [u8; 32],
    pub tag: [u8; 16],
}

/// A wrapped key on its own (an account key kept at rest): fixed size.
impl crate::codec::Record for WrappedKey {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 1 + 32 + 32 + 16;
}

/// What a sealed key is bound to: the kind of sealing (`domain`), the
/// one-time key, the recipient, the sealed key's public half when it is an
/// account key, and the chat and epoch of the entry that carries it.
fn wrap_context(
    domain: &str,
    ephemeral: &[u8; 32],
    recipient: &EncryptionPublicKey,
    sealed_key: Option<&EncryptionPublicKey>,
    chat: ChatId,
    epoch: u32,
) -> Vec<u8> {
    let mut c = Vec::with_capacity(domain.len() + 32 * 3 + 16 + 4);
    c.extend_from_slice(domain.as_bytes());
    c.extend_from_slice(ephemeral);
    c.extend_from_slice(&recipient.0);
    if let Some(key) = sealed_key {
        c.extend_from_slice(&key.0);
    }
    c.extend_from_slice(&chat.0);
    c.extend_from_slice(&epoch.to_le_bytes());
    c
}

fn wrap_kek(shared: &[u8; 32], context: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut input = Zeroizing::new(Vec::with_capacity(32 + context.len()));
    input.extend_from_slice(shared);
    input.extend_from_slice(context);
    Zeroizing::new(blake3::derive_key(WRAP_KEY_CONTEXT, &input))
}

/// Seals 32 secret bytes to `recipient` with a one-time X25519 key
/// derived from `seed` (which must hold fresh randomness and everything
/// that distinguishes this sealing), under a key-encryption key bound to
/// the context `context_for` builds around the one-time public key.
fn seal_secret(
    secret: &[u8; 32],
    recipient: &EncryptionPublicKey,
    seed: &[u8],
    context_for: impl FnOnce(&[u8; 32]) -> Vec<u8>,
) -> Result<WrappedKey, KeyError> {
    let ephemeral_secret = Zeroizing::new(blake3::derive_key(WRAP_EPHEMERAL_CONTEXT, seed));
    let ephemeral = StaticSecret::from(*ephemeral_secret);
    let ephemeral_public = PublicKey::from(&ephemeral).to_bytes();
    let shared = ephemeral.diffie_hellman(&PublicKey::from(recipient.0));
    if !shared.was_contributory() {
        return Err(KeyError::WeakPublicKey);
    }
    let context = context_for(&ephemeral_public);
    let kek = wrap_kek(shared.as_bytes(), &context);
    let mut ciphertext = *secret;
    // Each key-encryption key comes from a one-time X25519 key and is used
    // once, so a fixed nonce is safe. Encrypting 32 bytes cannot hit the
    // AEAD's size limit.
    let tag = XChaCha20Poly1305::new(kek.as_ref().into())
        .encrypt_in_place_detached(XNonce::from_slice(&[0; 24]), &context, &mut ciphertext)
        .expect("32 bytes are far below the AEAD's size limit");
    Ok(WrappedKey {
        ephemeral: ephemeral_public,
        ciphertext,
        tag: tag.into(),
    })
}

/// Opens what [`seal_secret`] sealed to `own`, given the same context.
fn open_secret(
    own: &StaticSecret,
    wrapped: &WrappedKey,
    context: &[u8],
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let shared = own.diffie_hellman(&PublicKey::from(wrapped.ephemeral));
    if !shared.was_contributory() {
        return Err(KeyError::UnwrapFailed);
    }
    let kek = wrap_kek(shared.as_bytes(), context);
    let mut secret = Zeroizing::new(wrapped.ciphertext);
    XChaCha20Poly1305::new(kek.as_ref().into())
        .decrypt_in_place_detached(
            XNonce::from_slice(&[0; 24]),
            context,
            secret.as_mut(),
            Tag::from_slice(&wrapped.tag),
        )
        .map_err(|_| KeyError::UnwrapFailed)?;
    Ok(secret)
}

/// The X25519 form of a device's Ed25519 key (the birational map), which
/// its holder opens with the scalar of its signing key.
fn device_x25519(device: &DevicePublicKey) -> Result<[u8; 32], KeyError> {
    let key = device
        .verifying_key()
        .map_err(|_| KeyError::WeakPublicKey)?;
    if key.is_weak() {
        return Err(KeyError::WeakPublicKey);
    }
    Ok(key.to_montgomery().to_bytes())
}

pub(crate) fn short_hex(bytes: &[u8]) -> String {
    bytes.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn account(seed: u8) -> AccountKeypair {
        AccountKeypair::from_secret_bytes(&[seed; 32])
    }

    fn device(seed: u8) -> DevicePublicKey {
        let k = SigningKey::from_bytes(&[seed; 32]);
        DevicePublicKey::from_bytes(k.verifying_key().to_bytes()).unwrap()
    }

    const CHAT: ChatId = ChatId([7; 16]);

    #[test]
    fn an_account_key_sealed_to_a_device_opens_only_there_and_only_as_named() {
        let new = AccountEncryptionKey::generate(&[5; 32]);
        assert_ne!(
            new.public(),
            AccountEncryptionKey::derive(&account(1)).public()
        );
        let tablet = SigningKey::from_bytes(&[32; 32]);
        let phone = SigningKey::from_bytes(&[31; 32]);
        let sealed = new.seal_to_device(&device(32), CHAT, 3, &[9; 32]).unwrap();
        let opened =
            AccountEncryptionKey::open_from_device(&tablet, &sealed, &new.public(), CHAT, 3)
                .unwrap();
        assert_eq!(opened.public(), new.public());
        // Not by another device, not in another chat or epoch, not under
        // another name, not altered.
        let named = new.public();
        let open = |key: &SigningKey, sealed: &WrappedKey, named, chat, epoch| {
            AccountEncryptionKey::open_from_device(key, sealed, named, chat, epoch).map(|_| ())
        };
        let fail = Err(KeyError::UnwrapFailed);
        assert_eq!(open(&phone, &sealed, &named, CHAT, 3), fail);
        assert_eq!(open(&tablet, &sealed, &named, ChatId([8; 16]), 3), fail);
        assert_eq!(open(&tablet, &sealed, &named, CHAT, 4), fail);
        let other = AccountEncryptionKey::generate(&[6; 32]).public();
        assert_eq!(open(&tablet, &sealed, &other, CHAT, 3), fail);
        let mut altered = sealed.clone();
        altered.ciphertext[0] ^= 1;
        assert_eq!(open(&tablet, &altered, &named, CHAT, 3), fail);
        // The sealed bytes are not the key.
        assert_ne!(&sealed.ciphertext, new.secret_bytes().as_ref());
    }

    #[test]
    fn encryption_key_is_a_function_of_the_account_key() {
        let a = AccountEncryptionKey::derive(&account(1));
        let again = AccountEncryptionKey::derive(&account(1));
        let other = AccountEncryptionKey::derive(&account(2));
        assert_eq!(a.public(), again.public());
        let moved = AccountEncryptionKey::from_secret_bytes(&a.secret_bytes());
        assert_eq!(moved.public(), a.public());
        assert_ne!(a.public(), other.public());
        // Not the Ed25519 secret itself, nor its public key.
        assert_ne!(&a.public().0, account(1).id().as_bytes());
        assert_ne!(a.0.to_bytes(), *account(1).secret_bytes());
    }

    #[test]
    fn wrapped_key_opens_only_for_its_recipient_chat_and_epoch() {
        let alice = AccountEncryptionKey::derive(&account(1));
        let bob = AccountEncryptionKey::derive(&account(2));
        let key = ChatKey::from_bytes([9; 32]);
        let wrapped = key.wrap_to(&alice.public(), CHAT, 3, &[5; 32]).unwrap();

        assert_eq!(alice.unwrap(&wrapped, CHAT, 3).unwrap(), key);
        // A second device of the same account derives the same key and opens it.
        let alice_again = AccountEncryptionKey::derive(&account(1));
        assert_eq!(alice_again.unwrap(&wrapped, CHAT, 3).unwrap(), key);

        assert_eq!(bob.unwrap(&wrapped, CHAT, 3), Err(KeyError::UnwrapFailed));
        assert_eq!(
            alice.unwrap(&wrapped, ChatId([8; 16]), 3),
            Err(KeyError::UnwrapFailed)
        );
        assert_eq!(alice.unwrap(&wrapped, CHAT, 4), Err(KeyError::UnwrapFailed));
        let mut altered = wrapped.clone();
        altered.ciphertext[0] ^= 1;
        assert_eq!(alice.unwrap(&altered, CHAT, 3), Err(KeyError::UnwrapFailed));
        let mut altered = wrapped;
        altered.ephemeral[0] ^= 1;
        assert!(alice.unwrap(&altered, CHAT, 3).is_err());
    }

    #[test]
    fn wrapping_to_a_low_order_point_is_refused() {
        let key = ChatKey::from_bytes([9; 32]);
        assert_eq!(
            key.wrap_to(&EncryptionPublicKey([0; 32]), CHAT, 0, &[1; 32]),
            Err(KeyError::WeakPublicKey)
        );
    }

    #[test]
    fn one_time_keys_differ_per_recipient_even_with_the_same_randomness() {
        let key = ChatKey::from_bytes([9; 32]);
        let a = AccountEncryptionKey::derive(&account(1)).public();
        let b = AccountEncryptionKey::derive(&account(2)).public();
        let wa = key.wrap_to(&a, CHAT, 0, &[1; 32]).unwrap();
        let wb = key.wrap_to(&b, CHAT, 0, &[1; 32]).unwrap();
        assert_ne!(wa.ephemeral, wb.ephemeral);
    }

    #[test]
    fn rotation_needs_both_the_previous_key_and_the_fresh_secret() {
        let k0 = ChatKey::from_bytes([1; 32]);
        let fresh = ChatKey::from_bytes([2; 32]);
        let k1 = k0.rotate(&fresh);
        assert_ne!(k1, k0);
        assert_ne!(k1, fresh);
        assert_eq!(k1, k0.rotate(&fresh));
        assert_ne!(k1, fresh.rotate(&k0));
    }

    #[test]
    fn body_opens_only_in_its_chat_epoch_and_author() {
        let key = ChatKey::from_bytes([3; 32]);
        let context = BodyContext {
            chat: CHAT,
            epoch: 2,
            author: device(1),
        };
        let body = key.seal_body(&context, [4; 24], b"hello");
        assert!(!body.ciphertext.windows(5).any(|w| w == b"hello"));
        assert_eq!(&key.open_body(&context, &body).unwrap()[..], b"hello");

        for other in [
            BodyContext {
                chat: ChatId([1; 16]),
                ..context
            },
            BodyContext {
                epoch: 3,
                ..context
            },
            BodyContext {
                author: device(2),
                ..context
            },
        ] {
            assert_eq!(
                key.open_body(&other, &body),
                Err(KeyError::BodyDoesNotDecrypt)
            );
        }
        let wrong_key = ChatKey::from_bytes([4; 32]);
        assert_eq!(
            wrong_key.open_body(&context, &body),
            Err(KeyError::BodyDoesNotDecrypt)
        );
        let mut altered = body;
        altered.ciphertext[0] ^= 1;
        assert_eq!(
            key.open_body(&context, &altered),
            Err(KeyError::BodyDoesNotDecrypt)
        );
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let key = ChatKey::from_bytes([0xab; 32]);
        assert_eq!(format!("{key:?}"), "ChatKey(..)");
        let account_key = AccountEncryptionKey::derive(&account(1));
        assert!(
            format!("{account_key:?}").starts_with("AccountEncryptionKey(EncryptionPublicKey(")
        );
    }
}
