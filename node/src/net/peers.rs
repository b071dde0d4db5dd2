//! The address book: peers this node has met, where to reach them, and when
//! to try again. Pure bookkeeping with time as an input, so the redial policy
//! is tested without sockets or sleeps.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};
use serde::{Deserialize, Serialize};
use tern_protocol::{AccountId, DecodeError, Record};

/// Most peers remembered; the least recently seen disconnected one goes first.
pub const CAPACITY: usize = 256;
/// Most addresses kept per peer.
pub const MAX_ADDRS: usize = 8;
/// Longest address kept, in bytes: with [`MAX_ADDRS`], a record always fits
/// its [`PeerRecord::MAX_LEN`].
pub const MAX_ADDR_LEN: usize = 128;
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A peer unreachable for this long is forgotten.
const FORGET_AFTER_MS: u64 = 7 * 24 * 3600 * 1000;

/// What is persisted about a peer, so the node can find it after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub account: Option<AccountId>,
    pub name: String,
    /// Binary multiaddrs.
    pub addrs: Vec<Vec<u8>>,
    pub last_seen_ms: u64,
}

impl Record for PeerRecord {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 2048;

    fn validate(&self) -> Result<(), DecodeError> {
        if self.addrs.len() > MAX_ADDRS
            || self.addrs.iter().any(|a| a.len() > MAX_ADDR_LEN)
            || self.name.len() > 64
        {
            return Err(DecodeError::Invalid("peer record over its bounds".into()));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub account: Option<AccountId>,
    pub name: String,
    pub addrs: Vec<Multiaddr>,
    pub last_seen_ms: u64,
    connected: bool,
    failures: u32,
    /// `None` while connected or while a dial is under way.
    next_dial: Option<Instant>,
}

impl Entry {
    pub fn record(&self) -> PeerRecord {
        PeerRecord {
            account: self.account,
            name: self.name.clone(),
            addrs: self.addrs.iter().map(|a| a.to_vec()).collect(),
            last_seen_ms: self.last_seen_ms,
        }
    }
}

#[derive(Default)]
pub struct AddressBook {
    entries: HashMap<PeerId, Entry>,
}

/// Outcome of remembering a peer: what the caller must persist or delete.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// The entry is new or its identity changed: persist it.
    pub changed: bool,
    pub evicted: Option<PeerId>,
}

/// A device presented a valid certificate from another account than the one
/// it proved before. Devices do not change accounts (a new device key is made
/// for every `tern init`), so this is refused rather than believed.
#[derive(Debug, PartialEq, Eq)]
pub struct AccountMismatch {
    pub known: AccountId,
}

impl AddressBook {
    /// Restores entries loaded from the store; each is due for a dial now.
    pub fn restore(&mut self, peer: PeerId, record: PeerRecord, now: Instant) {
        let addrs = record
            .addrs
            .into_iter()
            .filter_map(|a| Multiaddr::try_from(a).ok())
            .collect();
        self.entries.insert(
            peer,
            Entry {
                account: record.account,
                name: record.name,
                addrs,
                last_seen_ms: record.last_seen_ms,
                connected: false,
                failures: 0,
                next_dial: Some(now),
            },
        );
    }

