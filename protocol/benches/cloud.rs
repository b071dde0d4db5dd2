//! What a storage peer spends verifying cloud-chat entries, next to the raw
//! Ed25519 verification each entry needs, in the same run; entry
//! signatures checked one by one against in batches; and entries signed
//! one by one against in runs, by their author and by a storage peer.
//!
//!     cargo bench -p tern-protocol --bench cloud

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::{Signer, SigningKey, Verifier};
use tern_protocol::{
    AccountKeypair, DevicePublicKey,
    cloud::{ChatId, ChatLog, ChatMember, Draft, Entry, EntryHash},
};

const CHAT: ChatId = ChatId([7; 16]);
const N: usize = 1000;
/// Entries per signature where they are signed in runs (a busy node's
/// round with 64 sends in flight).
const RUN: usize = 64;

fn member(seed: u8) -> (AccountKeypair, ChatMember) {
    let account = AccountKeypair::from_secret_bytes(&[seed; 32]);
    let key = SigningKey::from_bytes(&[seed ^ 0x33; 32]);
    let public = DevicePublicKey::from_bytes(key.verifying_key().to_bytes()).unwrap();
    let cert = account.certify(public, "bench", 1).unwrap();
    let member = ChatMember::for_account(&account, key, cert).unwrap();
    (account, member)
}

fn text() -> Draft {
    Draft::Text {
        text: "x".repeat(1000),
        reply_to: None,
    }
}

fn random(i: usize) -> [u8; 32] {
    let mut random = [0u8; 32];
    random[..8].copy_from_slice(&(i as u64).to_le_bytes());
    random
}

/// A chat's first N messages of 1 KiB, as a member device wrote them:
/// each signed alone, or (`run`) signed `run` at a time.
fn history(run: Option<usize>) -> Vec<Entry> {
    let (log, hashes) = author(run);
    hashes.iter().map(|h| log.get(h).unwrap().clone()).collect()
}

/// The author's side of [`history`]: its log and the entries' hashes.
fn author(run: Option<usize>) -> (ChatLog, Vec<EntryHash>) {
    let (_, mut alice) = member(1);
    let (bob_account, bob) = member(2);
    let mut log = ChatLog::new(CHAT);
    let genesis = alice
        .create(
            CHAT,
            &[(bob_account.id(), bob.encryption_key())],
            vec![],
            None,
            [1; 32],
        )
        .unwrap();
    log.insert_composed(genesis.clone()).unwrap();
    let mut hashes = vec![genesis.hash()];
    for i in 0..N {
        let e = match run {
            None => alice.compose(&log, text(), random(i)),
            Some(_) => alice.compose_unsigned(&log, text(), random(i)),
        };
        hashes.push(e.as_ref().unwrap().hash());
        log.insert_composed(e.unwrap()).unwrap();
        if run.is_some_and(|run| (i + 1) % run == 0 || i + 1 == N) {
            alice.sign_composed(&mut log);
        }
    }
    (log, hashes)
}

/// A storage peer's log, every entry inserted (and so verified) one by one.
fn insert_all(entries: Vec<Entry>) -> ChatLog {
    let mut log = ChatLog::new(CHAT);
    for e in entries {
        log.insert(e).unwrap();
    }
    log
}

/// Checks the entries' signatures `size` at a time, as pushes bring them.
fn check_in_batches(mut entries: Vec<Entry>, size: usize) {
    while !entries.is_empty() {
        let rest = entries.split_off(entries.len().min(size));
        assert!(Entry::precheck_many(entries).iter().all(Result::is_ok));
        entries = rest;
    }
}

fn bench(c: &mut Criterion) {
    let entries = history(None);
    let mut g = c.benchmark_group("storage peer: verify 1000 entries of 1 KiB");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);

    let key = SigningKey::from_bytes(&[9; 32]);
    let verifying = key.verifying_key();
    let msg = vec![0u8; 200];
    let sig = key.sign(&msg);
    g.bench_function("reference: raw Ed25519 verify × 1000", |b| {
        b.iter(|| {
            for _ in 0..N {
                verifying.verify(black_box(&msg), &sig).unwrap();
            }
        })
    });
    g.bench_function(
        "ChatLog::insert × 1000 (signature, chain, membership, body hash)",
        |b| b.iter_batched(|| entries.clone(), insert_all, BatchSize::LargeInput),
    );
    g.bench_function("Entry::precheck × 1000, one by one", |b| {
        b.iter_batched(
            || entries[1..].to_vec(),
            |entries| {
                for e in entries {
                    assert!(e.precheck().is_ok());
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("Entry::precheck_many, 1000 in one batch", |b| {
        b.iter_batched(
            || entries[1..].to_vec(),
            |entries| {
                assert!(Entry::precheck_many(entries).iter().all(Result::is_ok));
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("Entry::precheck_many, 1000 in batches of 16", |b| {
        b.iter_batched(
            || entries[1..].to_vec(),
            |entries| check_in_batches(entries, 16),
            BatchSize::LargeInput,
        )
    });
    g.finish();

    let runs = history(Some(RUN));
    let mut g = c.benchmark_group("entries signed in runs of 64, 1000 of 1 KiB");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    g.bench_function("author: compose + keep, each signed alone", |b| {
        b.iter(|| author(None))
    });
    g.bench_function("author: compose + keep, signed in runs of 64", |b| {
        b.iter(|| author(Some(RUN)))
    });
    for (name, entries) in [("each signed alone", &entries), ("runs of 64", &runs)] {
        g.bench_function(
            format!("storage peer: ChatLog::insert × 1000, {name}"),
            |b| b.iter_batched(|| entries.clone(), insert_all, BatchSize::LargeInput),
        );
        g.bench_function(
            format!("storage peer: precheck_many in batches of 64, {name}"),
            |b| {
                b.iter_batched(
                    || entries[1..].to_vec(),
                    |entries| check_in_batches(entries, RUN),
                    BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
