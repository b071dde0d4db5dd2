//! A node as a storage peer for cloud chats, driven over real libp2p by a
//! member device built from `tern-protocol`: the hosting policy, the quota,
//! forged entries, durability across SIGKILL, and no plaintext on disk.

mod support;

use ed25519_dalek::SigningKey;
use libp2p::{Multiaddr, PeerId};
use support::*;
use tern_node::cloud::wire::{PushResult, StoreRequest, StoreResponse};
use tern_protocol::{
    AccountKeypair, DevicePublicKey,
    cloud::{ChatId, ChatLog, ChatMember, Draft, Entry, SyncRequest},
};

type Client = RecordClient<StoreRequest, StoreResponse>;

async fn client(target: Multiaddr) -> (Client, PeerId) {
    let identity = libp2p::identity::Keypair::generate_ed25519();
    record_client(identity, "/tern/store/1", target).await
}

async fn ask_store(swarm: &mut Client, peer: PeerId, request: StoreRequest) -> StoreResponse {
    ask(swarm, peer, request)
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"))
}

fn push(entries: &[Entry]) -> StoreRequest {
    StoreRequest::Push {
        entries: entries.to_vec(),
    }
}

fn results(r: StoreResponse) -> Vec<PushResult> {
    match r {
        StoreResponse::Pushed { results } => results,
        other => panic!("expected push results, got {other:?}"),
    }
}

struct Member {
    account: AccountKeypair,
    member: ChatMember,
    log: ChatLog,
    n: u8,
}

const CHAT: ChatId = ChatId([42; 16]);

impl Member {
    fn new(seed: u8) -> Self {
        let account = AccountKeypair::from_secret_bytes(&[seed; 32]);
        let key = SigningKey::from_bytes(&[seed ^ 0x55; 32]);
        let public = DevicePublicKey::from_bytes(key.verifying_key().to_bytes()).unwrap();
        let cert = account.certify(public, "phone", 1).unwrap();
        let member = ChatMember::for_account(&account, key, cert).unwrap();
        Self {
            account,
            member,
            log: ChatLog::new(CHAT),
            n: 0,
        }
    }

    fn random(&mut self) -> [u8; 32] {
        self.n = self.n.wrapping_add(1);
        *blake3::hash(&[self.n, 7]).as_bytes()
    }

    fn create_with(&mut self, other: &Member) -> Entry {
        let r = self.random();
        let g = self
            .member
            .create(
                CHAT,
                &[(other.account.id(), other.member.encryption_key())],
                vec![],
                None,
                r,
            )
            .unwrap();
        self.log.insert(g.clone()).unwrap();
        g
    }

    fn say(&mut self, text: &str) -> Entry {
        let r = self.random();
        let e = self
            .member
            .compose(
                &self.log,
                Draft::Text {
                    text: text.into(),
                    reply_to: None,
                },
                r,
            )
            .unwrap();
        self.log.insert(e.clone()).unwrap();
        e
    }
}

