//! Joining a running testnet from outside: by bootstrap address, by ticket,
//! and (with mDNS off) by nothing else.

mod support;

use serde_json::Value;
use support::*;

fn connected_peer_ids(dir: &std::path::Path) -> Vec<String> {
    tern_json(dir, &["peers", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_node_started_with_bootstrap_joins_and_is_seen_by_every_node() {
    let tmp = tempfile::tempdir().unwrap();
    let net = TestnetProcess::start(&tmp.path().join("net"), 3);
    let boot = dial_addr(&net.status(1));

    let dir = tmp.path().join("newcomer");
    init(&dir, "newcomer");
    let mut args = LOOPBACK.to_vec();
    args.extend(["--bootstrap", &boot]);
    let newcomer = NodeProcess::start(&dir, &args);
    let id = newcomer.peer_id();

    // Only node-1 was named; the DHT introduces the rest.
    for k in 1..=3 {
        poll(&format!("node-{k} to see the newcomer"), || {
            connected_peer_ids(&net.node_dir(k))
                .contains(&id)
                .then_some(())
        });
    }
    poll("the newcomer to see all three", || {
        (newcomer.connected_peers() == 3).then_some(())
    });
    // It comes to know who they are: their certificates are exchanged and
    // checked just after each connection opens, so this is polled too.
    let peers = poll("the newcomer to know all three by name", || {
        let peers = tern_json(&dir, &["peers", "--json"]);
        let named = peers.as_array()?.iter().all(|p| p["name"].is_string());
        named.then_some(peers)
    });
    let peers = peers.as_array().unwrap();
    assert_eq!(peers.len(), 3, "{peers:?}");
    for p in peers {
        assert!(p["name"].as_str().unwrap().starts_with("node-"), "{p}");
        assert_eq!(p["account_id"].as_str().unwrap().len(), 52);
    }
}

#[test]
fn without_mdns_a_node_is_alone_until_it_connects_by_ticket() {
    let tmp = tempfile::tempdir().unwrap();
    let net = TestnetProcess::start(&tmp.path().join("net"), 2);

    let dir = tmp.path().join("loner");
    init(&dir, "loner");
    let loner = NodeProcess::start(&dir, LOOPBACK);

    // A second outsider joins by bootstrap; by the time it is fully in, the
    // loner (no mDNS, no bootstrap) has had every chance and found no one.
    let dir2 = tmp.path().join("joiner");
    init(&dir2, "joiner");
    let boot = dial_addr(&net.status(1));
    let mut args = LOOPBACK.to_vec();
    args.extend(["--bootstrap", &boot]);
    let joiner = NodeProcess::start(&dir2, &args);
    poll("the joiner to be fully connected", || {
        (joiner.connected_peers() == 2).then_some(())
    });
    assert_eq!(
        loner.connected_peers(),
        0,
        "a node without mDNS or bootstrap found peers"
    );

    // The ticket path: one copy-pasted line.
    let ticket = String::from_utf8(tern(&net.node_dir(2), &["ticket"]).stdout).unwrap();
    assert!(ticket.trim().starts_with("tern"), "{ticket}");
    let out = tern(&dir, &["connect", ticket.trim()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node2 = net.status(2)["peer_id"].as_str().unwrap().to_owned();
    poll("node-2 to see the loner", || {
        connected_peer_ids(&net.node_dir(2))
            .contains(&loner.peer_id())
            .then_some(())
    });
    assert!(connected_peer_ids(&dir).contains(&node2));

    // A remembered peer survives a restart of the loner: it redials by itself.
    let status = loner.stop();
    assert!(status.success());
    let loner = NodeProcess::start(&dir, LOOPBACK);
    assert!(
        loner.status()["known_peers"].as_u64().unwrap() >= 1,
        "address book not restored"
    );
    poll("the restarted loner to redial node-2", || {
        connected_peer_ids(&dir).contains(&node2).then_some(())
    });
    drop(loner);
}

#[test]
fn connect_reports_bad_targets_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir, "a");
    let _node = NodeProcess::start(&dir, LOOPBACK);
    for (target, expect) in [
        ("not-a-ticket", "not a ticket or multiaddr"),
        ("/ip4/1.2.3/tcp/1", "not a valid multiaddr"),
        ("ternaaaa", "ticket"),
        // Nothing listens on port 1 of loopback: refused at once.
        ("/ip4/127.0.0.1/tcp/1", "could not connect"),
    ] {
        let out = tern(&dir, &["connect", target]);
        assert!(!out.status.success(), "{target} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{target}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line please: {err}");
    }
}

#[test]
fn a_restarted_node_keeps_its_port_unless_someone_else_took_it() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), "a");
    let node = NodeProcess::start(tmp.path(), LOOPBACK);
    let first = node.status()["listen_addrs"].clone();
    let tcp_port = |addrs: &Value| -> u16 {
        let status = serde_json::json!({ "listen_addrs": addrs });
        tcp_listen_addr(&status)
            .rsplit('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(node.stop().success());

    let node = NodeProcess::start(tmp.path(), LOOPBACK);
    assert_eq!(node.status()["listen_addrs"], first, "ports not reused");
    assert!(node.stop().success());

    // Another program now holds the TCP port: the node must not share it.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", tcp_port(&first))).unwrap();
    let node = NodeProcess::start(tmp.path(), LOOPBACK);
    let moved = node.status()["listen_addrs"].clone();
    assert_ne!(tcp_port(&moved), tcp_port(&first));
    // And it is reachable on its new port.
    let other = tmp.path().join("other");
    init(&other, "other");
    let _peer = NodeProcess::start(&other, LOOPBACK);
    let out = tern(&other, &["connect", &node.tcp_addr()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(squatter);
}
