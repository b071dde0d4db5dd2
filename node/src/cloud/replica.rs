//! The storage-peer side of cloud chats: the chats this node keeps for
//! others, verified by `tern-protocol`'s [`ChatLog`] and kept in one
//! [`SegmentLog`] per chat.
//!
//! A storage peer holds no key and reads nothing. It checks that each
//! entry is signed, chained and written by a member, and that each purge is
//! authorised. It stores what passes, and says so only once it is on disk.
//! It also checks its operator's hosting policy: every entry's author must
//! be an account this node agreed to host, within the quota.
//!
//! Work comes in batches: [`Replicas::accept`] verifies and appends, and
//! [`Replicas::commit`] syncs every touched log once and carries out the
//! purges. Acknowledgements wait for the commit.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use tern_protocol::{
    Record,
    cloud::{
        BatchLimits, ChatId, ChatLog, ChatSummary, Entry, EntryHash, LogError, LogOutput,
        SyncRequest, SyncResponse, sync,
    },
};

use super::hosting::{HostPolicy, Refusal};
use crate::{
    data_dir::create_private_dir,
    segments::{SegmentError, SegmentLog},
};

/// What happened to one pushed entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Verified and appended; durable after the next commit.
    Stored,
    /// Already held.
    Duplicate,
    /// Held back until these parents arrive.
    Missing(Vec<EntryHash>),
    /// The hosting policy says no.
    Refused(Refusal),
    /// Failed verification; the reason is logged and returned.
    Rejected(String),
}

struct Replica {
    log: ChatLog,
    store: SegmentLog,
}

pub struct Replicas {
    root: PathBuf,
    chats: HashMap<ChatId, Replica>,
    /// Chats with appends waiting for a sync.
    dirty: BTreeSet<ChatId>,
    /// Purges waiting for the commit: (chat, entry, header-only encoding).
    purges: Vec<(ChatId, EntryHash, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Segments(#[from] SegmentError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("chat {chat} on disk holds an entry that does not verify: {why}")]
    Damaged { chat: String, why: String },
    #[error("this node does not keep chat {0}")]
    UnknownChat(String),
    #[error("{0}")]
    Sync(String),
}

fn chat_dir(root: &Path, chat: &ChatId) -> PathBuf {
    root.join(data_encoding::HEXLOWER.encode(&chat.0))
}

impl Replicas {
    /// Loads every kept chat: each stored entry is verified again, in
    /// causal order, as it was when it arrived.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ReplicaError> {
        let root = root.into();
        create_private_dir(&root).map_err(|source| ReplicaError::Io {
            path: root.display().to_string(),
            source,
        })?;
        let mut chats = HashMap::new();
        let dirs = std::fs::read_dir(&root).map_err(|source| ReplicaError::Io {
            path: root.display().to_string(),
            source,
        })?;
        for dir in dirs.flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            let Some(id) = data_encoding::HEXLOWER
                .decode(name.as_bytes())
                .ok()
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
            else {
                continue;
            };
            let chat = ChatId(id);
            let store = SegmentLog::open(dir.path())?;
            let mut entries = Vec::with_capacity(store.len());
            let mut damaged = None;
            store.scan(|_, bytes| match Entry::decode(bytes) {
                Ok(e) => entries.push(e),
                Err(e) => damaged = Some(e.to_string()),
            })?;
            if let Some(why) = damaged {
                return Err(ReplicaError::Damaged { chat: name, why });
            }
            // Parents before children: lamport counts up along every chain.
            entries.sort_by_key(|e| (e.header.header.lamport, e.hash()));
            let mut log = ChatLog::new(chat);
            for e in entries {
                if let Err(err) = log.insert(e) {
                    return Err(ReplicaError::Damaged {
                        chat: name,
                        why: err.to_string(),
                    });
                }
            }
            chats.insert(chat, Replica { log, store });
        }
        Ok(Self {
            root,
            chats,
            dirty: BTreeSet::new(),
            purges: Vec::new(),
        })
    }

    /// Bytes of other people's chats on disk: what the quota counts.
    pub fn used_bytes(&self) -> u64 {
        self.chats.values().map(|r| r.store.disk_bytes()).sum()
    }

    pub fn chats(&self) -> impl Iterator<Item = &ChatId> {
        self.chats.keys()
    }

    pub fn entries(&self, chat: &ChatId) -> usize {
        self.chats.get(chat).map_or(0, |r| r.log.len())
    }

    pub fn summary(&self, chat: &ChatId) -> Option<ChatSummary> {
        self.chats.get(chat).map(|r| ChatSummary::of(&r.log))
    }

