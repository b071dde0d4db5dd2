//! Discovery and reachability beyond plain dialling: mDNS between two hosts
//! on one LAN segment, and a connection carried by a relay.
//!
//! The LAN is two network namespaces joined by a veth pair, made by this test
//! and deleted when it ends: multicast never leaves the sandbox. That needs
//! root; without it the mDNS test says so and is skipped, unless
//! TERN_REQUIRE_NETNS=1 (set by .ci/run) makes that a failure.

mod support;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use serde_json::Value;
use support::*;

/// A network namespace that exists for the lifetime of this value.
struct Netns(String);

impl Netns {
    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        Netns::ip(&["netns", "del", &self.0]);
    }
}

/// Two hosts, 10.201.0.1 and 10.201.0.2, on a private veth link.
fn lan() -> Option<(Netns, Netns)> {
    let tag = std::process::id();
    let (a, b) = (format!("tern-a-{tag}"), format!("tern-b-{tag}"));
    if !Netns::ip(&["netns", "add", &a]) {
        return None;
    }
    let na = Netns(a.clone());
    assert!(Netns::ip(&["netns", "add", &b]), "second namespace");
    let nb = Netns(b.clone());
    let (va, vb) = (format!("tva{tag}"), format!("tvb{tag}"));
    for args in [
        vec![
            "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ],
        vec!["-n", &a, "addr", "add", "10.201.0.1/24", "dev", &va],
        vec!["-n", &b, "addr", "add", "10.201.0.2/24", "dev", &vb],
        vec!["-n", &a, "link", "set", &va, "up", "multicast", "on"],
        vec!["-n", &b, "link", "set", &vb, "up", "multicast", "on"],
        vec!["-n", &a, "link", "set", "lo", "up"],
        vec!["-n", &b, "link", "set", "lo", "up"],
    ] {
        assert!(Netns::ip(&args), "ip {args:?}");
    }
    Some((na, nb))
}

/// `tern` run inside a namespace.
fn tern_in(ns: &Netns, dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(tern_bin())
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("run tern in namespace")
}

struct NsNode(Child);

impl Drop for NsNode {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a node with default listen addresses (all interfaces) in `ns`.
fn start_in(ns: &Netns, dir: &Path, extra: &[&str]) -> NsNode {
    let log = std::fs::File::create(dir.join("node.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(tern_bin())
        .arg("--data-dir")
        .arg(dir)
        .arg("node")
        .args(extra)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    poll("namespaced node to serve", || {
        tern_in(ns, dir, &["status"]).status.success().then_some(())
    });
    NsNode(child)
}

fn connected(ns: &Netns, dir: &Path) -> u64 {
    let out = tern_in(ns, dir, &["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["connected_peers"].as_u64().unwrap_or(0)
}

#[test]
fn mdns_finds_a_peer_on_the_same_lan_and_no_mdns_does_not() {
    let is_root = unsafe { libc::geteuid() } == 0;
    let required = std::env::var_os("TERN_REQUIRE_NETNS").is_some();
    let Some((a, b)) = is_root.then(lan).flatten() else {
        assert!(
            !required,
            "TERN_REQUIRE_NETNS is set but network namespaces cannot be made (root and iproute2 are needed)"
        );
        eprintln!("SKIPPED mdns test: creating network namespaces needs root and iproute2");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (da, db, dc) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    for (d, n) in [(&da, "a"), (&db, "b"), (&dc, "c")] {
        init(d, n);
    }

    // Host B runs a node that does not use mDNS; host A one that does.
    // Neither is told about the other.
    let _quiet = start_in(&b, &dc, &["--no-mdns"]);
    let _na = start_in(&a, &da, &[]);
    // A node with mDNS on host B: A and it must find each other by multicast.
    let _nb = start_in(&b, &db, &[]);
    poll("mDNS peers on the two hosts to connect", || {
        (connected(&a, &da) >= 1 && connected(&b, &db) >= 1).then_some(())
    });
    let peers: Value =
        serde_json::from_slice(&tern_in(&a, &da, &["peers", "--json"]).stdout).unwrap();
    let names: Vec<&str> = peers
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(names.contains(&"b"), "{peers}");
    assert!(
        !names.contains(&"c"),
        "a --no-mdns node was found by multicast: {peers}"
    );
    assert_eq!(
        connected(&b, &dc),
        0,
        "the --no-mdns node found peers without bootstrap"
    );
}

#[test]
fn a_relay_carries_a_connection_to_a_node_that_is_only_reachable_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (dr, db, da) = (
        tmp.path().join("relay"),
        tmp.path().join("b"),
        tmp.path().join("a"),
    );
    for (d, n) in [(&dr, "relay"), (&db, "b"), (&da, "a")] {
        init(d, n);
    }
    // A relay serves once it knows an address others reach it at: the
    // operator declares it with --external, as on a public server.
    let (_relay, circuit) = start_relay(&dr);
    // B listens only through the relay: it holds a reservation there and
    // has no address of its own that A could dial.
    let b = start_behind_relay(&db, &circuit);
    let b_id = b.peer_id();

    let _a = NodeProcess::start(&da, LOOPBACK);
    let out = tern(&da, &["connect", &format!("{circuit}/p2p/{b_id}")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll("A and B to know each other through the relay", || {
        let peers = tern_json(&da, &["peers", "--json"]);
        peers
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["peer_id"] == b_id.as_str() && p["name"] == "b")
            .then_some(())
    });
    // A reached B over the circuit, and B has no direct address at all.
    let peers = tern_json(&da, &["peers", "--json"]);
    let b_seen = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == b_id.as_str())
        .unwrap();
    assert!(
        b_seen["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_str().unwrap().contains("/p2p-circuit")),
        "A did not come through the relay: {b_seen}"
    );
    let b_status = b.status();
    assert!(
        b_status["listen_addrs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x.as_str().unwrap().contains("/p2p-circuit")),
        "B was directly reachable after all: {b_status}"
    );
    assert!(
        tern_json(&db, &["peers", "--json"])
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "a")
    );
}
