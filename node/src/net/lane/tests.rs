use std::net::Ipv4Addr;

use libp2p::identity::Keypair;
use tern_protocol::cloud::{ChatId, Entry};

use super::*;
use crate::{cloud::wire::PushResult, test_util::chat_entries as entries};

fn peer() -> PeerId {
    Keypair::generate_ed25519().public().to_peer_id()
}

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A lane server on loopback whose requests come out of the returned
/// receiver; the sender of the watch stops it.
async fn server() -> (
    LaneServer,
    mpsc::Receiver<InboundStore>,
    watch::Sender<bool>,
    PeerId,
) {
    let me = peer();
    let (tx, rx) = mpsc::channel(16);
    let (stop, stopped) = watch::channel(false);
    let (server, _task) = LaneServer::bind(loopback(), me, tx, LaneMetrics::default(), stopped)
        .await
        .unwrap();
    (server, rx, stop, me)
}

fn pushed(n: usize) -> StoreResponse {
    let mut results = vec![PushResult::Stored];
    results.resize(n, PushResult::Duplicate);
    StoreResponse::Pushed { results }
}

fn push(entries: &[Entry]) -> StoreRequest {
    StoreRequest::Push {
        entries: entries.to_vec(),
    }
}

/// Connects to `server`'s lane port as `pusher`, with `offer`.
async fn connect(
    server: &LaneServer,
    pusher: PeerId,
    me: PeerId,
    offer: &LaneOffer,
) -> Result<Lane, LaneError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port()));
    Lane::connect(addr, pusher, me, offer).await
}

/// A lane from `pusher`, on a fresh offer.
async fn open(server: &LaneServer, pusher: PeerId, me: PeerId) -> Lane {
    let offer = server.offer(pusher).unwrap();
    connect(server, pusher, me, &offer).await.unwrap()
}

/// Answers every push from `pusher` with one result per entry, `Stored`
/// and then `Duplicate`s (so an answer shows which push it is for), and
/// fails the test on a request from anyone else; the pushes' sizes are
/// kept in the returned list.
fn answer_all(mut rx: mpsc::Receiver<InboundStore>, pusher: PeerId) -> Arc<Mutex<Vec<usize>>> {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let list = asked.clone();
    tokio::spawn(async move {
        while let Some(InboundStore {
            peer,
            request,
            answer,
        }) = rx.recv().await
        {
            assert_eq!(
                peer, pusher,
                "a lane request must come as from the peer the offer was for"
            );
            let StoreRequest::Push { entries } = request else {
                panic!("unexpected request {request:?}");
            };
            asked.lock().unwrap().push(entries.len());
            let Answer::Lane(reply) = answer else {
                panic!("a lane request must be answered on the lane");
            };
            let _ = reply.send(pushed(entries.len()));
        }
    });
    list
}

#[tokio::test]
async fn requests_cross_a_lane_and_answers_come_back_in_order() {
    let (server, rx, _stop, me) = server().await;
    let pusher = peer();
    let answered = answer_all(rx, pusher);
    let lane = open(&server, pusher, me).await;
    let all = entries(20);
    // Pushes of 1 to 20 entries, several in flight at once as the cloud
    // service sends them; each answer must be its own push's.
    let answers = futures::future::join_all((1..=20).map(|n| {
        let lane = lane.clone();
        let request = push(&all[..n]);
        async move { (n, lane.ask(request).await) }
    }))
    .await;
    for (n, a) in answers {
        assert_eq!(a.unwrap(), pushed(n), "the answer to the push of {n}");
    }
    let mut sizes = answered.lock().unwrap().clone();
    sizes.sort();
    assert_eq!(sizes, (1..=20).collect::<Vec<_>>());
}

/// A push built from kept records goes from its own buffer (the length in
/// its headroom) and the receiver reads the push of those entries.
#[tokio::test]
async fn a_push_built_from_kept_records_arrives_as_the_push_of_its_entries() {
    let (server, mut rx, _stop, me) = server().await;
    let pusher = peer();
    let lane = open(&server, pusher, me).await;
    let all = entries(40);
    let pieces: Vec<Vec<u8>> = all.iter().map(|e| e.encode()[1..].to_vec()).collect();
    let request = StoreRequest::EncodedPush(EncodedPush::new(&pieces));
    let asked = tokio::spawn(async move { lane.ask(request).await });
    let inbound = rx.recv().await.expect("the push reaches the service");
    assert_eq!(inbound.request, push(&all));
    let Answer::Lane(reply) = inbound.answer else {
        panic!("a lane request must be answered on the lane");
    };
    reply.send(pushed(all.len())).unwrap();
    assert_eq!(asked.await.unwrap().unwrap(), pushed(all.len()));
}

