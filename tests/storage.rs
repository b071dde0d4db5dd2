//! A node as a storage peer for cloud chats, driven over real libp2p by a
//! member device built from `tern-protocol`: the hosting policy, the quota,
//! forged entries, outsiders, forks, unauthorised purges and removed
//! members, durability across SIGKILL, and no plaintext on disk.

mod support;

use ed25519_dalek::SigningKey;
use libp2p::{Multiaddr, PeerId};
use support::*;
use tern_node::cloud::wire::{PushResult, StoreRequest, StoreResponse};
use tern_protocol::{
    AccountKeypair, DeviceCertificate, DevicePublicKey,
    cloud::{ChatId, ChatLog, ChatMember, Draft, Entry, EntryHash, EntryKind, SyncRequest},
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
    seed: u8,
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
            seed,
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
        g.into_entry()
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
        e.into_entry()
    }

    /// This member's device key and certificate, to sign entries by hand.
    fn device(&self) -> (SigningKey, DeviceCertificate) {
        let key = SigningKey::from_bytes(&[self.seed ^ 0x55; 32]);
        let public = DevicePublicKey::from_bytes(key.verifying_key().to_bytes()).unwrap();
        (key, self.account.certify(public, "phone", 1).unwrap())
    }

    /// `entry`, re-written as if this member had written it on top of
    /// `parents`, and signed with this member's device key.
    fn resign(&self, entry: &Entry, log: &ChatLog, parents: Vec<EntryHash>) -> Entry {
        let (key, cert) = self.device();
        let mut header = entry.header.header.clone();
        header.seq = log.next_seq(&cert.device);
        header.lamport = parents
            .iter()
            .filter_map(|p| log.lamport(p))
            .max()
            .unwrap_or(0)
            + 1;
        header.author = cert.into();
        header.parents = parents;
        Entry {
            header: header.sign(&key),
            body: entry.body.clone(),
        }
    }
}

fn insert_all(log: &mut ChatLog, entries: &[Entry]) {
    for e in entries {
        log.insert(e.clone()).unwrap();
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

#[test]
fn entries_that_break_the_rules_are_rejected_with_a_logged_reason_and_the_node_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("storage");
    init(&dir, "community-storage");
    let node = NodeProcess::start(&dir, &[LOOPBACK, &["--host-open"]].concat());
    let target: Multiaddr = node.tcp_addr().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut c, peer) = rt.block_on(client(target));
    let mut push_one = |e: &Entry| -> PushResult {
        results(rt.block_on(ask_store(&mut c, peer, push(std::slice::from_ref(e))))).remove(0)
    };

    // A group of three without admins: Alice, Bob and Carol.
    let (mut alice, mut bob, mut carol, dave) = (
        Member::new(11),
        Member::new(12),
        Member::new(13),
        Member::new(14),
    );
    let r = alice.random();
    let genesis = alice
        .member
        .create(
            CHAT,
            &[
                (bob.account.id(), bob.member.encryption_key()),
                (carol.account.id(), carol.member.encryption_key()),
            ],
            vec![],
            None,
            r,
        )
        .unwrap()
        .into_entry();
    alice.log.insert(genesis.clone()).unwrap();
    let hello = alice.say("hello group");
    for e in [&genesis, &hello] {
        assert_eq!(push_one(e), PushResult::Stored);
    }
    insert_all(&mut bob.log, &[genesis.clone(), hello.clone()]);
    insert_all(&mut carol.log, &[genesis.clone(), hello.clone()]);
    let mut reasons = Vec::new();
    let mut rejected = |r: PushResult, what: &str| match r {
        PushResult::Rejected(why) => reasons.push(why),
        other => panic!("{what}: expected a rejection, got {other:?}"),
    };

    // Dave, who is not a member, signs a copy of Alice's message as his.
    let outsider = dave.resign(&hello, &alice.log, alice.log.heads());
    rejected(push_one(&outsider), "entry from a non-member");

    // Bob forks his own history: two different entries with one seq.
    let mut fork_base = ChatLog::new(CHAT);
    insert_all(&mut fork_base, &[genesis.clone(), hello.clone()]);
    let first = bob.say("first version");
    let second = {
        let r = bob.random();
        bob.member
            .compose(
                &fork_base,
                Draft::Text {
                    text: "second version".into(),
                    reply_to: None,
                },
                r,
            )
            .unwrap()
            .into_entry()
    };
    fork_base.insert(second.clone()).unwrap();
    assert_eq!(push_one(&first), PushResult::Stored);
    rejected(push_one(&second), "a fork by a member");

    // Carol may not purge Alice's message in a group without admins.
    let purge = {
        let (key, cert) = carol.device();
        let heads = carol.log.heads();
        let header = tern_protocol::cloud::EntryHeader {
            chat: CHAT,
            seq: carol.log.next_seq(&cert.device),
            lamport: heads
                .iter()
                .filter_map(|p| carol.log.lamport(p))
                .max()
                .unwrap()
                + 1,
            author: cert.into(),
            parents: heads,
            epoch: 0,
            kind: EntryKind::Purge {
                targets: vec![hello.hash()],
            },
            body_hash: None,
        };
        Entry {
            header: header.sign(&key),
            body: None,
        }
    };
    rejected(push_one(&purge), "a purge by someone not allowed");

    // Alice removes Carol; Carol then writes on top of her removal.
    alice.log.insert(first.clone()).unwrap();
    let r = alice.random();
    let removal = alice
        .member
        .compose(
            &alice.log,
            Draft::RemoveMember {
                account: carol.account.id(),
            },
            r,
        )
        .unwrap()
        .into_entry();
    alice.log.insert(removal.clone()).unwrap();
    assert_eq!(push_one(&removal), PushResult::Stored);
    insert_all(&mut carol.log, &[first.clone(), removal.clone()]);
    let mut late = carol.resign(&hello, &carol.log, vec![removal.hash()]);
    late.header = {
        let mut h = late.header.header.clone();
        h.epoch = 1;
        h.sign(&carol.device().0)
    };
    rejected(push_one(&late), "an entry from a removed member");

    // Every rejection says why, and the node logged it.
    assert_eq!(reasons.len(), 4);
    assert!(reasons[0].contains("member"), "{}", reasons[0]);
    assert!(reasons[1].to_lowercase().contains("fork"), "{}", reasons[1]);
    assert!(reasons[2].contains("delete"), "{}", reasons[2]);
    assert!(
        reasons[3].contains("removed") || reasons[3].contains("member"),
        "{}",
        reasons[3]
    );
    let log = node.log();
    for why in &reasons {
        assert!(
            log.contains(&format!("rejected a cloud-chat entry: {why}")),
            "not logged: {why}"
        );
    }

    // The node keeps serving: it still takes Alice's next message, and
    // serves the chat without any of the rejected entries.
    let next = alice.say("still here");
    assert_eq!(push_one(&next), PushResult::Stored);
    let StoreResponse::Synced(batch) = rt.block_on(ask_store(
        &mut c,
        peer,
        StoreRequest::Sync(SyncRequest::for_log(&ChatLog::new(CHAT))),
    )) else {
        panic!("the node stopped serving");
    };
    let held: Vec<_> = batch.entries.iter().map(Entry::hash).collect();
    assert_eq!(held.len(), 5, "genesis, hello, first, removal, still here");
    for bad in [&outsider, &second, &purge, &late] {
        assert!(!held.contains(&bad.hash()));
    }
}
