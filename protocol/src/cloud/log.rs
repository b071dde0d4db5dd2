//! [`ChatLog`]: one chat's entries as a member device or a storage peer
//! holds them, every entry verified on insert. It needs no key: a storage
//! peer runs exactly this, and a member device adds a
//! [`super::member::ChatMember`] on top to write and read.
//!
//! Sans-IO: entries in, [`LogOutput`]s out (persist this, erase that body,
//! fetch those parents, tell the user). The driver keeps the entries on disk
//! and replays them into a fresh log after a restart, in
//! [`Entry::storage_key`] order.
//!
//! Verification is a function of the entry and its ancestors only, so every
//! holder that has an entry's ancestors reaches the same verdict, whatever
//! order entries arrived in; replicas converge. The one exception is a fork
//! (one device signing two entries with the same seq): whichever half
//! arrives second is refused and both are kept as [`ForkEvidence`].

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{
    account::StoragePeer,
    entry::{
        BodyHash, ChatId, Composed, Entry, EntryBody, EntryError, EntryHash, EntryKind,
        MAX_HEADER_LEN, Prechecked, RunMessage, RunPath, SignedHeader,
    },
    membership::{Membership, MembershipError},
};
use crate::{
    codec::{DecodeError, Record},
    collections::{HashMap, HashSet},
    identity::{AccountId, DeviceCertificate, DevicePublicKey},
};

/// Most entries waiting for their parents.
pub const MAX_PENDING: usize = 1024;
/// Most bytes of entries waiting for their parents.
pub const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;
/// Verified device certificates remembered (forgotten all at once beyond).
const MAX_REMEMBERED_CERTIFICATES: usize = 4096;

/// Why an entry was refused. The log is unchanged after any of these
/// (a fork only adds to the evidence).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LogError {
    #[error("malformed entry: {0}")]
    Malformed(&'static str),
    #[error("entry is for chat {got:?}, this log is {expected:?}")]
    WrongChat { expected: ChatId, got: ChatId },
    #[error("the author's device certificate does not verify")]
    BadCertificate,
    #[error("the device signature does not verify (forged or altered header)")]
    BadSignature,
    #[error("the body does not match the header's body hash (altered body)")]
    BodyMismatch,
    #[error("the entry carries a body but its header names none")]
    UnexpectedBody,
    #[error("entry {0:?} is already in the log (replay)")]
    Duplicate(EntryHash),
    #[error("device {device:?} signed two different entries with seq {seq} (fork)")]
    Fork { device: DevicePublicKey, seq: u64 },
    #[error("this chat already has another genesis")]
    ConflictingGenesis,
    #[error("the genesis author is not among its members")]
    GenesisAuthorNotMember,
    #[error("{0:?} is not a member of the chat")]
    NotMember(AccountId),
    #[error("{0:?} was removed from the chat and cannot write after that")]
    RemovedMember(AccountId),
    #[error("device {0:?} was revoked by its account and cannot write after that")]
    RevokedDevice(DevicePublicKey),
    #[error("entry {seq} of its device does not follow the device's entry {} (gap or reorder)", seq.saturating_sub(1))]
    SeqNotChained { device: DevicePublicKey, seq: u64 },
    #[error("lamport clock is {got}, it must be {expected}")]
    BadLamport { expected: u64, got: u64 },
    #[error("entry is in key epoch {got}, the epoch in force is {expected}")]
    WrongEpoch { expected: u32, got: u32 },
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("not allowed to delete {0:?} for everyone")]
    UnauthorisedPurge(EntryHash),
    #[error("a purge may only name earlier messages it has seen; {0:?} is not one")]
    BadPurgeTarget(EntryHash),
    #[error("{0:?} may not change the chat's storage set (only members, or admins if it has any)")]
    UnauthorisedStorage(AccountId),
    #[error("too many entries are waiting for their parents; sync in order")]
    PendingFull,
}

impl From<EntryError> for LogError {
    fn from(e: EntryError) -> Self {
        match e {
            EntryError::Shape(why) => Self::Malformed(why),
            EntryError::BadCertificate => Self::BadCertificate,
            EntryError::BadSignature => Self::BadSignature,
            EntryError::BodyMismatch => Self::BodyMismatch,
            EntryError::UnexpectedBody => Self::UnexpectedBody,
        }
    }
}

/// Two headers one device signed with the same seq: proof, checkable by
/// anyone, that the device (hence its account) forked the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkEvidence {
    pub first: SignedHeader,
    pub second: SignedHeader,
}

impl ForkEvidence {
    pub fn device(&self) -> DevicePublicKey {
        self.first.author_device()
    }

    pub fn account(&self) -> AccountId {
        self.first.author_account()
    }

    /// Both signatures hold, same chat, same device, same seq, different
    /// entries.
    pub fn verify(&self) -> Result<(), EntryError> {
        self.first.verify()?;
        self.second.verify()?;
        let (a, b) = (&self.first.header, &self.second.header);
        if a.chat != b.chat
            || a.author.device != b.author.device
            || a.seq != b.seq
            || self.first.hash() == self.second.hash()
        {
            return Err(EntryError::Shape("not a fork"));
        }
        Ok(())
    }
}

impl Record for ForkEvidence {
    /// 2: headers signed by runs (as [`Entry`] 2).
    const VERSION: u8 = 2;
    const MAX_LEN: usize = 2 * MAX_HEADER_LEN + 16;

    fn validate(&self) -> Result<(), DecodeError> {
        self.verify()
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    }
}

