//! Whole-chat scenarios: several member devices and a storage peer, each
//! with its own log, driven entry by entry and synced through the same
//! functions a node uses.

use ed25519_dalek::SigningKey;

use super::{
    AccountEncryptionKey, ChatHistory, ChatId, ChatLog, ChatMember, ChatSummary, Composed, Content,
    Draft, Entry, EntryBody, EntryError, EntryHash, EntryHeader, EntryKind, LogError, LogOutput,
    MemberError, SyncRequest,
    account::{MAX_ADDR_LEN, MAX_STORAGE_PEERS, StoragePeer},
    in_sync, respond,
};
use crate::{
    codec::{DecodeError, Record},
    identity::{AccountKeypair, DeviceCertificate, DevicePublicKey},
};

pub(crate) const CHAT: ChatId = ChatId([42; 16]);

/// Deterministic "random" bytes for tests.
pub(crate) struct Dice(u64);

impl Dice {
    pub(crate) fn new() -> Self {
        Self(0)
    }

    pub(crate) fn roll(&mut self) -> [u8; 32] {
        self.0 += 1;
        blake3::derive_key("tern test dice", &self.0.to_le_bytes())
    }
}

pub(crate) fn account(seed: u8) -> AccountKeypair {
    AccountKeypair::from_secret_bytes(&[seed; 32])
}

/// One device of an account, with its own copy of the chat log.
pub(crate) struct Device {
    pub key: SigningKey,
    pub cert: DeviceCertificate,
    pub member: ChatMember,
    pub log: ChatLog,
}

impl Device {
    pub(crate) fn new(account_seed: u8, device_seed: u8) -> Self {
        let account = account(account_seed);
        let key = SigningKey::from_bytes(&[device_seed; 32]);
        let public = DevicePublicKey::from_bytes(key.verifying_key().to_bytes()).unwrap();
        let cert = account.certify(public, "test device", 1).unwrap();
        let member = ChatMember::for_account(&account, key.clone(), cert.clone()).unwrap();
        Self {
            key,
            cert,
            member,
            log: ChatLog::new(CHAT),
        }
    }

    /// Composes and inserts into this device's own log.
    pub(crate) fn write(&mut self, draft: Draft, dice: &mut Dice) -> Entry {
        let entry = self.member.compose(&self.log, draft, dice.roll()).unwrap();
        self.log.insert_composed(entry.clone()).unwrap();
        entry.into_entry()
    }

    /// Takes a fresh account key at `generation` and writes the key change
    /// revoking `revoked`, sealed to `keep`.
    pub(crate) fn revoke(
        &mut self,
        generation: u32,
        keep: Vec<DevicePublicKey>,
        revoked: Vec<DevicePublicKey>,
        dice: &mut Dice,
    ) -> Entry {
        let key = AccountEncryptionKey::generate(&dice.roll());
        assert!(self.member.add_encryption_key(generation, key));
        self.write(Draft::AccountKey { keep, revoked }, dice)
    }

    pub(crate) fn compose(&mut self, draft: Draft, dice: &mut Dice) -> Result<Entry, MemberError> {
        self.member
            .compose(&self.log, draft, dice.roll())
            .map(Composed::into_entry)
    }

    pub(crate) fn say(&mut self, text: &str, dice: &mut Dice) -> Entry {
        self.write(
            Draft::Text {
                text: text.into(),
                reply_to: None,
            },
            dice,
        )
    }

    pub(crate) fn decrypt(&mut self, hash: &EntryHash) -> Result<Content, MemberError> {
        self.member.decrypt(&self.log, hash)
    }

    pub(crate) fn history(&mut self) -> ChatHistory {
        self.member.history(&self.log)
    }

    pub(crate) fn texts(&mut self) -> Vec<String> {
        self.history()
            .messages
            .into_iter()
            .map(|m| m.text)
            .collect()
    }
}

/// Alice (creator), Bob and, for groups, Carol; genesis in every log.
/// How many entries a log's outputs ask to persist.
pub(crate) fn persisted(outputs: &[LogOutput]) -> usize {
    outputs
        .iter()
        .filter(|o| matches!(o, LogOutput::Persist { .. }))
        .count()
}

pub(crate) fn chat(with_carol: bool, admins: bool, dice: &mut Dice) -> Vec<Device> {
    let mut devices = vec![Device::new(1, 11), Device::new(2, 12)];
    if with_carol {
        devices.push(Device::new(3, 13));
    }
    let others: Vec<_> = devices[1..]
        .iter()
        .map(|d| (d.member.account(), d.member.encryption_key()))
        .collect();
    let admins = if admins {
        vec![devices[0].member.account()]
    } else {
        vec![]
    };
    let genesis = devices[0]
        .member
        .create(CHAT, &others, admins, Some("the chat"), dice.roll())
        .unwrap();
    for device in &mut devices {
        device.log.insert(genesis.clone()).unwrap();
    }
    devices
}

/// Runs sync rounds from `from` into `to` until `to` lacks nothing.
pub(crate) fn pull(to: &mut ChatLog, from: &ChatLog) -> usize {
    let mut inserted = 0;
    for _ in 0..10_000 {
        let request = SyncRequest::decode(&SyncRequest::for_log(to).encode()).unwrap();
        let response = respond(from, &request, Default::default()).unwrap();
        let response = super::SyncResponse::decode(&response.encode()).unwrap();
        for entry in response.entries {
            // An entry that waited for its parents may come again: not
            // an error for a sync driver.
            match to.insert(entry) {
                Ok(_) => inserted += 1,
                Err(LogError::Duplicate(_)) => {}
                Err(e) => panic!("sync delivered an invalid entry: {e}"),
            }
        }
        if !response.more {
            return inserted;
        }
    }
    panic!("sync did not finish");
}

/// Syncs device `to`'s log from device `from`'s.
pub(crate) fn sync_devices(devices: &mut [Device], to: usize, from: usize) {
    assert_ne!(to, from);
    if to < from {
        let (a, b) = devices.split_at_mut(from);
        pull(&mut a[to].log, &b[0].log);
    } else {
        let (a, b) = devices.split_at_mut(to);
        pull(&mut b[0].log, &a[from].log);
    }
}

/// An entry built by hand on top of `log`'s heads, signed by `key`: for
/// entries no honest `ChatMember` would compose.
pub(crate) fn hand_made(
    log: &ChatLog,
    key: &SigningKey,
    cert: &DeviceCertificate,
    kind: EntryKind,
    body: Option<EntryBody>,
) -> Entry {
    let mut parents = log.heads();
    if let Some(own) = log.last_of_device(&cert.device)
        && !parents.contains(&own)
    {
        parents.push(own);
    }
    let lamport = parents.iter().filter_map(|p| log.lamport(p)).max().unwrap() + 1;
    let header = EntryHeader {
        chat: log.chat(),
        author: cert.clone().into(),
        seq: log.next_seq(&cert.device),
        lamport,
        epoch: log.membership_for_parents(&parents).epoch(),
        parents,
        kind,
        body_hash: body.as_ref().map(|b| b.hash()),
    };
    Entry {
        header: header.sign(key),
        body,
    }
}

