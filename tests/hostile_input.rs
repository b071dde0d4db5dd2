//! Random bytes and malformed frames, sent the way an attacker would, leave
//! the node running, serving, and unchanged.

mod support;

use std::{
    io::{Read, Write},
    net::{TcpStream, UdpSocket},
    time::Duration,
};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{
    Multiaddr, StreamProtocol, noise,
    request_response::{self, ProtocolSupport},
    swarm::SwarmEvent,
    tcp, yamux,
};
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use serde_json::Value;
use support::*;
use tern_protocol::{AccountKeypair, Record};

/// Writes requests verbatim (no framing) so the test controls every byte.
#[derive(Clone, Default)]
struct RawCodec;

async fn read_up_to_4k<T: AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    io.take(4096).read_to_end(&mut v).await?;
    Ok(v)
}

async fn write_and_close<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: &[u8],
) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.close().await
}

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        read_up_to_4k(io).await
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        read_up_to_4k(io).await
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()> {
        write_and_close(io, &req).await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()> {
        write_and_close(io, &res).await
    }
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn listen_port(status: &Value, proto: &str) -> u16 {
    let addr = status["listen_addrs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|a| a.contains(proto))
        .unwrap();
    addr.split('/').nth(4).unwrap().parse().unwrap()
}

#[test]
fn random_bytes_at_the_tcp_and_quic_listeners_are_shrugged_off() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), "target");
    let mut node = NodeProcess::start(tmp.path(), LOOPBACK);
    let status = node.status();
    let tcp_port = listen_port(&status, "/tcp/");
    let udp_port = listen_port(&status, "/quic-v1");
    let mut rng = StdRng::seed_from_u64(7);

    for round in 0..40 {
        let mut s = TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut junk = vec![0u8; rng.gen_range(1..64 * 1024)];
        rng.fill_bytes(&mut junk);
        if round % 2 == 0 {
            // Get past multistream-select, then talk nonsense.
            let _ = s.write_all(b"\x13/multistream/1.0.0\n\x07/noise\n");
        }
        let _ = s.write_all(&junk);
        let _ = s.read(&mut [0u8; 256]);
    }
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..500 {
        let mut junk = vec![0u8; rng.gen_range(1..1400)];
        rng.fill_bytes(&mut junk);
        let _ = udp.send_to(&junk, ("127.0.0.1", udp_port));
    }

    assert!(node.is_running(), "node died: {}", node.log());
    assert_eq!(node.status()["peer_id"], status["peer_id"]);
    // And it still accepts real peers, over TCP and QUIC.
    let other = tmp.path().join("other");
    init(&other, "other");
    let peer = NodeProcess::start(&other, LOOPBACK);
    let quic = status["listen_addrs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|a| a.contains("quic"))
        .unwrap();
    let out = tern(
        &other,
        &[
            "connect",
            &format!("{quic}/p2p/{}", status["peer_id"].as_str().unwrap()),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    poll("the target to see the new peer", || {
        (node.connected_peers() == 1).then_some(())
    });
    drop(peer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_forged_frames_are_rejected_and_the_node_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    init(&dir, "target");
    let node = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || NodeProcess::start(&dir, LOOPBACK)
    })
    .await
    .unwrap();
    let target: Multiaddr = node.tcp_addr().parse().unwrap();
    let before = metric(&dir, "tern_rejected_frames_total");

    let attacker_identity = libp2p::identity::Keypair::generate_ed25519();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(attacker_identity.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(
                    StreamProtocol::new("/tern/introduce/1"),
                    ProtocolSupport::Outbound,
                )],
                request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    swarm.dial(target).unwrap();
    let node_peer = loop {
        match swarm.select_next_some().await {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => break peer_id,
            SwarmEvent::OutgoingConnectionError { error, .. } => panic!("dial failed: {error}"),
            _ => {}
        }
    };

    // A correctly signed certificate, but for a device that is not the sender.
    let someone = AccountKeypair::from_secret_bytes(&[5; 32]);
    let other_device = libp2p::identity::Keypair::generate_ed25519();
    let other_key = tern_protocol::DevicePublicKey::from_bytes(
        other_device.public().try_into_ed25519().unwrap().to_bytes(),
    )
    .unwrap();
    let wrong_device = someone.certify(other_key, "impostor", 1).unwrap().encode();
    // A certificate for the sender itself, with its signature damaged.
    let attacker_key = tern_protocol::DevicePublicKey::from_bytes(
        attacker_identity
            .public()
            .try_into_ed25519()
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    let mut bad_sig = someone.certify(attacker_key, "forger", 1).unwrap();
    bad_sig.signature[10] ^= 1;
    let bad_sig = bad_sig.encode();

    let mut rng = StdRng::seed_from_u64(11);
    let mut random = vec![0u8; 300];
    rng.fill_bytes(&mut random);
    let attacks: Vec<Vec<u8>> = vec![
        random,
        u32::MAX.to_be_bytes().to_vec(),
        framed(&[0xAA; 50]),
        framed(&[]),
        framed(&[9, 1, 2, 3]), // unknown record version
        framed(&wrong_device),
        framed(&bad_sig),
        vec![0, 0, 0, 200, 1, 2, 3], // promises 200 bytes, sends 3
    ];
    let n = attacks.len();
    for a in attacks {
        swarm.behaviour_mut().send_request(&node_peer, a);
    }
    let mut outcomes = 0;
    let waited = tokio::time::timeout(DEADLINE, async {
        while outcomes < n {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                }) => {
                    // The node drops the stream without a word (we read EOF);
                    // answers come only to well-formed requests, and none of ours was.
                    assert!(
                        response.is_empty(),
                        "node answered a malformed introduction with {} bytes",
                        response.len()
                    );
                    outcomes += 1;
                }
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure { .. }) => {
                    outcomes += 1
                }
                SwarmEvent::ConnectionClosed { .. } => break,
                _ => {}
            }
        }
    })
    .await;
    assert!(waited.is_ok(), "no outcome for the attack frames");

    let dir2 = dir.clone();
    let node = tokio::task::spawn_blocking(move || {
        let mut node = node;
        assert!(node.is_running(), "node died: {}", node.log());
        poll("every attack frame to be counted as rejected", || {
            (metric(&dir2, "tern_rejected_frames_total") >= before + n as f64).then_some(())
        });
        // The impostor was not remembered as anyone's device.
        let peers = tern_json(&dir2, &["peers", "--json"]);
        for p in peers.as_array().unwrap() {
            assert!(p["account_id"].is_null(), "forged identity accepted: {p}");
        }
        assert!(
            node.log()
                .contains("rejected a certificate for another device")
        );
        node
    })
    .await
    .unwrap();

    // Still serving real peers.
    let other = dir.join("other");
    tokio::task::spawn_blocking(move || {
        init(&other, "honest");
        let honest = NodeProcess::start(&other, LOOPBACK);
        let out = tern(&other, &["connect", &node.tcp_addr()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        poll("the honest peer to be identified", || {
            let peers = tern_json(&node.dir, &["peers", "--json"]);
            peers
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "honest")
                .then_some(())
        });
        drop(honest);
    })
    .await
    .unwrap();
}

