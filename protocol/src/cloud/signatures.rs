//! Entry signatures, checked alone or many at once under one rule.
//!
//! The rule is Ed25519 as ZIP 215 pins it down: `s` must be canonical
//! (below the group order ℓ), `R` and `A` must decode to curve points, and
//! the check is the cofactored equation `[8][s]B = [8]R + [8][k]A` with
//! `k = SHA-512(R ‖ A ‖ M)`. On top of that a device key of small order is
//! refused: with one, `[8][k]A` vanishes and anyone could sign.
//!
//! Why cofactored: a batch check folds many equations into one random
//! linear combination, and only the cofactored form makes the batch accept
//! exactly the batches whose signatures each pass alone. A cofactorless
//! single check (`verify_strict`) and a cofactorless batch disagree on a
//! signature whose `R` carries a small-order component, which only its
//! signer can make: the batch accepts it depending on the other entries
//! in the batch. Storage peers that check the same entry in different
//! batches would then keep different logs. With one rule everywhere the
//! verdict on an entry never depends on what it arrived with.
//!
//! The rule accepts every signature `verify_strict` accepts, so nothing
//! stored before it changes. It gives no one but the signer a second valid
//! signature for a message: `k` hashes `R` as sent, so changing `R` changes
//! `k`, and making the equation hold again takes the secret key.
//!
//! The batch's coefficients are 128-bit scalars drawn from a blake3 hash
//! of every item (their `k` and `s`), so the signer cannot aim at them and
//! the check needs no RNG. A batch that fails is split in halves until the
//! failing signatures are found, so one bad entry costs a few extra
//! batches, not a single check of every other entry.

use std::collections::HashMap;

use curve25519_dalek::{
    constants::ED25519_BASEPOINT_POINT,
    edwards::{CompressedEdwardsY, EdwardsPoint},
    scalar::Scalar,
    traits::{IsIdentity, VartimeMultiscalarMul},
};
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha512};

const BATCH_CONTEXT: &str = "tern entry signature batch v1";
/// At or below this many signatures a failed batch is settled one by one.
const SINGLES_AT: usize = 4;

/// One signature to check.
pub struct Signed<'a> {
    /// The signer's key; [`VerifyingKey`] has already decoded the point.
    pub key: &'a VerifyingKey,
    pub message: &'a [u8],
    pub signature: &'a [u8; 64],
}

/// A signature decoded for the equation: `R`, `s`, and `k`.
struct Parsed {
    key: [u8; 32],
    r: EdwardsPoint,
    s: Scalar,
    k: Scalar,
}

fn parse(item: &Signed<'_>) -> Option<Parsed> {
    if item.key.is_weak() {
        return None;
    }
    let (r_bytes, s_bytes) = item.signature.split_at(32);
    let s: Option<Scalar> =
        Scalar::from_canonical_bytes(s_bytes.try_into().expect("32 of 64 bytes")).into();
    let r = CompressedEdwardsY(r_bytes.try_into().expect("32 of 64 bytes")).decompress()?;
    let mut h = Sha512::new();
    h.update(r_bytes);
    h.update(item.key.as_bytes());
    h.update(item.message);
    let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());
    Some(Parsed {
        key: *item.key.as_bytes(),
        r,
        s: s?,
        k,
    })
}

/// `[8]([s]B − [k]A − R)` is the identity.
fn holds(p: &Parsed, key: &EdwardsPoint) -> bool {
    let sb_minus_ka = EdwardsPoint::vartime_double_scalar_mul_basepoint(&p.k, &-key, &p.s);
    (sb_minus_ka - p.r).mul_by_cofactor().is_identity()
}

/// Checks one signature.
pub fn verify(item: &Signed<'_>) -> bool {
    parse(item).is_some_and(|p| holds(&p, &item.key.to_edwards()))
}