/// Everything observable about a log, to show a refused entry changed
/// nothing.
fn snapshot(log: &ChatLog) -> (usize, Vec<EntryHash>, ChatSummary, usize, Vec<EntryHash>) {
    (
        log.len(),
        log.heads(),
        ChatSummary::of(log),
        log.pending_count(),
        log.in_display_order().map(|(h, _)| h).collect(),
    )
}

fn assert_refused(log: &mut ChatLog, entry: Entry, expected: LogError) {
    let before = snapshot(log);
    assert_eq!(log.insert(entry), Err(expected));
    assert_eq!(snapshot(log), before, "a refused entry changed the log");
}

#[test]
fn concurrent_writers_converge_to_one_display_order() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let (a, b) = devices.split_at_mut(1);
    let (alice, bob) = (&mut a[0], &mut b[0]);

    for round in 0..4 {
        // Both write without seeing each other…
        for i in 0..5 {
            alice.say(&format!("alice {round}.{i}"), &mut dice);
            bob.say(&format!("bob {round}.{i}"), &mut dice);
        }
        // …then sync in both directions.
        pull(&mut alice.log, &bob.log);
        pull(&mut bob.log, &alice.log);
        assert!(in_sync(
            &ChatSummary::of(&alice.log),
            &ChatSummary::of(&bob.log)
        ));
    }
    let order_a: Vec<_> = alice.log.in_display_order().map(|(h, _)| h).collect();
    let order_b: Vec<_> = bob.log.in_display_order().map(|(h, _)| h).collect();
    assert_eq!(order_a, order_b);
    assert_eq!(alice.history(), bob.history());
    let texts = alice.texts();
    assert_eq!(texts.len(), 40);
    // Each writer's own messages keep their order.
    let alice_texts: Vec<_> = texts.iter().filter(|t| t.starts_with("alice")).collect();
    let mut sorted = alice_texts.clone();
    sorted.sort();
    assert_eq!(alice_texts, sorted);
    assert_eq!(alice.history().title.as_deref(), Some("the chat"));
}

#[test]
fn forged_altered_replayed_and_outsider_entries_are_refused() {
    let mut dice = Dice::new();
    let mut devices = chat(true, false, &mut dice);
    let good = devices[0].say("hello", &mut dice);
    let proper = devices[0]
        .compose(
            Draft::Text {
                text: "next".into(),
                reply_to: None,
            },
            &mut dice,
        )
        .unwrap();
    let log = &mut devices[1].log;
    log.insert(good.clone()).unwrap();

    // Forged: signed by a key that is not the certified device's.
    let mut forged = proper.clone();
    forged.header = proper
        .header
        .header
        .clone()
        .sign(&SigningKey::from_bytes(&[99; 32]));
    assert_refused(log, forged, LogError::BadSignature);

    // Altered header: a field changed after signing.
    let mut altered = proper.clone();
    altered.header.header.lamport += 1;
    assert_refused(log, altered, LogError::BadSignature);

    // Altered certificate inside the header.
    let mut altered_cert = proper.clone();
    std::sync::Arc::make_mut(&mut altered_cert.header.header.author).name = "evil".into();
    assert_refused(log, altered_cert, LogError::BadCertificate);

    // Altered body: no longer matches the signed body hash.
    let mut altered_body = proper.clone();
    altered_body.body.as_mut().unwrap().ciphertext[3] ^= 0x40;
    assert_refused(log, altered_body, LogError::BodyMismatch);

    // Replay.
    assert_refused(log, good.clone(), LogError::Duplicate(good.hash()));

    // An outsider with a valid certificate of its own account.
    let mallory = Device::new(9, 19);
    let body = devices[0].log.get(&good.hash()).unwrap().body.clone();
    let outsider = hand_made(
        &devices[1].log,
        &mallory.key,
        &mallory.cert,
        EntryKind::Message,
        body,
    );
    let log = &mut devices[1].log;
    assert_refused(log, outsider, LogError::NotMember(mallory.member.account()));

    // Reordered: an entry that skips the device's previous one.
    let mut skipping = proper.header.header.clone();
    skipping.seq += 1;
    let skipping = Entry {
        header: skipping.sign(&devices[0].key),
        body: proper.body.clone(),
    };
    assert!(matches!(
        devices[1].log.insert(skipping),
        Err(LogError::SeqNotChained { .. })
    ));

    // Entry for another chat.
    let mut elsewhere = proper.header.header.clone();
    elsewhere.chat = ChatId([1; 16]);
    let elsewhere = Entry {
        header: elsewhere.sign(&devices[0].key),
        body: proper.body.clone(),
    };
    assert!(matches!(
        devices[1].log.insert(elsewhere),
        Err(LogError::WrongChat { .. })
    ));

    // The proper one still goes in after all that.
    devices[1].log.insert(proper).unwrap();
    assert_eq!(devices[1].texts(), ["hello", "next"]);
}

#[test]
fn a_fork_is_refused_and_kept_as_evidence() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let draft = |t: &str| Draft::Text {
        text: t.into(),
        reply_to: None,
    };
    let one = devices[0].compose(draft("one"), &mut dice).unwrap();
    let other = devices[0].compose(draft("other"), &mut dice).unwrap();
    assert_eq!(one.header.header.seq, other.header.header.seq);

    let device = devices[0].cert.device;
    let alice = devices[0].member.account();
    let log = &mut devices[1].log;
    log.insert(one).unwrap();
    // Seq 0 was the genesis.
    assert_refused(log, other.clone(), LogError::Fork { device, seq: 1 });
    let evidence = &log.fork_evidence()[0];
    assert_eq!(evidence.account(), alice);
    evidence.verify().unwrap();
    let decoded = super::ForkEvidence::decode(&evidence.encode()).unwrap();
    assert_eq!(&decoded, evidence);
    // Offered again: still refused, evidence not duplicated.
    assert!(log.insert(other).is_err());
    assert_eq!(log.fork_evidence().len(), 1);
}