    pub fn get(&self, peer: &PeerId) -> Option<&Entry> {
        self.entries.get(peer)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The known devices of `account`: connected ones first, then the most
    /// recently seen.
    pub fn devices_of(&self, account: &AccountId) -> Vec<PeerId> {
        let mut found: Vec<(&PeerId, &Entry)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.account.as_ref() == Some(account))
            .collect();
        found.sort_by_key(|(p, e)| (!e.connected, std::cmp::Reverse(e.last_seen_ms), **p));
        found.into_iter().map(|(p, _)| *p).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records a verified Tern peer (connected now) and its identity.
    pub fn remember(
        &mut self,
        peer: PeerId,
        account: AccountId,
        name: &str,
        now_ms: u64,
    ) -> Result<Changes, AccountMismatch> {
        let mut changes = Changes::default();
        if let Some(known) = self.entries.get(&peer).and_then(|e| e.account)
            && known != account
        {
            return Err(AccountMismatch { known });
        }
        if !self.entries.contains_key(&peer) && self.entries.len() >= CAPACITY {
            changes.evicted = self.evict_one();
            if changes.evicted.is_none() {
                return Ok(changes); // every remembered peer is connected: keep them
            }
        }
        let e = self.entries.entry(peer).or_insert_with(|| Entry {
            account: None,
            name: String::new(),
            addrs: Vec::new(),
            last_seen_ms: now_ms,
            connected: true,
            failures: 0,
            next_dial: None,
        });
        let name: String = name.chars().take(64).collect();
        changes.changed = e.account != Some(account) || e.name != name;
        e.account = Some(account);
        e.name = name;
        e.last_seen_ms = now_ms;
        Ok(changes)
    }

    /// Replaces the addresses of a remembered peer (deduplicated, dialable,
    /// at most [`MAX_ADDRS`] of at most [`MAX_ADDR_LEN`] bytes). Returns
    /// whether anything changed (and so should be persisted).
    pub fn set_addrs(&mut self, peer: &PeerId, addrs: impl IntoIterator<Item = Multiaddr>) -> bool {
        let Some(e) = self.entries.get_mut(peer) else {
            return false;
        };
        let mut fresh: Vec<Multiaddr> = Vec::new();
        for a in addrs.into_iter().map(strip_p2p).filter(is_dialable) {
            if a.len() <= MAX_ADDR_LEN && !fresh.contains(&a) && fresh.len() < MAX_ADDRS {
                fresh.push(a);
            }
        }
        if fresh.is_empty() || fresh == e.addrs {
            return false;
        }
        e.addrs = fresh;
        true
    }

    pub fn on_connected(&mut self, peer: &PeerId, now_ms: u64) {
        if let Some(e) = self.entries.get_mut(peer) {
            e.connected = true;
            e.failures = 0;
            e.next_dial = None;
            e.last_seen_ms = now_ms;
        }
    }

    /// The last connection to `peer` closed: try again soon.
    pub fn on_disconnected(&mut self, peer: &PeerId, now: Instant, now_ms: u64) {
        if let Some(e) = self.entries.get_mut(peer) {
            e.connected = false;
            e.failures = 0;
            e.last_seen_ms = now_ms;
            e.next_dial = Some(now + backoff(peer, 0));
        }
    }

    /// A dial failed: back off exponentially, and forget peers gone too long.
    /// Returns true when the peer was forgotten.
    pub fn on_dial_failed(&mut self, peer: &PeerId, now: Instant, now_ms: u64) -> bool {
        let Some(e) = self.entries.get_mut(peer) else {
            return false;
        };
        if e.connected {
            return false; // another connection is up; nothing to redial
        }
        if now_ms.saturating_sub(e.last_seen_ms) > FORGET_AFTER_MS {
            self.entries.remove(peer);
            return true;
        }
        e.failures = e.failures.saturating_add(1);
        e.next_dial = Some(now + backoff(peer, e.failures));
        false
    }

    /// Peers due for a redial at `now`, at most `budget` of them. They are
    /// marked as being dialled until [`Self::on_connected`] or
    /// [`Self::on_dial_failed`] reports the outcome.
    pub fn due(&mut self, now: Instant, budget: usize) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut due: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.connected && !e.addrs.is_empty())
            .filter_map(|(p, e)| e.next_dial.filter(|t| *t <= now).map(|t| (t, *p)))
            .collect();
        due.sort();
        due.into_iter()
            .take(budget)
            .filter_map(|(_, p)| {
                let e = self.entries.get_mut(&p)?;
                e.next_dial = None;
                Some((p, e.addrs.clone()))
            })
            .collect()
    }

    fn evict_one(&mut self) -> Option<PeerId> {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| !e.connected)
            .min_by_key(|(_, e)| e.last_seen_ms)
            .map(|(p, _)| *p)?;
        self.entries.remove(&victim);
        Some(victim)
    }
}

/// 1 s, 2 s, 4 s … capped at 5 min, plus up to 25% spread derived from the
/// peer id so that many nodes restarting together do not redial in lockstep.
fn backoff(peer: &PeerId, failures: u32) -> Duration {
    let base = MIN_BACKOFF
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF);
    let h = peer
        .to_bytes()
        .iter()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b)));
    base + base.mul_f64(f64::from(h % 1000) / 4000.0)
}

