//! Cloud chats between real nodes: two members on nodes 1 and 2, storage
//! peers 1-3 with a write quorum of 2. Histories, statuses, crashes,
//! catch-up, lost quorum, and what is left on disk after a delete.

mod support;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use support::*;
use tern_node::{client::ApiClient, data_dir::DataDir};

/// Three nodes that store for each other (as in a testnet), all connected.
struct Three {
    _tmp: tempfile::TempDir,
    dirs: Vec<PathBuf>,
    nodes: Vec<Option<NodeProcess>>,
    rt: tokio::runtime::Runtime,
}

const OPEN: &[&str] = &["--host-open"];

impl Three {
    fn start() -> Self {
        Self::start_with(&[OPEN, OPEN, OPEN])
    }

    /// Three nodes with their own extra flags each.
    fn start_with(flags: &[&[&str]; 3]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (1..=3).map(|k| tmp.path().join(format!("n{k}"))).collect();
        for (k, d) in dirs.iter().enumerate() {
            init(d, &format!("node-{}", k + 1));
        }
        let nodes = dirs
            .iter()
            .zip(flags)
            .map(|(d, f)| Some(NodeProcess::start(d, &[LOOPBACK, f].concat())))
            .collect();
        let t = Self {
            _tmp: tmp,
            dirs,
            nodes,
            rt: tokio::runtime::Runtime::new().unwrap(),
        };
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            let addr = t.node(b).tcp_addr();
            let out = tern(&t.dirs[a], &["connect", &addr]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        t
    }

    fn node(&self, k: usize) -> &NodeProcess {
        self.nodes[k].as_ref().expect("node is running")
    }

    fn dir(&self, k: usize) -> &Path {
        &self.dirs[k]
    }

    fn kill(&mut self, k: usize) {
        if let Some(n) = self.nodes[k].take() {
            kill9(n.pid());
        }
    }

    fn restart(&mut self, k: usize) {
        assert!(self.nodes[k].is_none());
        self.nodes[k] = Some(NodeProcess::start(
            &self.dirs[k],
            &[LOOPBACK, OPEN].concat(),
        ));
    }

    fn account(&self, k: usize) -> String {
        self.node(k).status()["account_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn get(&self, k: usize, path: &str) -> Result<Value, String> {
        let c = ApiClient::new(&DataDir::new(self.dir(k))).map_err(|e| e.to_string())?;
        self.rt
            .block_on(c.get::<Value>(path))
            .map_err(|e| e.to_string())
    }

    /// A chat between the accounts of nodes 1 and 2, stored on all three
    /// with a quorum of 2, known to both members.
    fn chat(&self) -> String {
        self.chat_on(&[0, 1, 2], 2)
    }

    fn chat_on(&self, storage: &[usize], quorum: u8) -> String {
        let bob = self.account(1);
        poll("node 1 to learn node 2's account record", || {
            self.get(0, &format!("/v1/accounts/{bob}")).ok()
        });
        let peers: Vec<String> = storage.iter().map(|k| self.node(*k).peer_id()).collect();
        let out = tern_json(
            self.dir(0),
            &[
                "chat",
                "new",
                "--with",
                &bob,
                "--title",
                "three nodes",
                "--storage",
                &peers.join(","),
                "--quorum",
                &quorum.to_string(),
                "--json",
            ],
        );
        assert_eq!(out["quorum"], quorum);
        assert_eq!(out["storage"].as_array().unwrap().len(), storage.len());
        let chat = out["chat_id"].as_str().unwrap().to_owned();
        poll("node 2 to have the chat", || {
            self.get(1, "/v1/chats")
                .ok()?
                .as_array()?
                .iter()
                .any(|c| c["chat_id"] == chat.as_str())
                .then_some(())
        });
        chat
    }

    fn history(&self, k: usize, chat: &str) -> Vec<Value> {
        self.get(k, &format!("/v1/chats/{chat}/messages"))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    fn replicas(&self, k: usize, chat: &str) -> Vec<Value> {
        self.get(k, &format!("/v1/chats/{chat}/replicas"))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// Node `k` sets the chat's storage to all three nodes, quorum 2.
    fn store_on_all_three(&self, k: usize, chat: &str) {
        let peers: Vec<String> = (0..3).map(|k| self.node(k).peer_id()).collect();
        let out = tern(
            self.dir(k),
            &[
                "chat",
                "storage",
                chat,
                "--set",
                &peers.join(","),
                "--quorum",
                "2",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Polls until node `k` reports every storage peer reachable and in sync.
    fn wait_all_in_sync(&self, k: usize, chat: &str) -> Vec<Value> {
        poll(
            &format!("all replicas in sync, seen from node {}", k + 1),
            || {
                let r = self.replicas(k, chat);
                r.iter()
                    .all(|v| v["in_sync"] == true && v["reachable"] == true)
                    .then_some(r)
            },
        )
    }
}

/// Sends `n` messages from node `k` on threads of its own; returns the
/// receipts.
fn send_many(dir: PathBuf, chat: String, prefix: &'static str, n: usize) -> Vec<Value> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = ApiClient::new(&DataDir::new(&dir)).unwrap();
    rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let r: Value = c
                .post(
                    &format!("/v1/chats/{chat}/messages"),
                    &json!({ "text": format!("{prefix} {i}") }),
                )
                .await
                .unwrap_or_else(|e| panic!("send {prefix} {i}: {e}"));
            out.push(r);
        }
        out
    })
}

fn ids_and_texts(h: &[Value]) -> Vec<(String, String, String)> {
    h.iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["author"].as_str().unwrap().to_owned(),
                m["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn two_members_interleave_a_thousand_messages_each_and_see_stored_then_read() {
    let t = Three::start();
    let chat = t.chat();
    let (a, b) = (t.dir(0).to_owned(), t.dir(1).to_owned());
    let (ca, cb) = (chat.clone(), chat.clone());
    let alice = std::thread::spawn(move || send_many(a, ca, "from alice", 1000));
    let bob = std::thread::spawn(move || send_many(b, cb, "from bob", 1000));
    let receipts: Vec<Value> = [alice.join().unwrap(), bob.join().unwrap()].concat();
    // Every send answered `stored`: a quorum of storage peers had it on disk.
    for r in &receipts {
        assert_eq!(r["status"], "stored", "{r}");
        assert!(r["acknowledged"].as_u64().unwrap() >= 2, "{r}");
    }

    // Both sides end with the same complete history, in the same order.
    let (h1, h2) = poll("both histories complete and identical", || {
        let (h1, h2) = (t.history(0, &chat), t.history(1, &chat));
        (h1.len() == 2000 && ids_and_texts(&h1) == ids_and_texts(&h2)).then_some((h1, h2))
    });
    for prefix in ["from alice", "from bob"] {
        for i in 0..1000 {
            let text = format!("{prefix} {i}");
            assert!(
                h1.iter().any(|m| m["text"] == text.as_str()),
                "{text} missing"
            );
        }
    }
    // Each side's own messages keep their order.
    let mine: Vec<&str> = h1
        .iter()
        .filter(|m| m["from_me"] == true)
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..1000).map(|i| format!("from alice {i}")).collect();
    assert_eq!(mine, expected);
    assert!(h1.iter().all(|m| m["status"] != "read"));
    assert!(h2.iter().all(|m| m["status"] != "read"));

    // Bob reads: Alice's messages turn `read` (two checks) on her side.
    let out = tern(t.dir(1), &["chat", "read", &chat]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll("alice's messages to show read", || {
        let h = t.history(0, &chat);
        h.iter()
            .filter(|m| m["from_me"] == true)
            .all(|m| m["status"] == "read")
            .then_some(())
    });
    // Bob's own messages are not read until Alice reads.
    let h = t.history(1, &chat);
    assert!(
        h.iter()
            .filter(|m| m["from_me"] == true)
            .all(|m| m["status"] == "stored"),
        "bob's messages read before alice read"
    );
    let out = tern(t.dir(0), &["chat", "read", &chat]);
    assert!(out.status.success());
    poll("bob's messages to show read", || {
        t.history(1, &chat)
            .iter()
            .filter(|m| m["from_me"] == true)
            .all(|m| m["status"] == "read")
            .then_some(())
    });
}

#[test]
fn a_storage_peer_killed_after_acknowledging_loses_nothing_and_resyncs_by_itself() {
    let mut t = Three::start();
    let chat = t.chat();
    let receipts = send_many(t.dir(0).to_owned(), chat.clone(), "before", 100);
    let last = receipts.last().unwrap()["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Wait until node 3 itself acknowledged the last one, then kill it.
    poll("node 3 to acknowledge the last message", || {
        let r = t
            .get(0, &format!("/v1/chats/{chat}/messages/{last}"))
            .ok()?;
        (r["acknowledged"] == 3).then_some(())
    });
    t.kill(2);
    // Node 3 misses these.
    send_many(t.dir(1).to_owned(), chat.clone(), "while down", 50);
    t.restart(2);

    // Without any command, every replica reports in sync.
    let seen = t.wait_all_in_sync(0, &chat);
    let entries: Vec<u64> = seen
        .iter()
        .map(|v| v["entries"].as_u64().unwrap())
        .collect();
    assert!(entries.windows(2).all(|w| w[0] == w[1]), "{entries:?}");
    // 1 genesis + 1 storage entry + 150 messages.
    assert_eq!(entries[0], 152);
    t.wait_all_in_sync(1, &chat);
    // Node 3's own restart recovered everything it had acknowledged: no
    // message is missing anywhere.
    let h = t.history(1, &chat);
    assert_eq!(h.len(), 150);
    for i in 0..100 {
        assert!(
            h.iter()
                .any(|m| m["text"] == format!("before {i}").as_str())
        );
    }
}

#[test]
fn stored_messages_still_say_stored_after_a_restart_with_every_storage_peer_down() {
    let mut t = Three::start();
    let chat = t.chat();
    let receipts = send_many(t.dir(0).to_owned(), chat.clone(), "kept", 30);
    assert!(
        receipts.iter().all(|r| r["status"] == "stored"),
        "{receipts:?}"
    );
    // Both other storage peers go away; then node 1 restarts. No peer can
    // answer a compare, so only what node 1 kept can say "stored".
    t.kill(1);
    t.kill(2);
    let n = t.nodes[0].take().unwrap();
    assert!(n.stop().success());
    t.nodes[0] = Some(NodeProcess::start(t.dir(0), &[LOOPBACK, OPEN].concat()));
    let h = t.history(0, &chat);
    assert_eq!(h.len(), 30);
    let statuses: Vec<&str> = h.iter().map(|m| m["status"].as_str().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == "stored"), "{statuses:?}");
    // A message sent now, with no peer up, is not stored.
    let c = ApiClient::new(&DataDir::new(t.dir(0))).unwrap();
    let late: Value =
        t.rt.block_on(c.post(
            &format!("/v1/chats/{chat}/messages"),
            &json!({ "text": "alone", "wait_ms": 0 }),
        ))
        .unwrap();
    assert_ne!(late["status"], "stored", "{late}");
}

#[test]
fn a_peer_that_was_down_catches_up_and_without_quorum_sending_says_so() {
    let mut t = Three::start();
    let chat = t.chat();
    t.kill(2);
    // Two of three still make the quorum.
    let receipts = send_many(t.dir(0).to_owned(), chat.clone(), "node 3 is down", 500);
    assert!(receipts.iter().all(|r| r["status"] == "stored"));
    t.restart(2);
    let seen = t.wait_all_in_sync(0, &chat);
    assert!(seen.iter().all(|v| v["entries"] == 502), "{seen:?}");

    // Two of three down: the message is kept here and reported as not yet
    // stored, with the reason.
    t.kill(1);
    t.kill(2);
    let out = tern(t.dir(0), &["chat", "send", &chat, "alone"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("quorum not reached"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("sending"));
    let h = t.history(0, &chat);
    let alone = h.iter().find(|m| m["text"] == "alone").unwrap();
    assert_eq!(alone["status"], "sending");
    let id = alone["id"].as_str().unwrap().to_owned();

    // They come back: it is pushed again and stored, and nothing
    // acknowledged is lost.
    t.restart(1);
    t.restart(2);
    poll("the lone message to be stored", || {
        let r = t.get(0, &format!("/v1/chats/{chat}/messages/{id}")).ok()?;
        (r["status"] == "stored").then_some(())
    });
    let h2 = poll("node 2 to have every message", || {
        let h = t.history(1, &chat);
        (h.len() == 501).then_some(h)
    });
    assert_eq!(ids_and_texts(&h2), ids_and_texts(&t.history(0, &chat)));
    t.wait_all_in_sync(0, &chat);
}

/// The bytes of one entry's encrypted body, as a storage peer serves it.
fn ciphertext_of(t: &Three, k: usize, chat: &str, message: &str) -> Vec<u8> {
    use tern_node::cloud::wire::{StoreRequest, StoreResponse};
    use tern_protocol::cloud::{ChatId, ChatLog, SyncRequest};
    let id: [u8; 16] = data_encoding::HEXLOWER
        .decode(chat.as_bytes())
        .unwrap()
        .try_into()
        .unwrap();
    let target: libp2p::Multiaddr = t.node(k).tcp_addr().parse().unwrap();
    t.rt.block_on(async {
        let identity = libp2p::identity::Keypair::generate_ed25519();
        let (mut c, peer) =
            record_client::<StoreRequest, StoreResponse>(identity, "/tern/store/1", target).await;
        let mut log = ChatLog::new(ChatId(id));
        loop {
            let r = ask(&mut c, peer, StoreRequest::Sync(SyncRequest::for_log(&log)))
                .await
                .unwrap();
            let StoreResponse::Synced(batch) = r else {
                panic!("expected a sync batch, got {r:?}");
            };
            for e in batch.entries {
                if data_encoding::HEXLOWER.encode(&e.hash().0) == message {
                    return e.body.expect("a message has a body").ciphertext;
                }
                log.insert(e).unwrap();
            }
            assert!(batch.more, "message {message} not on node {}", k + 1);
        }
    })
}

#[test]
fn storage_peers_hold_no_plaintext_and_a_deleted_message_is_gone_from_every_disk() {
    let t = Three::start();
    let chat = t.chat();
    let receipts = send_many(t.dir(0).to_owned(), chat.clone(), "plaintext-marker", 20);
    let victim = receipts[7]["message_id"].as_str().unwrap().to_owned();
    poll("node 2 to have every message", || {
        (t.history(1, &chat).len() == 20).then_some(())
    });
    // A quorum of two answered the sends; the third storage peer may still
    // be catching up, and the search below means something only once it
    // holds everything.
    t.wait_all_in_sync(0, &chat);
    for k in 0..3 {
        for i in 0..20 {
            let found = files_containing(t.dir(k), format!("plaintext-marker {i}").as_bytes());
            assert!(found.is_empty(), "plaintext on disk: {found:?}");
        }
    }
    let ciphertext = ciphertext_of(&t, 2, &chat, &victim);
    assert!(ciphertext.len() >= 32);
    let needle = &ciphertext[..32];
    for k in 0..3 {
        assert!(
            !files_containing(t.dir(k), needle).is_empty(),
            "the entry should be on node {} before the delete",
            k + 1
        );
    }

    // Bob (the other member of a two-person chat) deletes it for everyone.
    let out = tern(
        t.dir(1),
        &["chat", "delete", &chat, &victim[..12], "--for-everyone"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll(
        "the ciphertext to be gone from every data directory",
        || {
            (0..3)
                .all(|k| files_containing(t.dir(k), needle).is_empty())
                .then_some(())
        },
    );
    // No mark in the history, on either side.
    for k in 0..2 {
        let h = poll("the delete to reach both members", || {
            let h = t.history(k, &chat);
            (h.len() == 19).then_some(h)
        });
        assert!(h.iter().all(|m| m["id"] != victim.as_str()));
        assert!(h.iter().all(|m| m["text"] != "plaintext-marker 7"));
    }
    t.wait_all_in_sync(0, &chat);
}

#[test]
fn every_change_reaches_the_event_stream() {
    let mut t = Three::start();
    let chat = t.chat();
    let (w1, w2) = (Watcher::start(t.dir(0)), Watcher::start(t.dir(1)));
    let chat_is = |e: &Value| e["chat_id"] == chat.as_str();

    let sent = send_many(t.dir(0).to_owned(), chat.clone(), "watched", 1);
    let id = sent[0]["message_id"].as_str().unwrap().to_owned();
    let m = w2.next_where("chat_message", |e| {
        e["type"] == "chat_message" && chat_is(e)
    });
    assert_eq!(m["text"], "watched 0");
    assert_eq!(m["message_id"], id.as_str());
    assert_eq!(m["from_me"], false);
    w1.next_where("chat_status stored", |e| {
        e["type"] == "chat_status" && e["message_id"] == id.as_str() && e["status"] == "stored"
    });

    let out = tern(t.dir(0), &["chat", "edit", &chat, &id, "watched, edited"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = w2.next_where("chat_edited", |e| e["type"] == "chat_edited" && chat_is(e));
    assert_eq!(e["message_id"], id.as_str());
    assert_eq!(e["text"], "watched, edited");
    let h = t.history(1, &chat);
    assert_eq!(h[0]["text"], "watched, edited");
    assert_eq!(h[0]["edited"], true);

    assert!(tern(t.dir(1), &["chat", "read", &chat]).status.success());
    let r = w1.next_where("chat_receipt", |e| {
        e["type"] == "chat_receipt" && chat_is(e)
    });
    assert_eq!(r["reader"], t.account(1).as_str());

    let out = tern(t.dir(0), &["chat", "delete", &chat, &id, "--for-everyone"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = w2.next_where("chat_deleted", |e| {
        e["type"] == "chat_deleted" && chat_is(e)
    });
    assert_eq!(d["message_ids"][0], id.as_str());

    // A storage peer goes away: replica health says so.
    let gone = t.node(2).peer_id();
    t.kill(2);
    w1.next_where("replica_health unreachable", |e| {
        e["type"] == "replica_health" && e["peer_id"] == gone.as_str() && e["reachable"] == false
    });
    t.restart(2);
    w1.next_where("replica_health back", |e| {
        e["type"] == "replica_health" && e["peer_id"] == gone.as_str() && e["reachable"] == true
    });
}

#[test]
fn messages_sent_on_the_event_socket_are_answered_by_ref_stored_and_seen_by_the_other_member() {
    use futures::{SinkExt, StreamExt};
    const N: usize = 200;
    let t = Three::start();
    let chat = t.chat();
    let client = ApiClient::new(&DataDir::new(t.dir(0))).unwrap();
    let (sent, stored, refused, mine) = t.rt.block_on(async {
        let (mut commands, events) = client.socket().await.unwrap();
        let mut events = Box::pin(events);
        for n in 0..N {
            let command = json!({"type": "send", "chat_id": chat, "text": format!("socket {n}"), "ref": n.to_string()});
            commands.feed(command).await.unwrap();
        }
        commands
            .feed(json!({"type": "send", "chat_id": "no-such-chat", "text": "lost", "ref": "bad chat"}))
            .await
            .unwrap();
        commands.feed(json!({"type": "shout", "text": "?"})).await.unwrap();
        commands.flush().await.unwrap();
        let (mut sent, mut stored, mut refused, mut mine) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        while sent.len() < N || stored.len() < N || refused.len() < 2 || mine.len() < N {
            let e = tokio::time::timeout_at(deadline, events.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "after 120 s: {} sent, {} stored, refused {refused:?}",
                        sent.len(),
                        stored.len()
                    )
                })
                .expect("socket open")
                .unwrap();
            match e["type"].as_str() {
                Some("sent") => sent.push(e),
                Some("refused") => refused.push(e),
                Some("chat_status") if e["status"] == "stored" => stored.push(e),
                Some("chat_message") => mine.push(e),
                Some("lagged") => panic!("a slow test client lagged: {e}"),
                _ => {}
            }
        }
        (sent, stored, refused, mine)
    });
    // This device's own `chat_message` events carry what it sent.
    let own: std::collections::HashMap<&str, &Value> = mine
        .iter()
        .map(|e| (e["message_id"].as_str().unwrap(), e))
        .collect();
    for answer in &sent {
        let event = own[answer["message_id"].as_str().unwrap()];
        let text = format!("socket {}", answer["ref"].as_str().unwrap());
        assert_eq!(event["text"], text.as_str());
        assert_eq!(event["from_me"], true);
    }
    // Every command answered once, by its ref, with the message's id.
    let mut refs: Vec<usize> = sent
        .iter()
        .map(|a| a["ref"].as_str().unwrap().parse().unwrap())
        .collect();
    refs.sort();
    assert_eq!(refs, (0..N).collect::<Vec<_>>());
    assert!(sent.iter().all(|a| a["chat_id"] == chat.as_str()));
    let ids: std::collections::HashSet<&str> = sent
        .iter()
        .map(|a| a["message_id"].as_str().unwrap())
        .collect();
    let stored: std::collections::HashSet<&str> = stored
        .iter()
        .map(|e| e["message_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, stored, "each sent message reaches `stored`");
    // Answers come as commands finish, so by ref, not by order.
    let by_ref = |r: Value| refused.iter().find(|a| a["ref"] == r).expect("answered");
    assert!(
        by_ref(json!("bad chat"))["error"]
            .as_str()
            .unwrap()
            .contains("not a chat id"),
        "{refused:?}"
    );
    assert!(
        by_ref(Value::Null)["error"]
            .as_str()
            .unwrap()
            .contains("not a command"),
        "{refused:?}"
    );
    // The other member gets them all, in the order they were sent.
    let h = poll("node 2 to hold every message", || {
        let h = t.history(1, &chat);
        (h.len() == N).then_some(h)
    });
    let texts: Vec<&str> = h.iter().map(|m| m["text"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..N).map(|n| format!("socket {n}")).collect();
    assert_eq!(texts, expected);
}

#[test]
fn a_storage_peer_that_did_not_agree_refuses_clearly_until_its_operator_allows() {
    // Node 3 stores only for accounts its operator allows.
    let t = Three::start_with(&[OPEN, OPEN, &[]]);
    let chat = t.chat_on(&[0, 2], 2);
    let out = tern(t.dir(0), &["chat", "send", &chat, "needs both"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("quorum not reached"), "{stderr}");
    assert!(
        stderr.contains("tern host allow"),
        "the refusal should say what to do: {stderr}"
    );
    assert_eq!(t.history(0, &chat)[0]["status"], "sending");

    // The operator agrees: without anyone resending, it is stored.
    let out = tern(t.dir(2), &["host", "allow", &t.account(0)]);
    assert!(out.status.success());
    poll("the message to be stored once allowed", || {
        (t.history(0, &chat)[0]["status"] == "stored").then_some(())
    });
    t.wait_all_in_sync(0, &chat);
}

#[test]
fn a_new_storage_peer_catches_up_and_clear_for_everyone_empties_every_copy() {
    let t = Three::start();
    // Kept by nodes 1 and 2 only, at first.
    let chat = t.chat_on(&[0, 1], 2);
    send_many(t.dir(0).to_owned(), chat.clone(), "early", 150);
    send_many(t.dir(1).to_owned(), chat.clone(), "reply", 50);
    assert!(files_containing(&t.dir(2).join("replicas"), chat.as_bytes()).is_empty());

    // Node 3 joins the storage set: it gets the whole log without anyone
    // pushing it by hand.
    t.store_on_all_three(1, &chat);
    let seen = t.wait_all_in_sync(0, &chat);
    assert_eq!(seen.len(), 3);
    // genesis, two storage entries, 200 messages.
    assert!(seen.iter().all(|v| v["entries"] == 203), "{seen:?}");
    assert_eq!(
        t.get(0, "/v1/chats").unwrap()[0]["storage"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Clear for everyone: no message left on any device, the log still
    // verifies, and the replicas agree.
    let ciphertext = ciphertext_of(&t, 2, &chat, t.history(0, &chat)[3]["id"].as_str().unwrap());
    let out = tern(t.dir(0), &["chat", "clear", &chat, "--for-everyone"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for k in 0..2 {
        poll("every message gone", || {
            t.history(k, &chat).is_empty().then_some(())
        });
    }
    t.wait_all_in_sync(0, &chat);
    poll(
        "the cleared ciphertext to be gone from every data directory",
        || {
            (0..3)
                .all(|k| files_containing(t.dir(k), &ciphertext).is_empty())
                .then_some(())
        },
    );
    // The chat itself goes on.
    let r = send_many(t.dir(1).to_owned(), chat.clone(), "after the clear", 1);
    assert_eq!(r[0]["status"], "stored");
    poll("the new message on node 1", || {
        (t.history(0, &chat).len() == 1).then_some(())
    });
}

/// A long log (about 10 MB, ten full pushes) reaches a storage peer that
/// joins late: on a lane when it opens them, over libp2p when it does not.
#[test]
fn a_new_storage_peer_catches_up_a_long_log_on_a_lane_or_over_libp2p() {
    let long: &'static str = "lane ".repeat(1600).leak();
    for lanes in [true, false] {
        let t = if lanes {
            Three::start()
        } else {
            Three::start_with(&[OPEN, OPEN, &["--host-open", "--no-lanes"]])
        };
        let chat = t.chat_on(&[0, 1], 2);
        send_many(t.dir(0).to_owned(), chat.clone(), long, 1200);
        t.store_on_all_three(1, &chat);
        let seen = t.wait_all_in_sync(0, &chat);
        // genesis, two storage entries, 1,200 messages.
        assert!(seen.iter().all(|v| v["entries"] == 1203), "{seen:?}");
        // With lanes off, node 3 refuses them and nodes 1 and 2 push over
        // libp2p: being in sync above is what shows the fallback works.
        if lanes {
            assert!(
                metric(t.dir(2), "tern_lane_requests_total") > 0.0,
                "no push came on a lane"
            );
            assert!(metric(t.dir(2), "tern_lanes_opened_total") >= 1.0);
        }
    }
}

#[test]
fn a_device_linked_after_a_thousand_messages_gets_the_full_history_with_the_other_device_offline() {
    let mut t = Three::start();
    let chat = t.chat();
    let (a, b) = (t.dir(0).to_owned(), t.dir(1).to_owned());
    let (ca, cb) = (chat.clone(), chat.clone());
    let alice = std::thread::spawn(move || send_many(a, ca, "alice", 600));
    let bob = std::thread::spawn(move || send_many(b, cb, "bob", 400));
    alice.join().unwrap();
    bob.join().unwrap();

    // Alice links a laptop to her account, then her first device goes
    // offline.
    let alice_account = t.account(0);
    let out = tern(t.dir(0), &["device", "link"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let laptop_dir = t.dir(0).parent().unwrap().join("laptop");
    let out = tern(
        &laptop_dir,
        &["init", "--link", &code, "--name", "alice-laptop"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.kill(0);
    let laptop = NodeProcess::start(&laptop_dir, LOOPBACK);
    assert_eq!(laptop.status()["account_id"], alice_account.as_str());

    // From the storage peers alone, the laptop finds the chat and pulls all
    // of it.
    let reference = ids_and_texts(&t.history(1, &chat));
    assert_eq!(reference.len(), 1000);
    let c = ApiClient::new(&DataDir::new(&laptop_dir)).unwrap();
    let history = poll("the laptop to have the full history", || {
        let h: Value =
            t.rt.block_on(c.get(&format!("/v1/chats/{chat}/messages")))
                .ok()?;
        let h = h.as_array()?.clone();
        (h.len() == 1000).then_some(h)
    });
    assert_eq!(ids_and_texts(&history), reference);
    // Alice's messages are hers on the laptop too.
    assert_eq!(history.iter().filter(|m| m["from_me"] == true).count(), 600);

    // And it writes as Alice: Bob sees it.
    let r: Value =
        t.rt.block_on(c.post(
            &format!("/v1/chats/{chat}/messages"),
            &json!({ "text": "from the laptop" }),
        ))
        .unwrap();
    assert_eq!(r["status"], "stored", "{r}");
    poll("bob to see the laptop's message", || {
        t.history(1, &chat)
            .iter()
            .any(|m| m["text"] == "from the laptop")
            .then_some(())
    });
}

#[test]
fn a_group_of_three_accounts_shares_one_history_and_only_authors_edit() {
    let t = Three::start();
    let (bob, carol) = (t.account(1), t.account(2));
    for who in [&bob, &carol] {
        poll("node 1 to learn the members' records", || {
            t.get(0, &format!("/v1/accounts/{who}")).ok()
        });
    }
    let out = tern_json(
        t.dir(0),
        &[
            "chat",
            "new",
            "--with",
            &bob,
            &carol,
            "--title",
            "the three of us",
            "--json",
        ],
    );
    let chat = out["chat_id"].as_str().unwrap().to_owned();
    assert_eq!(out["members"].as_array().unwrap().len(), 3);
    // Each member's own node is its chosen storage peer: all three keep it.
    assert_eq!(out["storage"].as_array().unwrap().len(), 3);
    assert_eq!(out["quorum"], 2);
    for k in 1..3 {
        poll("every member to have the group", || {
            (t.get(k, "/v1/chats").ok()?.as_array()?.len() == 1).then_some(())
        });
    }
    for (k, prefix) in [(0, "alice"), (1, "bob"), (2, "carol")] {
        let r = send_many(t.dir(k).to_owned(), chat.clone(), prefix, 5);
        assert!(r.iter().all(|r| r["status"] == "stored"), "{r:?}");
    }
    let histories: Vec<Vec<(String, String, String)>> = (0..3)
        .map(|k| {
            poll("15 messages everywhere", || {
                let h = t.history(k, &chat);
                (h.len() == 15).then_some(ids_and_texts(&h))
            })
        })
        .collect();
    assert_eq!(histories[0], histories[1]);
    assert_eq!(histories[1], histories[2]);

    // Carol may not edit Alice's message, nor delete it for everyone in a
    // group without admins; nothing changes.
    let alices = histories[0]
        .iter()
        .find(|m| m.2 == "alice 0")
        .unwrap()
        .0
        .clone();
    let out = tern(
        t.dir(2),
        &["chat", "edit", &chat, &alices, "carol was here"],
    );
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    let out = tern(
        t.dir(2),
        &["chat", "delete", &chat, &alices, "--for-everyone"],
    );
    assert!(!out.status.success());
    assert_eq!(ids_and_texts(&t.history(2, &chat)), histories[2]);
    // Alice may.
    let out = tern(t.dir(0), &["chat", "edit", &chat, &alices, "alice, edited"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll("the edit to reach carol", || {
        t.history(2, &chat)
            .iter()
            .any(|m| m["text"] == "alice, edited" && m["edited"] == true)
            .then_some(())
    });
}

#[test]
fn by_default_each_member_keeps_the_chat_on_its_own_node_without_hosting_anyone() {
    // No open hosting, no allow lists: each account's chosen storage peer
    // is its own node, which keeps its own chats.
    let t = Three::start_with(&[&[], &[], &[]]);
    let bob = t.account(1);
    poll("node 1 to learn node 2's account record", || {
        t.get(0, &format!("/v1/accounts/{bob}")).ok()
    });
    let out = tern_json(t.dir(0), &["chat", "new", "--with", &bob, "--json"]);
    let chat = out["chat_id"].as_str().unwrap().to_owned();
    let mut storage: Vec<String> = out["storage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    storage.sort();
    let mut expected = vec![t.node(0).peer_id(), t.node(1).peer_id()];
    expected.sort();
    assert_eq!(storage, expected);
    assert_eq!(out["quorum"], 2);
    let r = send_many(t.dir(0).to_owned(), chat.clone(), "hello", 3);
    assert!(r.iter().all(|r| r["status"] == "stored"), "{r:?}");
    poll("bob to have the messages", || {
        (t.history(1, &chat).len() == 3).then_some(())
    });
    // Node 3 keeps nothing of it.
    assert!(
        t.get(2, "/v1/chats")
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(files_containing(t.dir(2), b"hello").is_empty());
}

/// Links a new device to node `k`'s account in `dir` (not started).
fn link_device(t: &Three, k: usize, dir: &Path, name: &str) {
    let out = tern(t.dir(k), &["device", "link"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = tern(dir, &["init", "--link", &code, "--name", name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How many entries of `chat` a `/v1/chats` answer says the device holds.
fn chat_entries(chats: Value, chat: &str) -> Option<u64> {
    chats.as_array()?.iter().find(|c| c["chat_id"] == chat)?["entries"].as_u64()
}

fn texts(history: &[Value]) -> Vec<String> {
    history
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_revoked_device_reads_nothing_after_and_a_device_offline_at_the_revocation_reads_on() {
    let mut t = Three::start();
    let chat = t.chat();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (d0, d1) = (t.dir(0).to_owned(), t.dir(1).to_owned());
    let send = |dir: &Path, text: &str| {
        let r: Value = rt
            .block_on(ApiClient::new(&DataDir::new(dir)).unwrap().post(
                &format!("/v1/chats/{chat}/messages"),
                &json!({ "text": text }),
            ))
            .unwrap();
        assert_eq!(r["status"], "stored", "{r}");
    };
    send(&d0, "before");

    // Alice links a phone (running) and a tablet (offline for now).
    let root = t.dir(0).parent().unwrap().to_owned();
    let (phone_dir, tablet_dir) = (root.join("phone"), root.join("tablet"));
    link_device(&t, 0, &phone_dir, "alice-phone");
    link_device(&t, 0, &tablet_dir, "alice-tablet");
    let phone = NodeProcess::start(&phone_dir, LOOPBACK);
    let on = |dir: &Path, path: &str| -> Option<Value> {
        rt.block_on(ApiClient::new(&DataDir::new(dir)).ok()?.get::<Value>(path))
            .ok()
    };
    let history_on = |dir: &Path| -> Option<Vec<Value>> {
        Some(
            on(dir, &format!("/v1/chats/{chat}/messages"))?
                .as_array()?
                .clone(),
        )
    };
    poll("the phone to read the chat", || {
        (texts(&history_on(&phone_dir)?) == ["before"]).then_some(())
    });
    let record_key = |dir: &Path| {
        on(dir, "/v1/account")?["encryption_key"]
            .as_str()
            .map(str::to_owned)
    };
    let key_before = record_key(&d0).expect("alice's own record");

    // Alice's first device revokes the phone.
    let phone_id = phone.peer_id();
    let revoked: Value = rt
        .block_on(
            ApiClient::new(&DataDir::new(&d0))
                .unwrap()
                .post("/v1/devices/revoke", &json!({ "device": phone_id })),
        )
        .unwrap();
    assert_eq!(revoked["revoked"], true, "{revoked}");
    assert_eq!(revoked["chats_rekeyed"], 1, "{revoked}");
    let key_after = record_key(&d0).expect("alice's own record");
    assert_ne!(key_after, key_before, "the record still names the old key");
    assert_eq!(on(&d0, "/v1/account").unwrap()["key_generation"], 1);
    // Bob's node, which held Alice's record from before, fetches it again
    // when it keeps her AccountKey entry: a chat it creates with her from
    // now on is wrapped to the new key.
    let alice = t.account(0);
    poll("bob's node to hold alice's new record", || {
        (on(&d1, &format!("/v1/accounts/{alice}"))?["encryption_key"].as_str()? == key_after)
            .then_some(())
    });
    send(&d0, "after");
    send(&d1, "bob, after");
    poll("bob to read on", || {
        (texts(&t.history(1, &chat)) == ["before", "after", "bob, after"]).then_some(())
    });

    // The phone still gets every entry (it is still connected and still
    // holds the account key), but reads nothing written after.
    let entries_of = |dir: &Path| chat_entries(on(dir, "/v1/chats")?, &chat);
    let all = entries_of(&d1).unwrap();
    poll("the phone to hold every entry", || {
        (entries_of(&phone_dir)? >= all).then_some(())
    });
    assert_eq!(texts(&history_on(&phone_dir).unwrap()), ["before"]);
    // And it cannot write to the chat any more.
    let r = rt.block_on(
        ApiClient::new(&DataDir::new(&phone_dir))
            .unwrap()
            .post::<_, Value>(
                &format!("/v1/chats/{chat}/messages"),
                &json!({ "text": "from the phone" }),
            ),
    );
    assert!(r.is_err(), "the revoked phone wrote: {r:?}");
    drop(phone);

    // A laptop linked after the revocation gets the new key from the linker
    // and reads everything.
    let laptop_dir = root.join("laptop");
    link_device(&t, 0, &laptop_dir, "alice-laptop");
    let laptop = NodeProcess::start(&laptop_dir, LOOPBACK);
    poll("the laptop to read the whole chat", || {
        (texts(&history_on(&laptop_dir)?) == ["before", "after", "bob, after"]).then_some(())
    });
    assert_eq!(record_key(&laptop_dir).as_ref(), Some(&key_after));
    drop(laptop);

    // The tablet comes online with Alice's first device gone: from the
    // storage peers alone it takes the new key and reads everything.
    t.kill(0);
    let _tablet = NodeProcess::start(&tablet_dir, LOOPBACK);
    poll("the tablet to read the whole chat", || {
        (texts(&history_on(&tablet_dir)?) == ["before", "after", "bob, after"]).then_some(())
    });
    // Its own record names the new key too, and it writes on.
    poll("the tablet's record to name the new key", || {
        (record_key(&tablet_dir)? == key_after).then_some(())
    });
    // It learned the revocation from the chat too: its device list shows
    // the phone revoked.
    poll("the tablet to list the phone as revoked", || {
        let devices = on(&tablet_dir, "/v1/devices")?;
        let phone = devices
            .as_array()?
            .iter()
            .find(|d| d["device"] == phone_id.as_str())?;
        (phone["revoked"] == true).then_some(())
    });
    let r: Value = rt
        .block_on(ApiClient::new(&DataDir::new(&tablet_dir)).unwrap().post(
            &format!("/v1/chats/{chat}/messages"),
            &json!({ "text": "tablet" }),
        ))
        .unwrap();
    assert_eq!(r["status"], "stored", "{r}");
    poll("bob to read the tablet", || {
        texts(&t.history(1, &chat))
            .contains(&"tablet".to_owned())
            .then_some(())
    });
}

#[test]
fn a_revocation_reaches_the_accounts_other_devices_through_its_record_when_no_chat_carries_it() {
    let mut t = Three::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d0 = t.dir(0).to_owned();
    let on = |dir: &Path, path: &str| -> Option<Value> {
        rt.block_on(ApiClient::new(&DataDir::new(dir)).ok()?.get::<Value>(path))
            .ok()
    };
    // Alice (node 1) links a phone and a tablet; she has no chat yet.
    let root = d0.parent().unwrap().to_owned();
    let (phone_dir, tablet_dir) = (root.join("phone"), root.join("tablet"));
    link_device(&t, 0, &phone_dir, "alice-phone");
    link_device(&t, 0, &tablet_dir, "alice-tablet");
    let phone = NodeProcess::start(&phone_dir, LOOPBACK);
    let tablet = NodeProcess::start(&tablet_dir, LOOPBACK);
    let revoked: Value = rt
        .block_on(
            ApiClient::new(&DataDir::new(&d0))
                .unwrap()
                .post("/v1/devices/revoke", &json!({ "device": phone.peer_id() })),
        )
        .unwrap();
    assert_eq!(revoked["chats_rekeyed"], 0, "{revoked}");
    let account = on(&d0, "/v1/account").unwrap();
    assert_eq!(account["key_generation"], 1, "{account}");
    let new_key = account["encryption_key"].as_str().unwrap().to_owned();

    // The tablet meets Alice's first device again and takes the key sealed
    // to it in that device's record; the phone never gets it.
    drop(tablet);
    let tablet = NodeProcess::start(&tablet_dir, LOOPBACK);
    poll("the tablet to take the new key from the record", || {
        (on(&tablet_dir, "/v1/account")?["encryption_key"].as_str()? == new_key).then_some(())
    });
    assert_ne!(
        on(&phone_dir, "/v1/account").unwrap()["encryption_key"].as_str(),
        Some(new_key.as_str())
    );

    // Bob, once he holds Alice's new record, starts a chat with her: the
    // tablet reads it, the phone does not.
    t.kill(1);
    t.restart(1);
    let alice = t.account(0);
    poll("bob's node to hold alice's new record", || {
        (t.get(1, &format!("/v1/accounts/{alice}")).ok()?["encryption_key"].as_str()? == new_key)
            .then_some(())
    });
    let out = tern_json(
        t.dir(1),
        &[
            "chat", "new", "--with", &alice, "--title", "after", "--json",
        ],
    );
    let chat = out["chat_id"].as_str().unwrap().to_owned();
    let r: Value = rt
        .block_on(ApiClient::new(&DataDir::new(t.dir(1))).unwrap().post(
            &format!("/v1/chats/{chat}/messages"),
            &json!({ "text": "hello alice" }),
        ))
        .unwrap();
    assert_eq!(r["status"], "stored", "{r}");
    poll("the tablet to read bob's new chat", || {
        let h = on(&tablet_dir, &format!("/v1/chats/{chat}/messages"))?;
        (texts(h.as_array()?) == ["hello alice"]).then_some(())
    });
    drop(tablet);
    // The phone, still Alice's device to Bob's node, gets every entry of
    // the chat, and none of its text.
    let entries_of = |dir: &Path| chat_entries(on(dir, "/v1/chats")?, &chat);
    let all = entries_of(t.dir(1)).unwrap();
    poll("the phone to hold every entry of bob's chat", || {
        (entries_of(&phone_dir)? >= all).then_some(())
    });
    let phone_texts = texts(
        on(&phone_dir, &format!("/v1/chats/{chat}/messages"))
            .unwrap()
            .as_array()
            .unwrap(),
    );
    assert!(
        phone_texts.is_empty(),
        "the revoked phone read {phone_texts:?}"
    );
}