#[test]
fn removal_rotates_the_key_and_the_removed_member_reads_nothing_after() {
    let mut dice = Dice::new();
    let mut devices = chat(true, false, &mut dice);
    devices[0].say("before", &mut dice);
    let carol_account = devices[2].member.account();
    let removal = devices[0].write(
        Draft::RemoveMember {
            account: carol_account,
        },
        &mut dice,
    );
    let after = devices[0].say("after", &mut dice);
    assert_eq!(
        devices[0]
            .log
            .get(&after.hash())
            .unwrap()
            .header
            .header
            .epoch,
        1
    );

    // Carol's device gets the whole log (a storage peer would serve it).
    sync_devices(&mut devices, 2, 0);
    sync_devices(&mut devices, 1, 0);
    let carol = &mut devices[2];
    assert_eq!(carol.texts(), ["before"]);
    assert_eq!(carol.history().unreadable, 1);
    assert_eq!(
        carol.member.decrypt(&carol.log, &after.hash()),
        Err(MemberError::NoKey)
    );
    // Every key Carol's account could ever unwrap fails on the new message.
    let carol_key = super::AccountEncryptionKey::derive(&account(3));
    let genesis = carol
        .log
        .get(&carol.log.genesis().unwrap())
        .unwrap()
        .clone();
    let EntryKind::Genesis { members, .. } = &genesis.header.header.kind else {
        panic!()
    };
    let old_key = members
        .iter()
        .find(|m| m.account == carol_account)
        .map(|m| carol_key.unwrap(&m.wrapped_key, CHAT, 0).unwrap())
        .unwrap();
    let context = super::BodyContext {
        chat: CHAT,
        epoch: 1,
        author: devices[0].cert.device,
    };
    let body = after.body.as_ref().unwrap();
    assert!(old_key.open_body(&context, body).is_err());
    let EntryKind::RemoveMember { grants, .. } = &removal.header.header.kind else {
        panic!()
    };
    assert!(grants.iter().all(|g| g.account != carol_account));
    for grant in grants {
        assert!(carol_key.unwrap(&grant.wrapped_key, CHAT, 1).is_err());
        assert!(carol_key.unwrap(&grant.wrapped_key, CHAT, 0).is_err());
    }
    // Bob, who stayed, reads everything.
    assert_eq!(devices[1].texts(), ["before", "after"]);

    // Carol can no longer write: her device refuses, and an entry made
    // by hand on top of her removal is refused by every log.
    let carol = &mut devices[2];
    assert_eq!(
        carol.member.compose(
            &carol.log,
            Draft::Text {
                text: "x".into(),
                reply_to: None
            },
            dice.roll()
        ),
        Err(MemberError::NotMember)
    );
    let late = hand_made(
        &carol.log,
        &carol.key,
        &carol.cert,
        EntryKind::Message,
        body.clone().into(),
    );
    assert_refused(
        &mut devices[0].log,
        late,
        LogError::RemovedMember(carol_account),
    );
}

#[test]
fn a_new_device_of_a_member_reads_the_whole_history() {
    let mut dice = Dice::new();
    let mut devices = chat(true, false, &mut dice);
    let mut storage = ChatLog::new(CHAT);
    for i in 0..5 {
        devices[0].say(&format!("a{i}"), &mut dice);
    }
    let carol = devices[2].member.account();
    devices[0].write(Draft::RemoveMember { account: carol }, &mut dice);
    for i in 0..5 {
        devices[0].say(&format!("b{i}"), &mut dice);
    }
    devices[0].write(Draft::Rekey, &mut dice);
    devices[0].say("last", &mut dice);
    pull(&mut storage, &devices[0].log);

    // Bob links a second device; his first is offline. Same account key.
    let mut bob_phone = Device::new(2, 22);
    assert_eq!(pull(&mut bob_phone.log, &storage), storage.len());
    let texts = bob_phone.texts();
    assert_eq!(texts.len(), 11);
    assert_eq!(texts.first().map(String::as_str), Some("a0"));
    assert_eq!(texts.last().map(String::as_str), Some("last"));
    assert_eq!(bob_phone.history().unreadable, 0);
    assert_eq!(bob_phone.history().title.as_deref(), Some("the chat"));
    // It writes too, continuing from seq 0 of its own device.
    let entry = bob_phone.say("from the phone", &mut dice);
    assert_eq!(entry.header.header.seq, 0);
    storage.insert(entry).unwrap();
}

#[test]
fn delete_for_everyone_erases_bodies_everywhere_and_leaves_no_mark() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let mut storage = ChatLog::new(CHAT);
    devices[0].say("keep", &mut dice);
    let doomed = devices[0].say("oops", &mut dice);
    let edit = devices[0].write(
        Draft::Edit {
            target: doomed.hash(),
            text: "oops, edited".into(),
        },
        &mut dice,
    );
    pull(&mut storage, &devices[0].log);
    pull(&mut devices[1].log, &storage);
    assert_eq!(devices[1].texts(), ["keep", "oops, edited"]);
    let doomed_ciphertext = doomed.body.clone().unwrap().ciphertext;

    // In a two-person chat either member may delete: Bob deletes Alice's.
    let purge = devices[1]
        .compose(
            Draft::Delete {
                target: doomed.hash(),
            },
            &mut dice,
        )
        .unwrap();
    let EntryKind::Purge { targets } = &purge.header.header.kind else {
        panic!()
    };
    assert_eq!(targets, &vec![doomed.hash(), edit.hash()]);
    let outputs = storage.insert(purge.clone()).unwrap();
    let erased: Vec<_> = outputs
        .iter()
        .filter_map(|o| match o {
            LogOutput::EraseBody { entry, .. } => Some(*entry),
            _ => None,
        })
        .collect();
    assert_eq!(erased, vec![doomed.hash(), edit.hash()]);
    assert!(matches!(outputs[0], LogOutput::Persist { .. }));

    // Nothing the storage peer would write still holds the ciphertext.
    let all: Vec<u8> = storage
        .in_display_order()
        .flat_map(|(_, e)| e.encode())
        .collect();
    assert!(
        !all.windows(doomed_ciphertext.len())
            .any(|w| w == doomed_ciphertext)
    );
    assert!(storage.get(&doomed.hash()).unwrap().body.is_none());

    for device in &mut devices {
        pull(&mut device.log, &storage);
        assert_eq!(device.texts(), ["keep"]);
        assert!(device.log.is_purged(&doomed.hash()));
        assert_eq!(device.history().unreadable, 0);
    }
    // A re-sent copy with the body does not bring it back.
    assert!(storage.insert(doomed).is_err());
    assert!(storage.missing_bodies().next().is_none());
}