    /// Verifies and appends pushed entries; nothing is durable (and
    /// nothing should be acknowledged) before [`Self::commit`].
    pub fn accept(
        &mut self,
        policy: &HostPolicy,
        entries: Vec<Entry>,
    ) -> Result<Vec<Outcome>, ReplicaError> {
        let mut outcomes = Vec::with_capacity(entries.len());
        for entry in entries {
            let size = entry.encode().len() as u64;
            if let Err(r) = policy.decide(&entry.header.author_account(), self.used_bytes(), size) {
                outcomes.push(Outcome::Refused(r));
                continue;
            }
            let chat = entry.header.header.chat;
            if !self.chats.contains_key(&chat) {
                let dir = chat_dir(&self.root, &chat);
                let store = SegmentLog::open(&dir)?;
                self.chats.insert(
                    chat,
                    Replica {
                        log: ChatLog::new(chat),
                        store,
                    },
                );
            }
            let replica = self.chats.get_mut(&chat).expect("inserted above");
            let outputs = match replica.log.insert(entry) {
                Ok(o) => o,
                Err(LogError::Duplicate(_)) => {
                    outcomes.push(Outcome::Duplicate);
                    continue;
                }
                Err(e) => {
                    tracing::warn!("rejected a cloud-chat entry: {e}");
                    outcomes.push(Outcome::Rejected(e.to_string()));
                    continue;
                }
            };
            let mut outcome = Outcome::Stored;
            for output in outputs {
                match output {
                    LogOutput::Persist(e) => {
                        replica.store.append(&[(e.hash().0, &e.encode())])?;
                        self.dirty.insert(chat);
                    }
                    LogOutput::EraseBody { entry, .. } => {
                        if let Some(e) = replica.log.get(&entry) {
                            self.purges.push((chat, entry, e.without_body().encode()));
                        }
                    }
                    LogOutput::Missing(parents) => outcome = Outcome::Missing(parents),
                    LogOutput::Event(_) => {}
                }
            }
            outcomes.push(outcome);
        }
        // A chat nobody could start here leaves no directory behind.
        self.chats.retain(|chat, r| {
            let keep = !r.log.is_empty() || r.log.pending_count() > 0;
            if !keep {
                // Only an empty segment file is there: nothing was stored.
                let _ = std::fs::remove_dir_all(chat_dir(&self.root, chat));
            }
            keep
        });
        Ok(outcomes)
    }

    /// Makes every accepted entry durable (one sync per touched chat), then
    /// carries out the purges (each rewrites what held the purged bytes).
    pub fn commit(&mut self) -> Result<(), ReplicaError> {
        for chat in std::mem::take(&mut self.dirty) {
            if let Some(r) = self.chats.get_mut(&chat) {
                r.store.sync()?;
            }
        }
        let mut by_chat: HashMap<ChatId, Vec<(EntryHash, Vec<u8>)>> = HashMap::new();
        for (chat, entry, header_only) in std::mem::take(&mut self.purges) {
            by_chat.entry(chat).or_default().push((entry, header_only));
        }
        for (chat, changes) in by_chat {
            if let Some(r) = self.chats.get_mut(&chat) {
                let changes: Vec<_> = changes
                    .iter()
                    .map(|(h, bytes)| (h.0, Some(bytes.as_slice())))
                    .collect();
                r.store.purge(&changes)?;
            }
        }
        Ok(())
    }