/// What the driver must do after an insert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogOutput {
    /// Store this entry's encoding ([`Entry::encode`]) durably (under
    /// [`Entry::storage_key`]), replacing any stored version of it; only
    /// then acknowledge it to anyone. (The encoding, not a copy of the
    /// entry: the log keeps the entry, and the driver only writes bytes.)
    Persist { hash: EntryHash, record: Vec<u8> },
    /// Erase this body from disk (store the entry's header alone) and from
    /// anything derived from it: the entry was deleted for everyone.
    EraseBody { entry: EntryHash, body: BodyHash },
    /// An entry waits for these parents: fetch them (e.g. by a sync round).
    Missing(Vec<EntryHash>),
    /// Something to tell the user or the log.
    Event(LogEvent),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogEvent {
    Appended {
        entry: EntryHash,
        author: AccountId,
        kind: &'static str,
    },
    MembershipChanged {
        entry: EntryHash,
    },
    Purged {
        targets: Vec<EntryHash>,
    },
    /// The body of an entry held without one arrived.
    BodyAttached {
        entry: EntryHash,
    },
    /// An entry that waited for its parents turned out invalid once they
    /// arrived, and was dropped.
    PendingRejected {
        entry: EntryHash,
        error: LogError,
    },
}

type StateId = usize;

/// The membership state for a set of parents: one already interned, or a
/// new one (interned only if the entry is accepted).
enum ParentState {
    Known(StateId),
    New(Vec<(u64, EntryHash)>, Membership),
}

/// A membership state (with the storage set), named by the
/// state-changing entries it folds.
struct State {
    /// (lamport, hash), sorted: the fold order.
    changes: Vec<(u64, EntryHash)>,
    membership: Membership,
}

struct Stored {
    entry: Entry,
    /// The membership in force for this entry (from its ancestors).
    state: StateId,
    /// The membership in force for its descendants: `state`, plus this
    /// entry if it changes membership or the storage set.
    after: StateId,
    /// Set when the driver took the body to keep it elsewhere (on disk):
    /// the entry's encoded length with the body.
    released: Option<usize>,
}

/// What [`ChatLog::insert_one`] checks of an entry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checks {
    All,
    /// All but the author's certificate and signature: a [`Composed`]
    /// entry this process signed, or a parked one that passed them when it
    /// arrived.
    SkipSignature,
    /// All but the signature and the body: a [`Prechecked`] entry.
    Certificate,
}

/// One chat's verified log.
pub struct ChatLog {
    chat: ChatId,
    genesis: Option<EntryHash>,
    /// Boxed: growing the table then moves pointers, not entries (a
    /// catch-up of a large chat spent a sixth of its time in rehashing).
    entries: HashMap<EntryHash, Box<Stored>>,
    /// (lamport, hash): the display order, and a topological one.
    order: BTreeSet<(u64, EntryHash)>,
    /// Per device, its entries by seq (always contiguous from 0).
    devices: BTreeMap<DevicePublicKey, Vec<EntryHash>>,
    heads: BTreeSet<EntryHash>,
    states: Vec<State>,
    state_ids: HashMap<Vec<(u64, EntryHash)>, StateId>,
    /// AddMember entries, for members looking for their grants.
    additions: Vec<EntryHash>,
    /// Entries waiting for a parent, with their encoded size.
    pending: BTreeMap<EntryHash, (Entry, usize)>,
    pending_bytes: usize,
    /// The waiting entries by author device and seq (for fork checks).
    pending_seqs: HashMap<(DevicePublicKey, u64), EntryHash>,
    /// A parent not held yet → the waiting entries that name it.
    waiting_for: HashMap<EntryHash, Vec<EntryHash>>,
    /// Entries added since waiting entries were last looked at.
    unblocked: Vec<EntryHash>,
    forks: Vec<ForkEvidence>,
    purged: HashSet<EntryHash>,
    missing_bodies: BTreeSet<EntryHash>,
    /// Hashes of device certificates already verified.
    verified_certificates: HashSet<[u8; 32]>,
    /// The certificate verified last, compared whole before hashing: most
    /// entries in a row are one device's.
    last_certificate: Option<Arc<DeviceCertificate>>,
    /// One shared copy of each device's certificate, for the entries kept
    /// (a certificate is 160 bytes; every entry of a device carries it).
    certificates: HashMap<DevicePublicKey, Arc<DeviceCertificate>>,
    /// The run signature verified last: the entries of a run that arrive
    /// one by one are checked against it with hashing only.
    last_run: Option<(DevicePublicKey, [u8; 64], RunMessage)>,
    /// This device's entries composed to be signed as a run, oldest first
    /// (see [`super::ChatMember::sign_composed`]); not persisted until then.
    unsigned: Vec<EntryHash>,
}

impl ChatLog {
    pub fn new(chat: ChatId) -> Self {
        let empty = State {
            changes: Vec::new(),
            membership: Membership::default(),
        };
        Self {
            chat,
            genesis: None,
            entries: HashMap::default(),
            order: BTreeSet::new(),
            devices: BTreeMap::new(),
            heads: BTreeSet::new(),
            states: vec![empty],
            state_ids: [(Vec::new(), 0)].into_iter().collect(),
            additions: Vec::new(),
            pending: BTreeMap::new(),
            pending_bytes: 0,
            pending_seqs: HashMap::default(),
            waiting_for: HashMap::default(),
            unblocked: Vec::new(),
            forks: Vec::new(),
            purged: HashSet::default(),
            missing_bodies: BTreeSet::new(),
            verified_certificates: HashSet::default(),
            last_certificate: None,
            certificates: HashMap::default(),
            last_run: None,
            unsigned: Vec::new(),
        }
    }