#[test]
fn a_storage_peer_hosts_only_whom_it_agreed_to_and_loses_nothing_it_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("storage");
    init(&dir, "community-storage");
    let node = NodeProcess::start(&dir, &[LOOPBACK, &["--storage-quota-mib", "1"]].concat());
    let target: Multiaddr = node.tcp_addr().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    let (mut alice, bob) = (Member::new(1), Member::new(2));
    let genesis = alice.create_with(&bob);
    let first: Vec<Entry> = std::iter::once(genesis)
        .chain((0..20).map(|i| alice.say(&format!("plaintext-marker-{i}"))))
        .collect();

    // Not agreed to: a clear refusal, and nothing kept.
    let (mut c, peer) = rt.block_on(client(target.clone()));
    let refused = results(rt.block_on(ask_store(&mut c, peer, push(&first))));
    assert_eq!(refused.len(), first.len());
    match &refused[0] {
        PushResult::Refused(why) => assert!(why.contains("tern host allow"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(
        std::fs::read_dir(dir.join("replicas"))
            .unwrap()
            .next()
            .is_none()
    );

    // The operator agrees: stored, each acknowledged once it is on disk.
    let out = tern(&dir, &["host", "allow", &alice.account.id().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = results(rt.block_on(ask_store(&mut c, peer, push(&first))));
    assert!(
        stored.iter().all(|r| *r == PushResult::Stored),
        "{stored:?}"
    );
    // Replayed: nothing new.
    let again = results(rt.block_on(ask_store(&mut c, peer, push(&first[5..8]))));
    assert!(
        again.iter().all(|r| *r == PushResult::Duplicate),
        "{again:?}"
    );
    // Forged: rejected with its reason, and the node keeps serving.
    let mut forged = alice.say("forged-later");
    forged.header.signature[3] ^= 0x40;
    let mut altered = alice.say("altered-later");
    if let Some(b) = altered.body.as_mut() {
        b.ciphertext[0] ^= 1;
    }
    let bad = results(rt.block_on(ask_store(&mut c, peer, push(&[forged, altered]))));
    assert!(
        bad.iter().all(|r| matches!(r, PushResult::Rejected(_))),
        "{bad:?}"
    );
    // (The two were inserted into Alice's own log; start a clean branch.)
    let mut fresh = Member::new(1);
    fresh.log = ChatLog::new(CHAT);
    for e in &first {
        fresh.log.insert(e.clone()).unwrap();
    }

    // Storage peers hold ciphertext only.
    for i in 0..20 {
        assert!(files_containing(&dir, format!("plaintext-marker-{i}").as_bytes()).is_empty());
    }

    // Acknowledged, then SIGKILL: all of it is there after a restart.
    let more: Vec<Entry> = (0..50)
        .map(|i| fresh.say(&format!("before the kill {i}")))
        .collect();
    let acked = results(rt.block_on(ask_store(&mut c, peer, push(&more))));
    assert!(acked.iter().all(|r| *r == PushResult::Stored), "{acked:?}");
    drop(c);
    kill9(node.pid());
    drop(node);
    let node = NodeProcess::start(&dir, &[LOOPBACK, &["--storage-quota-mib", "1"]].concat());
    let target: Multiaddr = node.tcp_addr().parse().unwrap();
    let (mut c, peer) = rt.block_on(client(target));
    let empty = ChatLog::new(CHAT);
    let mut got = 0;
    let mut request = SyncRequest::for_log(&empty);
    let mut synced = ChatLog::new(CHAT);
    loop {
        let StoreResponse::Synced(batch) =
            rt.block_on(ask_store(&mut c, peer, StoreRequest::Sync(request)))
        else {
            panic!("expected a sync batch");
        };
        for e in batch.entries {
            synced.insert(e).unwrap();
            got += 1;
        }
        if !batch.more {
            break;
        }
        request = SyncRequest::for_log(&synced);
    }
    assert_eq!(got, 1 + 20 + 50, "acknowledged entries lost");
    assert!(tern_protocol::cloud::in_sync(
        &tern_protocol::cloud::ChatSummary::of(&synced),
        &tern_protocol::cloud::ChatSummary::of(&fresh.log)
    ));

    // A full quota is a clear error, not a crash.
    let mut quota_hit = None;
    for round in 0..20 {
        let big: Vec<Entry> = (0..40)
            .map(|i| fresh.say(&format!("{round}-{i}-{}", "q".repeat(3000))))
            .collect();
        let r = results(rt.block_on(ask_store(&mut c, peer, push(&big))));
        if let Some(PushResult::Refused(why)) =
            r.iter().find(|r| matches!(r, PushResult::Refused(_)))
        {
            quota_hit = Some(why.clone());
            break;
        }
    }
    let why = quota_hit.expect("a 1 MiB quota was never reached");
    assert!(why.contains("quota"), "{why}");
    // Still serving: what it holds can still be synced.
    let StoreResponse::Synced(batch) = rt.block_on(ask_store(
        &mut c,
        peer,
        StoreRequest::Sync(SyncRequest::for_log(&ChatLog::new(CHAT))),
    )) else {
        panic!("the storage peer stopped serving after its quota filled");
    };
    assert!(!batch.entries.is_empty());
    assert!(tern(&dir, &["status", "--json"]).status.success());
}
