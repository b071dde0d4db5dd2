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
    cell::RefCell,
    collections::{BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
};

use tern_protocol::{
    AccountId, DevicePublicKey, Record,
    cloud::{
        BatchLimits, ChatId, ChatLog, ChatMember, ChatSummary, Composed, Entry, EntryError,
        EntryHash, EntryKind, LogError, LogOutput, Prechecked, SyncRequest, SyncResponse, sync,
    },
    codec::encode_nested,
};

use super::hosting::{HostPolicy, Refusal};
use crate::{
    data_dir::create_private_dir,
    segments::{Key, SegmentError, SegmentLog, Value},
};

/// What happened to one pushed entry.
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// A segment record's bytes beyond its value (header and checksum), as
/// counted against the quota.
const RECORD_OVERHEAD: u64 = 45;
/// A flush slower than this is logged (at debug level).
const SLOW_FLUSH: std::time::Duration = std::time::Duration::from_millis(50);

/// A verified entry's record, waiting for its batch's one append.
struct Staged {
    chat: ChatId,
    hash: EntryHash,
    bytes: Vec<u8>,
    /// The offered entry's place in the batch, where this record is it.
    outcome: Option<usize>,
}

/// An entry offered to the chats this node keeps.
enum Offered {
    /// From a peer or from disk: verified in full.
    Received(Entry),
    /// Composed and signed by this device.
    Composed(Composed),
    /// Its signature and body checked already (the rest is checked on
    /// insert).
    Checked(Prechecked),
}

/// Batches at least this large have their signatures checked in parallel
/// (a catch-up's; a streaming writer's pushes are smaller, and on a busy
/// machine starting threads for them costs more than it saves).
const PARALLEL_CHECK_MIN: usize = 128;
/// …and so are batches of large entries carrying at least this many body
/// bytes (a catch-up of 16 KB messages comes 64 to a 1 MiB push).
const PARALLEL_CHECK_BYTES: usize = 512 * 1024;
/// Entries whose signatures are checked together when a chat is loaded.
const LOAD_CHECK_BATCH: usize = 4096;
/// Threads checking one batch's signatures, at most.
const MAX_CHECK_THREADS: usize = 4;

/// The flushes of a commit, to run on a thread that may block
/// ([`Replicas::start_commit`]).
#[derive(Default)]
pub struct CommitJob {
    syncs: Vec<crate::segments::PendingSync>,
    bytes: usize,
}

impl CommitJob {
    /// Bytes the commit makes durable (appended since the last one).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Blocks until everything the commit covers is on disk.
    pub fn run(self) -> Result<(), String> {
        let started = std::time::Instant::now();
        let (files, bytes) = (self.syncs.len(), self.bytes);
        for s in self.syncs {
            s.run().map_err(|e| e.to_string())?;
        }
        let took = started.elapsed();
        if took >= SLOW_FLUSH {
            tracing::debug!(files, bytes, "a flush took {} ms", took.as_millis());
        }
        Ok(())
    }
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
    /// Bytes on disk, kept as a running total.
    used: u64,
    /// Set when a commit failed: memory may be ahead of the disk.
    failed: Option<String>,
    /// Entries appended since the last [`Self::take_appended`].
    appended: Vec<(ChatId, EntryHash)>,
    /// Chats holding this device's entries composed to be signed as a run
    /// ([`Self::sign_composed`]).
    unsigned: BTreeSet<ChatId>,
    /// `AccountKey` entries kept since the last [`Self::take_key_changes`].
    key_changes: Vec<KeyChange>,
    /// Bytes appended since the last commit started.
    unflushed: usize,
    /// This node's account, once known: the chats it is not a member of
    /// are hosted, and their bodies are kept on disk only.
    account: Option<AccountId>,
    /// Hosted chats whose logs released bodies to disk.
    released: HashSet<ChatId>,
    /// Released bodies found damaged on disk when read, to be fetched
    /// again ([`ChatLog::body_lost`]) at the next change.
    lost: RefCell<Vec<(ChatId, EntryHash)>>,
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
    #[error("kept chats are {0}")]
    Failed(String),
}

/// An entry as a push carries it: its encoding without the version byte.
pub enum PushPiece {
    /// The record kept on disk, as it is (its first byte, the version,
    /// is left out).
    Kept(Value),
    /// Encoded from the entry in memory.
    Encoded(Vec<u8>),
}

impl AsRef<[u8]> for PushPiece {
    fn as_ref(&self) -> &[u8] {
        match self {
            // Checked to start with the version when read.
            Self::Kept(record) => &record[1..],
            Self::Encoded(bytes) => bytes,
        }
    }
}

impl Replica {
    /// The entry's encoding as a push carries it. A released body is not
    /// decoded: the record goes as it is kept, once the header it starts
    /// with is found to be the one verified (the segment's checks found no
    /// damage, and whoever receives it checks the body, as any pushed one).
    fn piece_for_peer(&self, hash: &EntryHash, entry: &Entry) -> Result<PushPiece, ReplicaError> {
        if !self.log.body_released(hash) {
            let mut bytes = Vec::with_capacity(entry.encoded_len());
            encode_nested(entry, &mut bytes);
            return Ok(PushPiece::Encoded(bytes));
        }
        let record = self.kept_record(hash)?;
        if !entry.header.heads_record_with_body(&record) {
            return Err(self.differs());
        }
        Ok(PushPiece::Kept(record))
    }

    /// Puts back the body the log released, read from this chat's segments.
    fn put_body_back(&self, hash: &EntryHash, entry: &mut Entry) -> Result<(), ReplicaError> {
        if !self.log.body_released(hash) {
            return Ok(());
        }
        let record = self.kept_record(hash)?;
        let stored = Entry::decode(&record).map_err(|e| self.damaged(e.to_string()))?;
        // The segment's checks found no damage; the record must still be
        // this entry's (its body is checked by whoever receives it).
        if stored.header != entry.header {
            return Err(self.differs());
        }
        entry.body = stored.body;
        Ok(())
    }

    /// The record kept for `hash`, which must be there.
    fn kept_record(&self, hash: &EntryHash) -> Result<Value, ReplicaError> {
        self.store
            .get(&hash.0)?
            .ok_or_else(|| self.damaged("a kept entry is missing from disk".into()))
    }

    fn differs(&self) -> ReplicaError {
        self.damaged("an entry on disk differs from the one verified".into())
    }

    fn damaged(&self, why: String) -> ReplicaError {
        ReplicaError::Damaged {
            chat: format!("{:?}", self.log.chat()),
            why,
        }
    }
}

fn chat_dir(root: &Path, chat: &ChatId) -> PathBuf {
    root.join(crate::hex::hex(&chat.0))
}