    /// Verifies `entry` and adds it, then any waiting entries it unblocks.
    /// On error nothing changed (but a fork is kept as evidence).
    pub fn insert(&mut self, entry: impl Into<Entry>) -> Result<Vec<LogOutput>, LogError> {
        let entry = entry.into();
        let hash = entry.hash();
        self.insert_with(entry, hash, Checks::All)
    }

    /// Adds an entry this process composed: everything is checked but the
    /// certificate and signature it has just made itself.
    pub fn insert_composed(&mut self, entry: Composed) -> Result<Vec<LogOutput>, LogError> {
        let hash = entry.hash();
        self.insert_with(entry.into_entry(), hash, Checks::SkipSignature)
    }

    /// Adds an entry whose signature was checked already (on another
    /// thread, say): everything else is checked here.
    pub fn insert_checked(&mut self, entry: Prechecked) -> Result<Vec<LogOutput>, LogError> {
        let (entry, hash) = entry.into_parts();
        self.insert_with(entry, hash, Checks::Certificate)
    }

    fn insert_with(
        &mut self,
        entry: Entry,
        hash: EntryHash,
        checks: Checks,
    ) -> Result<Vec<LogOutput>, LogError> {
        let mut out = Vec::new();
        self.insert_one(entry, hash, checks, &mut out)?;
        self.drain_pending(&mut out);
        Ok(out)
    }

    /// `hash` is `entry.hash()`, computed once by the caller.
    fn insert_one(
        &mut self,
        entry: Entry,
        hash: EntryHash,
        checks: Checks,
        out: &mut Vec<LogOutput>,
    ) -> Result<(), LogError> {
        let header = &entry.header.header;
        header.check_shape()?;
        if header.chat != self.chat {
            return Err(LogError::WrongChat {
                expected: self.chat,
                got: header.chat,
            });
        }
        if self.entries.contains_key(&hash) {
            return self.attach_body(hash, entry, out);
        }
        match checks {
            Checks::All => {
                self.verify_certificate(&entry)?;
                self.verify_signature(&entry, &hash)?;
                entry.check_body()?;
            }
            Checks::Certificate => self.verify_certificate(&entry)?,
            Checks::SkipSignature => entry.check_body()?,
        }
        self.check_fork(hash, &entry)?;

        let unknown: Vec<EntryHash> = header
            .parents
            .iter()
            .filter(|p| !self.entries.contains_key(p))
            .copied()
            .collect();
        if !unknown.is_empty() {
            return self.park(hash, entry, unknown, out);
        }

        let state = self.state_for_parents(&header.parents);
        self.check_against(&entry, self.membership_of(&state))?;
        self.accept(hash, entry, state, out);
        Ok(())
    }

    /// The author's certificate. A certificate verified once is
    /// remembered (by its hash, so an altered copy is checked again): every
    /// entry of a device carries the same one, and this halves the
    /// signature checks per entry.
    fn verify_certificate(&mut self, entry: &Entry) -> Result<(), LogError> {
        let certificate = &entry.header.header.author;
        if self.last_certificate.as_deref() == Some(&**certificate) {
            return Ok(());
        }
        let fingerprint = *blake3::hash(&certificate.encode()).as_bytes();
        if !self.verified_certificates.contains(&fingerprint) {
            certificate.verify().map_err(|_| LogError::BadCertificate)?;
            if self.verified_certificates.len() >= MAX_REMEMBERED_CERTIFICATES {
                self.verified_certificates.clear();
            }
            self.verified_certificates.insert(fingerprint);
        }
        self.last_certificate = Some(certificate.clone());
        Ok(())
    }

    /// The device's signature over the entry's run. Several entries of one
    /// run in a row are checked once: the same device, signature and
    /// signed root get the same verdict.
    fn verify_signature(&mut self, entry: &Entry, hash: &EntryHash) -> Result<(), LogError> {
        let signed = &entry.header;
        let run = (
            signed.author_device(),
            signed.signature,
            signed.signed_message(hash)?,
        );
        if self.last_run.as_ref() != Some(&run) {
            signed.verify_message(&run.2)?;
            self.last_run = Some(run);
        }
        Ok(())
    }

    /// Makes the entry's certificate the log's shared copy of it.
    fn share_certificate(&mut self, entry: &mut Entry) {
        let author = &mut entry.header.header.author;
        match self.certificates.get(&author.device) {
            Some(shared) if Arc::ptr_eq(shared, author) => {}
            Some(shared) if **shared == **author => *author = shared.clone(),
            _ => {
                if self.certificates.len() >= MAX_REMEMBERED_CERTIFICATES {
                    self.certificates.clear();
                }
                self.certificates.insert(author.device, author.clone());
            }
        }
    }

    /// A known entry again: a replay, unless it brings a body we lack.
    fn attach_body(
        &mut self,
        hash: EntryHash,
        entry: Entry,
        out: &mut Vec<LogOutput>,
    ) -> Result<(), LogError> {
        let Some(body) = entry.body else {
            return Err(LogError::Duplicate(hash));
        };
        if !self.missing_bodies.contains(&hash) {
            return Err(LogError::Duplicate(hash));
        }
        let Some(stored) = self.entries.get_mut(&hash) else {
            return Err(LogError::Duplicate(hash));
        };
        if stored.entry.header.header.body_hash != Some(body.hash()) {
            return Err(LogError::BodyMismatch);
        }
        stored.entry.body = Some(body);
        self.missing_bodies.remove(&hash);
        out.push(LogOutput::Persist {
            hash,
            record: stored.entry.encode(),
        });
        out.push(LogOutput::Event(LogEvent::BodyAttached { entry: hash }));
        Ok(())
    }