#[test]
fn unauthorised_purge_is_refused() {
    let mut dice = Dice::new();
    let mut devices = chat(true, true, &mut dice);
    let alice_message = devices[0].say("mine", &mut dice);
    let bob_message = devices[1].say("bob's", &mut dice);
    sync_devices(&mut devices, 1, 0);
    sync_devices(&mut devices, 2, 0);
    sync_devices(&mut devices, 2, 1);

    // In a group Bob (no admin) may not delete Alice's message…
    assert_eq!(
        devices[1].compose(
            Draft::Delete {
                target: alice_message.hash()
            },
            &mut dice
        ),
        Err(MemberError::NotAllowedToDelete)
    );
    let bob = &devices[1];
    let purge = hand_made(
        &bob.log,
        &bob.key,
        &bob.cert,
        EntryKind::Purge {
            targets: vec![alice_message.hash()],
        },
        None,
    );
    assert_refused(
        &mut devices[2].log,
        purge,
        LogError::UnauthorisedPurge(alice_message.hash()),
    );
    // …nor something that is not a message.
    let genesis = devices[2].log.genesis().unwrap();
    let bob = &devices[1];
    let purge = hand_made(
        &bob.log,
        &bob.key,
        &bob.cert,
        EntryKind::Purge {
            targets: vec![genesis],
        },
        None,
    );
    assert_refused(
        &mut devices[2].log,
        purge,
        LogError::BadPurgeTarget(genesis),
    );
    // His own, yes; and Alice, the admin, any.
    let own = devices[1].write(
        Draft::Delete {
            target: bob_message.hash(),
        },
        &mut dice,
    );
    devices[2].log.insert(own).unwrap();
    let by_admin = devices[2].compose(
        Draft::Delete {
            target: alice_message.hash(),
        },
        &mut dice,
    );
    assert_eq!(by_admin, Err(MemberError::NotAllowedToDelete));
    sync_devices(&mut devices, 0, 2);
    let purge = devices[0].write(
        Draft::Delete {
            target: alice_message.hash(),
        },
        &mut dice,
    );
    devices[2].log.insert(purge).unwrap();
    assert!(devices[2].texts().is_empty());
}

#[test]
fn storage_peer_verifies_everything_and_reads_nothing() {
    let mut dice = Dice::new();
    let mut devices = chat(true, false, &mut dice);
    let mut storage = ChatLog::new(CHAT);
    let mut persisted: Vec<u8> = Vec::new();
    let secret_words = ["meet at noon", "the password is swordfish", "the chat"];
    devices[0].say(secret_words[0], &mut dice);
    devices[1].say(secret_words[1], &mut dice);
    sync_devices(&mut devices, 0, 1);
    devices[0].write(Draft::Read, &mut dice);
    let carol = devices[2].member.account();
    devices[0].write(Draft::RemoveMember { account: carol }, &mut dice);
    devices[0].say("after removal", &mut dice);

    let mut all: Vec<Entry> = devices[0]
        .log
        .in_display_order()
        .map(|(_, e)| e.clone())
        .collect();
    all.reverse(); // worst order: children before parents
    for entry in all {
        for output in storage.insert(entry).unwrap() {
            if let LogOutput::Persist { hash, record } = output {
                assert_eq!(hash, Entry::decode(&record).unwrap().hash());
                persisted.extend(record);
            }
        }
    }
    assert_eq!(storage.len(), devices[0].log.len());
    assert_eq!(storage.pending_count(), 0);
    assert!(in_sync(
        &ChatSummary::of(&storage),
        &ChatSummary::of(&devices[0].log)
    ));
    for word in secret_words {
        assert!(!persisted.windows(word.len()).any(|w| w == word.as_bytes()));
    }
    // The storage peer's own account is no member: it holds no key.
    let mut peer = Device::new(7, 17);
    peer.log = storage;
    let history = peer.history();
    assert!(history.messages.is_empty());
    assert!(history.title.is_none());
    assert!(history.unreadable >= 3);
}

#[test]
fn a_log_keeps_one_copy_of_each_certificate() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let a = devices[0].say("one", &mut dice);
    let b = devices[0].say("two", &mut dice);
    // As from the wire: every entry decoded with a certificate of its own.
    let mut storage = ChatLog::new(CHAT);
    let all: Vec<Entry> = devices[0]
        .log
        .in_display_order()
        .map(|(_, e)| Entry::decode(&e.encode()).unwrap())
        .collect();
    for e in all {
        storage.insert(e).unwrap();
    }
    let (x, y) = (
        storage.get(&a.hash()).unwrap(),
        storage.get(&b.hash()).unwrap(),
    );
    assert!(std::sync::Arc::ptr_eq(
        &x.header.header.author,
        &y.header.header.author
    ));
    assert_eq!(x.hash(), a.hash());
}

#[test]
fn a_storage_peer_cannot_tell_short_messages_apart_by_length() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let texts = [
        "ok",
        "yes",
        "see you at 8 by the old bridge",
        &"x".repeat(200),
    ];
    let sizes: Vec<usize> = texts
        .iter()
        .map(|t| {
            let e = devices[0].say(t, &mut dice);
            e.body.expect("a message has a body").ciphertext.len()
        })
        .collect();
    assert!(sizes.windows(2).all(|w| w[0] == w[1]), "{sizes:?}");
    // And the members read them as written.
    let history = devices[0].history();
    for t in texts {
        assert!(
            history.messages.iter().any(|m| m.text == t),
            "{t} is missing"
        );
    }
}

#[test]
fn only_the_signature_check_is_skipped_for_an_entry_composed_here() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let text = |t: &str| Draft::Text {
        text: t.into(),
        reply_to: None,
    };
    let alice = &mut devices[0];
    let one = alice
        .member
        .compose(&alice.log, text("one"), dice.roll())
        .unwrap();
    let other = alice
        .member
        .compose(&alice.log, text("other"), dice.roll())
        .unwrap();
    let first = one.entry().clone();
    // It carries its hash: the one every holder computes from its bytes,
    // and the one the author's log names it by.
    let named = one.hash();
    assert_eq!(named, Entry::decode(&first.encode()).unwrap().hash());
    alice.log.insert_composed(one).unwrap();
    assert_eq!(alice.log.get(&named), Some(&first));
    // Two entries at one seq: a fork, whoever composed them.
    let device = alice.cert.device;
    assert_eq!(
        alice.log.insert_composed(other),
        Err(LogError::Fork { device, seq: 1 })
    );
    // Another chat's log refuses it too.
    let elsewhere = alice
        .member
        .compose(&alice.log, text("two"), dice.roll())
        .unwrap();
    let mut other_chat = ChatLog::new(ChatId([7; 16]));
    assert!(matches!(
        other_chat.insert_composed(elsewhere),
        Err(LogError::WrongChat { .. })
    ));

    // An entry waiting for its parents had its signature checked when it
    // came: a forged child is refused at once, not parked.
    let parent = devices[0].say("parent", &mut dice);
    let mut child = devices[0].compose(text("child"), &mut dice).unwrap();
    child.header = child
        .header
        .header
        .clone()
        .sign(&SigningKey::from_bytes(&[99; 32]));
    let bob = &mut devices[1].log;
    bob.insert(first).unwrap();
    assert_refused(bob, child, LogError::BadSignature);
    assert_eq!(bob.pending_count(), 0);
    bob.insert(parent).unwrap();
    assert_eq!(bob.pending_count(), 0);
}

