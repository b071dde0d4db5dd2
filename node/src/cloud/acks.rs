//! What the storage peers of a chat acknowledged of this device's entries,
//! kept across restarts, so a message that was `stored` still says so right
//! after a restart, before any peer has answered a compare (or when none is
//! reachable).
//!
//! One small file per chat, `acks`, in the chat's directory: for each
//! storage peer, how many of this device's entries (seq 0 to count - 1) it
//! acknowledged as durable. Counts only grow, and a peer acknowledges only
//! what it has flushed, so a file that is older than memory (a crash before
//! the next save) understates, never overstates: those messages show
//! `sending` until the next compare, as they did before this file existed.
//! The file is replaced whole (written aside, then renamed); one that does
//! not decode is ignored.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
};

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tern_protocol::{DecodeError, Record};

const FILE: &str = "acks";
/// Most peers a file lists (a storage set has at most 8; peers that left
/// the set may still be remembered).
pub const MAX_PEERS: usize = 64;
/// Longest peer id encoding.
const MAX_PEER_ID: usize = 64;

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SavedAcks {
    /// (peer id bytes, entries of this device it holds)
    peers: Vec<(Vec<u8>, u64)>,
}

impl Record for SavedAcks {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 8 + MAX_PEERS * (MAX_PEER_ID + 12);

    fn validate(&self) -> Result<(), DecodeError> {
        if self.peers.len() > MAX_PEERS {
            return Err(DecodeError::Invalid("too many peers".into()));
        }
        if self.peers.iter().any(|(p, _)| p.len() > MAX_PEER_ID) {
            return Err(DecodeError::Invalid("peer id too long".into()));
        }
        Ok(())
    }
}

fn path(chat_dir: &Path) -> PathBuf {
    chat_dir.join(FILE)
}

/// The counts saved for a chat; empty if none were, or the file is damaged.
pub fn load(chat_dir: &Path) -> HashMap<PeerId, u64> {
    let Ok(bytes) = std::fs::read(path(chat_dir)) else {
        return HashMap::new();
    };
    if bytes.len() > SavedAcks::MAX_LEN {
        return HashMap::new();
    }
    match SavedAcks::decode(&bytes) {
        Ok(saved) => saved
            .peers
            .into_iter()
            .filter_map(|(p, count)| Some((PeerId::from_bytes(&p).ok()?, count)))
            .collect(),
        Err(e) => {
            tracing::warn!(dir = %chat_dir.display(), "ignoring a damaged acknowledgement file: {e}");
            HashMap::new()
        }
    }
}

/// Replaces the chat's file with these counts (at most [`MAX_PEERS`], the
/// highest kept). The chat's directory must exist.
pub fn save<S>(chat_dir: &Path, counts: &HashMap<PeerId, u64, S>) -> io::Result<()> {
    let mut peers: Vec<(Vec<u8>, u64)> = counts
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(p, c)| (p.to_bytes(), *c))
        .collect();
    peers.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    peers.truncate(MAX_PEERS);
    let bytes = SavedAcks { peers }.encode();
    let aside = chat_dir.join(format!("{FILE}.new"));
    std::fs::write(&aside, bytes)?;
    std::fs::rename(&aside, path(chat_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_a_save_and_damage_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(load(tmp.path()).is_empty());
        let (a, b) = (PeerId::random(), PeerId::random());
        let counts = HashMap::from([(a, 12), (b, 40), (PeerId::random(), 0)]);
        save(tmp.path(), &counts).unwrap();
        assert_eq!(load(tmp.path()), HashMap::from([(a, 12), (b, 40)]));
        // Saved again, replaced whole.
        save(tmp.path(), &HashMap::from([(a, 13)])).unwrap();
        assert_eq!(load(tmp.path()), HashMap::from([(a, 13)]));
        // Garbage, a cut file, or one too long: nothing, and no panic.
        let file = path(tmp.path());
        let good = std::fs::read(&file).unwrap();
        for bad in [
            b"garbage".to_vec(),
            good[..good.len() - 3].to_vec(),
            vec![1u8; SavedAcks::MAX_LEN + 1],
        ] {
            std::fs::write(&file, bad).unwrap();
            assert!(load(tmp.path()).is_empty());
        }
        // More peers than a file holds: the highest counts are kept.
        let many: HashMap<PeerId, u64> = (1..=100).map(|c| (PeerId::random(), c)).collect();
        save(tmp.path(), &many).unwrap();
        let kept = load(tmp.path());
        assert_eq!(kept.len(), MAX_PEERS);
        assert!(kept.values().all(|c| *c > 100 - MAX_PEERS as u64));
    }
}
