//! Device linking over real processes: `tern device link` on a running
//! node, `tern init --link CODE` on a new data directory, and the account's
//! device list on both (`tern device list`, `tern device revoke`).

mod support;

use std::{io::Read, io::Write, path::Path};

use serde_json::Value;
use support::*;
use tern_protocol::link::LinkCode;

/// `tern device link` on `dir`: the code, checked to be one line.
fn link_code(dir: &Path) -> String {
    let out = tern(dir, &["device", "link"]);
    assert!(
        out.status.success(),
        "device link: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one line: {text:?}");
    let code = text.trim().to_owned();
    assert!(code.starts_with("tern-link:"), "{code}");
    code
}

/// `tern init --link CODE --name NAME` on `dir`: (success, stderr).
fn init_linked(dir: &Path, code: &str, name: &str) -> (bool, String) {
    let out = tern(dir, &["init", "--link", code, "--name", name]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

fn must_link(dir: &Path, code: &str, name: &str) {
    let (ok, err) = init_linked(dir, code, name);
    assert!(ok, "init --link failed: {err}{}", node_logs());
}

/// `tern device list --json`, as (name, this_device, revoked) sorted by name.
fn devices(dir: &Path) -> Vec<(String, bool, bool)> {
    let v = tern_json(dir, &["device", "list", "--json"]);
    let mut out: Vec<_> = v
        .as_array()
        .expect("an array")
        .iter()
        .map(|d| {
            assert!(d["device"].as_str().unwrap().starts_with("12D3KooW"));
            (
                d["name"].as_str().unwrap().to_owned(),
                d["this_device"].as_bool().unwrap(),
                d["revoked"].as_bool().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn device_id(dir: &Path, name: &str) -> String {
    let v = tern_json(dir, &["device", "list", "--json"]);
    v.as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .and_then(|d| d["device"].as_str())
        .unwrap_or_else(|| panic!("no device {name}"))
        .to_owned()
}

/// GET `path` on the node of `dir` with its token: (status, JSON body).
fn api_get(dir: &Path, path: &str) -> (u16, Value) {
    api_request(dir, "GET", path, true)
}

fn api_request(dir: &Path, method: &str, path: &str, with_token: bool) -> (u16, Value) {
    let endpoint: Value =
        serde_json::from_slice(&std::fs::read(dir.join("api.json")).unwrap()).unwrap();
    let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
    let auth = if with_token {
        format!("Authorization: Bearer {}\r\n", token.trim())
    } else {
        String::new()
    };
    let mut s = std::net::TcpStream::connect(endpoint["address"].as_str().unwrap()).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The names of the devices in the node's own signed account record.
fn record_devices(dir: &Path) -> Vec<String> {
    let (code, v) = api_get(dir, "/v1/account");
    assert_eq!(code, 200, "{v}");
    let mut names: Vec<String> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d[1].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

fn entry(name: &str, this: bool, revoked: bool) -> (String, bool, bool) {
    (name.to_owned(), this, revoked)
}

#[test]
fn a_linked_device_joins_the_account_learns_its_devices_and_can_be_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let (a_dir, b_dir, c_dir, d_dir) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
        tmp.path().join("d"),
    );
    init(&a_dir, "laptop");
    let a = NodeProcess::start(&a_dir, LOOPBACK);
    let code = link_code(&a_dir);
    must_link(&b_dir, &code, "phone");

    // The new device starts from the linker's addresses.
    let config = std::fs::read_to_string(b_dir.join("config.toml")).unwrap();
    assert!(config.contains(&a.peer_id()), "bootstrap: {config}");
    let b = NodeProcess::start(&b_dir, LOOPBACK);
    assert_eq!(a.status()["account_id"], b.status()["account_id"]);
    assert_ne!(a.peer_id(), b.peer_id());

    assert_eq!(
        devices(&a_dir),
        vec![entry("laptop", true, false), entry("phone", false, false)]
    );
    assert_eq!(
        devices(&b_dir),
        vec![entry("laptop", false, false), entry("phone", true, false)]
    );
    assert_eq!(record_devices(&a_dir), ["laptop", "phone"]);
    assert_eq!(record_devices(&b_dir), ["laptop", "phone"]);
    poll("the new device to connect to the linker", || {
        (b.connected_peers() >= 1).then_some(())
    });

    // A third device, linked by the second: the first learns of it from
    // the second's record when they next meet.
    let code = link_code(&b_dir);
    must_link(&c_dir, &code, "tablet");
    assert_eq!(record_devices(&b_dir), ["laptop", "phone", "tablet"]);
    a.stop();
    let a = NodeProcess::start(&a_dir, LOOPBACK);
    poll("the first device to learn of the third", || {
        devices(&a_dir)
            .contains(&entry("tablet", false, false))
            .then_some(())
    });
    assert_eq!(record_devices(&a_dir), ["laptop", "phone", "tablet"]);

    // Revoking takes the device out of the record, and it stays out: a
    // record from another device that still lists it does not bring it
    // back, also after a restart.
    let tablet = device_id(&a_dir, "tablet");
    let out = tern(&a_dir, &["device", "revoke", &tablet[..24]]);
    assert!(
        out.status.success(),
        "revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(devices(&a_dir).contains(&entry("tablet", false, true)));
    assert_eq!(record_devices(&a_dir), ["laptop", "phone"]);
    let code = link_code(&b_dir);
    must_link(&d_dir, &code, "watch");
    a.stop();
    let _a = NodeProcess::start(&a_dir, LOOPBACK);
    poll("the first device to learn of the fourth", || {
        devices(&a_dir)
            .contains(&entry("watch", false, false))
            .then_some(())
    });
    assert_eq!(
        devices(&a_dir),
        vec![
            entry("laptop", true, false),
            entry("phone", false, false),
            entry("tablet", false, true),
            entry("watch", false, false)
        ]
    );
    assert_eq!(record_devices(&a_dir), ["laptop", "phone", "watch"]);

    // This device cannot revoke itself.
    let out = tern(&a_dir, &["device", "revoke", &device_id(&a_dir, "laptop")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is this device"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn wrong_used_and_unreachable_codes_fail_clearly_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = tmp.path().join("a");
    let b_dir = tmp.path().join("b");
    init(&a_dir, "laptop");
    let a = NodeProcess::start(&a_dir, LOOPBACK);

    for route in [
        ("GET", "/v1/devices"),
        ("POST", "/v1/devices/link"),
        ("POST", "/v1/devices/revoke"),
    ] {
        let (code, _) = api_request(&a_dir, route.0, route.1, false);
        assert_eq!(code, 401, "{route:?} without the token");
    }

    let fails = |dir: &Path, code: &str, expect: &str| {
        let (ok, err) = init_linked(dir, code, "phone");
        assert!(!ok, "init --link {code} succeeded");
        assert!(err.contains(expect), "expected {expect:?} in: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!dir.join("account.key").exists() && !dir.join("config.toml").exists());
    };

    // Not a code at all: refused before anything is dialled.
    fails(&b_dir, "hello", "starts with \"tern-link:\"");

    // A wrong secret for a real code: refused, and the code is burnt, so
    // the right secret fails too.
    let right = link_code(&a_dir);
    let parsed: LinkCode = right.parse().unwrap();
    let wrong = LinkCode::new(parsed.linker, parsed.addrs.clone(), parsed.id, [0x55; 32]);
    fails(&b_dir, &wrong.to_string(), "wrong");
    fails(&b_dir, &right, "already used");

    // A used code cannot be used again.
    let code = tern_json(&a_dir, &["device", "link", "--json"])["code"]
        .as_str()
        .unwrap()
        .to_owned();
    must_link(&b_dir, &code, "phone");
    fails(&tmp.path().join("c"), &code, "already used");

    // A directory that already has an identity is refused before the code
    // is used: the code still works elsewhere.
    let code = link_code(&a_dir);
    let (ok, err) = init_linked(&b_dir, &code, "again");
    assert!(!ok && err.contains("refusing to overwrite"), "{err}");
    must_link(&tmp.path().join("d"), &code, "tablet");
    assert_eq!(devices(&a_dir).len(), 3);

    // The linker is gone.
    let code = link_code(&a_dir);
    a.stop();
    let (ok, err) = init_linked(&tmp.path().join("e"), &code, "watch");
    assert!(!ok);
    assert!(
        err.contains("could not reach") || err.contains("no answer"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_on_the_wire_are_refused_and_burn_the_code() {
    use tern_protocol::link::{LinkRefusal, LinkRequest, LinkResponse};
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = tmp.path().join("a");
    let node = tokio::task::spawn_blocking({
        let a_dir = a_dir.clone();
        move || {
            init(&a_dir, "laptop");
            NodeProcess::start(&a_dir, LOOPBACK)
        }
    })
    .await
    .unwrap();
    let code: LinkCode = link_code(&a_dir).parse().unwrap();
    let target = node.tcp_addr().parse().unwrap();
    let identity = libp2p::identity::Keypair::generate_ed25519();
    let (mut swarm, peer) =
        record_client::<LinkRequest, LinkResponse>(identity, "/tern/link/1", target).await;

    // Another code id: unknown, and the real code is untouched.
    let other = LinkRequest::Hello {
        code: [0; 8],
        nonce: [1; 32],
    };
    assert_eq!(
        ask(&mut swarm, peer, other).await,
        Ok(LinkResponse::Refused(LinkRefusal::Unknown))
    );
    // A proof sent without asking for a challenge is a guess: refused, and
    // it uses the code up.
    let guess = LinkRequest::Proof {
        code: code.id,
        mac: [7; 32],
        name: "mallory".into(),
    };
    assert_eq!(
        ask(&mut swarm, peer, guess.clone()).await,
        Ok(LinkResponse::Refused(LinkRefusal::WrongProof))
    );
    assert_eq!(
        ask(&mut swarm, peer, guess).await,
        Ok(LinkResponse::Refused(LinkRefusal::Used))
    );
    let (ok, err) = tokio::task::spawn_blocking({
        let dir = tmp.path().join("b");
        let code = code.to_string();
        move || init_linked(&dir, &code, "phone")
    })
    .await
    .unwrap();
    assert!(!ok && err.contains("already used"), "{err}");
    assert_eq!(
        tokio::task::spawn_blocking(move || devices(&a_dir))
            .await
            .unwrap(),
        vec![entry("laptop", true, false)]
    );
}