/// Checks many signatures; the verdicts are in the items' order and are
/// the ones [`verify`] gives each item alone.
pub fn verify_many(items: &[Signed<'_>]) -> Vec<bool> {
    let mut keys: HashMap<[u8; 32], EdwardsPoint> = HashMap::new();
    let parsed: Vec<Option<Parsed>> = items
        .iter()
        .map(|item| {
            let p = parse(item)?;
            keys.entry(p.key).or_insert_with(|| item.key.to_edwards());
            Some(p)
        })
        .collect();
    let candidates: Vec<&Parsed> = parsed.iter().flatten().collect();
    let mut passed = vec![false; candidates.len()];
    settle(&candidates, &keys, &mut passed);
    let mut passed = passed.into_iter();
    parsed
        .iter()
        .map(|p| p.is_some() && passed.next().unwrap_or(false))
        .collect()
}

/// Writes each item's verdict into `passed`: the whole batch at once, or
/// by halves if it fails.
fn settle(items: &[&Parsed], keys: &HashMap<[u8; 32], EdwardsPoint>, passed: &mut [bool]) {
    if items.len() <= SINGLES_AT {
        for (p, verdict) in items.iter().zip(passed.iter_mut()) {
            *verdict = holds(p, &keys[&p.key]);
        }
        return;
    }
    if batch_holds(items, keys) {
        passed.fill(true);
        return;
    }
    let half = items.len() / 2;
    let (left, right) = items.split_at(half);
    let (left_passed, right_passed) = passed.split_at_mut(half);
    settle(left, keys, left_passed);
    settle(right, keys, right_passed);
}

/// `[8](−(Σ zᵢsᵢ)B + Σ zᵢRᵢ + Σ_A (Σ_{i by A} zᵢkᵢ)A)` is the identity, with
/// one term per distinct key (a catch-up is mostly one device's entries).
fn batch_holds(items: &[&Parsed], keys: &HashMap<[u8; 32], EdwardsPoint>) -> bool {
    let mut transcript = blake3::Hasher::new_derive_key(BATCH_CONTEXT);
    transcript.update(&(items.len() as u64).to_le_bytes());
    for p in items {
        transcript.update(p.k.as_bytes());
        transcript.update(p.s.as_bytes());
    }
    let mut coefficients = transcript.finalize_xof();
    let mut b = Scalar::ZERO;
    let mut per_key: Vec<([u8; 32], Scalar)> = Vec::new();
    let mut scalars = Vec::with_capacity(items.len() + 1 + keys.len());
    let mut points = Vec::with_capacity(items.len() + 1 + keys.len());
    for p in items {
        let mut z = [0u8; 16];
        coefficients.fill(&mut z);
        let z = Scalar::from(u128::from_le_bytes(z));
        b += z * p.s;
        match per_key.iter_mut().find(|(key, _)| *key == p.key) {
            Some((_, sum)) => *sum += z * p.k,
            None => per_key.push((p.key, z * p.k)),
        }
        scalars.push(z);
        points.push(p.r);
    }
    scalars.push(-b);
    points.push(ED25519_BASEPOINT_POINT);
    for (key, sum) in per_key {
        scalars.push(sum);
        points.push(keys[&key]);
    }
    EdwardsPoint::vartime_multiscalar_mul(scalars, points)
        .mul_by_cofactor()
        .is_identity()
}

#[cfg(test)]
mod tests {
    use curve25519_dalek::constants::EIGHT_TORSION;
    use ed25519_dalek::{Signer, SigningKey};

    use super::*;

    struct Owned {
        key: VerifyingKey,
        message: Vec<u8>,
        signature: [u8; 64],
    }

    impl Owned {
        fn item(&self) -> Signed<'_> {
            Signed {
                key: &self.key,
                message: &self.message,
                signature: &self.signature,
            }
        }
    }

    fn signed(seed: u8, n: usize) -> Owned {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let message = format!("entry {n} by {seed}").into_bytes();
        Owned {
            key: key.verifying_key(),
            signature: key.sign(&message).to_bytes(),
            message,
        }
    }

    /// A signature with `R + T` for a small-order `T`, made with the secret
    /// key (only a signer can): `k` is computed over the altered `R`.
    fn with_torsion_in_r(seed: u8, message: &[u8]) -> Owned {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let a = key.to_scalar();
        let nonce = Scalar::from(987_654_321u64);
        let r = EdwardsPoint::mul_base(&nonce) + EIGHT_TORSION[1];
        let r_bytes = r.compress().to_bytes();
        let mut h = Sha512::new();
        h.update(r_bytes);
        h.update(key.verifying_key().as_bytes());
        h.update(message);
        let k = Scalar::from_bytes_mod_order_wide(&h.finalize().into());
        let s = nonce + k * a;
        let mut signature = [0; 64];
        signature[..32].copy_from_slice(&r_bytes);
        signature[32..].copy_from_slice(s.as_bytes());
        Owned {
            key: key.verifying_key(),
            message: message.to_vec(),
            signature,
        }
    }

    fn verdicts(owned: &[Owned]) -> Vec<bool> {
        verify_many(&owned.iter().map(Owned::item).collect::<Vec<_>>())
    }

    #[test]
    fn good_signatures_pass_alone_and_together() {
        let owned: Vec<Owned> = (0..40).map(|n| signed(1 + (n % 3) as u8, n)).collect();
        assert!(owned.iter().all(|o| verify(&o.item())));
        assert_eq!(verdicts(&owned), vec![true; 40]);
        assert_eq!(verdicts(&[]), Vec::<bool>::new());
    }

    #[test]
    fn every_bad_signature_in_a_batch_is_named_and_no_good_one() {
        let mut owned: Vec<Owned> = (0..50).map(|n| signed(7, n)).collect();
        owned[3].message.push(b'!'); // altered message
        owned[17].signature[5] ^= 1; // altered R
        owned[18].signature[40] ^= 1; // altered s
        owned[49].key = SigningKey::from_bytes(&[8; 32]).verifying_key(); // other key
        // s + ℓ: the same point equation, but s is not canonical.
        let s = Scalar::from_bytes_mod_order(owned[30].signature[32..].try_into().unwrap());
        let mut wide = [0u8; 33];
        wide[..32].copy_from_slice(s.as_bytes());
        // ℓ = 2^252 + 27742317777372353535851937790883648493, little-endian.
        let mut l = [0u8; 32];
        l[..16].copy_from_slice(&0x14def9dea2f79cd65812631a5cf5d3ed_u128.to_le_bytes());
        l[31] = 0x10;
        let mut carry = 0u16;
        for i in 0..32 {
            let sum = wide[i] as u16 + l[i] as u16 + carry;
            wide[i] = sum as u8;
            carry = sum >> 8;
        }
        assert_eq!(carry, 0, "s + ℓ fits 32 bytes for this s");
        owned[30].signature[32..].copy_from_slice(&wide[..32]);
        let expected: Vec<bool> = (0..50).map(|n| ![3, 17, 18, 30, 49].contains(&n)).collect();
        assert_eq!(verdicts(&owned), expected);
        let alone: Vec<bool> = owned.iter().map(|o| verify(&o.item())).collect();
        assert_eq!(alone, expected);
    }

    #[test]
    fn a_signers_small_order_component_gets_the_same_verdict_in_any_batch() {
        let odd = with_torsion_in_r(9, b"crafted");
        // The cofactorless strict check refuses it; this rule accepts it,
        // alone and in every batch, so holders cannot disagree about it.
        assert!(
            odd.key
                .verify_strict(
                    &odd.message,
                    &ed25519_dalek::Signature::from_bytes(&odd.signature)
                )
                .is_err()
        );
        assert!(verify(&odd.item()));
        for size in [1, 5, 8, 13, 64] {
            let mut owned: Vec<Owned> = (0..size).map(|n| signed(2, n)).collect();
            owned.push(with_torsion_in_r(9, b"crafted"));
            assert_eq!(verdicts(&owned), vec![true; size + 1], "batch of {size}");
        }
    }

    #[test]
    fn a_small_order_device_key_signs_nothing() {
        // With A of small order [8][k]A vanishes: R = [s]B passes for any
        // message, so such a key must be refused outright.
        let weak = VerifyingKey::from_bytes(&EIGHT_TORSION[0].compress().to_bytes()).unwrap();
        let s = Scalar::from(5u8);
        let mut signature = [0; 64];
        signature[..32].copy_from_slice(&EdwardsPoint::mul_base(&s).compress().to_bytes());
        signature[32..].copy_from_slice(s.as_bytes());
        let forged = Owned {
            key: weak,
            message: b"anything".to_vec(),
            signature,
        };
        assert!(!verify(&forged.item()));
        let mut owned: Vec<Owned> = (0..8).map(|n| signed(3, n)).collect();
        owned.push(forged);
        let mut expected = vec![true; 8];
        expected.push(false);
        assert_eq!(verdicts(&owned), expected);
    }
}