#[test]
fn garbage_at_the_api_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    init(tmp.path(), "target");
    let mut node = NodeProcess::start(tmp.path(), LOOPBACK);
    let endpoint: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("api.json")).unwrap()).unwrap();
    let addr = endpoint["address"].as_str().unwrap().to_owned();
    let token = std::fs::read_to_string(tmp.path().join("api.token"))
        .unwrap()
        .trim()
        .to_owned();
    let mut rng = StdRng::seed_from_u64(3);

    for _ in 0..30 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut junk = vec![0u8; rng.gen_range(1..16 * 1024)];
        rng.fill_bytes(&mut junk);
        let _ = s.write_all(&junk);
        let _ = s.read(&mut [0u8; 512]);
    }

    let request = |body: &[u8], len: usize| {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "POST /v1/connect HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        );
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(body);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    for (body, expect) in [
        (&b"{"[..], "400"),
        (&b"[1,2,3]"[..], "400"),
        (&b"{\"target\": 5}"[..], "400"),
        (&b"{\"target\": \"\\u0000/ip4\"}"[..], "400"),
    ] {
        let out = request(body, body.len());
        assert!(
            out.starts_with(&format!("HTTP/1.1 {expect}")),
            "{}: {out}",
            String::from_utf8_lossy(body)
        );
        assert!(out.contains("\"error\""), "{out}");
    }
    let huge = vec![b'a'; 1024 * 1024];
    let out = request(&huge, huge.len());
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");

    assert!(node.is_running(), "{}", node.log());
    let s = node.status();
    assert_eq!(s["connected_peers"], 0);
    assert_eq!(s["known_peers"], 0, "garbage changed the address book");
}