#[tokio::test]
async fn a_lane_carries_pushes_only() {
    let (server, rx, _stop, me) = server().await;
    let pusher = peer();
    let answered = answer_all(rx, pusher);
    let lane = open(&server, pusher, me).await;
    let chat = ChatId([7; 16]);
    assert!(lane.ask(StoreRequest::Summary { chat }).await.is_err());
    assert!(answered.lock().unwrap().is_empty());
    poll_until("the lane to close", || lane.is_closed()).await;
    assert!(lane.ask(push(&entries(1))).await.is_err());
}

async fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_wrong_key_fails_the_handshake_and_the_server_keeps_serving() {
    let (server, rx, _stop, me) = server().await;
    let pusher = peer();
    let _answered = answer_all(rx, pusher);
    let mut offer = server.offer(pusher).unwrap();
    offer.key[0] ^= 1;
    let err = connect(&server, pusher, me, &offer)
        .await
        .err()
        .expect("a wrong key must not open a lane");
    assert!(
        matches!(err, LaneError::Io(_) | LaneError::Handshake(_)),
        "{err}"
    );
    // The same id, now with the right key, is used up.
    offer.key[0] ^= 1;
    assert!(connect(&server, pusher, me, &offer).await.is_err());
    // A fresh offer works.
    let lane = open(&server, pusher, me).await;
    assert_eq!(lane.ask(push(&entries(1))).await.unwrap(), pushed(1));
}

#[tokio::test]
async fn an_offer_opens_one_lane_for_the_peer_it_was_made_to() {
    let (server, rx, _stop, me) = server().await;
    let pusher = peer();
    let _answered = answer_all(rx, pusher);
    let offer = server.offer(pusher).unwrap();
    // Another peer that learnt the offer: the prologue names the peer the
    // offer was for, so the handshake fails.
    let thief = peer();
    assert!(connect(&server, thief, me, &offer).await.is_err());
    // The offer was taken by that attempt: replaying it finds nothing.
    assert!(connect(&server, pusher, me, &offer).await.is_err());
    // A lane that believes it talks to another node fails too.
    let offer = server.offer(pusher).unwrap();
    assert!(connect(&server, pusher, peer(), &offer).await.is_err());
    // A used offer, replayed after a lane opened with it.
    let offer = server.offer(pusher).unwrap();
    let _lane = connect(&server, pusher, me, &offer).await.unwrap();
    assert!(connect(&server, pusher, me, &offer).await.is_err());
}

#[tokio::test]
async fn offers_are_bounded_per_peer() {
    let (server, _rx, _stop, _me) = server().await;
    let pusher = peer();
    assert!(server.offer(pusher).is_some());
    assert!(server.offer(pusher).is_some());
    assert!(
        server.offer(pusher).is_none(),
        "a third waiting offer for one peer"
    );
    assert!(
        server.offer(peer()).is_some(),
        "another peer still gets one"
    );
}

#[tokio::test]
async fn open_lanes_count_against_a_peers_offers() {
    let (server, _rx, _stop, me) = server().await;
    let pusher = peer();
    let mut lanes = Vec::new();
    for _ in 0..2 {
        lanes.push(open(&server, pusher, me).await);
    }
    poll_until("both lanes counted", || server.offer(pusher).is_none()).await;
    drop(lanes);
    // A dropped lane closes after its writer notices; the server's end
    // then frees the slot.
    poll_until("closed lanes to free their slots", || {
        server.offer(pusher).is_some()
    })
    .await;
}

#[tokio::test]
async fn a_connection_that_is_not_a_lane_is_closed() {
    let (server, mut rx, _stop, _me) = server().await;
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, server.port()))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("the server must close it")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing is answered to a stranger");
    assert!(rx.try_recv().is_err());
}

/// Both ends of a lane after a real handshake over loopback TCP.
async fn pair() -> ((Sealer, Opener), (Sealer, Opener)) {
    let key = [9u8; 32];
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let at = listener.local_addr().unwrap();
    let responder = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut hs = handshake_state(&key, b"test", false).unwrap();
        respond(&mut s, &mut hs).await.unwrap();
        split(s, hs).unwrap()
    });
    let mut s = TcpStream::connect(at).await.unwrap();
    let mut hs = handshake_state(&key, b"test", true).unwrap();
    initiate(&mut s, &mut hs).await.unwrap();
    let initiator = split(s, hs).unwrap();
    (initiator, responder.await.unwrap())
}

