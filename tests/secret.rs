//! Secret chats between real nodes: set-up, key comparison, a man in the
//! middle, self-destruct timers, an offline recipient, a relay that keeps
//! nothing, forwarding and logout.

mod support;

use std::path::Path;

use serde_json::Value;
use support::*;
use tern_node::secret::wire::{SecretRequest, SecretResponse};
use tern_protocol::{Record, secret::SecretFrame};

/// Two nodes that know each other.
fn pair(tmp: &Path) -> (NodeProcess, NodeProcess) {
    let (da, db) = (tmp.join("a"), tmp.join("b"));
    init(&da, "alice-phone");
    init(&db, "bob-laptop");
    let a = NodeProcess::start(&da, LOOPBACK);
    let b = NodeProcess::start(&db, LOOPBACK);
    connect(&a, &b);
    (a, b)
}

fn connect(a: &NodeProcess, b: &NodeProcess) {
    let out = tern(&a.dir, &["connect", &b.tcp_addr()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ticket(dir: &Path) -> String {
    let out = tern(dir, &["ticket"]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn chats(dir: &Path) -> Vec<Value> {
    tern_json(dir, &["secret", "list", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

fn chat(dir: &Path, id: &str) -> Option<Value> {
    chats(dir).into_iter().find(|c| c["secret_id"] == id)
}

fn state(dir: &Path, id: &str) -> String {
    chat(dir, id).map_or("none".into(), |c| c["state"].as_str().unwrap().to_owned())
}

fn wait_state(dir: &Path, id: &str, want: &str) {
    poll(&format!("{id} to be {want} in {}", dir.display()), || {
        (state(dir, id) == want).then_some(())
    });
}

/// `a` asks `b` (by ticket); returns the id once `b` has the request.
fn request(a: &Path, b: &Path) -> String {
    let started = tern_json(a, &["secret", "start", &ticket(b), "--json"]);
    assert_eq!(started["state"], "pending");
    let id = started["secret_id"].as_str().unwrap().to_owned();
    wait_state(b, &id, "pending");
    id
}

/// A secret chat from `a` to `b`, active on both.
fn active_chat(a: &Path, b: &Path) -> String {
    let id = request(a, b);
    let out = tern(b, &["secret", "accept", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_state(a, &id, "active");
    wait_state(b, &id, "active");
    id
}

fn send(dir: &Path, id: &str, text: &str) -> String {
    let r = tern_json(dir, &["secret", "send", id, text, "--json"]);
    r["message_id"].as_str().unwrap().to_owned()
}

/// Reads the chat on `dir` (this marks incoming messages read).
fn history(dir: &Path, id: &str) -> Vec<Value> {
    tern_json(dir, &["secret", "history", id, "--json"])
        .as_array()
        .unwrap()
        .clone()
}

fn texts(h: &[Value]) -> Vec<String> {
    h.iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect()
}

fn key(dir: &Path, id: &str, format: &str) -> Vec<u8> {
    let out = tern(dir, &["secret", "key", id, "--format", format]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn assert_nowhere(dir: &Path, needle: &str) {
    let found = files_containing(dir, needle.as_bytes());
    assert!(found.is_empty(), "{needle:?} found in {found:?}");
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time as the node
/// prints it (`2026-11-22T04:05:06.789Z`).
fn parse_rfc3339(s: &str) -> u64 {
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    let (hh, mm, ss, ms) = (n(11, 13), n(14, 16), n(17, 19), n(20, 23));
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (((days * 24 + hh) * 60 + mm) * 60 + ss) as u64 * 1000 + ms as u64
}

#[test]
fn start_accept_and_start_decline_show_the_right_state_on_both_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    let watch_a = Watcher::start(&a.dir);
    let watch_b = Watcher::start(&b.dir);

    // Start → accept: active on both, and both were told.
    let first = request(&a.dir, &b.dir);
    assert_eq!(state(&a.dir, &first), "pending");
    let req = watch_b.next_where("secret_request", |e| e["type"] == "secret_request");
    assert_eq!(req["secret_id"], first.as_str());
    assert_eq!(req["name"], "alice-phone");
    let out = tern(&b.dir, &["secret", "accept", &first]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("active"));
    wait_state(&a.dir, &first, "active");
    assert_eq!(state(&b.dir, &first), "active");
    watch_a.next_where("secret_accepted", |e| {
        e["type"] == "secret_accepted" && e["secret_id"] == first.as_str()
    });

    // Start → decline: cancelled on both.
    let second = request(&a.dir, &b.dir);
    let out = tern(&b.dir, &["secret", "decline", &second]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
    assert_eq!(state(&b.dir, &second), "cancelled");
    wait_state(&a.dir, &second, "cancelled");
    watch_a.next_where("secret_cancelled", |e| {
        e["type"] == "secret_cancelled" && e["secret_id"] == second.as_str()
    });
    // The asking side cannot accept its own request, nor accept it twice.
    let third = request(&a.dir, &b.dir);
    let out = tern(&a.dir, &["secret", "accept", &third]);
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);

    // Two active chats with the same contact coexist, each with its own key.
    let out = tern(&b.dir, &["secret", "accept", &third]);
    assert!(out.status.success());
    wait_state(&a.dir, &third, "active");
    assert_eq!(state(&a.dir, &first), "active");
    send(&a.dir, &first, "in the first chat");
    send(&a.dir, &third, "in the third chat");
    poll("both messages at B", || {
        let h1 = texts(&history(&b.dir, &first));
        let h3 = texts(&history(&b.dir, &third));
        (h1 == ["in the first chat"] && h3 == ["in the third chat"]).then_some(())
    });
    assert_ne!(key(&a.dir, &first, "hex"), key(&a.dir, &third, "hex"));
    let listed = chats(&b.dir);
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.iter().all(|c| c["peer"] == a.status()["account_id"]));
}

#[test]
fn both_devices_show_the_same_key_in_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    let id = active_chat(&a.dir, &b.dir);
    for format in ["hex", "emoji", "svg", "png", "picture"] {
        assert_eq!(
            key(&a.dir, &id, format),
            key(&b.dir, &id, format),
            "{format} differs"
        );
    }
    // The short code needs its commit-reveal round; it then matches too.
    let short = poll("the short code on both sides", || {
        let sa = String::from_utf8(key(&a.dir, &id, "short")).unwrap();
        let sb = String::from_utf8(key(&b.dir, &id, "short")).unwrap();
        (!sa.contains("not yet") && sa == sb).then_some(sa)
    });
    assert_eq!(short.split_whitespace().count(), 5, "{short}");
    let hex = String::from_utf8(key(&a.dir, &id, "hex")).unwrap();
    assert_eq!(hex.split_whitespace().collect::<String>().len(), 64);
    let emoji = String::from_utf8(key(&a.dir, &id, "emoji")).unwrap();
    assert_eq!(emoji.split_whitespace().count(), 22);

    // Files written with --out are byte-identical on both devices.
    for format in ["png", "svg"] {
        let fa = tmp.path().join(format!("a.{format}"));
        let fb = tmp.path().join(format!("b.{format}"));
        for (dir, f) in [(&a.dir, &fa), (&b.dir, &fb)] {
            let out = tern(
                dir,
                &[
                    "secret",
                    "key",
                    &id,
                    "--format",
                    format,
                    "--out",
                    f.to_str().unwrap(),
                ],
            );
            assert!(out.status.success());
        }
        let (ba, bb) = (std::fs::read(&fa).unwrap(), std::fs::read(&fb).unwrap());
        assert_eq!(ba, bb, "{format} files differ");
        if format == "png" {
            assert_eq!(&ba[..8], b"\x89PNG\r\n\x1a\n");
        } else {
            assert!(String::from_utf8(ba).unwrap().starts_with("<svg"));
        }
    }
}

#[test]
fn a_man_in_the_middle_gives_the_two_sides_different_keys() {
    // Alice believes she has Bob's ticket, but it is Mallory's; Mallory
    // opens her own secret chat with Bob and would pass messages along.
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    let dm = tmp.path().join("m");
    init(&dm, "bob-laptop"); // the same name as Bob's device
    let m = NodeProcess::start(&dm, LOOPBACK);
    connect(&m, &a);
    connect(&m, &b);
    let alice_side = active_chat(&a.dir, &m.dir);
    let bob_side = active_chat(&m.dir, &b.dir);
    for format in ["hex", "emoji", "png", "svg"] {
        assert_ne!(
            key(&a.dir, &alice_side, format),
            key(&b.dir, &bob_side, format),
            "{format} is the same on both sides of the middleman"
        );
    }
    let short = |dir: &Path, id: &str| {
        poll("a short code", || {
            let s = String::from_utf8(key(dir, id, "short")).unwrap();
            (!s.contains("not yet")).then_some(s)
        })
    };
    assert_ne!(short(&a.dir, &alice_side), short(&b.dir, &bob_side));
    // What each side can see: the account it is really talking to.
    assert_eq!(
        chat(&a.dir, &alice_side).unwrap()["peer"],
        m.status()["account_id"]
    );
    assert_ne!(
        chat(&a.dir, &alice_side).unwrap()["peer"],
        b.status()["account_id"]
    );
}

#[test]
fn a_timer_deletes_a_message_on_both_devices_two_to_three_seconds_after_it_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    let id = active_chat(&a.dir, &b.dir);
    let watch_a = Watcher::start(&a.dir);
    let watch_b = Watcher::start(&b.dir);

    let before = "sent before the timer: zebra-kumquat-1";
    send(&a.dir, &id, before);
    let out = tern(&a.dir, &["secret", "timer", &id, "2s"]);
    assert!(out.status.success());
    poll("the timer to reach B", || {
        (chat(&b.dir, &id).unwrap()["timer_ms"] == 2000).then_some(())
    });
    let doomed = "self-destructing: walrus-persimmon-2";
    let doomed_id = send(&a.dir, &id, doomed);
    poll("both messages stored at B", || {
        (chat(&b.dir, &id).unwrap()["messages"] == 2).then_some(())
    });

    // Unread, it does not expire: well past 2 s later it is still there.
    std::thread::sleep(std::time::Duration::from_millis(3500));
    assert_eq!(chat(&b.dir, &id).unwrap()["messages"], 2);
    assert_eq!(texts(&history(&a.dir, &id)), [before, doomed]);
    assert!(!files_containing(&b.dir, doomed.as_bytes()).is_empty());

    // B reads: the countdown starts there, and at A when the receipt lands.
    let shown = history(&b.dir, &id);
    assert_eq!(texts(&shown), [before, doomed]);
    assert!(shown[0]["expires_at"].is_null());
    let expires_at = parse_rfc3339(shown[1]["expires_at"].as_str().unwrap());
    let read_at = expires_at - 2000;

    for (side, w) in [("B", &watch_b), ("A", &watch_a)] {
        let e = w.next_where("secret_expired", |e| {
            e["type"] == "secret_expired"
                && e["message_ids"]
                    .as_array()
                    .is_some_and(|ids| ids.iter().any(|x| x == doomed_id.as_str()))
        });
        let after = e["at_ms"].as_u64().unwrap() - read_at;
        assert!(
            (2000..3000).contains(&after),
            "{side} deleted it {after} ms after it was read"
        );
    }
    for dir in [&a.dir, &b.dir] {
        assert_eq!(texts(&history(dir, &id)), [before]);
        assert_nowhere(dir, doomed);
        assert_nowhere(dir, &doomed_id);
        assert!(!files_containing(dir, before.as_bytes()).is_empty());
    }
}

#[test]
fn an_offline_recipient_gets_all_100_messages_in_order_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    let id = active_chat(&a.dir, &b.dir);
    let b_dir = b.dir.clone();
    assert!(b.stop().success());

    let sent: Vec<String> = (0..100)
        .map(|i| format!("offline message {i:03}"))
        .collect();
    for t in &sent {
        send(&a.dir, &id, t);
    }
    let waiting = chat(&a.dir, &id).unwrap()["outbox"].as_u64().unwrap();
    assert!(waiting >= 100, "only {waiting} frames wait for B");

    let b = NodeProcess::start(&b_dir, LOOPBACK);
    connect(&a, &b);
    poll("all 100 messages at B", || {
        (chat(&b.dir, &id).unwrap()["messages"] == 100).then_some(())
    });
    assert_eq!(texts(&history(&b.dir, &id)), sent);
    poll("A's outbox to drain", || {
        (chat(&a.dir, &id).unwrap()["outbox"] == 0).then_some(())
    });
    // And the chat goes on both ways.
    send(&b.dir, &id, "welcome back");
    poll("the reply at A", || {
        texts(&history(&a.dir, &id))
            .last()
            .map(String::as_str)
            .eq(&Some("welcome back"))
            .then_some(())
    });
    assert_eq!(history(&b.dir, &id).len(), 101);
}

#[test]
fn after_250_messages_the_keys_have_been_replaced_by_fresh_diffie_hellman() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    let id = active_chat(&a.dir, &b.dir);
    for i in 0..250 {
        let (from, _) = if i % 5 == 4 {
            (&b.dir, &a.dir)
        } else {
            (&a.dir, &b.dir)
        };
        send(from, &id, &format!("m{i}"));
    }
    poll("all 250 messages on both sides", || {
        let ca = chat(&a.dir, &id).unwrap();
        let cb = chat(&b.dir, &id).unwrap();
        (ca["messages"] == 250 && cb["messages"] == 250 && ca["outbox"] == 0 && cb["outbox"] == 0)
            .then_some(())
    });
    for dir in [&a.dir, &b.dir] {
        let c = chat(dir, &id).unwrap();
        assert!(c["rekeys"].as_u64().unwrap() >= 2, "{c}");
        assert!(c["epoch"].as_u64().unwrap() >= 2, "{c}");
    }
    let h = texts(&history(&b.dir, &id));
    let want: Vec<String> = (0..250).map(|i| format!("m{i}")).collect();
    let mut sorted = h.clone();
    sorted.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(sorted, want_sorted, "messages lost or duplicated");
}

#[test]
fn forwarding_is_refused_and_logout_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    let id = active_chat(&a.dir, &b.dir);
    let text = "for your eyes only: quokka-tamarind-3";
    let mid = send(&a.dir, &id, text);
    poll("the message at B", || {
        (texts(&history(&b.dir, &id)) == [text]).then_some(())
    });

    let out = tern(&b.dir, &["secret", "forward", &id, &mid, "--to", "anyone"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be forwarded"), "{err}");
    assert_eq!(err.lines().count(), 1);

    let fingerprint = String::from_utf8(key(&a.dir, &id, "hex")).unwrap();
    let fingerprint = fingerprint.split_whitespace().collect::<String>();
    let out = tern(&a.dir, &["logout"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(chats(&a.dir).is_empty());
    wait_state(&b.dir, &id, "closed");
    for needle in [text, &id, &mid, &fingerprint] {
        assert_nowhere(&a.dir, needle);
    }
    let erasable = a.dir.join("erasable");
    let left: Vec<_> = std::fs::read_dir(&erasable).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in {}: {left:?}", erasable.display());
    // B closed its side: nothing more can be sent there.
    let out = tern(&b.dir, &["secret", "send", &id, "hello?"]);
    assert!(!out.status.success());
}

#[test]
fn a_relay_and_storage_peer_between_the_devices_keeps_nothing_of_the_chat() {
    let tmp = tempfile::tempdir().unwrap();
    let (da, db, dr) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("r"),
    );
    for (d, n) in [(&dr, "community-server"), (&da, "alice"), (&db, "bob")] {
        init(d, n);
    }
    let (relay, circuit) = start_relay(&dr);
    // Bob is reachable only through the relay.
    let b = start_behind_relay(&db, &circuit);
    let _alice = NodeProcess::start(&da, LOOPBACK);
    let b_id = b.peer_id();
    let out = tern(&da, &["connect", &format!("{circuit}/p2p/{b_id}")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let id = active_chat(&da, &db);
    let mut needles = vec![id.clone()];
    for i in 0..20 {
        let t = format!("relayed secret {i}: capybara-{i}-rambutan");
        needles.push(send(&da, &id, &t));
        needles.push(t);
    }
    let reply = "relayed answer: axolotl-lychee";
    needles.push(send(&db, &id, reply));
    needles.push(reply.into());
    poll("everything delivered", || {
        (history(&db, &id).len() == 21 && history(&da, &id).len() == 21).then_some(())
    });
    // The traffic went through the relay: A sees B only on a circuit.
    let peers = tern_json(&da, &["peers", "--json"]);
    let to_b = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == b_id.as_str())
        .unwrap();
    assert!(
        to_b["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x.as_str().unwrap().contains("p2p-circuit")),
        "{to_b}"
    );
    let fp = String::from_utf8(key(&da, &id, "hex")).unwrap();
    needles.push(fp.split_whitespace().collect());
    let short = String::from_utf8(key(&da, &id, "emoji")).unwrap();
    needles.push(short.trim().to_owned());
    drop(relay); // flush nothing more: what is on disk is what it kept
    for n in &needles {
        assert_nowhere(&dr, n);
    }
    // The devices themselves do hold the chat.
    assert!(!files_containing(&db, b"axolotl-lychee").is_empty());
}

/// The frames waiting in a chat's outbox on disk, in order.
fn outbox_frames(dir: &Path, id: &str) -> Vec<SecretFrame> {
    let space = dir.join("erasable").join(format!("secret-{id}"));
    let mut frames: Vec<SecretFrame> = std::fs::read_dir(&space)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("o-"))
        .map(|e| SecretFrame::decode(&std::fs::read(e.path()).unwrap()).unwrap())
        .collect();
    frames.sort_by_key(|f| f.n);
    frames
}

/// Sends `requests` on `/tern/secret/1`, one at a time, from a libp2p node
/// with `identity` to `target`; returns the answers in order.
async fn send_as(
    identity: libp2p::identity::Keypair,
    target: libp2p::Multiaddr,
    requests: Vec<SecretRequest>,
) -> Vec<Result<SecretResponse, String>> {
    let (mut swarm, peer) = record_client(identity, "/tern/secret/1", target).await;
    let mut answers = Vec::new();
    for r in requests {
        answers.push(ask(&mut swarm, peer, r).await);
    }
    answers
}

#[test]
fn replayed_reordered_bit_flipped_and_foreign_frames_are_rejected_and_the_chat_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    let id = active_chat(&a.dir, &b.dir);
    send(&a.dir, &id, "hello");
    poll("hello at B", || {
        (texts(&history(&b.dir, &id)) == ["hello"]).then_some(())
    });
    let (a_dir, b_dir) = (a.dir.clone(), b.dir.clone());
    let drained = |what: &str| {
        poll(what, || {
            (chat(&a_dir, &id).unwrap()["outbox"] == 0).then_some(())
        });
    };
    drained("A's outbox to drain");

    // An attacker who stole Alice's transport key (not the chat's keys)
    // records frames while Bob is offline…
    assert!(b.stop().success());
    send(&a_dir, &id, "captured one");
    let first = outbox_frames(&a_dir, &id);
    assert_eq!(first.len(), 1);
    let b = NodeProcess::start(&b_dir, LOOPBACK);
    connect(&a, &b);
    poll("the first capture delivered", || {
        (texts(&history(&b_dir, &id)) == ["hello", "captured one"]).then_some(())
    });
    drained("A's outbox to drain again");
    assert!(b.stop().success());
    send(&a_dir, &id, "captured two");
    send(&a_dir, &id, "captured three");
    let later = outbox_frames(&a_dir, &id);
    assert_eq!(later.len(), 2);
    // …and takes Alice's place while she is offline.
    assert!(a.stop().success());
    let b = NodeProcess::start(&b_dir, LOOPBACK);
    let before = metric(&b_dir, "tern_rejected_frames_total");
    let secret_id: [u8; 16] = data_encoding::HEXLOWER
        .decode(id.as_bytes())
        .unwrap()
        .try_into()
        .unwrap();
    let frames = |f: Vec<SecretFrame>| SecretRequest::Frames {
        secret_id,
        frames: f,
    };
    let mut flipped = later[0].clone();
    flipped.ciphertext[3] ^= 0x10;
    let alice = tern_node::keys::load(&tern_node::data_dir::DataDir::new(&a_dir), None)
        .unwrap()
        .device;
    let target: libp2p::Multiaddr = b.tcp_addr().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answers = rt.block_on(send_as(
        alice,
        target.clone(),
        vec![
            frames(first.clone()),          // replayed
            frames(vec![later[1].clone()]), // reordered: the third before the second
            frames(vec![flipped]),          // one bit flipped
        ],
    ));
    let expected = SecretResponse::Ack { next: later[0].n };
    for (what, answer) in ["replay", "reorder", "bit flip"].iter().zip(&answers) {
        assert_eq!(answer.as_ref().unwrap(), &expected, "{what}");
    }
    // Someone else entirely, with a frame for this chat: it is not theirs.
    let stranger = libp2p::identity::Keypair::generate_ed25519();
    let answers = rt.block_on(send_as(stranger, target, vec![frames(later.clone())]));
    assert_eq!(answers[0].as_ref().unwrap(), &SecretResponse::Unknown);
    poll("every attack counted as rejected", || {
        (metric(&b_dir, "tern_rejected_frames_total") >= before + 4.0).then_some(())
    });
    assert_eq!(texts(&history(&b_dir, &id)), ["hello", "captured one"]);

    // Alice comes back: her real frames go through, once each, in order.
    let a = NodeProcess::start(&a_dir, LOOPBACK);
    connect(&a, &b);
    poll("the held-back messages at B", || {
        (history(&b_dir, &id).len() == 4).then_some(())
    });
    assert_eq!(
        texts(&history(&b_dir, &id)),
        ["hello", "captured one", "captured two", "captured three"]
    );
    send(&b_dir, &id, "all good here");
    poll("B's answer at A", || {
        (texts(&history(&a_dir, &id)).last().map(String::as_str) == Some("all good here"))
            .then_some(())
    });
}
