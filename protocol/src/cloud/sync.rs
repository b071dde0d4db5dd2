//! Anti-entropy between two holders of a chat (device and storage peer, or
//! two storage peers).
//!
//! Each side summarises its log as, per author device, how many entries of
//! that device it holds (they are always contiguous from seq 0: an entry is
//! only accepted after its device's previous one), plus a hash of its head
//! set. Equal head hashes mean equal logs, since every entry is named by its
//! hash and heads name everything before them.
//!
//! A round: A sends `SyncRequest { summary of A }`; B answers with the
//! entries A lacks, oldest first, bounded by count and bytes, and `more` if
//! it stopped early (A asks again). If B sees in A's summary entries that B
//! lacks ([`they_have_more`]), B asks A the same way. Entries come in
//! display order, which is topological, so A inserts them without waiting
//! for parents.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    entry::{ChatId, Entry, EntryHash},
    log::ChatLog,
};
use crate::{
    codec::{DecodeError, Record},
    identity::DevicePublicKey,
};

/// Most devices a summary lists.
pub const MAX_SUMMARY_DEVICES: usize = 4096;
/// Most bodies one request asks for.
pub const MAX_WANTED_BODIES: usize = 256;
/// Most entries in one response.
pub const MAX_BATCH_ENTRIES: usize = 1024;
/// Most bytes of entries in one response (a single larger entry is still
/// sent alone, so a response is bounded by this plus one entry).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SyncError {
    #[error("the request is for chat {got:?}, this log is {expected:?}")]
    WrongChat { expected: ChatId, got: ChatId },
}

/// How far a holder's log goes for one author device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceProgress {
    pub device: DevicePublicKey,
    /// Entries held from this device: seqs 0 to `count - 1`.
    pub count: u64,
}

/// A compact description of what a holder has, cheap to compare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatSummary {
    pub chat: ChatId,
    /// Sorted by device, each device once.
    pub devices: Vec<DeviceProgress>,
    /// blake3 over the sorted head set.
    pub heads_hash: [u8; 32],
    pub entries: u64,
}

impl ChatSummary {
    pub fn of(log: &ChatLog) -> Self {
        let devices = log
            .device_progress()
            .map(|(device, count)| DeviceProgress {
                device: *device,
                count,
            })
            .collect();
        Self {
            chat: log.chat(),
            devices,
            heads_hash: heads_hash(log),
            entries: log.len() as u64,
        }
    }

    fn counts(&self) -> BTreeMap<DevicePublicKey, u64> {
        self.devices.iter().map(|d| (d.device, d.count)).collect()
    }
}

fn heads_hash(log: &ChatLog) -> [u8; 32] {
    let mut heads = log.heads();
    heads.sort();
    let mut hasher = blake3::Hasher::new_derive_key("tern cloud heads v1");
    for head in heads {
        hasher.update(&head.0);
    }
    *hasher.finalize().as_bytes()
}

impl Record for ChatSummary {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 64 + MAX_SUMMARY_DEVICES * (32 + 10);

    fn validate(&self) -> Result<(), DecodeError> {
        if self.devices.len() > MAX_SUMMARY_DEVICES {
            return Err(DecodeError::Invalid("too many devices".into()));
        }
        if !self.devices.windows(2).all(|w| w[0].device < w[1].device) {
            return Err(DecodeError::Invalid(
                "devices must be sorted and distinct".into(),
            ));
        }
        Ok(())
    }
}

/// Whether two holders have the same log.
pub fn in_sync(a: &ChatSummary, b: &ChatSummary) -> bool {
    a.chat == b.chat && a.heads_hash == b.heads_hash
}

/// Whether `theirs` holds entries `log` lacks, so `log`'s holder should ask.
pub fn they_have_more(log: &ChatLog, theirs: &ChatSummary) -> bool {
    theirs.chat == log.chat()
        && theirs
            .devices
            .iter()
            .any(|d| d.count > log.next_seq(&d.device))
}

/// Whether two holders' logs disagree in a way sync cannot repair: the
/// same number of entries per device yet different heads. That happens
/// only after a fork reached them in different orders; see the logs'
/// fork evidence.
pub fn diverged(a: &ChatSummary, b: &ChatSummary) -> bool {
    a.chat == b.chat && a.devices == b.devices && a.heads_hash != b.heads_hash
}