    fn check_fork(&mut self, hash: EntryHash, entry: &Entry) -> Result<(), LogError> {
        let header = &entry.header.header;
        let device = header.author.device;
        let seq = header.seq;
        let existing = usize::try_from(seq)
            .ok()
            .and_then(|i| self.devices.get(&device)?.get(i))
            .copied()
            .or_else(|| {
                self.pending_seqs
                    .get(&(device, seq))
                    .filter(|h| **h != hash)
                    .copied()
            });
        let Some(existing) = existing else {
            return Ok(());
        };
        let first = match (self.entries.get(&existing), self.pending.get(&existing)) {
            (Some(stored), _) => stored.entry.header.clone(),
            (None, Some((pending, _))) => pending.header.clone(),
            (None, None) => return Ok(()),
        };
        let evidence = ForkEvidence {
            first,
            second: entry.header.clone(),
        };
        let already = self
            .forks
            .iter()
            .any(|f| f.second.hash() == hash || f.first.hash() == hash);
        if !already {
            self.forks.push(evidence);
        }
        Err(LogError::Fork { device, seq })
    }

    fn park(
        &mut self,
        hash: EntryHash,
        entry: Entry,
        unknown: Vec<EntryHash>,
        out: &mut Vec<LogOutput>,
    ) -> Result<(), LogError> {
        let missing: Vec<EntryHash> = unknown
            .iter()
            .filter(|p| !self.pending.contains_key(p))
            .copied()
            .collect();
        if !self.pending.contains_key(&hash) {
            let size = entry.encoded_len();
            if self.pending.len() >= MAX_PENDING || self.pending_bytes + size > MAX_PENDING_BYTES {
                return Err(LogError::PendingFull);
            }
            for parent in &unknown {
                self.waiting_for.entry(*parent).or_default().push(hash);
            }
            let header = &entry.header.header;
            self.pending_seqs
                .insert((header.author.device, header.seq), hash);
            self.pending_bytes += size;
            self.pending.insert(hash, (entry, size));
        }
        if !missing.is_empty() {
            out.push(LogOutput::Missing(missing));
        }
        Ok(())
    }

    /// Adds the waiting entries that the entries just added unblock, and
    /// those that these unblock in turn. Only the children of what was
    /// added are looked at, so a long run of entries that came ahead of
    /// their parents is taken in time proportional to its length.
    fn drain_pending(&mut self, out: &mut Vec<LogOutput>) {
        while let Some(added) = self.unblocked.pop() {
            let Some(children) = self.waiting_for.remove(&added) else {
                continue;
            };
            for child in children {
                let ready = self.pending.get(&child).is_some_and(|(e, _)| {
                    e.header
                        .header
                        .parents
                        .iter()
                        .all(|p| self.entries.contains_key(p))
                });
                if !ready {
                    continue;
                }
                let Some((entry, size)) = self.pending.remove(&child) else {
                    continue;
                };
                self.pending_bytes = self.pending_bytes.saturating_sub(size);
                let header = &entry.header.header;
                let key = (header.author.device, header.seq);
                if self.pending_seqs.get(&key) == Some(&child) {
                    self.pending_seqs.remove(&key);
                }
                if let Err(error) = self.insert_one(entry, child, Checks::SkipSignature, out) {
                    out.push(LogOutput::Event(LogEvent::PendingRejected {
                        entry: child,
                        error,
                    }));
                }
            }
        }
    }

    /// Everything that needs the entry's ancestors (all known here).
    fn check_against(&self, entry: &Entry, membership: &Membership) -> Result<(), LogError> {
        let signed = &entry.header;
        let header = &signed.header;
        let author = signed.author_account();

        if let EntryKind::Genesis { members, .. } = &header.kind {
            if self.genesis.is_some() {
                return Err(LogError::ConflictingGenesis);
            }
            if !members.iter().any(|m| m.account == author) {
                return Err(LogError::GenesisAuthorNotMember);
            }
            return Ok(());
        }

        if !membership.is_member(&author) {
            if membership.was_removed(&author) {
                return Err(LogError::RemovedMember(author));
            }
            return Err(LogError::NotMember(author));
        }
        if membership.is_revoked_device(&header.author.device, &author) {
            return Err(LogError::RevokedDevice(header.author.device));
        }

        if header.seq > 0 {
            let device = header.author.device;
            let previous = usize::try_from(header.seq - 1)
                .ok()
                .and_then(|i| self.devices.get(&device)?.get(i));
            if !previous.is_some_and(|p| header.parents.contains(p)) {
                return Err(LogError::SeqNotChained {
                    device,
                    seq: header.seq,
                });
            }
        }

        let expected_lamport = header
            .parents
            .iter()
            .filter_map(|p| self.entries.get(p))
            .map(|s| s.entry.header.header.lamport)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        if header.lamport != expected_lamport {
            return Err(LogError::BadLamport {
                expected: expected_lamport,
                got: header.lamport,
            });
        }
        if header.epoch != membership.epoch() {
            return Err(LogError::WrongEpoch {
                expected: membership.epoch(),
                got: header.epoch,
            });
        }

        match &header.kind {
            EntryKind::AddMember { .. }
            | EntryKind::RemoveMember { .. }
            | EntryKind::Rekey { .. }
            | EntryKind::AccountKey { .. } => {
                membership.authorise(&author, &header.kind)?;
                membership.check_grants(&header.kind)?;
            }
            EntryKind::Purge { targets } => {
                for target in targets {
                    let Some(stored) = self.entries.get(target) else {
                        return Err(LogError::BadPurgeTarget(*target));
                    };
                    let target_header = &stored.entry.header.header;
                    if !matches!(target_header.kind, EntryKind::Message)
                        || !self.is_ancestor(target, &header.parents)
                    {
                        return Err(LogError::BadPurgeTarget(*target));
                    }
                    if !membership.may_purge(&author, &target_header.author.account) {
                        return Err(LogError::UnauthorisedPurge(*target));
                    }
                }
            }
            EntryKind::Storage { .. } => {
                if !membership.may_set_storage(&author) {
                    return Err(LogError::UnauthorisedStorage(author));
                }
            }
            EntryKind::Genesis { .. } | EntryKind::Message => {}
        }
        Ok(())
    }

