//! Cost of secret-chat encryption per message, next to raw
//! ChaCha20-Poly1305 and XChaCha20-Poly1305 on the same payload in the same
//! run.
//!
//!     cargo bench -p tern-protocol --bench secret

use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, XChaCha20Poly1305, XNonce, aead::Aead};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use std::hint::black_box;
use tern_protocol::{
    AccountKeypair, DevicePublicKey,
    secret::{Handshake, LocalDevice, SecretSession},
};

fn session_pair() -> (SecretSession, SecretSession) {
    let keys = [
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
    ];
    let certs: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let public = DevicePublicKey::from_bytes(k.verifying_key().to_bytes()).unwrap();
            AccountKeypair::from_secret_bytes(&[i as u8 + 10; 32])
                .certify(public, "bench", 0)
                .unwrap()
        })
        .collect();
    let a = LocalDevice {
        signing_key: &keys[0],
        certificate: &certs[0],
    };
    let b = LocalDevice {
        signing_key: &keys[1],
        certificate: &certs[1],
    };
    let (hs_a, m1) = Handshake::initiate([0; 16], &a, certs[1].device, [3; 32]).unwrap();
    let (hs_b, m2) = Handshake::respond([0; 16], &b, certs[0].device, [4; 32], &m1).unwrap();
    let done_a = hs_a.on_message(&m2, 0).unwrap();
    let done_b = hs_b.on_message(&done_a.reply.unwrap(), 0).unwrap();
    (done_a.session, done_b.session)
}

fn bench(c: &mut Criterion) {
    let payload = vec![0x42u8; 1024];
    let mut g = c.benchmark_group("1 KiB message");
    g.throughput(Throughput::Bytes(payload.len() as u64));

    let raw = XChaCha20Poly1305::new(&[7u8; 32].into());
    g.bench_function("reference: raw XChaCha20-Poly1305 encrypt", |b| {
        b.iter(|| {
            raw.encrypt(XNonce::from_slice(&[0; 24]), black_box(payload.as_slice()))
                .unwrap()
        })
    });

    let ietf = ChaCha20Poly1305::new(&[7u8; 32].into());
    g.bench_function("reference: raw ChaCha20-Poly1305 encrypt", |b| {
        b.iter(|| {
            ietf.encrypt(Nonce::from_slice(&[0; 12]), black_box(payload.as_slice()))
                .unwrap()
        })
    });
    let sealed = ietf
        .encrypt(Nonce::from_slice(&[0; 12]), payload.as_slice())
        .unwrap();
    g.bench_function("reference: raw ChaCha20-Poly1305 encrypt + decrypt", |b| {
        b.iter(|| {
            let c = ietf
                .encrypt(Nonce::from_slice(&[0; 12]), black_box(payload.as_slice()))
                .unwrap();
            black_box(c);
            ietf.decrypt(Nonce::from_slice(&[0; 12]), black_box(sealed.as_slice()))
                .unwrap()
        })
    });

    // Seal on one side, open on the other, so chains and re-keys advance as
    // in a real chat (a re-key every 100 messages is included).
    let (mut a, mut b) = session_pair();
    g.bench_function("secret session: seal + open", |bench| {
        bench.iter(|| {
            for f in a.seal(black_box(&payload), 0, [5; 32]).unwrap() {
                for r in b.open(&f, 0, [6; 32]).unwrap().reply {
                    a.open(&r, 0, [0; 32]).unwrap();
                }
            }
        })
    });
    let (mut a, _) = session_pair();
    g.bench_function("secret session: seal only", |bench| {
        bench.iter(|| a.seal(black_box(&payload), 0, [5; 32]).unwrap())
    });
    g.finish();

    c.bench_function(
        "secret handshake (Noise XX + identity proofs, both sides)",
        |b| b.iter(session_pair),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