/// [`Entry::precheck_many`], on every core for a large batch (a
/// catch-up's; a streaming writer's pushes are smaller, and on a busy
/// machine starting threads for them costs more than it saves).
#[allow(clippy::result_large_err)]
fn check_batch(entries: Vec<Entry>) -> Vec<Result<Prechecked, (Entry, EntryError)>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_CHECK_THREADS);
    let bytes: usize = entries
        .iter()
        .filter_map(|e| e.body.as_ref())
        .map(|b| b.ciphertext.len())
        .sum();
    let large = entries.len() >= PARALLEL_CHECK_MIN || bytes >= PARALLEL_CHECK_BYTES;
    if !large || entries.len() < 2 || threads < 2 {
        return Entry::precheck_many(entries);
    }
    let chunk = entries.len().div_ceil(threads);
    let mut chunks = Vec::with_capacity(threads);
    let mut rest = entries;
    while rest.len() > chunk {
        let tail = rest.split_off(chunk);
        chunks.push(rest);
        rest = tail;
    }
    chunks.push(rest);
    std::thread::scope(|scope| {
        let mut chunks = chunks.into_iter();
        let first = chunks.next().unwrap_or_default();
        let others: Vec<_> = chunks
            .map(|c| scope.spawn(|| Entry::precheck_many(c)))
            .collect();
        let mut checked = Entry::precheck_many(first);
        for other in others {
            // A checking thread panics only as the same check on this
            // thread would (a bug in the signature library): the panic
            // goes on here, and no outcome is lost or out of place.
            match other.join() {
                Ok(more) => checked.extend(more),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        checked
    })
}

/// Loads one kept chat, re-verifying every entry in causal order. Purges
/// the log finds unfinished (a crash between the commit and the rewrite)
/// are returned so the caller finishes them.
/// Entries whose body must be erased, each with its header-only encoding.
type PendingPurges = Vec<(EntryHash, Vec<u8>)>;

///
/// A directory with nothing in it is no kept chat: it is made when a chat's
/// genesis verifies, and a crash can come before the genesis is written. It
/// is removed and `None` returned, so the genesis, when it comes again, is
/// taken as for a new chat.
fn load_chat(chat: ChatId, dir: &Path) -> Result<Option<(Replica, PendingPurges)>, ReplicaError> {
    let name = dir.display().to_string();
    let store = SegmentLog::open(dir)?;
    if store.is_empty() {
        drop(store);
        std::fs::remove_dir_all(dir).map_err(|source| ReplicaError::Io { path: name, source })?;
        return Ok(None);
    }
    let mut entries = Vec::with_capacity(store.len());
    let mut damaged = None;
    store.scan(|_, bytes| match Entry::decode(bytes) {
        Ok(e) => entries.push(e),
        Err(e) => damaged = Some(e.to_string()),
    })?;
    if let Some(why) = damaged {
        return Err(ReplicaError::Damaged { chat: name, why });
    }
    // Parents before children: a child's lamport exceeds its parents'.
    entries.sort_by_key(|e| (e.header.header.lamport, e.hash()));
    let mut log = ChatLog::new(chat);
    let mut purges = Vec::new();
    let mut checked = Vec::with_capacity(entries.len());
    while !entries.is_empty() {
        let rest = entries.split_off(entries.len().min(LOAD_CHECK_BATCH));
        checked.extend(check_batch(entries));
        entries = rest;
    }
    for e in checked {
        let inserted = match e {
            Ok(e) => log.insert_checked(e),
            Err((e, _)) => log.insert(e),
        };
        let outputs = inserted.map_err(|err| ReplicaError::Damaged {
            chat: name.clone(),
            why: err.to_string(),
        })?;
        // A purge replayed here may find its target's body still on disk (a
        // crash came between the commit and the rewrite): erase it again.
        // Where the disk already holds the header alone, the rewrite finds
        // nothing to change.
        for o in outputs {
            if let LogOutput::EraseBody { entry, .. } = o
                && let Some(e) = log.get(&entry)
            {
                purges.push((entry, e.without_body().encode()));
            }
        }
    }
    Ok(Some((Replica { log, store }, purges)))
}

/// An account's new encryption key, as an `AccountKey` entry kept here
/// announced it: which account, written by which of its devices, revoking
/// which.
#[derive(Debug)]
pub struct KeyChange {
    pub chat: ChatId,
    pub account: AccountId,
    pub by: DevicePublicKey,
    pub revoked: Vec<DevicePublicKey>,
}

impl Replicas {
    /// Loads every kept chat. A chat whose files are damaged is set aside
    /// (renamed `*.damaged`, logged) for anti-entropy to restore; it does
    /// not stop the node.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ReplicaError> {
        Self::open_as(root, None)
    }

    /// [`Self::open`] for a node of `account`. The chats `account` is not a
    /// member of are hosted: their logs keep headers in memory and bodies
    /// on disk only (a community node hosting many chats needs memory for
    /// their headers, not their history). A hosted chat's bodies leave
    /// memory as soon as it is loaded, and each new one once it is written.
    pub fn open_as(
        root: impl Into<PathBuf>,
        account: Option<AccountId>,
    ) -> Result<Self, ReplicaError> {
        let root = root.into();
        let io = |source| ReplicaError::Io {
            path: root.display().to_string(),
            source,
        };
        create_private_dir(&root).map_err(io)?;
        let mut this = Self {
            root: root.clone(),
            chats: HashMap::new(),
            dirty: BTreeSet::new(),
            purges: Vec::new(),
            used: 0,
            failed: None,
            appended: Vec::new(),
            unsigned: BTreeSet::new(),
            key_changes: Vec::new(),
            unflushed: 0,
            account,
            released: HashSet::new(),
            lost: RefCell::new(Vec::new()),
        };
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
            match load_chat(chat, &dir.path()) {
                Ok(None) => {}
                Ok(Some((replica, purges))) => {
                    this.insert_loaded(chat, replica)?;
                    this.purges
                        .extend(purges.into_iter().map(|(h, b)| (chat, h, b)));
                }
                Err(e) => {
                    tracing::error!("setting aside a damaged chat: {e}");
                    let aside = root.join(format!("{name}.damaged"));
                    let _ = std::fs::rename(dir.path(), aside);
                }
            }
        }
        this.used = this.chats.values().map(|r| r.store.disk_bytes()).sum();
        // Finish purges a crash interrupted before anything is served.
        this.commit()?;
        Ok(this)
    }

    /// Bytes of other people's chats on disk: what the quota counts.
    pub fn used_bytes(&self) -> u64 {
        self.used
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

    /// The directory of a kept chat (where its segments are).
    pub fn chat_dir(&self, chat: &ChatId) -> Option<PathBuf> {
        self.chats
            .contains_key(chat)
            .then(|| chat_dir(&self.root, chat))
    }

    /// The verified log of a kept chat.
    pub fn log(&self, chat: &ChatId) -> Option<&ChatLog> {
        self.chats.get(chat).map(|r| &r.log)
    }

    /// Entries appended (and, after a commit, durable) since the last call,
    /// in the order they were appended.
    pub fn take_appended(&mut self) -> Vec<(ChatId, EntryHash)> {
        std::mem::take(&mut self.appended)
    }

    /// Accounts that took a new encryption key (an `AccountKey` entry was
    /// kept here) since the last call.
    pub fn take_key_changes(&mut self) -> Vec<KeyChange> {
        std::mem::take(&mut self.key_changes)
    }

    /// Whether a failed commit stopped the kept chats.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn check(&self) -> Result<(), ReplicaError> {
        match &self.failed {
            Some(why) => Err(ReplicaError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Verifies and appends pushed entries; nothing is durable (and
    /// nothing should be acknowledged) before [`Self::commit`].
    ///
    /// The hosting policy is decided once per chat, on its first entry (the
    /// genesis) by its creator's account; after that any verified member
    /// may write. Only new bytes count against the quota, and a purge never
    /// does. `policy` is `None` for this device's own chats, which it keeps
    /// as a member whatever the hosting policy says.
    pub fn accept(
        &mut self,
        policy: Option<&HostPolicy>,
        entries: Vec<Entry>,
    ) -> Result<Vec<Outcome>, ReplicaError> {
        self.check()?;
        let mut outcomes = Vec::with_capacity(entries.len());
        let mut staged = Vec::new();
        for offered in self.precheck(entries) {
            let at = outcomes.len();
            let (outcome, go_on) = self.accept_one(policy, offered, Some((&mut staged, at)))?;
            outcomes.push(outcome);
            if !go_on {
                break;
            }
        }
        self.write_staged(staged, &mut outcomes)?;
        Ok(outcomes)
    }

    /// Writes a batch's records with one append per chat. Where one fails
    /// the chat is reloaded from disk (memory never holds what the disk
    /// does not), and its entries of this batch are rejected.
    fn write_staged(
        &mut self,
        staged: Vec<Staged>,
        outcomes: &mut [Outcome],
    ) -> Result<(), ReplicaError> {
        let mut by_chat: Vec<(ChatId, Vec<Staged>)> = Vec::new();
        for s in staged {
            match by_chat.iter_mut().find(|(c, _)| *c == s.chat) {
                Some((_, records)) => records.push(s),
                None => by_chat.push((s.chat, vec![s])),
            }
        }
        for (chat, records) in by_chat {
            let Some(r) = self.chats.get_mut(&chat) else {
                // Staged records are of kept chats; were one gone, its
                // entries must not be acknowledged.
                for i in records.iter().filter_map(|s| s.outcome) {
                    outcomes[i] = Outcome::Rejected("the chat is no longer kept here".into());
                }
                continue;
            };
            let batch: Vec<(Key, &[u8])> = records
                .iter()
                .map(|s| (s.hash.0, s.bytes.as_slice()))
                .collect();
            let bytes: usize = records.iter().map(|s| s.bytes.len()).sum();
            match r.store.append(&batch) {
                Ok(()) => {
                    self.unflushed += bytes;
                    self.dirty.insert(chat);
                    self.appended.extend(records.iter().map(|s| (chat, s.hash)));
                    self.release_hosted(chat, records.iter().map(|s| s.hash))?;
                }
                Err(e) => {
                    tracing::warn!("cannot append to a kept chat: {e}");
                    for i in records.iter().filter_map(|s| s.outcome) {
                        outcomes[i] = Outcome::Rejected(e.to_string());
                    }
                    self.reload(chat)?;
                }
            }
        }
        Ok(())
    }

    /// A batch's signatures and bodies, checked together before the
    /// entries go into their logs one by one (a batch check costs a
    /// fraction of single ones, a new replica's catch-up is mostly these
    /// checks, and [`check_batch`] runs them on every core).
    /// Entries whose place (device and seq) is taken already are not
    /// checked here; they, and any that fail, are offered as received, so
    /// the log checks them in full (a replay is a duplicate, another entry
    /// at that place a fork) and gives the reason.
    fn precheck(&self, entries: Vec<Entry>) -> Vec<Offered> {
        if entries.len() < 2 {
            return entries.into_iter().map(Offered::Received).collect();
        }
        // By place, not by hash: hashing every header for this cost as much
        // as a tenth of a storage peer's time.
        let held = |e: &Entry| {
            let h = &e.header.header;
            self.chats
                .get(&h.chat)
                .is_some_and(|r| r.log.next_seq(&h.author.device) > h.seq)
        };
        let mut offered: Vec<Option<Offered>> = Vec::with_capacity(entries.len());
        let mut fresh = Vec::with_capacity(entries.len());
        for e in entries {
            if held(&e) {
                offered.push(Some(Offered::Received(e)));
            } else {
                offered.push(None);
                fresh.push(e);
            }
        }
        let mut checked = check_batch(fresh).into_iter();
        for slot in offered.iter_mut().filter(|slot| slot.is_none()) {
            *slot = checked.next().map(|r| match r {
                Ok(checked) => Offered::Checked(checked),
                Err((e, _)) => Offered::Received(e),
            });
        }
        offered.into_iter().flatten().collect()
    }

    /// This device's own entry, just composed: kept in its chat without
    /// checking the signature it has just made (everything else is
    /// checked, and no hosting policy applies).
    pub fn accept_composed(&mut self, entry: Composed) -> Result<Outcome, ReplicaError> {
        self.check()?;
        let chat = entry.header.header.chat;
        let hash = entry.hash();
        let unsigned = !entry.header.is_signed();
        let outcome = self.accept_one(None, Offered::Composed(entry), None)?.0;
        // Held by the log, but written (and announced) only once the run
        // is signed: no `Persist` said so.
        if unsigned && self.log(&chat).is_some_and(|l| l.contains(&hash)) {
            self.unsigned.insert(chat);
            return Ok(Outcome::Stored);
        }
        Ok(outcome)
    }

    /// Signs this device's entries composed since the last call, one
    /// signature per chat's run, and appends them. Call it before anything
    /// the round did is committed or sent: until then those entries verify
    /// nowhere. If an append fails, the kept chats stop as after a failed
    /// commit: that chat was reloaded from disk and its unsigned entries,
    /// which the round's commands answer for, are gone.
    pub fn sign_composed(&mut self, member: &ChatMember) -> Result<(), ReplicaError> {
        self.check()?;
        let mut failed = None;
        for chat in std::mem::take(&mut self.unsigned) {
            let Some(r) = self.chats.get_mut(&chat) else {
                continue;
            };
            for output in member.sign_composed(&mut r.log) {
                let LogOutput::Persist { hash, record } = output else {
                    continue;
                };
                match self.append(chat, hash, &record) {
                    Ok(()) => {
                        self.note_key_change(chat, &hash);
                        self.appended.push((chat, hash));
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                        break;
                    }
                }
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => {
                let why = format!("stopped after a storage failure ({e}); restart the node");
                self.failed = Some(why.clone());
                Err(ReplicaError::Failed(why))
            }
        }
    }

    /// One entry; `false` when a failed append stops the batch. With
    /// `staged` (and the entry's place in its batch) its records are left
    /// there for [`Self::write_staged`]; without, they are appended at once.
    fn accept_one(
        &mut self,
        policy: Option<&HostPolicy>,
        offered: Offered,
        mut staged: Option<(&mut Vec<Staged>, usize)>,
    ) -> Result<(Outcome, bool), ReplicaError> {
        let entry: &Entry = match &offered {
            Offered::Received(e) => e,
            Offered::Composed(c) => c,
            Offered::Checked(c) => c.entry(),
        };
        let chat = entry.header.header.chat;
        let hash = match &offered {
            Offered::Checked(c) => c.hash(),
            Offered::Composed(c) => c.hash(),
            Offered::Received(e) => e.hash(),
        };
        let is_purge = matches!(entry.header.header.kind, EntryKind::Purge { .. });
        let known = self.chats.contains_key(&chat);
        if known && self.chats[&chat].log.is_duplicate(&hash, entry) {
            return Ok((Outcome::Duplicate, true));
        }
        let creator = if known {
            self.chats[&chat].creator()
        } else if matches!(entry.header.header.kind, EntryKind::Genesis { .. }) {
            Some(entry.header.author_account())
        } else {
            None
        };
        let Some(creator) = creator else {
            // Not kept here (yet): the pusher should start from the
            // genesis, which is where the hosting policy answers.
            return Ok((Outcome::Missing(entry.header.header.parents.clone()), true));
        };
        if let Some(policy) = policy {
            let incoming = if is_purge {
                0
            } else {
                entry.encoded_len() as u64
            };
            if let Err(r) = policy.decide(&creator, self.used, incoming) {
                return Ok((Outcome::Refused(r), true));
            }
        }
        // A new chat gets its directory only once its genesis verifies.
        let mut fresh = None;
        let log = match self.chats.get_mut(&chat) {
            Some(r) => &mut r.log,
            None => fresh.insert(ChatLog::new(chat)),
        };
        let inserted = match offered {
            Offered::Received(e) => log.insert(e),
            Offered::Composed(c) => log.insert_composed(c),
            Offered::Checked(c) => log.insert_checked(c),
        };
        let outputs = match inserted {
            Ok(o) => o,
            Err(LogError::Duplicate(_)) => return Ok((Outcome::Duplicate, true)),
            Err(e) => {
                tracing::warn!("rejected a cloud-chat entry: {e}");
                return Ok((Outcome::Rejected(e.to_string()), true));
            }
        };
        if let Some(log) = fresh {
            let store = SegmentLog::open(chat_dir(&self.root, &chat))?;
            self.chats.insert(chat, Replica { log, store });
        }
        let mut outcome = Outcome::Missing(Vec::new());
        for output in outputs {
            match output {
                LogOutput::Persist {
                    hash: h,
                    record: enc,
                } => {
                    // This entry, or one that waited for it.
                    self.note_key_change(chat, &h);
                    match staged.as_mut() {
                        Some((staged, at)) => {
                            self.used += enc.len() as u64 + RECORD_OVERHEAD;
                            staged.push(Staged {
                                chat,
                                hash: h,
                                bytes: enc,
                                outcome: (h == hash).then_some(*at),
                            });
                        }
                        None => {
                            if let Err(err) = self.append(chat, h, &enc) {
                                return Ok((Outcome::Rejected(err.to_string()), false));
                            }
                            self.appended.push((chat, h));
                        }
                    }
                    if h == hash {
                        outcome = Outcome::Stored;
                    }
                }
                LogOutput::EraseBody { entry, .. } => {
                    if let Some(e) = self.chats.get(&chat).and_then(|r| r.log.get(&entry)) {
                        self.purges.push((chat, entry, e.without_body().encode()));
                    }
                }
                LogOutput::Missing(parents) => {
                    if outcome != Outcome::Stored {
                        outcome = Outcome::Missing(parents);
                    }
                }
                LogOutput::Event(_) => {}
            }
        }
        Ok((outcome, true))
    }

    fn note_key_change(&mut self, chat: ChatId, hash: &EntryHash) {
        let Some(entry) = self.chats.get(&chat).and_then(|r| r.log.get(hash)) else {
            return;
        };
        if let EntryKind::AccountKey { change, .. } = &entry.header.header.kind {
            self.key_changes.push(KeyChange {
                chat,
                account: entry.header.author_account(),
                by: entry.header.author_device(),
                revoked: change.revoked.clone(),
            });
        }
    }

    /// Appends one record; on failure the chat is reloaded from disk, so
    /// memory never holds what the disk does not.
    fn append(&mut self, chat: ChatId, hash: EntryHash, bytes: &[u8]) -> Result<(), ReplicaError> {
        let r = self
            .chats
            .get_mut(&chat)
            .expect("the caller holds this chat");
        match r.store.append(&[(hash.0, bytes)]) {
            Ok(()) => {
                self.used += bytes.len() as u64 + RECORD_OVERHEAD;
                self.unflushed += bytes.len();
                self.dirty.insert(chat);
                Ok(())
            }
            Err(e) => {
                tracing::warn!("cannot append to a kept chat: {e}");
                self.reload(chat)?;
                Err(e.into())
            }
        }
    }

    /// Reads a chat again from disk. What was appended to it is flushed
    /// first (the reopened log would not know it still needs a sync, and
    /// the round's answers wait on that sync). If this fails, the kept
    /// chats stop, as after a failed commit: memory would no longer match
    /// the disk.
    fn reload(&mut self, chat: ChatId) -> Result<(), ReplicaError> {
        let result = self.reload_inner(chat);
        if let Err(e) = &result {
            self.failed = Some(format!(
                "stopped after a storage failure ({e}); restart the node"
            ));
        }
        result
    }

    fn reload_inner(&mut self, chat: ChatId) -> Result<(), ReplicaError> {
        if let Some(mut r) = self.chats.remove(&chat) {
            r.store.sync()?;
        }
        let dir = chat_dir(&self.root, &chat);
        if dir.exists()
            && let Some((replica, _)) = load_chat(chat, &dir)?
        {
            self.insert_loaded(chat, replica)?;
        }
        self.used = self.chats.values().map(|r| r.store.disk_bytes()).sum();
        Ok(())
    }

    /// Makes every accepted entry durable (one sync per touched chat), then
    /// carries out the purges (each rewrites what held the purged bytes).
    /// If the disk fails here, memory may be ahead of it: the replicas stop
    /// until a restart reloads them from disk.
    pub fn commit(&mut self) -> Result<(), ReplicaError> {
        self.check()?;
        let result = self.commit_inner();
        if let Err(e) = &result {
            self.failed = Some(format!(
                "stopped after a storage failure ({e}); restart the node"
            ));
        }
        result
    }

    /// Starts a commit whose flushes run elsewhere, so this thread can go
    /// on verifying while the disk works: the appends so far are written,
    /// and the returned job makes them durable. Nothing is durable (and
    /// nothing should be acknowledged) until [`Self::finish_commit`] is
    /// given the job's result. Purges (rare) are carried out at once.
    pub fn start_commit(&mut self) -> Result<CommitJob, ReplicaError> {
        self.check()?;
        if !self.purges.is_empty() {
            self.commit()?;
            return Ok(CommitJob::default());
        }
        let mut job = CommitJob {
            bytes: std::mem::take(&mut self.unflushed),
            ..CommitJob::default()
        };
        for chat in std::mem::take(&mut self.dirty) {
            let Some(r) = self.chats.get_mut(&chat) else {
                continue;
            };
            match r.store.sync_later() {
                Ok(pending) => job.syncs.extend(pending),
                Err(e) => {
                    self.failed = Some(format!(
                        "stopped after a storage failure ({e}); restart the node"
                    ));
                    return Err(e.into());
                }
            }
        }
        Ok(job)
    }

    /// Ends a commit begun by [`Self::start_commit`] with what its job
    /// returned. A failed flush stops the kept chats, as a failed
    /// [`Self::commit`] does: memory may then be ahead of the disk. After
    /// one failed, a later flush proves nothing (the kernel may have
    /// dropped the pages the first could not write), so it fails too.
    pub fn finish_commit(&mut self, flushed: Result<(), String>) -> Result<(), ReplicaError> {
        self.used = self.chats.values().map(|r| r.store.disk_bytes()).sum();
        self.check()?;
        flushed.map_err(|e| {
            let why = format!("stopped after a storage failure ({e}); restart the node");
            self.failed = Some(why.clone());
            ReplicaError::Failed(why)
        })
    }

    fn commit_inner(&mut self) -> Result<(), ReplicaError> {
        self.unflushed = 0;
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
        self.used = self.chats.values().map(|r| r.store.disk_bytes()).sum();
        Ok(())
    }

    /// What a member device or another replica lacks, in a bounded batch.
    pub fn serve(&self, request: &SyncRequest) -> Result<SyncResponse, ReplicaError> {
        self.check()?;
        let r = self
            .chats
            .get(&request.chat)
            .ok_or_else(|| ReplicaError::UnknownChat(format!("{:?}", request.chat)))?;
        let mut response = sync::respond(&r.log, request, BatchLimits::default())
            .map_err(|e| ReplicaError::Sync(e.to_string()))?;
        for entry in &mut response.entries {
            if entry.body.is_none() {
                let hash = entry.hash();
                // A body damaged on disk goes without: the asker holds the
                // entry as missing its body and asks other holders for it,
                // and so does this node.
                if let Err(e) = r.put_body_back(&hash, entry) {
                    tracing::warn!("serving an entry without its body: {e}");
                    self.lost.borrow_mut().push((request.chat, hash));
                }
            }
        }
        Ok(response)
    }

    /// An entry of a kept chat as a push to a peer carries it: with its
    /// body, read from disk if the log released it. A body found damaged
    /// is fetched again after [`Self::forget_lost_bodies`].
    pub fn piece_for_peer(
        &self,
        chat: &ChatId,
        hash: &EntryHash,
    ) -> Result<Option<PushPiece>, ReplicaError> {
        let Some(r) = self.chats.get(chat) else {
            return Ok(None);
        };
        let Some(entry) = r.log.get(hash) else {
            return Ok(None);
        };
        match r.piece_for_peer(hash, entry) {
            Ok(piece) => Ok(Some(piece)),
            Err(e) => {
                self.lost.borrow_mut().push((*chat, *hash));
                Err(e)
            }
        }
    }

    /// Marks the bodies found damaged since the last call as missing, so
    /// sync fetches them again; whether there were any.
    pub fn forget_lost_bodies(&mut self) -> bool {
        let lost = self.lost.take();
        let any = !lost.is_empty();
        for (chat, hash) in lost {
            if let Some(r) = self.chats.get_mut(&chat)
                && r.log.body_lost(&hash)
            {
                tracing::warn!(?chat, ?hash, "a body on disk is damaged; fetching it again");
            }
        }
        any
    }

    /// Keeps a chat loaded from disk; a hosted one releases its bodies.
    fn insert_loaded(&mut self, chat: ChatId, replica: Replica) -> Result<(), ReplicaError> {
        let hashes: Vec<EntryHash> = replica.log.in_display_order().map(|(h, _)| h).collect();
        self.chats.insert(chat, replica);
        self.release_hosted(chat, hashes.into_iter())
    }

    /// Whether this node's account is a member of `chat` now.
    fn is_member(&self, chat: &ChatId) -> bool {
        match (&self.account, self.chats.get(chat)) {
            (Some(a), Some(r)) => r.log.current_membership().is_member(a),
            _ => false,
        }
    }

    /// Drops from memory the bodies of these entries of a hosted chat (they
    /// are on disk, appended already). A chat this account has joined
    /// since its bodies were released is reloaded, bodies and all: its
    /// history is read from memory.
    fn release_hosted(
        &mut self,
        chat: ChatId,
        hashes: impl Iterator<Item = EntryHash>,
    ) -> Result<(), ReplicaError> {
        if self.account.is_none() {
            return Ok(());
        }
        if self.is_member(&chat) {
            if self.released.remove(&chat) {
                tracing::info!("this account joined a chat this node hosted: loading its bodies");
                self.reload(chat)?;
            }
            return Ok(());
        }
        let Some(r) = self.chats.get_mut(&chat) else {
            return Ok(());
        };
        let mut any = false;
        for hash in hashes {
            any |= r.log.release_body(&hash).is_some();
        }
        if any {
            self.released.insert(chat);
        }
        Ok(())
    }
}

impl Replica {
    /// The account that created the chat: whose hosting agreement covers it.
    fn creator(&self) -> Option<tern_protocol::AccountId> {
        let g = self.log.genesis()?;
        self.log.get(&g).map(|e| e.header.author_account())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::hosting::HostLists;
    use crate::test_util::files_containing;
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

    /// `creator` starts the chat with `other`; returns the genesis.
    fn create_with(creator: &mut Person, other: &Person) -> Entry {
        let genesis = creator
            .member
            .create(
                CHAT,
                &[(other.account.id(), other.member.encryption_key())],
                vec![],
                None,
                [3; 32],
            )
            .unwrap();
        creator.log.insert(genesis.clone()).unwrap();
        genesis.into_entry()
    }

    /// `p` writes `draft` and keeps it; returns the entry.
    fn write(p: &mut Person, draft: Draft, n: u8) -> Entry {
        let e = p.member.compose(&p.log, draft, [n; 32]).unwrap();
        p.log.insert(e.clone()).unwrap();
        e.into_entry()
    }

    fn say(p: &mut Person, text: &str, n: u8) -> Entry {
        let text = Draft::Text {
            text: text.into(),
            reply_to: None,
        };
        write(p, text, n)
    }

    fn open_policy() -> HostPolicy {
        HostPolicy {
            open: true,
            quota_bytes: 1 << 30,
            lists: HostLists::default(),
        }
    }

    /// A hosted entry goes to peers as its record is kept, but only while
    /// that record is the entry verified: another entry's record under its
    /// key (sound to the segment's checks) is not sent, and the body is
    /// fetched again.
    #[test]
    fn a_kept_record_goes_out_only_if_it_is_the_verified_entrys() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut alice, bob, carol) = (person(1), person(2), person(3));
        let genesis = create_with(&mut alice, &bob);
        let said: Vec<Entry> = (0..3)
            .map(|i| say(&mut alice, &format!("m{i}"), 10 + i))
            .collect();
        let mut replicas = Replicas::open_as(tmp.path(), Some(carol.account.id())).unwrap();
        let mut all = vec![genesis];
        all.extend(said.iter().cloned());
        let out = replicas.accept(Some(&open_policy()), all).unwrap();
        assert!(out.iter().all(|o| *o == Outcome::Stored), "{out:?}");
        replicas.commit().unwrap();
        let (swapped, other) = (said[1].hash(), said[2].encode());
        replicas
            .chats
            .get_mut(&CHAT)
            .unwrap()
            .store
            .append(&[(swapped.0, &other)])
            .unwrap();

        let refused = replicas.piece_for_peer(&CHAT, &swapped);
        assert!(
            matches!(&refused, Err(ReplicaError::Damaged { why, .. }) if why.contains("differs")),
            "{:?}",
            refused.map(|p| p.map(|p| p.as_ref().len()))
        );
        let piece = replicas.piece_for_peer(&CHAT, &said[0].hash()).unwrap();
        let sent = Entry::decode(&[&[Entry::VERSION], piece.unwrap().as_ref()].concat());
        assert_eq!(sent.unwrap(), said[0]);
        assert!(replicas.forget_lost_bodies());
        let wanted = SyncRequest::for_log(replicas.log(&CHAT).unwrap()).want_bodies;
        assert_eq!(wanted, vec![swapped]);
    }

    /// A node that is no member of a chat holds its bodies on disk only,
    /// serves them whole (from memory's headers and disk's bodies), erases
    /// them for real on a purge, and keeps them in memory again once its
    /// account joins.
    #[test]
    fn a_hosted_chat_keeps_bodies_on_disk_only_and_serves_them_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut alice, bob, carol) = (person(1), person(2), person(3));
        let genesis = create_with(&mut alice, &bob);
        let said: Vec<Entry> = (0..20)
            .map(|i| say(&mut alice, &format!("m{i}"), 10 + i))
            .collect();
        let host = carol.account.id();
        let mut replicas = Replicas::open_as(tmp.path(), Some(host)).unwrap();
        let mut all = vec![genesis.clone()];
        all.extend(said.iter().cloned());
        let out = replicas.accept(Some(&open_policy()), all.clone()).unwrap();
        assert!(out.iter().all(|o| *o == Outcome::Stored), "{out:?}");
        replicas.commit().unwrap();

        let held = |r: &Replicas| {
            let log = r.log(&CHAT).unwrap();
            all.iter()
                .filter(|e| log.get(&e.hash()).unwrap().body.is_some())
                .count()
        };
        assert_eq!(held(&replicas), 0, "a hosted chat keeps no body in memory");
        // Served whole: a new replica gets every body, in batches that fit.
        let serve_all = |r: &Replicas| {
            let mut fresh = ChatLog::new(CHAT);
            loop {
                let resp = r.serve(&SyncRequest::for_log(&fresh)).unwrap();
                assert!(resp.encoded_len() <= SyncResponse::MAX_LEN);
                for e in resp.entries {
                    fresh.insert(e).unwrap();
                }
                if !resp.more {
                    break fresh;
                }
            }
        };
        let fresh = serve_all(&replicas);
        assert_eq!(fresh.len(), all.len());
        assert_eq!(fresh.missing_bodies().count(), 0);
        for e in &all {
            assert_eq!(fresh.get(&e.hash()), Some(e));
            // Pushed as kept (a body's), without decoding: the same entry
            // arrives.
            let piece = replicas.piece_for_peer(&CHAT, &e.hash()).unwrap().unwrap();
            assert_eq!(matches!(piece, PushPiece::Kept(_)), e.body.is_some());
            let pushed = Entry::decode(&[&[Entry::VERSION], piece.as_ref()].concat()).unwrap();
            assert_eq!(&pushed, e);
        }
        // After a restart, the same.
        drop(replicas);
        let mut replicas = Replicas::open_as(tmp.path(), Some(host)).unwrap();
        assert_eq!(held(&replicas), 0);
        assert_eq!(serve_all(&replicas).len(), all.len());

        // A body damaged on disk after it was loaded is not served: its
        // entry goes without it (the asker fetches it elsewhere), and every
        // other entry still comes whole.
        let damaged = &said[7];
        let ct = &damaged.body.as_ref().unwrap().ciphertext;
        let file = files_containing(tmp.path(), ct).pop().unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let at = bytes
            .windows(ct.len())
            .position(|w| w == ct.as_slice())
            .unwrap();
        bytes[at + ct.len() / 2] ^= 0x40;
        std::fs::write(&file, &bytes).unwrap();
        let fresh = serve_all(&replicas);
        assert_eq!(fresh.len(), all.len());
        assert_eq!(
            fresh.missing_bodies().copied().collect::<Vec<_>>(),
            vec![damaged.hash()]
        );
        assert!(replicas.piece_for_peer(&CHAT, &damaged.hash()).is_err());
        // This node wants it again, and takes it from whoever has it.
        assert!(replicas.forget_lost_bodies());
        let log = replicas.log(&CHAT).unwrap();
        assert_eq!(
            log.missing_bodies().copied().collect::<Vec<_>>(),
            vec![damaged.hash()]
        );
        assert_eq!(SyncRequest::for_log(log).want_bodies, vec![damaged.hash()]);
        let out = replicas
            .accept(Some(&open_policy()), vec![damaged.clone()])
            .unwrap();
        assert_eq!(out, vec![Outcome::Stored]);
        replicas.commit().unwrap();
        assert_eq!(held(&replicas), 0, "the body fetched again is on disk only");
        let fresh = serve_all(&replicas);
        assert_eq!(fresh.missing_bodies().count(), 0);
        assert_eq!(fresh.get(&damaged.hash()), Some(damaged));
        // (The damaged copy is a replaced record now; mend it, so the
        // reloads below do not set the chat aside as damaged.)
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            f.write_all_at(
                &[bytes[at + ct.len() / 2] ^ 0x40],
                (at + ct.len() / 2) as u64,
            )
            .unwrap();
        }

        // A purge of a body kept on disk erases it there.
        let target = &said[3];
        let ciphertext = target.body.as_ref().unwrap().ciphertext.clone();
        assert_eq!(files_containing(tmp.path(), &ciphertext).len(), 1);
        let purge = write(
            &mut alice,
            Draft::Delete {
                target: target.hash(),
            },
            90,
        );
        let out = replicas.accept(Some(&open_policy()), vec![purge]).unwrap();
        assert_eq!(out, vec![Outcome::Stored]);
        replicas.commit().unwrap();
        assert_eq!(files_containing(tmp.path(), &ciphertext).len(), 0);
        let fresh = serve_all(&replicas);
        assert!(fresh.get(&target.hash()).unwrap().body.is_none());

        // Carol joins: the chat is hers to read now, bodies in memory.
        let add = Draft::AddMember {
            account: carol.account.id(),
            encryption_key: carol.member.encryption_key(),
        };
        let add = write(&mut alice, add, 91);
        let out = replicas.accept(Some(&open_policy()), vec![add]).unwrap();
        assert_eq!(out, vec![Outcome::Stored]);
        assert_eq!(replicas.failure(), None);
        replicas.commit().unwrap();

        let with_bodies = all.iter().filter(|e| e.body.is_some()).count();
        assert_eq!(
            held(&replicas),
            with_bodies - 1,
            "every body but the purged one"
        );
    }

    #[test]
    fn a_storage_peer_keeps_verified_entries_across_restarts_and_purges_for_real() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut alice, bob) = (person(1), person(2));
        let genesis = create_with(&mut alice, &bob);
        let hello = say(&mut alice, "hello bob", 4);
        let secret = say(&mut alice, "this will be deleted", 5);

        let mut replicas = Replicas::open(tmp.path()).unwrap();
        let ciphertext = secret.body.as_ref().unwrap().ciphertext.clone();
        // A child before its parent waits in memory and is not called stored.
        let out = replicas
            .accept(Some(&open_policy()), vec![genesis, secret.clone()])
            .unwrap();
        assert!(
            matches!(out[..], [Outcome::Stored, Outcome::Missing(_)]),
            "{out:?}"
        );
        replicas.commit().unwrap();
        assert_eq!(files_containing(tmp.path(), &ciphertext).len(), 0);
        let out = replicas
            .accept(Some(&open_policy()), vec![hello.clone()])
            .unwrap();
        assert_eq!(out, vec![Outcome::Stored]);
        assert_eq!(
            replicas
                .accept(Some(&open_policy()), vec![secret.clone()])
                .unwrap(),
            vec![Outcome::Duplicate]
        );
        replicas.commit().unwrap();
        // The storage peer holds ciphertext only.
        assert_eq!(files_containing(tmp.path(), b"hello bob").len(), 0);
        assert_eq!(files_containing(tmp.path(), &ciphertext).len(), 1);
        // A replay changes nothing.
        assert_eq!(
            replicas
                .accept(Some(&open_policy()), vec![hello.clone()])
                .unwrap(),
            vec![Outcome::Duplicate]
        );

        // Delete for everyone: the body goes from disk, the chain stays.
        let purge = write(
            &mut alice,
            Draft::Delete {
                target: secret.hash(),
            },
            6,
        );
        assert_eq!(
            replicas.accept(Some(&open_policy()), vec![purge]).unwrap(),
            vec![Outcome::Stored]
        );
        replicas.commit().unwrap();
        assert_eq!(files_containing(tmp.path(), &ciphertext).len(), 0);
        drop(replicas);

        let replicas = Replicas::open(tmp.path()).unwrap();
        assert_eq!(replicas.entries(&CHAT), 4);
        let summary = replicas.summary(&CHAT).unwrap();
        assert!(sync::in_sync(&summary, &ChatSummary::of(&alice.log)));
    }

    #[test]
    fn a_batch_checked_at_once_keeps_every_good_entry_and_names_the_bad_ones() {
        // One batch check on this thread, and one split across threads.
        for messages in [20, PARALLEL_CHECK_MIN + 10] {
            let tmp = tempfile::tempdir().unwrap();
            let (mut alice, bob) = (person(1), person(2));
            let genesis = create_with(&mut alice, &bob);
            let mut batch = vec![genesis];
            for n in 0..messages {
                batch.push(say(&mut alice, &format!("message {n}"), n as u8));
            }
            // Two entries Alice never sent, with forged signatures: one in
            // each half of the batch; one whose payload was altered on the
            // way (its header and signature intact). A forged copy of a
            // kept entry names that entry (the hash is the header's) and
            // changes nothing; and a replay.
            let sent = ChatSummary::of(&alice.log);
            let mut forged = say(&mut alice, "never sent", 200);
            forged.header.signature[5] ^= 1;
            let mut late_forged = say(&mut alice, "never sent either", 201);
            late_forged.header.signature[9] ^= 1;
            let mut altered = say(&mut alice, "altered on the way", 202);
            if let Some(body) = altered.body.as_mut() {
                body.ciphertext[0] ^= 1;
            }
            let mut forged_copy = batch[4].clone();
            forged_copy.header.signature[7] ^= 1;
            let replayed = batch[3].clone();
            batch.insert(11, forged);
            batch.push(late_forged);
            batch.push(altered);
            batch.push(forged_copy);
            batch.push(replayed);

            let mut replicas = Replicas::open(tmp.path()).unwrap();
            let out = replicas.accept(Some(&open_policy()), batch).unwrap();
            assert_eq!(out.len(), messages + 6);
            let rejected: Vec<usize> = (0..out.len())
                .filter(|i| matches!(&out[*i], Outcome::Rejected(why) if why.contains("signature")))
                .collect();
            assert_eq!(rejected, vec![11, out.len() - 4], "{out:?}");
            assert!(
                matches!(&out[out.len() - 3], Outcome::Rejected(why) if why.contains("altered body")),
                "{out:?}"
            );
            assert_eq!(out[out.len() - 2], Outcome::Duplicate);
            assert_eq!(out[out.len() - 1], Outcome::Duplicate);
            let stored = out.iter().filter(|o| **o == Outcome::Stored).count();
            assert_eq!(stored, messages + 1);
            // Every good entry is on disk and verifies again on reopening.
            let replicas = committed_and_reopened(replicas, tmp.path());
            assert_eq!(replicas.entries(&CHAT), messages + 1);
            assert!(sync::in_sync(&replicas.summary(&CHAT).unwrap(), &sent));
        }
    }

    #[test]
    fn a_commit_flushed_on_another_thread_while_more_arrive_keeps_both_and_a_failed_one_stops_the_chats()
     {
        let tmp = tempfile::tempdir().unwrap();
        let (mut alice, bob) = (person(1), person(2));
        let genesis = create_with(&mut alice, &bob);
        let first = say(&mut alice, "flushed on the other thread", 1);
        let second = say(&mut alice, "taken while it flushed", 2);
        let third = say(&mut alice, "after the failure", 3);

        let mut replicas = Replicas::open(tmp.path()).unwrap();
        let out = replicas
            .accept(Some(&open_policy()), vec![genesis, first])
            .unwrap();
        assert_eq!(out, vec![Outcome::Stored, Outcome::Stored]);
        let job = replicas.start_commit().unwrap();
        let flushing = std::thread::spawn(move || job.run());
        let out = replicas.accept(Some(&open_policy()), vec![second]).unwrap();
        assert_eq!(out, vec![Outcome::Stored]);
        replicas.finish_commit(flushing.join().unwrap()).unwrap();
        let job = replicas.start_commit().unwrap();
        replicas.finish_commit(job.run()).unwrap();
        drop(replicas);
        let mut replicas = Replicas::open(tmp.path()).unwrap();
        assert_eq!(replicas.entries(&CHAT), 3);

        // A flush that failed: what memory holds may not be on disk, so
        // the kept chats stop, with the reason, until a restart.
        let job = replicas.start_commit().unwrap();
        let err = replicas
            .finish_commit(job.run().and(Err("No space left on device".into())))
            .unwrap_err();
        assert!(err.to_string().contains("No space left on device"), "{err}");
        let refused = replicas
            .accept(Some(&open_policy()), vec![third])
            .unwrap_err();
        assert!(
            refused.to_string().contains("restart the node"),
            "{refused}"
        );
        assert!(replicas.start_commit().is_err());
        // A flush already under way when another failed counts for nothing.
        assert!(replicas.finish_commit(Ok(())).is_err());
        drop(replicas);
        assert_eq!(Replicas::open(tmp.path()).unwrap().entries(&CHAT), 3);
    }

    /// The disk refuses the next append to `CHAT` (as when it is full).
    fn refuse_next_append(replicas: &mut Replicas) {
        replicas
            .chats
            .get_mut(&CHAT)
            .unwrap()
            .store
            .fail_next_append = true;
    }

    /// Commits, closes, and opens the kept chats again from disk.
    fn committed_and_reopened(mut replicas: Replicas, root: &Path) -> Replicas {
        replicas.commit().unwrap();
        drop(replicas);
        Replicas::open(root).unwrap()
    }

    #[test]
    fn a_batch_whose_one_append_fails_is_rejected_whole_and_memory_matches_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut alice, bob) = (person(1), person(2));
        let genesis = create_with(&mut alice, &bob);
        let first = say(&mut alice, "kept", 1);
        let later: Vec<Entry> = (2..6)
            .map(|n| say(&mut alice, &format!("message {n}"), n))
            .collect();
        let mut replicas = Replicas::open(tmp.path()).unwrap();
        let out = replicas
            .accept(Some(&open_policy()), vec![genesis, first])
            .unwrap();
        assert_eq!(out, vec![Outcome::Stored; 2]);
        replicas.commit().unwrap();
        assert_eq!(replicas.take_appended().len(), 2);
        let used = replicas.used;

        refuse_next_append(&mut replicas);
        let out = replicas
            .accept(Some(&open_policy()), later.clone())
            .unwrap();
        assert_eq!(out.len(), 4);
        assert!(
            out.iter()
                .all(|o| matches!(o, Outcome::Rejected(why) if why.contains("no storage space"))),
            "{out:?}"
        );
        assert_eq!(
            replicas.entries(&CHAT),
            2,
            "memory holds what the disk holds"
        );
        assert!(replicas.take_appended().is_empty());
        assert_eq!(replicas.used, used);

        // The same batch again, once the disk has room: every entry kept.
        let out = replicas.accept(Some(&open_policy()), later).unwrap();
        assert_eq!(out, vec![Outcome::Stored; 4]);
        assert_eq!(replicas.take_appended().len(), 4);
        let replicas = committed_and_reopened(replicas, tmp.path());
        assert_eq!(replicas.entries(&CHAT), 6);
    }

    #[test]
    fn own_entries_reach_the_disk_only_signed_and_a_failed_write_of_a_run_stops_the_chats() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut alice, bob) = (person(1), person(2));
        let genesis = create_with(&mut alice, &bob);
        let mut replicas = Replicas::open_as(tmp.path(), Some(alice.account.id())).unwrap();
        assert_eq!(
            replicas.accept(None, vec![genesis]).unwrap(),
            vec![Outcome::Stored]
        );
        replicas.commit().unwrap();
        replicas.take_appended();
        let compose = |replicas: &mut Replicas, alice: &mut Person, n: u8| {
            let text = Draft::Text {
                text: format!("run message {n}"),
                reply_to: None,
            };
            let log = replicas.log(&CHAT).unwrap();
            let e = alice.member.compose_unsigned(log, text, [n; 32]).unwrap();
            let hash = e.hash();
            assert_eq!(replicas.accept_composed(e).unwrap(), Outcome::Stored);
            hash
        };
        let run: Vec<EntryHash> = (0..3)
            .map(|n| compose(&mut replicas, &mut alice, n))
            .collect();
        // Held in memory, written nowhere yet.
        assert_eq!(replicas.entries(&CHAT), 4);
        assert!(replicas.take_appended().is_empty());
        let on_disk = Replicas::open(tmp.path()).unwrap();
        assert_eq!(on_disk.entries(&CHAT), 1);
        drop(on_disk);

        replicas.sign_composed(&alice.member).unwrap();
        let appended: Vec<EntryHash> = replicas
            .take_appended()
            .into_iter()
            .map(|(_, h)| h)
            .collect();
        assert_eq!(appended, run);
        let replicas = committed_and_reopened(replicas, tmp.path());
        assert_eq!(replicas.entries(&CHAT), 4, "the run verifies from disk");
        let log = replicas.log(&CHAT).unwrap();
        let signatures: HashSet<[u8; 64]> = run
            .iter()
            .map(|h| log.get(h).unwrap().header.signature)
            .collect();
        assert_eq!(signatures.len(), 1, "one signature for the run");

        // The disk refuses the next run: the chats stop, as after a failed
        // commit, rather than answer for entries that exist nowhere.
        let mut replicas = Replicas::open_as(tmp.path(), Some(alice.account.id())).unwrap();
        compose(&mut replicas, &mut alice, 10);
        refuse_next_append(&mut replicas);
        assert!(replicas.sign_composed(&alice.member).is_err());
        assert!(replicas.failure().is_some());
        assert_eq!(
            replicas.entries(&CHAT),
            4,
            "memory holds what the disk holds"
        );
        let log = replicas.log(&CHAT).unwrap();
        let late = alice
            .member
            .compose_unsigned(
                log,
                Draft::Text {
                    text: "late".into(),
                    reply_to: None,
                },
                [11; 32],
            )
            .unwrap();
        assert!(replicas.accept_composed(late).is_err());
    }

    #[test]
    fn a_chat_whose_directory_outlived_a_crash_before_its_genesis_takes_the_genesis() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut alice, bob) = (person(1), person(2));
        let genesis = create_with(&mut alice, &bob);
        let first = say(&mut alice, "after the crash", 1);
        // The state a kill leaves between making the chat's directory and
        // writing its genesis: the chat is kept, with nothing in it.
        drop(SegmentLog::open(chat_dir(tmp.path(), &CHAT)).unwrap());
        let mut replicas = Replicas::open(tmp.path()).unwrap();
        assert_eq!(replicas.entries(&CHAT), 0);
        assert!(
            !chat_dir(tmp.path(), &CHAT).exists(),
            "an empty chat is not kept"
        );
        let orphan = replicas
            .accept(Some(&open_policy()), vec![first.clone()])
            .unwrap();
        assert!(matches!(orphan[0], Outcome::Missing(_)), "{orphan:?}");
        let out = replicas
            .accept(Some(&open_policy()), vec![genesis, first])
            .unwrap();
        assert_eq!(out, vec![Outcome::Stored; 2]);
        let replicas = committed_and_reopened(replicas, tmp.path());
        assert_eq!(replicas.entries(&CHAT), 2);
    }

    #[test]
    fn forged_and_unhosted_entries_are_refused_and_nothing_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut alice, bob) = (person(1), person(2));
        let genesis = create_with(&mut alice, &bob);
        let mut replicas = Replicas::open(tmp.path()).unwrap();

        // Not an account this node agreed to host.
        let closed = HostPolicy {
            open: false,
            quota_bytes: 1 << 30,
            lists: HostLists::default(),
        };
        let out = replicas
            .accept(Some(&closed), vec![genesis.clone()])
            .unwrap();
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
            replicas.accept(Some(&tiny), vec![genesis.clone()]).unwrap()[0],
            Outcome::Refused(Refusal::QuotaFull { .. })
        ));

        // A forged signature.
        let mut forged = genesis.clone();
        forged.header.signature[0] ^= 1;
        assert!(matches!(
            replicas.accept(Some(&open_policy()), vec![forged]).unwrap()[0],
            Outcome::Rejected(_)
        ));
        assert_eq!(replicas.used_bytes(), 0);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

        // Allowed: the chat Alice created is hosted, and then Bob, whom
        // this node never agreed to host, may write in it as a member.
        let alice_only = HostPolicy {
            lists: HostLists {
                allowed: [alice.account.id()].into(),
                denied: Default::default(),
            },
            ..closed
        };
        assert_eq!(
            replicas
                .accept(Some(&alice_only), vec![genesis.clone()])
                .unwrap(),
            vec![Outcome::Stored]
        );
        let mut bob = bob;
        bob.log.insert(genesis).unwrap();
        let reply = say(&mut bob, "hi alice", 9);
        assert_eq!(
            replicas.accept(Some(&alice_only), vec![reply]).unwrap(),
            vec![Outcome::Stored]
        );
        // A chat it does not keep cannot be started by a later entry: the
        // pusher is told to start from the genesis, and nothing is kept.
        let stray = say(&mut alice, "no genesis here", 10);
        let mut other = stray.clone();
        other.header.header.chat = ChatId([1; 16]);
        assert!(matches!(
            replicas.accept(Some(&open_policy()), vec![other]).unwrap()[0],
            Outcome::Missing(_)
        ));
        assert!(replicas.log(&ChatId([1; 16])).is_none());
        replicas.commit().unwrap();
        assert!(replicas.used_bytes() > 0);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
