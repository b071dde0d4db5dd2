//! The control API and CLI contract: authentication, loopback only, clear
//! one-line errors that change nothing, identity at rest.

mod support;

use std::{io::Write, net::TcpStream, time::Duration};

use serde_json::Value;
use support::*;

/// Raw HTTP/1.1 request on loopback; returns the status code and body.
fn http(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

fn api_addr(dir: &std::path::Path) -> String {
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("api.json")).unwrap()).unwrap();
    v["address"].as_str().unwrap().to_owned()
}

fn token(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("api.token"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn every_route_needs_the_bearer_token() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), "a");
    let _node = NodeProcess::start(tmp.path(), LOOPBACK);
    let addr = api_addr(tmp.path());
    let good = token(tmp.path());
    let routes = [
        ("GET", "/v1/status"),
        ("GET", "/v1/peers"),
        ("GET", "/v1/ticket"),
        ("POST", "/v1/connect"),
        ("GET", "/v1/events"),
        ("GET", "/metrics"),
        ("GET", "/v1/secret"),
        ("POST", "/v1/secret"),
        ("POST", "/v1/secret/00000000/accept"),
        ("POST", "/v1/secret/00000000/decline"),
        ("POST", "/v1/secret/00000000/close"),
        ("GET", "/v1/secret/00000000/key"),
        ("GET", "/v1/secret/00000000/messages"),
        ("POST", "/v1/secret/00000000/messages"),
        ("POST", "/v1/secret/00000000/timer"),
        ("POST", "/v1/secret/00000000/delete"),
        ("POST", "/v1/secret/00000000/clear"),
        ("POST", "/v1/secret/00000000/forward"),
        ("POST", "/v1/logout"),
        ("GET", "/v1/host"),
        ("GET", "/v1/account"),
        ("GET", "/v1/accounts/x"),
        ("POST", "/v1/host/allow"),
        ("POST", "/v1/host/deny"),
        ("GET", "/v1/chats"),
        ("POST", "/v1/chats"),
        ("GET", "/v1/chats/00000000/messages"),
        ("POST", "/v1/chats/00000000/messages"),
        ("GET", "/v1/chats/00000000/messages/00000000"),
        ("POST", "/v1/chats/00000000/messages/00000000/edit"),
        ("POST", "/v1/chats/00000000/delete"),
        ("POST", "/v1/chats/00000000/clear"),
        ("POST", "/v1/chats/00000000/read"),
        ("GET", "/v1/chats/00000000/replicas"),
        ("POST", "/v1/chats/00000000/storage"),
        ("GET", "/no/such/route"),
    ];
    for (method, path) in routes {
        for auth in [
            "",
            "Authorization: Bearer wrong\r\n",
            "Authorization: Basic abc\r\n",
        ] {
            let (code, body) = http(
                &addr,
                &format!(
                    "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n{auth}\r\n"
                ),
            );
            assert_eq!(code, 401, "{method} {path} with {auth:?}: {body}");
        }
        // A token differing in the last character is still wrong.
        let mut near = good.clone();
        near.pop();
        near.push('x');
        let (code, _) = http(
            &addr,
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {near}\r\n\r\n"
            ),
        );
        assert_eq!(code, 401);
    }
    let (code, body) = http(
        &addr,
        &format!(
            "GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {good}\r\n\r\n"
        ),
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(
        &addr,
        &format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {good}\r\n\r\n"
        ),
    );
    assert_eq!(code, 200);
    // Both libp2p's metrics and the node's own are exported.
    assert!(body.contains("tern_connected_peers"), "{body}");
    assert!(body.contains("libp2p_"), "no libp2p metrics");
    assert!(
        body.contains("tern_api_requests_total{status=\"401\"}"),
        "{body}"
    );
}