#[test]
fn out_of_order_entries_wait_for_their_parents() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let first = devices[0].say("1", &mut dice);
    let second = devices[0].say("2", &mut dice);
    let log = &mut devices[1].log;
    let outputs = log.insert(second.clone()).unwrap();
    assert_eq!(outputs, vec![LogOutput::Missing(vec![first.hash()])]);
    assert_eq!(log.len(), 1);
    let outputs = log.insert(first).unwrap();
    let persisted = persisted(&outputs);
    assert_eq!(persisted, 2);
    assert_eq!(log.pending_count(), 0);
    assert!(log.contains(&second.hash()));
}

#[test]
fn edits_receipts_and_replies() {
    let mut dice = Dice::new();
    let mut devices = chat(true, false, &mut dice);
    let question = devices[0].say("lunch?", &mut dice);
    sync_devices(&mut devices, 1, 0);
    let answer = devices[1].write(
        Draft::Text {
            text: "yes".into(),
            reply_to: Some(question.hash()),
        },
        &mut dice,
    );
    // Only the author edits.
    assert_eq!(
        devices[1].compose(
            Draft::Edit {
                target: question.hash(),
                text: "no".into()
            },
            &mut dice
        ),
        Err(MemberError::NotEditable)
    );
    devices[1].write(Draft::Read, &mut dice);
    sync_devices(&mut devices, 0, 1);
    devices[0].write(
        Draft::Edit {
            target: question.hash(),
            text: "lunch at 1?".into(),
        },
        &mut dice,
    );
    let history = devices[0].history();
    assert_eq!(history.messages.len(), 2);
    let q = &history.messages[0];
    assert_eq!(q.text, "lunch at 1?");
    assert!(q.edited);
    assert_eq!(q.read_by, vec![devices[1].member.account()]);
    let a = &history.messages[1];
    assert_eq!(a.entry, answer.hash());
    assert_eq!(a.reply_to, Some(question.hash()));
    assert!(a.read_by.is_empty(), "its author's receipt does not count");
}

#[test]
fn an_added_member_reads_the_epoch_it_joins_and_after() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    devices[0].say("an older epoch", &mut dice);
    devices[0].write(Draft::Rekey, &mut dice);
    devices[0].say("before dave", &mut dice);
    let mut dave = Device::new(4, 14);
    devices[0].write(
        Draft::AddMember {
            account: dave.member.account(),
            encryption_key: dave.member.encryption_key(),
        },
        &mut dice,
    );
    devices[0].say("welcome", &mut dice);
    pull(&mut dave.log, &devices[0].log);
    // The current key opens this epoch; the older one stays closed.
    // (The genesis title is in the older epoch too: re-send the title
    // after adding someone to a chat whose key has rotated.)
    assert_eq!(dave.texts(), ["before dave", "welcome"]);
    assert_eq!(dave.history().unreadable, 2);
    assert_eq!(dave.history().title, None);
    let hi = dave.say("hi all", &mut dice);
    devices[0].log.insert(hi).unwrap();
    assert_eq!(
        devices[0].texts(),
        ["an older epoch", "before dave", "welcome", "hi all"]
    );
    // After a rotation Dave still reads.
    devices[0].write(Draft::Rekey, &mut dice);
    devices[0].say("rotated", &mut dice);
    pull(&mut dave.log, &devices[0].log);
    assert_eq!(
        dave.texts(),
        ["before dave", "welcome", "hi all", "rotated"]
    );
}

#[test]
fn concurrent_removals_both_hold() {
    let mut dice = Dice::new();
    let mut devices = chat(true, false, &mut dice);
    let mut dave = Device::new(4, 14);
    devices[0].write(
        Draft::AddMember {
            account: dave.member.account(),
            encryption_key: dave.member.encryption_key(),
        },
        &mut dice,
    );
    for i in 1..3 {
        let (a, b) = devices.split_at_mut(i);
        pull(&mut b[0].log, &a[0].log);
    }
    pull(&mut dave.log, &devices[0].log);
    // Alice removes Carol while Bob, not having seen it, removes Dave.
    let carol = devices[2].member.account();
    devices[0].write(Draft::RemoveMember { account: carol }, &mut dice);
    devices[1].write(
        Draft::RemoveMember {
            account: dave.member.account(),
        },
        &mut dice,
    );
    let (a, b) = devices.split_at_mut(1);
    pull(&mut a[0].log, &b[0].log);
    pull(&mut b[0].log, &a[0].log);
    let merged = devices[0].say("after both", &mut dice);
    sync_devices(&mut devices, 1, 0);
    let (a, b) = devices.split_at_mut(2);
    pull(&mut b[0].log, &a[0].log);
    pull(&mut dave.log, &devices[0].log);

    let membership = devices[0].log.membership_for(&merged.hash()).unwrap();
    assert_eq!(membership.member_count(), 2);
    assert_eq!(membership.epoch(), 2);
    assert_eq!(devices[1].texts(), ["after both"]);
    assert_eq!(devices[2].decrypt(&merged.hash()), Err(MemberError::NoKey));
    assert_eq!(dave.decrypt(&merged.hash()), Err(MemberError::NoKey));
}

#[test]
fn a_removed_members_concurrent_branch_is_kept_but_not_shown_after_removal() {
    let mut dice = Dice::new();
    let mut devices = chat(true, false, &mut dice);
    let carol_account = devices[2].member.account();
    // Carol writes five messages (lamport 1 to 5) without seeing her
    // removal, which Alice writes at lamport 3.
    let mut carol_entries = Vec::new();
    for i in 0..5 {
        carol_entries.push(devices[2].say(&format!("carol {i}"), &mut dice));
    }
    devices[0].say("a0", &mut dice);
    devices[0].say("a1", &mut dice);
    let removal = devices[0].write(
        Draft::RemoveMember {
            account: carol_account,
        },
        &mut dice,
    );
    assert_eq!(removal.header.header.lamport, 3);
    // Her branch is valid (nobody can tell when it was written)…
    for entry in carol_entries {
        devices[0].log.insert(entry).unwrap();
    }
    // …but what sorts after the removal is not shown.
    let texts = devices[0].texts();
    assert!(texts.contains(&"carol 0".to_string()));
    assert!(texts.contains(&"carol 1".to_string()));
    assert!(!texts.contains(&"carol 3".to_string()));
    assert!(!texts.contains(&"carol 4".to_string()));
    // And a merge on top of both branches uses the rotated key.
    let merged = devices[0].say("merged", &mut dice);
    assert_eq!(merged.header.header.epoch, 1);
}