    /// Whether `target` is one of `from` or an ancestor of them. Walks back
    /// no further than the target's lamport.
    fn is_ancestor(&self, target: &EntryHash, from: &[EntryHash]) -> bool {
        let Some(target_lamport) = self.lamport(target) else {
            return false;
        };
        let mut seen = HashSet::default();
        let mut queue: VecDeque<EntryHash> = from.iter().copied().collect();
        while let Some(hash) = queue.pop_front() {
            if hash == *target {
                return true;
            }
            if !seen.insert(hash) {
                continue;
            }
            let Some(stored) = self.entries.get(&hash) else {
                continue;
            };
            let header = &stored.entry.header.header;
            if header.lamport <= target_lamport {
                continue;
            }
            queue.extend(header.parents.iter().copied());
        }
        false
    }

    fn accept(
        &mut self,
        hash: EntryHash,
        mut entry: Entry,
        state: ParentState,
        out: &mut Vec<LogOutput>,
    ) {
        let header = &entry.header.header;
        let author = entry.header.author_account();
        let lamport = header.lamport;
        let changes_membership = header.kind.changes_membership();
        let changes_state = header.kind.changes_state();

        let state = match state {
            ParentState::Known(id) => id,
            ParentState::New(key, _) => self.intern_with(key, None),
        };
        let after = if changes_state {
            let mut key = self.states[state].changes.clone();
            let at = key.partition_point(|c| *c < (lamport, hash));
            key.insert(at, (lamport, hash));
            self.intern_with(key, Some(&entry))
        } else {
            state
        };

        if matches!(header.kind, EntryKind::Genesis { .. }) {
            self.genesis = Some(hash);
        }
        if matches!(header.kind, EntryKind::AddMember { .. }) {
            self.additions.push(hash);
        }
        for parent in &header.parents {
            self.heads.remove(parent);
        }
        self.heads.insert(hash);
        self.order.insert((lamport, hash));
        self.devices
            .entry(header.author.device)
            .or_default()
            .push(hash);

        if header.body_hash.is_some() && entry.body.is_none() {
            self.missing_bodies.insert(hash);
        }
        let kind_name = entry.header.header.kind.name();
        let targets = match &entry.header.header.kind {
            EntryKind::Purge { targets } => targets.clone(),
            _ => Vec::new(),
        };
        // A purge's own record is written before the bodies it erases, so a
        // crash in between re-erases them when the log is replayed. An
        // entry of this device's run still to be signed is written when
        // the run is.
        if entry.header.is_signed() {
            out.push(LogOutput::Persist {
                hash,
                record: entry.encode(),
            });
        } else {
            self.unsigned.push(hash);
        }
        if !self.waiting_for.is_empty() {
            self.unblocked.push(hash);
        }
        self.share_certificate(&mut entry);
        self.entries.insert(
            hash,
            Box::new(Stored {
                entry,
                state,
                after,
                released: None,
            }),
        );
        out.push(LogOutput::Event(LogEvent::Appended {
            entry: hash,
            author,
            kind: kind_name,
        }));
        if changes_membership {
            out.push(LogOutput::Event(LogEvent::MembershipChanged {
                entry: hash,
            }));
        }
        if !targets.is_empty() {
            self.apply_purge(&targets, out);
            out.push(LogOutput::Event(LogEvent::Purged { targets }));
        }
    }

    /// Drops the bodies of purged entries and says which to erase from
    /// disk. Also applied when the log is rebuilt from disk, so a body that
    /// survived a crash is erased then.
    fn apply_purge(&mut self, targets: &[EntryHash], out: &mut Vec<LogOutput>) {
        for target in targets {
            self.purged.insert(*target);
            self.missing_bodies.remove(target);
            let Some(stored) = self.entries.get_mut(target) else {
                continue;
            };
            let body = match (stored.entry.body.take(), stored.released.take()) {
                (Some(body), _) => Some(body.hash()),
                // Kept on disk by the driver: erased there all the same.
                (None, Some(_)) => stored.entry.header.header.body_hash,
                (None, None) => None,
            };
            if let Some(body) = body {
                out.push(LogOutput::EraseBody {
                    entry: *target,
                    body,
                });
            }
        }
    }

    /// The membership state in force for an entry with these (known)
    /// parents: the fold of the membership changes among their ancestors.
    fn state_for_parents(&self, parents: &[EntryHash]) -> ParentState {
        let afters: BTreeSet<StateId> = parents
            .iter()
            .filter_map(|p| self.entries.get(p))
            .map(|s| s.after)
            .collect();
        if afters.len() <= 1 {
            return ParentState::Known(afters.into_iter().next().unwrap_or(0));
        }
        let union: BTreeSet<(u64, EntryHash)> = afters
            .iter()
            .flat_map(|id| self.states[*id].changes.iter().copied())
            .collect();
        let key: Vec<(u64, EntryHash)> = union.into_iter().collect();
        if let Some(id) = self.state_ids.get(&key) {
            return ParentState::Known(*id);
        }
        let membership = self.fold(&key, None);
        ParentState::New(key, membership)
    }

