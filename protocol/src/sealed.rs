//! Secrets encrypted at rest under a passphrase: Argon2id stretches the
//! passphrase into a key for XChaCha20-Poly1305.
//!
//! Salt and nonce are inputs (this crate draws no randomness). The KDF
//! parameters are stored with the secret and bounded on read, so a tampered
//! file cannot make the node burn unbounded memory or time.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::codec::Record;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("wrong passphrase, or the key file is damaged")]
    WrongPassphrase,
    #[error("key-derivation parameters out of range: {0}")]
    BadParams(String),
}

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl KdfParams {
    /// The default for keys on disk: 64 MiB, 3 passes (OWASP's Argon2id
    /// recommendation is at least 19 MiB and 2 passes).
    pub const DEFAULT: Self = Self {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 1,
    };

    const MAX_MEMORY_KIB: u32 = 1024 * 1024;
    const MAX_ITERATIONS: u32 = 16;
    const MAX_PARALLELISM: u32 = 8;

    fn argon2(&self) -> Result<Argon2<'static>, SealError> {
        if self.memory_kib > Self::MAX_MEMORY_KIB
            || self.iterations > Self::MAX_ITERATIONS
            || self.parallelism > Self::MAX_PARALLELISM
        {
            return Err(SealError::BadParams(format!("{self:?}")));
        }
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| SealError::BadParams(e.to_string()))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// A secret encrypted under a passphrase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecret {
    pub kdf: KdfParams,
    pub salt: [u8; 16],
    pub nonce: [u8; 24],
    pub ciphertext: Vec<u8>,
}

impl SealedSecret {
    pub fn seal(
        passphrase: &[u8],
        secret: &[u8],
        kdf: KdfParams,
        salt: [u8; 16],
        nonce: [u8; 24],
    ) -> Result<Self, SealError> {
        let mut sealed = Self {
            kdf,
            salt,
            nonce,
            ciphertext: Vec::new(),
        };
        let cipher = sealed.cipher(passphrase)?;
        let aad = sealed.aad();
        sealed.ciphertext = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: secret,
                    aad: &aad,
                },
            )
            // Encryption only fails for plaintexts beyond 256 GiB.
            .map_err(|_| SealError::BadParams("secret too large".into()))?;
        Ok(sealed)
    }

    pub fn open(&self, passphrase: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let cipher = self.cipher(passphrase)?;
        cipher
            .decrypt(
                XNonce::from_slice(&self.nonce),
                Payload {
                    msg: &self.ciphertext,
                    aad: &self.aad(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealError::WrongPassphrase)
    }

    fn cipher(&self, passphrase: &[u8]) -> Result<XChaCha20Poly1305, SealError> {
        let mut key = Zeroizing::new([0u8; 32]);
        self.kdf
            .argon2()?
            .hash_password_into(passphrase, &self.salt, key.as_mut())
            .map_err(|e| SealError::BadParams(e.to_string()))?;
        Ok(XChaCha20Poly1305::new(key.as_ref().into()))
    }

    /// Binds the parameters and salt to the ciphertext: changing them makes
    /// decryption fail instead of silently deriving another key.
    fn aad(&self) -> Vec<u8> {
        let mut aad = vec![Self::VERSION];
        aad.extend_from_slice(&self.kdf.memory_kib.to_le_bytes());
        aad.extend_from_slice(&self.kdf.iterations.to_le_bytes());
        aad.extend_from_slice(&self.kdf.parallelism.to_le_bytes());
        aad.extend_from_slice(&self.salt);
        aad
    }
}

impl Record for SealedSecret {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 1024;
}

#[cfg(test)]
mod tests {
    use super::*;

    // Cheap parameters: these tests check the construction, not the cost.
    const FAST: KdfParams = KdfParams {
        memory_kib: 256,
        iterations: 1,
        parallelism: 1,
    };

    fn sealed() -> SealedSecret {
        SealedSecret::seal(b"correct horse", b"the secret key", FAST, [7; 16], [9; 24]).unwrap()
    }

    #[test]
    fn opens_with_the_right_passphrase_only() {
        let s = SealedSecret::decode(&sealed().encode()).unwrap();
        assert_eq!(
            s.open(b"correct horse").unwrap().as_slice(),
            b"the secret key"
        );
        assert_eq!(s.open(b"wrong horse"), Err(SealError::WrongPassphrase));
    }

    #[test]
    fn ciphertext_does_not_contain_the_secret() {
        let bytes = sealed().encode();
        assert!(!bytes.windows(14).any(|w| w == b"the secret key"));
    }

    #[test]
    fn tampered_header_or_ciphertext_fails_to_open() {
        let mut s = sealed();
        s.salt[0] ^= 1;
        assert_eq!(s.open(b"correct horse"), Err(SealError::WrongPassphrase));
        let mut s = sealed();
        s.kdf.iterations = 2;
        assert_eq!(s.open(b"correct horse"), Err(SealError::WrongPassphrase));
        let mut s = sealed();
        s.ciphertext[3] ^= 0x80;
        assert_eq!(s.open(b"correct horse"), Err(SealError::WrongPassphrase));
    }

    #[test]
    fn absurd_kdf_parameters_are_refused_not_run() {
        let mut s = sealed();
        s.kdf.memory_kib = u32::MAX;
        assert!(matches!(
            s.open(b"correct horse"),
            Err(SealError::BadParams(_))
        ));
    }
}
