//! `tern testnet`: real processes, wired together, surviving a SIGKILL.

mod support;

use support::*;

#[test]
fn five_node_testnet_is_fully_connected_and_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let net = TestnetProcess::start(tmp.path(), 5);
    let mut pids = Vec::new();
    let mut peer_ids = Vec::new();
    for k in 1..=5 {
        let s = net.status(k);
        assert_eq!(s["connected_peers"], 4, "node-{k}: {s}");
        assert_eq!(s["name"], format!("node-{k}"));
        pids.push(s["pid"].as_u64().unwrap() as u32);
        peer_ids.push(s["peer_id"].as_str().unwrap().to_owned());
    }
    // `tern peers` on one node names the four others.
    let peers = tern_json(&net.node_dir(1), &["peers", "--json"]);
    let mut seen: Vec<&str> = peers
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap())
        .collect();
    seen.sort();
    let mut others: Vec<&str> = peer_ids[1..].iter().map(String::as_str).collect();
    others.sort();
    assert_eq!(seen, others);
    // The nodes of one testnet keep each other's chats out of the box.
    assert_eq!(
        tern_json(&net.node_dir(2), &["host", "list", "--json"])["mode"],
        "open"
    );

    let exit = net.interrupt();
    assert!(exit.success(), "testnet exited with {exit}");
    for pid in pids {
        assert!(!process_alive(pid), "node {pid} outlived the testnet");
    }

    // Running it again on the same directory restarts the same identities.
    let net = TestnetProcess::start(tmp.path(), 5);
    for k in 1..=5 {
        assert_eq!(net.status(k)["peer_id"], peer_ids[k - 1].as_str());
    }
}

#[test]
fn a_node_killed_with_sigkill_rejoins_with_the_same_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let net = TestnetProcess::start(tmp.path(), 4);
    let victim = net.node_dir(3);
    // Every peer identified (and so written to its address book) before the
    // kill: connected alone is not enough, identification follows it.
    let before = poll("node-3 to know its three peers", || {
        let s = net.status(3);
        (s["known_peers"] == 3).then_some(s)
    });
    let pid = before["pid"].as_u64().unwrap() as u32;

    kill9(pid);
    for k in [1, 2, 4] {
        poll(&format!("node-{k} to notice node-3 is gone"), || {
            (net.status(k)["connected_peers"] == 2).then_some(())
        });
    }

    // Restarted by hand exactly as the testnet suggests: no extra flags.
    let node = NodeProcess::start(&victim, &[]);
    let after = node.status();
    assert_eq!(after["peer_id"], before["peer_id"]);
    // It came back knowing its peers (written to disk before the kill), on
    // the same address, so both sides can find each other.
    assert_eq!(after["known_peers"], 3, "{after}");
    assert_eq!(after["listen_addrs"], before["listen_addrs"]);
    for k in 1..=4 {
        poll(&format!("node-{k} to be fully connected again"), || {
            (net.status(k)["connected_peers"] == 3).then_some(())
        });
    }
}