    fn membership_of<'a>(&'a self, state: &'a ParentState) -> &'a Membership {
        match state {
            ParentState::Known(id) => &self.states[*id].membership,
            ParentState::New(_, membership) => membership,
        }
    }

    fn fold(&self, changes: &[(u64, EntryHash)], extra: Option<&Entry>) -> Membership {
        let mut membership = Membership::default();
        for (_, hash) in changes {
            let signed = match self.entries.get(hash) {
                Some(stored) => &stored.entry.header,
                None => match extra {
                    Some(entry) => &entry.header,
                    None => continue,
                },
            };
            membership.apply(
                *hash,
                &signed.author_account(),
                &signed.header.author.device,
                &signed.header.kind,
            );
        }
        membership
    }

    fn intern_with(&mut self, key: Vec<(u64, EntryHash)>, extra: Option<&Entry>) -> StateId {
        if let Some(id) = self.state_ids.get(&key) {
            return *id;
        }
        let membership = self.fold(&key, extra);
        let id = self.states.len();
        self.states.push(State {
            changes: key.clone(),
            membership,
        });
        self.state_ids.insert(key, id);
        id
    }

    // ----- reading -----

    /// Takes the entries composed to be signed as a run, oldest first.
    pub(crate) fn take_unsigned(&mut self) -> Vec<EntryHash> {
        std::mem::take(&mut self.unsigned)
    }

    /// Gives an unsigned entry its run signature; its record to persist.
    pub(crate) fn set_signature(
        &mut self,
        hash: &EntryHash,
        signature: [u8; 64],
        run: RunPath,
    ) -> Option<Vec<u8>> {
        let stored = self.entries.get_mut(hash)?;
        let header = &mut stored.entry.header;
        if header.is_signed() {
            return None;
        }
        header.signature = signature;
        header.run = run;
        Some(stored.entry.encode())
    }

    /// Entries this device composed that wait to be signed.
    pub fn unsigned_count(&self) -> usize {
        self.unsigned.len()
    }

    pub fn chat(&self) -> ChatId {
        self.chat
    }

    pub fn genesis(&self) -> Option<EntryHash> {
        self.genesis
    }