    /// What a member device or another replica lacks, in a bounded batch.
    pub fn serve(&self, request: &SyncRequest) -> Result<SyncResponse, ReplicaError> {
        let r = self
            .chats
            .get(&request.chat)
            .ok_or_else(|| ReplicaError::UnknownChat(format!("{:?}", request.chat)))?;
        sync::respond(&r.log, request, BatchLimits::default())
            .map_err(|e| ReplicaError::Sync(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::hosting::HostLists;
    use ed25519_dalek::SigningKey;
    use tern_protocol::{
        AccountKeypair, DevicePublicKey,
        cloud::{ChatMember, Draft},
    };

    struct Person {
        account: AccountKeypair,
        member: ChatMember,
        log: ChatLog,
    }

    const CHAT: ChatId = ChatId([9; 16]);

    fn person(seed: u8) -> Person {
        let account = AccountKeypair::from_secret_bytes(&[seed; 32]);
        let key = SigningKey::from_bytes(&[seed.wrapping_add(50); 32]);
        let public = DevicePublicKey::from_bytes(key.verifying_key().to_bytes()).unwrap();
        let cert = account.certify(public, "phone", 1).unwrap();
        let member = ChatMember::for_account(&account, key, cert).unwrap();
        Person {
            account,
            member,
            log: ChatLog::new(CHAT),
        }
    }

    fn say(p: &mut Person, text: &str, n: u8) -> Entry {
        let e = p
            .member
            .compose(
                &p.log,
                Draft::Text {
                    text: text.into(),
                    reply_to: None,
                },
                [n; 32],
            )
            .unwrap();
        p.log.insert(e.clone()).unwrap();
        e
    }

    fn open_policy() -> HostPolicy {
        HostPolicy {
            open: true,
            quota_bytes: 1 << 30,
            lists: HostLists::default(),
        }
    }

    fn files_containing(dir: &Path, needle: &[u8]) -> usize {
        let mut n = 0;
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else if std::fs::read(e.path())
                    .unwrap_or_default()
                    .windows(needle.len())
                    .any(|w| w == needle)
                {
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn a_storage_peer_keeps_verified_entries_across_restarts_and_purges_for_real() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut alice, bob) = (person(1), person(2));
        let genesis = alice
            .member
            .create(
                CHAT,
                &[(bob.account.id(), bob.member.encryption_key())],
                vec![],
                None,
                [3; 32],
            )
            .unwrap();
        alice.log.insert(genesis.clone()).unwrap();
        let hello = say(&mut alice, "hello bob", 4);
        let secret = say(&mut alice, "this will be deleted", 5);

        let mut replicas = Replicas::open(tmp.path()).unwrap();
        let out = replicas
            .accept(&open_policy(), vec![genesis, hello.clone(), secret.clone()])
            .unwrap();
        assert_eq!(out, vec![Outcome::Stored, Outcome::Stored, Outcome::Stored]);
        replicas.commit().unwrap();
        // The storage peer holds ciphertext only.
        assert_eq!(files_containing(tmp.path(), b"hello bob"), 0);
        let ciphertext = secret.body.as_ref().unwrap().ciphertext.clone();
        assert_eq!(files_containing(tmp.path(), &ciphertext), 1);
        // A replay changes nothing.
        assert_eq!(
            replicas
                .accept(&open_policy(), vec![hello.clone()])
                .unwrap(),
            vec![Outcome::Duplicate]
        );

        // Delete for everyone: the body goes from disk, the chain stays.
        let purge = alice
            .member
            .compose(
                &alice.log,
                Draft::Delete {
                    target: secret.hash(),
                },
                [6; 32],
            )
            .unwrap();
        alice.log.insert(purge.clone()).unwrap();
        assert_eq!(
            replicas.accept(&open_policy(), vec![purge]).unwrap(),
            vec![Outcome::Stored]
        );
        replicas.commit().unwrap();
        assert_eq!(files_containing(tmp.path(), &ciphertext), 0);
        drop(replicas);

        let replicas = Replicas::open(tmp.path()).unwrap();
        assert_eq!(replicas.entries(&CHAT), 4);
        let summary = replicas.summary(&CHAT).unwrap();
        assert!(sync::in_sync(&summary, &ChatSummary::of(&alice.log)));
    }

    #[test]
    fn forged_and_unhosted_entries_are_refused_and_nothing_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut alice, bob) = (person(1), person(2));
        let genesis = alice
            .member
            .create(
                CHAT,
                &[(bob.account.id(), bob.member.encryption_key())],
                vec![],
                None,
                [3; 32],
            )
            .unwrap();
        alice.log.insert(genesis.clone()).unwrap();
        let mut replicas = Replicas::open(tmp.path()).unwrap();

        // Not an account this node agreed to host.
        let closed = HostPolicy {
            open: false,
            quota_bytes: 1 << 30,
            lists: HostLists::default(),
        };
        let out = replicas.accept(&closed, vec![genesis.clone()]).unwrap();
        assert_eq!(
            out,
            vec![Outcome::Refused(Refusal::NotAllowed(alice.account.id()))]
        );
        assert_eq!(replicas.chats().count(), 0);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

        // Over the quota.
        let tiny = HostPolicy {
            quota_bytes: 10,
            ..open_policy()
        };
        assert!(matches!(
            replicas.accept(&tiny, vec![genesis.clone()]).unwrap()[0],
            Outcome::Refused(Refusal::QuotaFull { .. })
        ));

        // A forged signature.
        let mut forged = genesis.clone();
        forged.header.signature[0] ^= 1;
        assert!(matches!(
            replicas.accept(&open_policy(), vec![forged]).unwrap()[0],
            Outcome::Rejected(_)
        ));
        assert_eq!(replicas.used_bytes(), 0);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

        // The real one is then taken.
        assert_eq!(
            replicas.accept(&open_policy(), vec![genesis]).unwrap(),
            vec![Outcome::Stored]
        );
        replicas.commit().unwrap();
        assert!(replicas.used_bytes() > 0);
    }
}