#[test]
fn api_on_a_non_loopback_address_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), "a");
    for api in ["0.0.0.0:0", "[::]:0", "192.0.2.1:80"] {
        let mut args = LOOPBACK.to_vec();
        args.extend(["--api", api]);
        let out = tern(tmp.path(), &[&["node"][..], &args].concat());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("loopback"), "{api}: {err}");
        assert!(
            !tmp.path().join("api.json").exists(),
            "a refused node left api.json"
        );
    }
    // Same in the config file.
    let cfg = tmp.path().join("config.toml");
    let original = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{original}\napi = \"0.0.0.0:7070\"\n").replace("api = \"127.0.0.1:0\"\n", ""),
    )
    .unwrap();
    let out = tern(tmp.path(), &[&["node"][..], LOOPBACK].concat());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn init_refuses_to_overwrite_and_client_errors_are_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), "first");
    let key = std::fs::read(tmp.path().join("account.key")).unwrap();
    let out = tern(tmp.path(), &["init", "--name", "second"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(
        std::fs::read(tmp.path().join("account.key")).unwrap(),
        key,
        "key changed"
    );

    // No node running: status says so and how to fix it, in one line.
    let out = tern(tmp.path(), &["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tern node"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A node that died without cleaning up (stale api.json) is reported as
    // not answering, not as a crash.
    let mut node = NodeProcess::start(tmp.path(), LOOPBACK);
    kill9(node.pid());
    // The leader thread turns zombie before the other threads are gone, so
    // wait for the process as a whole.
    poll("the killed node to be reaped", || {
        (!node.is_running()).then_some(())
    });
    let out = tern(tmp.path(), &["peers"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not answer"));

    // Not initialised at all.
    let empty = tempfile::tempdir().unwrap();
    let out = tern(empty.path(), &["node"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tern init"));
}

#[test]
fn passphrase_protected_identity_needs_the_passphrase_to_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let pass = tmp.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let out = tern(
        &dir,
        &[
            "init",
            "--name",
            "p",
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    #[cfg(unix)]
    for f in ["account.key", "device.key", "api.token"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }

    let out = tern(&dir, &[&["node"][..], LOOPBACK].concat());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--passphrase-file"));

    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    let mut args = vec!["node", "--passphrase-file", wrong.to_str().unwrap()];
    args.extend(LOOPBACK);
    let out = tern(&dir, &args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));

    let mut args = vec!["--passphrase-file", pass.to_str().unwrap()];
    args.extend(LOOPBACK);
    let node = NodeProcess::start(&dir, &args);
    assert!(node.status()["account_id"].as_str().unwrap().len() == 52);
}

#[test]
fn sigterm_stops_the_node_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), "a");
    let node = NodeProcess::start(tmp.path(), LOOPBACK);
    let status = node.stop();
    assert!(status.success(), "{status}");
    assert!(
        !tmp.path().join("api.json").exists(),
        "api.json left behind after a clean stop"
    );
}

#[test]
fn watch_streams_peer_events_as_json_lines() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&a, "a");
    init(&b, "b");
    let node_a = NodeProcess::start(&a, LOOPBACK);
    let _node_b = NodeProcess::start(&b, LOOPBACK);

    let mut watch = std::process::Command::new(tern_bin())
        .arg("--data-dir")
        .arg(&a)
        .args(["watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(DEADLINE).expect("a first event");
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["type"], "subscribed", "{first}");

    let ticket = String::from_utf8(tern(&b, &["ticket"]).stdout).unwrap();
    let out = tern(&a, &["connect", ticket.trim()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut events: Vec<Value> = Vec::new();
    poll("peer events on the stream", || {
        while let Ok(line) = rx.try_recv() {
            events.push(
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")),
            );
        }
        let identified = events
            .iter()
            .any(|e| e["type"] == "peer_identified" && e["name"] == "b");
        let connected = events.iter().any(|e| e["type"] == "peer_connected");
        (identified && connected).then_some(())
    });
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(events.iter().all(|e| e["at_ms"].as_u64().is_some()));
    drop(node_a);
}

#[test]
fn a_damaged_api_token_stops_the_node_from_starting() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), "a");
    for bad in ["", "\n", "short"] {
        std::fs::write(tmp.path().join("api.token"), bad).unwrap();
        let out = tern(tmp.path(), &[&["node"][..], LOOPBACK].concat());
        assert!(!out.status.success(), "started with token {bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("API token"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!tmp.path().join("api.json").exists());
    }
}

#[test]
fn renaming_a_device_re_signs_its_certificate_and_peers_see_the_new_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&a, "old-name");
    init(&b, "b");
    let mut args = LOOPBACK.to_vec();
    args.extend(["--name", "new-name"]);
    let node_a = NodeProcess::start(&a, &args);
    assert_eq!(node_a.status()["name"], "new-name");
    let _node_b = NodeProcess::start(&b, LOOPBACK);
    let out = tern(&b, &["connect", &node_a.tcp_addr()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll("b to learn a's new name", || {
        let peers = tern_json(&b, &["peers", "--json"]);
        peers
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "new-name")
            .then_some(())
    });
}

#[test]
fn bad_flags_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for args in [
        &["node", "--listen", "not-an-addr"][..],
        &["status", "--bogus"][..],
        &["frobnicate"][..],
    ] {
        let out = tern(tmp.path(), args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

#[test]
fn the_hosting_policy_is_set_by_command_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, other) = (tmp.path().join("host"), tmp.path().join("friend"));
    init(&d, "community");
    init(&other, "friend");
    let friend_id = NodeProcess::start(&other, LOOPBACK).status()["account_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let node = NodeProcess::start(&d, LOOPBACK);
    let s = tern_json(&d, &["host", "list", "--json"]);
    assert_eq!(s["mode"], "allow-list");
    assert_eq!(s["quota_bytes"], 1024u64 * 1024 * 1024);
    assert!(s["allowed"].as_array().unwrap().is_empty());

    let out = tern(&d, &["host", "allow", &friend_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tern(&d, &["host", "allow", "not-an-account"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not an account id"), "{err}");
    let s = tern_json(&d, &["host", "list", "--json"]);
    assert_eq!(s["allowed"], serde_json::json!([friend_id]));

    assert!(node.stop().success());
    let _node = NodeProcess::start(
        &d,
        &[LOOPBACK, &["--host-open", "--storage-quota-mib", "5"]].concat(),
    );
    let s = tern_json(&d, &["host", "list", "--json"]);
    assert_eq!(s["allowed"], serde_json::json!([friend_id]));
    assert_eq!(s["mode"], "open");
    assert_eq!(s["quota_bytes"], 5u64 * 1024 * 1024);
    let out = tern(&d, &["host", "deny", &friend_id]);
    assert!(out.status.success());
    let s = tern_json(&d, &["host", "list", "--json"]);
    assert!(s["allowed"].as_array().unwrap().is_empty());
    assert_eq!(s["denied"], serde_json::json!([friend_id]));
}

/// `GET path` on a node's API, with its token; returns (status, JSON body).
fn get_json(dir: &std::path::Path, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = http(
        &api_addr(dir),
        &format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
            token(dir)
        ),
    );
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    (code, json)
}

#[test]
fn devices_learn_each_others_signed_account_records_when_they_meet() {
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&da, "alice");
    init(&db, "bob");
    let a = NodeProcess::start(&da, LOOPBACK);
    let b = NodeProcess::start(&db, LOOPBACK);
    let bob_id = b.status()["account_id"].as_str().unwrap().to_owned();
    let (code, own) = get_json(&db, "/v1/account");
    assert_eq!(code, 200, "{own}");
    assert_eq!(own["account_id"], bob_id.as_str());
    assert_eq!(own["encryption_key"].as_str().unwrap().len(), 64);
    assert_eq!(own["devices"][0][0], b.peer_id().as_str());

    // Before they meet, Alice's node knows nothing of Bob's account.
    let (code, _) = get_json(&da, &format!("/v1/accounts/{bob_id}"));
    assert_eq!(code, 404);
    let out = tern(&da, &["connect", &b.tcp_addr()]);
    assert!(out.status.success());
    let seen = poll("Bob's record at Alice's node", || {
        let (code, v) = get_json(&da, &format!("/v1/accounts/{bob_id}"));
        (code == 200).then_some(v)
    });
    assert_eq!(seen["encryption_key"], own["encryption_key"]);
    assert_eq!(seen["devices"], own["devices"]);
    let (code, _) = get_json(&da, "/v1/accounts/not-an-account");
    assert_eq!(code, 400);
    drop(a);
}