    /// Verified entries held (waiting ones not counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, hash: &EntryHash) -> bool {
        self.entries.contains_key(hash)
    }

    /// The entry as this log holds it: without its body if the body was
    /// released ([`Self::release_body`]).
    pub fn get(&self, hash: &EntryHash) -> Option<&Entry> {
        self.entries.get(hash).map(|s| &s.entry)
    }

    /// Drops a verified entry's body from memory, for a driver that keeps
    /// it elsewhere (a storage peer reads bodies from disk when it serves
    /// them, so a chat it hosts costs memory for its headers only). The
    /// entry's body is not missing: [`Self::missing_bodies`] does not name
    /// it, a purge of it still asks for the erasure, and
    /// [`Self::encoded_len`] still counts it. Returns the body, or `None`
    /// if the entry has none in memory.
    pub fn release_body(&mut self, hash: &EntryHash) -> Option<EntryBody> {
        let stored = self.entries.get_mut(hash)?;
        let len = stored.entry.encoded_len();
        let body = stored.entry.body.take()?;
        stored.released = Some(len);
        Some(body)
    }

    /// A body released to the driver that the driver can no longer read
    /// (damaged on its disk): the entry is held without its body again,
    /// and [`Self::missing_bodies`] names it, so a sync round fetches it
    /// from another holder. Returns whether the body was released.
    pub fn body_lost(&mut self, hash: &EntryHash) -> bool {
        let Some(stored) = self.entries.get_mut(hash) else {
            return false;
        };
        if stored.released.take().is_none() {
            return false;
        }
        self.missing_bodies.insert(*hash);
        true
    }

    /// Whether inserting `entry` (named `hash`) would be a duplicate: the
    /// log holds it, and it brings no body the log lacks (a copy that does
    /// is attached; see [`Self::missing_bodies`]). The same rule as
    /// [`Self::insert`]'s, for a driver that answers duplicates before
    /// anything else (a hosting quota, say).
    pub fn is_duplicate(&self, hash: &EntryHash, entry: &Entry) -> bool {
        self.entries.contains_key(hash)
            && !(entry.body.is_some() && self.missing_bodies.contains(hash))
    }

    /// Whether the entry's body was released to the driver.
    pub fn body_released(&self, hash: &EntryHash) -> bool {
        self.entries.get(hash).is_some_and(|s| s.released.is_some())
    }

    /// Whether the entry has its body, here or released to the driver.
    pub fn has_body(&self, hash: &EntryHash) -> bool {
        self.entries
            .get(hash)
            .is_some_and(|s| s.entry.body.is_some() || s.released.is_some())
    }

    /// The entry's encoded length with its body, wherever the body is.
    pub fn encoded_len(&self, hash: &EntryHash) -> Option<usize> {
        let s = self.entries.get(hash)?;
        Some(s.released.unwrap_or_else(|| s.entry.encoded_len()))
    }

    pub fn lamport(&self, hash: &EntryHash) -> Option<u64> {
        self.get(hash).map(|e| e.header.header.lamport)
    }

    /// Entries nothing else names as a parent yet, in display order.
    pub fn heads(&self) -> Vec<EntryHash> {
        let mut heads: Vec<(u64, EntryHash)> = self
            .heads
            .iter()
            .filter_map(|h| Some((self.lamport(h)?, *h)))
            .collect();
        heads.sort();
        heads.into_iter().map(|(_, h)| h).collect()
    }

    /// All entries in the display order every holder agrees on: by lamport,
    /// then hash. Parents always come before children.
    pub fn in_display_order(&self) -> impl Iterator<Item = (EntryHash, &Entry)> {
        self.order
            .iter()
            .filter_map(|(_, h)| Some((*h, self.get(h)?)))
    }

    /// The membership in force for entry `hash` (from its ancestors).
    pub fn membership_for(&self, hash: &EntryHash) -> Option<&Membership> {
        let stored = self.entries.get(hash)?;
        Some(&self.states[stored.state].membership)
    }

    /// The membership a new entry on top of all current heads would be
    /// checked against.
    pub fn current_membership(&self) -> Membership {
        self.membership_for_parents(&self.heads())
    }

    /// The membership in force for an entry with these parents.
    pub fn membership_for_parents(&self, parents: &[EntryHash]) -> Membership {
        let state = self.state_for_parents(parents);
        self.membership_of(&state).clone()
    }

    /// The storage peers and write quorum a new entry on top of all current
    /// heads would see: those of the latest Storage entry, in display
    /// order, among the ancestors. `None` before any Storage entry.
    pub fn storage_set(&self) -> Option<(Vec<StoragePeer>, u8)> {
        let state = self.state_for_parents(&self.heads());
        let (peers, quorum) = self.membership_of(&state).storage_set()?;
        Some((peers.to_vec(), quorum))
    }

    /// The entries that made the current membership and storage set, each
    /// with its author device and seq.
    pub fn state_changes(&self) -> impl Iterator<Item = (DevicePublicKey, u64)> + '_ {
        let changes = match self.state_for_parents(&self.heads()) {
            ParentState::Known(id) => self.states[id].changes.clone(),
            ParentState::New(changes, _) => changes,
        };
        changes
            .into_iter()
            .filter_map(|(_, h)| self.get(&h))
            .map(|e| (e.header.author_device(), e.header.header.seq))
    }

    /// The storage set in force for entry `hash` (from its ancestors, so a
    /// Storage entry's own set applies from its children on).
    pub fn storage_set_for(&self, hash: &EntryHash) -> Option<(Vec<StoragePeer>, u8)> {
        let (peers, quorum) = self.membership_for(hash)?.storage_set()?;
        Some((peers.to_vec(), quorum))
    }

    /// The storage set whose write quorum decides when entry `hash` is
    /// stored: the one in force for it, or the current one for an entry
    /// no Storage entry precedes (the genesis, and the first Storage entry
    /// itself). Borrowed where the log holds it: this is asked for every
    /// answer and every entry waiting for its quorum.
    pub fn storage_set_counting(
        &self,
        hash: &EntryHash,
    ) -> Option<(std::borrow::Cow<'_, [StoragePeer]>, u8)> {
        match self.membership_for(hash).and_then(Membership::storage_set) {
            Some((peers, quorum)) => Some((peers.into(), quorum)),
            None => self
                .storage_set()
                .map(|(peers, quorum)| (peers.into(), quorum)),
        }
    }

    /// AddMember entries, in arrival order.
    pub fn additions(&self) -> &[EntryHash] {
        &self.additions
    }

    /// The seq the device's next entry must carry.
    pub fn next_seq(&self, device: &DevicePublicKey) -> u64 {
        self.devices.get(device).map_or(0, |v| v.len() as u64)
    }

    /// The device's latest entry.
    pub fn last_of_device(&self, device: &DevicePublicKey) -> Option<EntryHash> {
        self.devices.get(device)?.last().copied()
    }

    /// Per device, how many entries it wrote that this log holds.
    pub fn device_progress(&self) -> impl Iterator<Item = (&DevicePublicKey, u64)> {
        self.devices.iter().map(|(d, v)| (d, v.len() as u64))
    }

    /// The device's entries from `from_seq` on.
    pub fn device_entries_from(&self, device: &DevicePublicKey, from_seq: u64) -> &[EntryHash] {
        let Some(all) = self.devices.get(device) else {
            return &[];
        };
        let from = usize::try_from(from_seq)
            .unwrap_or(usize::MAX)
            .min(all.len());
        &all[from..]
    }

    pub fn is_purged(&self, hash: &EntryHash) -> bool {
        self.purged.contains(hash)
    }

    /// Entries held without a body that was not purged: fetch them.
    pub fn missing_bodies(&self) -> impl Iterator<Item = &EntryHash> {
        self.missing_bodies.iter()
    }

    pub fn fork_evidence(&self) -> &[ForkEvidence] {
        &self.forks
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// `from` and all their ancestors.
    pub fn ancestors_or_self(&self, from: &[EntryHash]) -> HashSet<EntryHash> {
        let mut seen = HashSet::default();
        let mut stack: Vec<EntryHash> = from
            .iter()
            .filter(|h| self.entries.contains_key(h))
            .copied()
            .collect();
        while let Some(hash) = stack.pop() {
            if !seen.insert(hash) {
                continue;
            }
            if let Some(stored) = self.entries.get(&hash) {
                stack.extend(stored.entry.header.header.parents.iter().copied());
            }
        }
        seen
    }
}