#[test]
fn every_record_rejects_oversized_and_hostile_input() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let entry = devices[0].say("x", &mut dice);
    let cases: Vec<(Vec<u8>, usize)> = vec![
        (entry.encode(), Entry::MAX_LEN),
        (
            SyncRequest::for_log(&devices[0].log).encode(),
            SyncRequest::MAX_LEN,
        ),
        (
            ChatSummary::of(&devices[0].log).encode(),
            ChatSummary::MAX_LEN,
        ),
        (
            Content::Text {
                text: "x".into(),
                reply_to: None,
            }
            .encode(),
            Content::MAX_LEN,
        ),
    ];
    for (bytes, max) in cases {
        let mut huge = bytes.clone();
        huge.resize(max + 1, 0);
        assert!(Entry::decode(&huge).is_err());
        assert!(SyncRequest::decode(&huge).is_err());
        assert!(ChatSummary::decode(&huge).is_err());
        for cut in 0..bytes.len() {
            assert!(Entry::decode(&bytes[..cut]).is_err() || cut == bytes.len());
        }
    }
    // A response claiming 2^32 entries in a few bytes.
    let hostile = [
        1u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f,
    ];
    assert!(super::SyncResponse::decode(&hostile).is_err());
}

fn storage_peer(seed: u8) -> StoragePeer {
    let key = SigningKey::from_bytes(&[seed; 32]);
    StoragePeer {
        node: DevicePublicKey::from_bytes(key.verifying_key().to_bytes()).unwrap(),
        addrs: vec![vec![seed; 8]],
    }
}

fn storage_draft(seeds: &[u8], quorum: u8) -> Draft {
    Draft::Storage {
        peers: seeds.iter().map(|s| storage_peer(*s)).collect(),
        quorum,
    }
}

#[test]
fn the_storage_set_is_in_the_log_and_every_replica_agrees() {
    let mut dice = Dice::new();
    let mut devices = chat(true, false, &mut dice);
    let genesis = devices[0].log.genesis().unwrap();
    assert_eq!(devices[0].log.storage_set(), None);

    // The creator sets the first storage set right after the genesis.
    let first = devices[0].write(storage_draft(&[50, 51, 52], 2), &mut dice);
    assert_eq!(first.header.header.parents, vec![genesis]);
    assert!(first.body.is_none());
    let first_set = (
        vec![storage_peer(50), storage_peer(51), storage_peer(52)],
        2,
    );
    assert_eq!(devices[0].log.storage_set(), Some(first_set.clone()));
    // In force for what follows it, not for the entry itself.
    assert_eq!(devices[0].log.storage_set_for(&first.hash()), None);
    let after = devices[0].say("stored where?", &mut dice);
    assert_eq!(
        devices[0].log.storage_set_for(&after.hash()),
        Some(first_set.clone())
    );
    // The quorum of the genesis and of the Storage entry itself is counted
    // on the set in force now.
    for hash in [genesis, first.hash(), after.hash()] {
        let (peers, quorum) = devices[0].log.storage_set_counting(&hash).unwrap();
        assert_eq!((peers.into_owned(), quorum), first_set);
    }

    for to in 1..3 {
        sync_devices(&mut devices, to, 0);
        assert_eq!(devices[to].log.storage_set(), Some(first_set.clone()));
    }

    // Bob and Carol change it concurrently: once everyone has both, the
    // later one in display order holds on every replica.
    let bob = devices[1].write(storage_draft(&[60], 1), &mut dice);
    let carol = devices[2].write(storage_draft(&[70, 71], 2), &mut dice);
    assert_eq!(bob.header.header.lamport, carol.header.header.lamport);
    for (to, from) in [(0, 1), (0, 2), (1, 0), (2, 0)] {
        sync_devices(&mut devices, to, from);
    }
    let winner = if bob.hash() > carol.hash() {
        (vec![storage_peer(60)], 1)
    } else {
        (vec![storage_peer(70), storage_peer(71)], 2)
    };
    for device in &devices {
        assert_eq!(device.log.storage_set(), Some(winner.clone()));
    }
    // Storage entries are not messages: the history is unchanged by them.
    assert_eq!(devices[1].texts(), ["stored where?"]);
}

#[test]
fn only_members_and_admins_change_the_storage_set() {
    let mut dice = Dice::new();
    let mut devices = chat(true, true, &mut dice);
    devices[0].write(storage_draft(&[50], 1), &mut dice);
    for to in 1..3 {
        sync_devices(&mut devices, to, 0);
    }
    let set = Some((vec![storage_peer(50)], 1));

    // An outsider with a valid certificate of its own account.
    let mallory = Device::new(9, 19);
    let outsider = hand_made(
        &devices[1].log,
        &mallory.key,
        &mallory.cert,
        EntryKind::Storage {
            peers: vec![storage_peer(66)],
            quorum: 1,
        },
        None,
    );
    assert_refused(
        &mut devices[1].log,
        outsider,
        LogError::NotMember(mallory.member.account()),
    );

    // A member who is not an admin of an admin-managed chat.
    assert_eq!(
        devices[1].compose(storage_draft(&[66], 1), &mut dice),
        Err(MemberError::NotAllowedToSetStorage)
    );
    let bob = devices[1].member.account();
    let not_admin = hand_made(
        &devices[1].log,
        &devices[1].key,
        &devices[1].cert,
        EntryKind::Storage {
            peers: vec![storage_peer(66)],
            quorum: 1,
        },
        None,
    );
    assert_refused(
        &mut devices[2].log,
        not_admin,
        LogError::UnauthorisedStorage(bob),
    );
    for device in &devices {
        assert_eq!(device.log.storage_set(), set);
    }

    // The admin may.
    devices[0].write(storage_draft(&[51, 52], 1), &mut dice);
    sync_devices(&mut devices, 2, 0);
    assert_eq!(
        devices[2].log.storage_set(),
        Some((vec![storage_peer(51), storage_peer(52)], 1))
    );
}