/// "Here is what I have; send what I lack."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub chat: ChatId,
    pub summary: ChatSummary,
    /// Entries the asker holds without their body (see
    /// [`ChatLog::missing_bodies`]).
    pub want_bodies: Vec<EntryHash>,
}

impl SyncRequest {
    pub fn for_log(log: &ChatLog) -> Self {
        Self {
            chat: log.chat(),
            summary: ChatSummary::of(log),
            want_bodies: log
                .missing_bodies()
                .take(MAX_WANTED_BODIES)
                .copied()
                .collect(),
        }
    }
}

impl Record for SyncRequest {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 32 + ChatSummary::MAX_LEN + MAX_WANTED_BODIES * 32 + 8;

    fn validate(&self) -> Result<(), DecodeError> {
        self.summary.validate()?;
        if self.summary.chat != self.chat {
            return Err(DecodeError::Invalid("summary is for another chat".into()));
        }
        if self.want_bodies.len() > MAX_WANTED_BODIES {
            return Err(DecodeError::Invalid("too many bodies asked for".into()));
        }
        Ok(())
    }
}

/// Entries the asker lacks, in an order it can insert them in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    pub chat: ChatId,
    pub entries: Vec<Entry>,
    /// More is missing than fitted: ask again after inserting these.
    pub more: bool,
}

impl Record for SyncResponse {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = MAX_BATCH_BYTES + Entry::MAX_LEN + 64;

    fn validate(&self) -> Result<(), DecodeError> {
        if self.entries.len() > MAX_BATCH_ENTRIES {
            return Err(DecodeError::Invalid("too many entries".into()));
        }
        for entry in &self.entries {
            entry.validate()?;
        }
        Ok(())
    }
}

/// Bounds on one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_entries: MAX_BATCH_ENTRIES,
            max_bytes: MAX_BATCH_BYTES,
        }
    }
}

/// What `theirs` lacks from `log`, oldest first (parents before children),
/// bounded by `limits` (never beyond the record bounds); `true` if more
/// remains.
pub fn missing_entries(
    log: &ChatLog,
    theirs: &ChatSummary,
    limits: BatchLimits,
) -> (Vec<Entry>, bool) {
    take_batch(lacking(log, theirs), limits)
}

/// Every entry of `log` that `theirs` lacks, in display order.
fn lacking<'a>(log: &'a ChatLog, theirs: &ChatSummary) -> Vec<&'a Entry> {
    let counts = theirs.counts();
    let mut lacking: Vec<(u64, EntryHash)> = log
        .device_progress()
        .flat_map(|(device, _)| {
            let from = counts.get(device).copied().unwrap_or(0);
            log.device_entries_from(device, from).iter()
        })
        .filter_map(|h| Some((log.lamport(h)?, *h)))
        .collect();
    lacking.sort();
    lacking.iter().filter_map(|(_, h)| log.get(h)).collect()
}

/// A prefix of `entries` within the limits; at least one entry (a single
/// entry larger than the byte budget still goes, alone).
fn take_batch(entries: Vec<&Entry>, limits: BatchLimits) -> (Vec<Entry>, bool) {
    let max_entries = limits.max_entries.clamp(1, MAX_BATCH_ENTRIES);
    let max_bytes = limits.max_bytes.min(MAX_BATCH_BYTES);
    let mut batch = Vec::new();
    let mut bytes = 0;
    for entry in &entries {
        let size = entry.encode().len();
        if batch.len() == max_entries || (!batch.is_empty() && bytes + size > max_bytes) {
            break;
        }
        bytes += size;
        batch.push((*entry).clone());
    }
    let more = batch.len() < entries.len();
    (batch, more)
}

/// The answer to `request`: first the bodies asked for (of entries the
/// asker holds without them), then the entries it lacks.
pub fn respond(
    log: &ChatLog,
    request: &SyncRequest,
    limits: BatchLimits,
) -> Result<SyncResponse, SyncError> {
    if request.chat != log.chat() || request.summary.chat != log.chat() {
        return Err(SyncError::WrongChat {
            expected: log.chat(),
            got: request.chat,
        });
    }
    let mut candidates: Vec<&Entry> = request
        .want_bodies
        .iter()
        .take(MAX_WANTED_BODIES)
        .filter_map(|h| log.get(h))
        .filter(|e| e.body.is_some())
        .collect();
    candidates.extend(lacking(log, &request.summary));
    let (entries, more) = take_batch(candidates, limits);
    Ok(SyncResponse {
        chat: log.chat(),
        entries,
        more,
    })
}