impl std::fmt::Debug for ChatLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatLog")
            .field("chat", &self.chat)
            .field("entries", &self.entries.len())
            .field("heads", &self.heads.len())
            .field("pending", &self.pending.len())
            .field("forks", &self.forks.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::{
        Draft,
        tests::{CHAT, Dice, chat, persisted, pull},
    };

    #[test]
    fn display_order_is_lamport_then_hash_and_heads_track_the_tips() {
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        let a = devices[0].say("a", &mut dice);
        let b = devices[1].say("b", &mut dice);
        let log = &mut devices[0].log;
        log.insert(b.clone()).unwrap();
        let mut tips = vec![a.hash(), b.hash()];
        tips.sort();
        let mut heads = log.heads();
        heads.sort();
        assert_eq!(heads, tips);
        let order: Vec<(u64, EntryHash)> = log
            .in_display_order()
            .map(|(h, e)| (e.header.header.lamport, h))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
        // A merge names both tips and becomes the only head.
        let merge = devices[0].say("merge", &mut dice);
        assert_eq!(merge.header.header.parents.len(), 2);
        assert_eq!(devices[0].log.heads(), vec![merge.hash()]);
        assert_eq!(merge.header.header.lamport, 2);
    }

    #[test]
    fn an_entry_waits_for_every_missing_parent_and_a_fork_among_waiting_entries_is_caught() {
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        let genesis = devices[0].log.in_display_order().next().unwrap().1.clone();
        let a = devices[0].say("a", &mut dice);
        let b = devices[1].say("b", &mut dice);
        devices[0].log.insert(b.clone()).unwrap();
        let merge = devices[0].say("merge", &mut dice);
        assert_eq!(merge.header.header.parents.len(), 2);
        let draft = |t: &str| Draft::Text {
            text: t.into(),
            reply_to: None,
        };
        let next = devices[0].compose(draft("next"), &mut dice).unwrap();
        let rival = devices[0].compose(draft("rival"), &mut dice).unwrap();

        let mut log = ChatLog::new(CHAT);
        log.insert(genesis).unwrap();
        log.insert(next.clone()).unwrap();
        log.insert(merge).unwrap();
        assert_eq!(log.pending_count(), 2);
        // Two entries at one seq of one device, both waiting: a fork, though
        // neither is in the log yet.
        let device = devices[0].cert.device;
        let seq = next.header.header.seq;
        assert_eq!(log.insert(rival), Err(LogError::Fork { device, seq }));
        assert_eq!(log.fork_evidence().len(), 1);
        // One parent of two is not enough; the second unblocks the merge,
        // and the merge the entry after it.
        log.insert(a).unwrap();
        assert_eq!((log.len(), log.pending_count()), (2, 2));
        let outputs = log.insert(b).unwrap();
        let persisted = persisted(&outputs);
        assert_eq!(persisted, 3);
        assert_eq!((log.len(), log.pending_count()), (5, 0));
        assert_eq!(log.heads(), vec![next.hash()]);
    }

    #[test]
    fn waiting_entries_are_bounded() {
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        let entries: Vec<Entry> = (0..=MAX_PENDING + 1)
            .map(|i| devices[0].say(&i.to_string(), &mut dice))
            .collect();
        let log = &mut devices[1].log;
        for entry in entries[1..=MAX_PENDING].iter().rev() {
            log.insert(entry.clone()).unwrap();
        }
        assert_eq!(log.pending_count(), MAX_PENDING);
        assert_eq!(
            log.insert(entries[MAX_PENDING + 1].clone()),
            Err(LogError::PendingFull)
        );
        assert_eq!(log.len(), 1);
        // The missing first one unblocks them all.
        let outputs = log.insert(entries[0].clone()).unwrap();
        let persisted = persisted(&outputs);
        assert_eq!(persisted, MAX_PENDING + 1);
        assert_eq!(log.pending_count(), 0);
        log.insert(entries[MAX_PENDING + 1].clone()).unwrap();
    }

    #[test]
    fn replaying_a_log_after_a_crash_erases_purged_bodies_again() {
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        let doomed = devices[0].say("gone", &mut dice);
        devices[0].write(
            Draft::Delete {
                target: doomed.hash(),
            },
            &mut dice,
        );
        // The driver wrote the purge but crashed before erasing the body:
        // on disk, the target still has it.
        let mut on_disk: Vec<Entry> = devices[0]
            .log
            .in_display_order()
            .map(|(_, e)| e.clone())
            .collect();
        for entry in &mut on_disk {
            if entry.hash() == doomed.hash() {
                *entry = doomed.clone();
            }
        }
        on_disk.sort_by_key(|e| Entry::storage_key(e.header.header.lamport, &e.hash()));
        let mut rebuilt = ChatLog::new(CHAT);
        let mut erased = Vec::new();
        for entry in on_disk {
            for output in rebuilt.insert(entry).unwrap() {
                if let LogOutput::EraseBody { entry, body } = output {
                    erased.push((entry, body));
                }
            }
        }
        assert_eq!(
            erased,
            vec![(doomed.hash(), doomed.body.as_ref().unwrap().hash())]
        );
        assert!(rebuilt.get(&doomed.hash()).unwrap().body.is_none());
    }

    #[test]
    fn entries_before_the_genesis_wait_for_it() {
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        let message = devices[0].say("early", &mut dice);
        let mut log = ChatLog::new(CHAT);
        let genesis = devices[0].log.genesis().unwrap();
        assert_eq!(
            log.insert(message).unwrap(),
            vec![LogOutput::Missing(vec![genesis])]
        );
        pull(&mut log, &devices[0].log);
        assert_eq!(log.len(), 2);
        assert_eq!(log.genesis(), Some(genesis));
    }

    #[test]
    fn a_second_genesis_is_refused() {
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        let bob = devices[0].member.account();
        let key = devices[0].member.encryption_key();
        let other = devices[1]
            .member
            .create(CHAT, &[(bob, key)], vec![], None, dice.roll())
            .unwrap();
        assert_eq!(
            devices[0].log.insert(other),
            Err(LogError::ConflictingGenesis)
        );
    }
}