#[test]
fn storage_set_bounds_hold_at_compose_and_at_decode() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let too_many: Vec<u8> = (0..=MAX_STORAGE_PEERS as u8).map(|i| 50 + i).collect();
    let mut long_address = storage_peer(50);
    long_address.addrs = vec![vec![0; MAX_ADDR_LEN + 1]];
    let cases: Vec<(Vec<StoragePeer>, u8)> = vec![
        (vec![], 0),
        (vec![], 1),
        (vec![storage_peer(50), storage_peer(51)], 0),
        (vec![storage_peer(50), storage_peer(51)], 3),
        (vec![storage_peer(50), storage_peer(50)], 1),
        (too_many.iter().map(|s| storage_peer(*s)).collect(), 1),
        (vec![long_address], 1),
    ];
    for (peers, quorum) in cases {
        let draft = Draft::Storage {
            peers: peers.clone(),
            quorum,
        };
        assert!(
            matches!(
                devices[0].compose(draft, &mut dice),
                Err(MemberError::Malformed(EntryError::Shape(_)))
            ),
            "composed {} peers, quorum {quorum}",
            peers.len()
        );
        let entry = hand_made(
            &devices[0].log,
            &devices[0].key,
            &devices[0].cert,
            EntryKind::Storage { peers, quorum },
            None,
        );
        assert!(matches!(
            Entry::decode(&entry.encode()),
            Err(DecodeError::Invalid(_))
        ));
        let before = snapshot(&devices[1].log);
        assert!(matches!(
            devices[1].log.insert(entry),
            Err(LogError::Malformed(_))
        ));
        assert_eq!(snapshot(&devices[1].log), before);
    }

    // The largest allowed set goes through, and a Storage entry with a
    // body does not.
    let most: Vec<u8> = (0..MAX_STORAGE_PEERS as u8).map(|i| 50 + i).collect();
    let entry = devices[0].write(storage_draft(&most, MAX_STORAGE_PEERS as u8), &mut dice);
    assert_eq!(Entry::decode(&entry.encode()).unwrap(), entry);
    let body = devices[0].say("a body", &mut dice).body;
    let with_body = hand_made(
        &devices[0].log,
        &devices[0].key,
        &devices[0].cert,
        EntryKind::Storage {
            peers: vec![storage_peer(50)],
            quorum: 1,
        },
        body,
    );
    assert!(with_body.verify_alone().is_err());
}

#[test]
fn a_storage_peer_reads_the_storage_set_without_keys() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let before = devices[0].say("before", &mut dice);
    devices[1].log.insert(before).unwrap();
    let set = devices[1].write(storage_draft(&[50, 51, 52], 2), &mut dice);
    let mut peer = ChatLog::new(CHAT);
    pull(&mut peer, &devices[1].log);
    assert!(peer.contains(&set.hash()));
    assert_eq!(
        peer.storage_set(),
        Some((
            vec![storage_peer(50), storage_peer(51), storage_peer(52)],
            2
        ))
    );
    assert_eq!(peer.storage_set(), devices[1].log.storage_set());
    // Rebuilt from its own records, as after a restart.
    let mut rebuilt = ChatLog::new(CHAT);
    for (_, entry) in peer.in_display_order() {
        rebuilt.insert(entry.clone()).unwrap();
    }
    assert_eq!(rebuilt.storage_set(), peer.storage_set());
}

#[test]
fn a_revoked_device_reads_nothing_after_and_cannot_write() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let alice = devices[0].member.account();
    let mut storage = ChatLog::new(CHAT);
    devices[0].say("before", &mut dice);
    pull(&mut storage, &devices[0].log);
    // Alice's phone (to be revoked) syncs; her tablet stays offline.
    let mut phone = Device::new(1, 31);
    let mut tablet = Device::new(1, 32);
    pull(&mut phone.log, &storage);
    assert_eq!(phone.texts(), ["before"]);

    // Her laptop revokes the phone: a fresh account key, sealed to the
    // laptop and the tablet, and a key rotation.
    let new_key = AccountEncryptionKey::generate(&dice.roll());
    let new_public = new_key.public();
    assert!(devices[0].member.add_encryption_key(1, new_key));
    assert_eq!(devices[0].member.encryption_key(), new_public);
    devices[0].write(
        Draft::AccountKey {
            keep: vec![tablet.cert.device],
            revoked: vec![phone.cert.device],
        },
        &mut dice,
    );
    devices[0].say("after", &mut dice);
    // The storage peer verifies all of it without any key.
    pull(&mut storage, &devices[0].log);

    // Bob reads on, and wraps to Alice's new key from now on.
    pull(&mut devices[1].log, &storage);
    assert_eq!(devices[1].texts(), ["before", "after"]);
    let heads = devices[1].log.heads();
    assert_eq!(
        devices[1]
            .log
            .membership_for_parents(&heads)
            .encryption_key(&alice),
        Some(&new_public)
    );

    // The phone holds the account key and the old chat key, and gets every
    // entry, but reads nothing written after the revocation.
    pull(&mut phone.log, &storage);
    assert_eq!(phone.log.len(), storage.len());
    assert_eq!(phone.texts(), ["before"]);
    assert_eq!(phone.history().unreadable, 1);
    assert!(phone.member.take_learned_keys().is_empty());
    // What it writes after the revocation is refused by every holder.
    let late = hand_made(
        &phone.log,
        &phone.key,
        &phone.cert,
        EntryKind::Message,
        Some(EntryBody {
            nonce: [7; 24],
            ciphertext: vec![7; 300],
        }),
    );
    let revoked = LogError::RevokedDevice(phone.cert.device);
    assert_refused(&mut storage, late.clone(), revoked.clone());
    assert_refused(&mut devices[1].log, late, revoked);

    // The tablet, offline throughout, takes the new key from the log (it
    // was sealed to its device key) as soon as it holds the entry, before
    // reading any message, and reads everything.
    pull(&mut tablet.log, &storage);
    tablet.member.refresh_keys(&tablet.log);
    let learned = tablet.member.take_learned_keys();
    assert_eq!(tablet.texts(), ["before", "after"]);
    assert_eq!(learned.len(), 1);
    assert_eq!((learned[0].0, learned[0].1.public()), (1, new_public));
    assert_eq!(tablet.member.encryption_key(), new_public);
    assert_eq!(tablet.member.key_generation(), 1);

    // Bob's later rotation goes to the new key: the tablet reads past it,
    // the phone does not.
    devices[1].write(Draft::Rekey, &mut dice);
    devices[1].say("bob, later", &mut dice);
    pull(&mut storage, &devices[1].log);
    pull(&mut tablet.log, &storage);
    pull(&mut phone.log, &storage);
    assert_eq!(tablet.texts(), ["before", "after", "bob, later"]);
    assert_eq!(phone.texts(), ["before"]);
}