fn strip_p2p(mut a: Multiaddr) -> Multiaddr {
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// Addresses worth dialling again later (not unspecified, not relayed
/// through a circuit that may be gone).
fn is_dialable(a: &Multiaddr) -> bool {
    a.iter().all(|p| match p {
        Protocol::Ip4(ip) => !ip.is_unspecified(),
        Protocol::Ip6(ip) => !ip.is_unspecified(),
        Protocol::P2pCircuit => false,
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::AccountKeypair;

    fn account() -> AccountId {
        AccountKeypair::from_secret_bytes(&[1; 32]).id()
    }
    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()
    }

    #[test]
    fn a_disconnected_peer_is_redialled_with_growing_backoff() {
        let mut book = AddressBook::default();
        let p = PeerId::random();
        let t0 = Instant::now();
        book.remember(p, account(), "n", 0).unwrap();
        book.set_addrs(&p, [addr(1)]);
        assert!(
            book.due(t0, 10).is_empty(),
            "connected peers are not redialled"
        );

        book.on_disconnected(&p, t0, 0);
        assert!(book.due(t0, 10).is_empty());
        let first = book.due(t0 + Duration::from_millis(1300), 10);
        assert_eq!(first, vec![(p, vec![addr(1)])]);
        assert!(
            book.due(t0 + Duration::from_secs(2), 10).is_empty(),
            "dial in flight"
        );

        let mut t = t0 + Duration::from_secs(2);
        let mut waits = Vec::new();
        for _ in 0..12 {
            book.on_dial_failed(&p, t, 0);
            let mut probe = t;
            while book.due(probe, 10).is_empty() {
                probe += Duration::from_millis(250);
            }
            waits.push(probe - t);
            t = probe;
        }
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert!(*waits.last().unwrap() <= MAX_BACKOFF.mul_f64(1.26));
        assert!(*waits.last().unwrap() >= MAX_BACKOFF);

        book.on_connected(&p, 1);
        book.on_disconnected(&p, t, 1);
        assert!(
            !book.due(t + Duration::from_millis(1300), 10).is_empty(),
            "backoff resets"
        );
    }

    #[test]
    fn peers_unreachable_for_a_week_are_forgotten() {
        let mut book = AddressBook::default();
        let p = PeerId::random();
        let now = Instant::now();
        book.remember(p, account(), "n", 0).unwrap();
        book.on_disconnected(&p, now, 0);
        assert!(!book.on_dial_failed(&p, now, FORGET_AFTER_MS));
        assert!(book.on_dial_failed(&p, now, FORGET_AFTER_MS + 1));
        assert!(book.get(&p).is_none());
    }

    #[test]
    fn capacity_is_bounded_and_evicts_the_stalest_disconnected_peer() {
        let mut book = AddressBook::default();
        let now = Instant::now();
        let peers: Vec<_> = (0..CAPACITY).map(|_| PeerId::random()).collect();
        for (i, p) in peers.iter().enumerate() {
            book.remember(*p, account(), "n", 100 + i as u64).unwrap();
            book.on_disconnected(p, now, 100 + i as u64);
        }
        let newcomer = PeerId::random();
        let changes = book.remember(newcomer, account(), "n", 10_000).unwrap();
        assert_eq!(changes.evicted, Some(peers[0]));
        assert_eq!(book.len(), CAPACITY);
    }

    #[test]
    fn addresses_are_bounded_deduplicated_and_dialable() {
        let mut book = AddressBook::default();
        let p = PeerId::random();
        book.remember(p, account(), "n", 0).unwrap();
        let mut offered: Vec<Multiaddr> = (1..20).map(addr).collect();
        offered.insert(0, addr(1));
        offered.insert(0, "/ip4/0.0.0.0/tcp/5".parse().unwrap());
        offered.insert(0, format!("/ip4/127.0.0.1/tcp/1/p2p/{p}").parse().unwrap());
        book.set_addrs(&p, offered);
        let kept = &book.get(&p).unwrap().addrs;
        assert_eq!(kept.len(), MAX_ADDRS);
        assert_eq!(kept[0], addr(1));
        assert_eq!(kept[1], addr(2));
        assert!(
            !book.set_addrs(&PeerId::random(), [addr(1)]),
            "strangers are not remembered"
        );
    }

    #[test]
    fn records_round_trip() {
        let r = PeerRecord {
            account: Some(account()),
            name: "node-1".into(),
            addrs: vec![addr(4001).to_vec()],
            last_seen_ms: 42,
        };
        assert_eq!(PeerRecord::decode(&r.encode()).unwrap(), r);
    }
}