#[tokio::test]
async fn messages_of_every_size_around_the_frame_size_arrive_whole() {
    let ((mut tx, _), (_, mut rx)) = pair().await;
    let sizes = [
        0,
        1,
        CHUNK - 5,
        CHUNK - 4,
        CHUNK - 3,
        CHUNK,
        2 * CHUNK - 4,
        2 * CHUNK,
        3 * CHUNK + 7,
        1 << 20,
    ];
    let sent: Vec<Vec<u8>> = sizes
        .iter()
        .map(|n| (0..*n).map(|i| (i * 7 + n) as u8).collect())
        .collect();
    let sending = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for m in &sent {
                tx.send(Outgoing::bytes(m)).await.unwrap();
            }
            tx
        })
    };
    for m in &sent {
        let got = rx.recv(2 << 20).await.unwrap().expect("a message");
        assert_eq!(got.len(), m.len());
        assert!(got == *m, "a message of {} bytes arrived altered", m.len());
    }
    let mut tx = sending.await.unwrap();
    tx.half.shutdown().await.unwrap();
    assert!(rx.recv(2 << 20).await.unwrap().is_none(), "a clean end");
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_from_its_length() {
    let ((mut tx, _), (_, mut rx)) = pair().await;
    tokio::spawn(async move { tx.send(Outgoing::bytes(&vec![1u8; 300_000])).await });
    match rx.recv(200_000).await {
        Err(LaneError::TooLong(300_000, 200_000)) => {}
        other => panic!("expected TooLong, got {other:?}"),
    }
}

#[tokio::test]
async fn an_altered_replayed_or_dropped_frame_does_not_open() {
    // Each case rewrites the sealed bytes of two messages on their way.
    type Tamper = fn(&mut Vec<u8>, usize);
    let cases: [(&str, Tamper); 3] = [
        ("altered", |b, _| {
            let i = b.len() - 20;
            b[i] ^= 0x40;
        }),
        // The first message's frames again in place of the second's.
        ("replayed", |b, first| {
            let again = b[..first].to_vec();
            b.truncate(first);
            b.extend_from_slice(&again);
        }),
        // The second message's first frame left out.
        ("dropped", |b, first| {
            let n = u16::from_be_bytes([b[first], b[first + 1]]) as usize;
            b.drain(first..first + 2 + n);
        }),
    ];
    for (what, tamper) in cases {
        let ((mut tx, _), (_, mut rx)) = pair().await;
        // Seal two messages without sending, then send them tampered.
        let one = vec![3u8; 100_000];
        let two = vec![4u8; 100_000];
        let mut bytes = Vec::new();
        let mut sealed = Vec::new();
        for m in [&one, &two] {
            for slice in tx.seal(Outgoing::bytes(m)).slices() {
                bytes.extend_from_slice(&slice);
            }
            sealed.push(bytes.len());
        }
        tamper(&mut bytes, sealed[0]);
        tokio::spawn(async move {
            let _ = tx.half.write_all(&bytes).await;
            let _ = tx.half.shutdown().await;
        });
        // The first message was left alone; the second does not open.
        let first = rx.recv(1 << 20).await.unwrap().expect("the first message");
        assert!(first == one, "{what}: the first message arrived altered");
        match rx.recv(1 << 20).await {
            Err(LaneError::Decrypt | LaneError::Malformed(_)) => {}
            other => panic!("{what}: expected the second message refused, got {other:?}"),
        }
    }
}

/// Lane frames are Noise transport messages: what one end seals in place
/// opens with snow's own transport state of the other end, and the other
/// way round, frame after frame (the nonce counts as Noise counts).
#[test]
fn frames_are_the_noise_transport_messages_of_the_handshake() {
    let key = [5u8; 32];
    let mut initiator = handshake_state(&key, b"test", true).unwrap();
    let mut responder = handshake_state(&key, b"test", false).unwrap();
    let mut msg = [0u8; 256];
    let n = initiator.write_message(&[], &mut msg).unwrap();
    responder.read_message(&msg[..n], &mut [0u8; 256]).unwrap();
    let n = responder.write_message(&[], &mut msg).unwrap();
    initiator.read_message(&msg[..n], &mut [0u8; 256]).unwrap();
    let (mut send, mut receive) = directions(&mut initiator).unwrap();
    let snow = responder.into_stateless_transport_mode().unwrap();
    for nonce in 0..3u64 {
        let plain: Vec<u8> = (0..1000 + nonce as usize).map(|i| i as u8).collect();
        // Sealed here, opened by snow.
        let mut frame = plain.clone();
        let tag = send.seal(&mut frame);
        frame.extend_from_slice(tag.as_ref());
        let mut out = vec![0u8; frame.len()];
        let m = snow.read_message(nonce, &frame, &mut out).unwrap();
        assert_eq!(out[..m], plain[..]);
        // Sealed by snow, opened here.
        let mut frame = vec![0u8; plain.len() + TAG];
        let n = snow.write_message(nonce, &plain, &mut frame).unwrap();
        frame.truncate(n);
        let m = receive.open(&mut frame).unwrap();
        assert_eq!(frame[..m], plain[..]);
    }
    // A frame out of turn does not open.
    let mut frame = vec![0u8; 10 + TAG];
    let n = snow.write_message(7, &[1; 10], &mut frame).unwrap();
    assert!(matches!(
        receive.open(&mut frame[..n]),
        Err(LaneError::Decrypt)
    ));
}