#[test]
fn an_account_key_change_is_bounded_and_revokes_only_its_own_devices() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let mut storage = ChatLog::new(CHAT);
    let mut alice_phone = Device::new(1, 31);
    pull(&mut alice_phone.log, &devices[0].log);
    // Bob names Alice's phone as revoked in his own key change: it is his
    // rotation, and it revokes nothing of Alice's.
    let rotation = devices[1].revoke(1, vec![], vec![alice_phone.cert.device], &mut dice);
    pull(&mut storage, &devices[1].log);
    pull(&mut alice_phone.log, &storage);
    let from_phone = alice_phone.say("still here", &mut dice);
    assert!(storage.insert(from_phone).is_ok());

    // Bounds: generation 0 is the derived key; the author's device keeps
    // the key; nobody is both kept and revoked; something is revoked.
    let EntryKind::AccountKey {
        new_epoch,
        grants,
        change,
    } = rotation.header.header.kind
    else {
        panic!("not an account key change")
    };
    let bob = &devices[1];
    type Mutation = fn(&mut super::AccountKeyChange, DevicePublicKey);
    let cases: [(&str, Mutation); 4] = [
        ("generation 0", |c, _| c.generation = 0),
        ("author revoked", |c, me| c.revoked.push(me)),
        ("author not kept", |c, _| c.devices.clear()),
        ("nothing revoked", |c, _| c.revoked.clear()),
    ];
    for (why, mutate) in cases {
        let mut changed = change.clone();
        mutate(&mut changed, bob.cert.device);
        let header = EntryHeader {
            chat: CHAT,
            author: bob.cert.clone().into(),
            parents: vec![EntryHash([1; 32])],
            seq: 1,
            lamport: 2,
            epoch: new_epoch - 1,
            kind: EntryKind::AccountKey {
                new_epoch,
                grants: grants.clone(),
                change: changed,
            },
            body_hash: None,
        };
        assert!(
            matches!(header.check_shape(), Err(EntryError::Shape(_))),
            "{why} passed the shape check"
        );
    }
}

#[test]
fn a_revocation_holds_against_other_accounts_later_keys_and_a_concurrent_counter_revocation() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let alice = devices[0].member.account();
    let laptop = devices[0].cert.device;
    let mut storage = ChatLog::new(CHAT);
    let mut phone = Device::new(1, 31);
    pull(&mut storage, &devices[0].log);
    pull(&mut phone.log, &storage);

    // The phone, offline, answers with a revocation of the laptop while
    // the laptop revokes the phone: two concurrent branches.
    phone.revoke(1, vec![], vec![laptop], &mut dice);
    devices[0].revoke(1, vec![], vec![phone.cert.device], &mut dice);
    pull(&mut storage, &devices[0].log);
    pull(&mut storage, &phone.log);
    // Both are kept (neither saw the other), but only the one first in
    // display order takes effect: the other's author is revoked by then.
    let heads = storage.heads();
    let merged = storage.membership_for_parents(&heads);
    let revoked = [laptop, phone.cert.device].map(|d| merged.is_revoked_device(&d, &alice));
    assert_eq!(
        revoked.iter().filter(|r| **r).count(),
        1,
        "revoked (laptop, phone): {revoked:?}"
    );
    let (winner, loser) = if revoked[1] {
        (0, phone.cert.device)
    } else {
        (1, laptop)
    };
    let winner_key = if winner == 0 {
        devices[0].member.encryption_key()
    } else {
        phone.member.encryption_key()
    };
    assert_eq!(merged.encryption_key(&alice), Some(&winner_key));

    // Bob, who holds the merged log, names the revoked device in his own
    // key change: that does not undo Alice's revocation.
    pull(&mut devices[1].log, &storage);
    devices[1].revoke(1, vec![], vec![loser], &mut dice);
    pull(&mut storage, &devices[1].log);
    let heads = storage.heads();
    assert!(
        storage
            .membership_for_parents(&heads)
            .is_revoked_device(&loser, &alice)
    );

    // The winner's next key change cannot go back to the revoked device:
    // an honest compose leaves it out, and one that names it is refused.
    let winner_device = if winner == 0 {
        &mut devices[0]
    } else {
        &mut phone
    };
    pull(&mut winner_device.log, &storage);
    assert!(
        winner_device
            .member
            .add_encryption_key(2, AccountEncryptionKey::generate(&dice.roll()))
    );
    let honest = winner_device
        .compose(
            Draft::AccountKey {
                keep: vec![loser],
                revoked: vec![
                    DevicePublicKey::from_bytes(
                        SigningKey::from_bytes(&[77; 32]).verifying_key().to_bytes(),
                    )
                    .unwrap(),
                ],
            },
            &mut dice,
        )
        .unwrap();
    let EntryKind::AccountKey {
        new_epoch,
        grants,
        mut change,
    } = honest.header.header.kind.clone()
    else {
        panic!("not an account key change")
    };
    assert!(change.devices.iter().all(|g| g.device != loser));
    storage.insert(honest).unwrap();
    change.devices.push(super::DeviceKeyGrant {
        device: loser,
        wrapped_key: change.devices[0].wrapped_key.clone(),
    });
    let back_to_revoked = hand_made(
        &storage,
        &winner_device.key,
        &winner_device.cert,
        EntryKind::AccountKey {
            new_epoch: new_epoch + 1,
            grants,
            change,
        },
        None,
    );
    assert_refused(
        &mut storage,
        back_to_revoked,
        LogError::Membership(super::MembershipError::KeyToRevokedDevice),
    );
}

#[test]
fn a_run_composed_unsigned_is_held_back_until_signed_then_verifies_everywhere() {
    let mut dice = Dice::new();
    let mut devices = chat(false, false, &mut dice);
    let mut peer = ChatLog::new(CHAT);
    pull(&mut peer, &devices[0].log);
    let alice = &mut devices[0];
    let mut hashes = Vec::new();
    for i in 0..5 {
        let text = Draft::Text {
            text: format!("run {i}"),
            reply_to: None,
        };
        let composed = alice
            .member
            .compose_unsigned(&alice.log, text, dice.roll())
            .unwrap();
        hashes.push(composed.hash());
        // Nobody else takes it as it is.
        assert_refused(&mut peer, composed.entry().clone(), LogError::BadSignature);
        // Its own log holds it, names it as a parent, but does not write it.
        let outputs = alice.log.insert_composed(composed).unwrap();
        assert_eq!(persisted(&outputs), 0);
        assert_eq!(alice.log.heads(), vec![*hashes.last().unwrap()]);
    }
    assert_eq!(alice.log.unsigned_count(), 5);

    let outputs = alice.member.sign_composed(&mut alice.log);
    let written: Vec<(EntryHash, Entry)> = outputs
        .iter()
        .filter_map(|o| match o {
            LogOutput::Persist { hash, record } => Some((*hash, Entry::decode(record).unwrap())),
            _ => None,
        })
        .collect();
    assert_eq!(
        written.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
        hashes,
        "every entry of the run, in order, once"
    );
    assert_eq!(alice.log.unsigned_count(), 0);
    assert!(alice.member.sign_composed(&mut alice.log).is_empty());
    for (hash, entry) in &written {
        assert_eq!(entry.hash(), *hash);
        assert_eq!(entry.verify_alone(), Ok(()));
        assert_eq!(entry.header.signature, written[0].1.header.signature);
        assert_eq!(alice.log.get(hash), Some(entry));
    }

    // A storage peer takes the run, and Bob reads it from there.
    assert_eq!(pull(&mut peer, &alice.log), 5);
    pull(&mut devices[1].log, &peer);
    assert_eq!(
        devices[1].texts(),
        (0..5).map(|i| format!("run {i}")).collect::<Vec<_>>()
    );
}
