//! The cloud-chat log store: appends with group commit, and the sequential
//! scan a catching-up replica is served from, each next to the raw file
//! operation on the same bytes in the same run.
//!
//!     cargo bench -p tern-node --bench segments

use std::{
    fs::{File, OpenOptions},
    hint::black_box,
    io::{Read, Write},
};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tern_node::segments::{Key, SegmentLog};

const BATCH: usize = 256;
const VALUE: usize = 1024;

fn key(i: u64) -> Key {
    *blake3::hash(&i.to_le_bytes()).as_bytes()
}

fn appends(c: &mut Criterion) {
    let value = vec![0x5au8; VALUE];
    let mut g = c.benchmark_group("append 256 × 1 KiB, one sync");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(30);

    let tmp = tempfile::tempdir().unwrap();
    let mut raw = OpenOptions::new()
        .create(true)
        .append(true)
        .open(tmp.path().join("raw"))
        .unwrap();
    let buf = vec![0x5au8; BATCH * (VALUE + 45)];
    g.bench_function("reference: raw write + fdatasync of the same bytes", |b| {
        b.iter(|| {
            raw.write_all(&buf).unwrap();
            raw.sync_data().unwrap();
        })
    });

    let mut log = SegmentLog::open(tmp.path().join("log")).unwrap();
    let mut n = 0u64;
    g.bench_function("segment log: append + sync", |b| {
        b.iter(|| {
            let keys: Vec<Key> = (0..BATCH as u64).map(|i| key(n + i)).collect();
            n += BATCH as u64;
            let batch: Vec<(Key, &[u8])> = keys.iter().map(|k| (*k, value.as_slice())).collect();
            log.append(&batch).unwrap();
            log.sync().unwrap();
        })
    });
    g.finish();
}

fn scans(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let value = vec![0xa5u8; VALUE];
    let mut log = SegmentLog::open(tmp.path().join("log")).unwrap();
    let total = 256 * 1024; // 256 MiB of records
    for chunk in 0..(total / BATCH) as u64 {
        let keys: Vec<Key> = (0..BATCH as u64).map(|i| key(chunk * 1000 + i)).collect();
        let batch: Vec<(Key, &[u8])> = keys.iter().map(|k| (*k, value.as_slice())).collect();
        log.append(&batch).unwrap();
    }
    log.sync().unwrap();
    let bytes = log.disk_bytes();
    let mut g = c.benchmark_group("read 256 MiB of 1 KiB records");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    let segs: Vec<_> = std::fs::read_dir(tmp.path().join("log"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    g.bench_function("reference: raw sequential read of the segment files", |b| {
        b.iter_batched(
            || vec![0u8; 1 << 20],
            |mut buf| {
                for p in &segs {
                    let mut f = File::open(p).unwrap();
                    while f.read(&mut buf).unwrap() > 0 {}
                }
                black_box(buf)
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("segment log: scan (parse and check every record)", |b| {
        b.iter(|| {
            let mut n = 0usize;
            log.scan(|_, v| n += v.len()).unwrap();
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, appends, scans);
criterion_main!(benches);
