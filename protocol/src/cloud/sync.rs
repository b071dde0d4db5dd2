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
    /// 2: carries [`Entry`] 2.
    const VERSION: u8 = 2;
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
    take_batch(log, lacking(log, theirs), limits)
}

/// The names of up to `max` entries `theirs` lacks from `log`, each with
/// its lamport clock, oldest first; `true` if more remains. For a holder
/// that queues what to send and sends it in batches of its own.
pub fn missing_order(
    log: &ChatLog,
    theirs: &ChatSummary,
    max: usize,
) -> (Vec<(u64, EntryHash)>, bool) {
    let mut lacking = lacking(log, theirs).peekable();
    let order: Vec<(u64, EntryHash)> = lacking
        .by_ref()
        .take(max)
        .filter_map(|h| Some((log.lamport(&h)?, h)))
        .collect();
    (order, lacking.peek().is_some())
}

/// The names of the entries of `log` that `theirs` lacks, in (lamport,
/// hash) order, produced lazily: a k-way merge of each device's missing
/// suffix (a device's entries have rising lamport clocks), so a batch
/// costs its own size, not the size of everything missing.
fn lacking<'a>(log: &'a ChatLog, theirs: &ChatSummary) -> impl Iterator<Item = EntryHash> + 'a {
    use std::{cmp::Reverse, collections::BinaryHeap};
    let counts = theirs.counts();
    let runs: Vec<&'a [EntryHash]> = log
        .device_progress()
        .map(|(device, _)| {
            let from = counts.get(device).copied().unwrap_or(0);
            log.device_entries_from(device, from)
        })
        .filter(|run| !run.is_empty())
        .collect();
    let key = move |h: &EntryHash| (log.lamport(h).unwrap_or(u64::MAX), *h);
    // (the next entry's order key, which run, where in it)
    type Next = Reverse<((u64, EntryHash), usize, usize)>;
    let mut heap: BinaryHeap<Next> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| Reverse((key(&run[0]), i, 0)))
        .collect();
    std::iter::from_fn(move || {
        let Reverse(((_, hash), run, at)) = heap.pop()?;
        if let Some(next) = runs[run].get(at + 1) {
            heap.push(Reverse((key(next), run, at + 1)));
        }
        Some(hash)
    })
}

/// A prefix of the named entries within the limits; at least one entry (a
/// single entry larger than the byte budget still goes, alone). Sizes count
/// bodies the driver keeps elsewhere ([`ChatLog::release_body`]); such
/// entries come without their body, for the driver to put back.
fn take_batch(
    log: &ChatLog,
    hashes: impl Iterator<Item = EntryHash>,
    limits: BatchLimits,
) -> (Vec<Entry>, bool) {
    let max_entries = limits.max_entries.clamp(1, MAX_BATCH_ENTRIES);
    let max_bytes = limits.max_bytes.min(MAX_BATCH_BYTES);
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut entries = hashes
        .filter_map(|h| Some((log.get(&h)?, log.encoded_len(&h)?)))
        .peekable();
    while let Some((entry, size)) = entries.peek() {
        if batch.len() == max_entries || (!batch.is_empty() && bytes + size > max_bytes) {
            break;
        }
        bytes += size;
        batch.push((*entry).clone());
        entries.next();
    }
    let more = entries.peek().is_some();
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
    let bodies = request
        .want_bodies
        .iter()
        .take(MAX_WANTED_BODIES)
        .filter(|h| log.has_body(h))
        .copied();
    let (entries, more) = take_batch(log, bodies.chain(lacking(log, &request.summary)), limits);
    Ok(SyncResponse {
        chat: log.chat(),
        entries,
        more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::{
        Draft, LogEvent, LogOutput,
        tests::{CHAT, Dice, chat, pull, sync_devices},
    };

    fn insert_all_in_order(log: &mut ChatLog, entries: Vec<Entry>) {
        for entry in entries {
            let outputs = log.insert(entry).unwrap();
            assert!(
                !outputs.iter().any(|o| matches!(o, LogOutput::Missing(_))),
                "a batch entry had to wait for its parents"
            );
        }
    }

    #[test]
    fn a_batch_is_the_display_order_of_what_is_missing() {
        // Two devices writing concurrently, then merged: the lazy merge of
        // per-device runs gives exactly the (lamport, hash) order of all
        // that is missing, whatever the peer already holds.
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        for i in 0..20 {
            devices[0].say(&format!("a{i}"), &mut dice);
            if i % 3 == 0 {
                devices[1].say(&format!("b{i}"), &mut dice);
            }
            if i % 5 == 0 {
                sync_devices(&mut devices, 0, 1);
            }
        }
        sync_devices(&mut devices, 0, 1);
        let source = &devices[0].log;
        let mut partial = ChatLog::new(CHAT);
        let all: Vec<Entry> = source.in_display_order().map(|(_, e)| e.clone()).collect();
        for e in all.iter().take(9) {
            partial.insert(e.clone()).unwrap();
        }
        for theirs in [ChatLog::new(CHAT), partial] {
            let summary = ChatSummary::of(&theirs);
            let mut expected: Vec<(u64, EntryHash)> = all
                .iter()
                .filter(|e| !theirs.contains(&e.hash()))
                .map(|e| (e.header.header.lamport, e.hash()))
                .collect();
            expected.sort();
            let (batch, more) = missing_entries(source, &summary, BatchLimits::default());
            assert!(!more);
            let got: Vec<(u64, EntryHash)> = batch
                .iter()
                .map(|e| (e.header.header.lamport, e.hash()))
                .collect();
            assert_eq!(got, expected);
            // The same order by name, whole or cut short.
            assert_eq!(
                missing_order(source, &summary, usize::MAX),
                (expected.clone(), false)
            );
            let (first, more) = missing_order(source, &summary, 5);
            assert_eq!((&first[..], more), (&expected[..5], true));
        }
    }

    #[test]
    fn batches_are_bounded_and_insertable_in_order() {
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        for i in 0..25 {
            devices[0].say(&format!("a{i}"), &mut dice);
            devices[1].say(&format!("b{i}"), &mut dice);
        }
        sync_devices(&mut devices, 0, 1);
        let source = &devices[0].log;
        assert_eq!(source.len(), 51);

        let mut replica = ChatLog::new(CHAT);
        let mut rounds = 0;
        loop {
            let request = SyncRequest::for_log(&replica);
            let limits = BatchLimits {
                max_entries: 7,
                max_bytes: MAX_BATCH_BYTES,
            };
            let response = respond(source, &request, limits).unwrap();
            assert!(response.entries.len() <= 7);
            insert_all_in_order(&mut replica, response.entries);
            rounds += 1;
            if !response.more {
                break;
            }
        }
        assert_eq!(rounds, 8);
        assert!(in_sync(
            &ChatSummary::of(&replica),
            &ChatSummary::of(source)
        ));

        // A byte budget below one entry still makes progress, one at a time.
        let mut replica = ChatLog::new(CHAT);
        let tiny = BatchLimits {
            max_entries: 100,
            max_bytes: 1,
        };
        let (batch, more) = missing_entries(source, &ChatSummary::of(&replica), tiny);
        assert_eq!(batch.len(), 1);
        assert!(more);
        insert_all_in_order(&mut replica, batch);
    }

    #[test]
    fn replicas_repair_each_other_in_both_directions() {
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        let mut left = ChatLog::new(CHAT);
        let mut right = ChatLog::new(CHAT);
        pull(&mut left, &devices[0].log);
        pull(&mut right, &devices[0].log);
        // Each replica receives different writes (a partition).
        for i in 0..5 {
            left.insert(devices[0].say(&format!("a{i}"), &mut dice))
                .unwrap();
            right
                .insert(devices[1].say(&format!("b{i}"), &mut dice))
                .unwrap();
        }
        let (l, r) = (ChatSummary::of(&left), ChatSummary::of(&right));
        assert!(!in_sync(&l, &r));
        assert!(they_have_more(&left, &r));
        assert!(they_have_more(&right, &l));
        pull(&mut left, &right);
        pull(&mut right, &left);
        let (l, r) = (ChatSummary::of(&left), ChatSummary::of(&right));
        assert!(in_sync(&l, &r));
        assert!(!they_have_more(&left, &r));
        assert_eq!(l.entries, 11);
        assert!(
            missing_entries(&left, &r, BatchLimits::default())
                .0
                .is_empty()
        );
    }

    #[test]
    fn bodies_held_without_their_entry_body_are_fetched() {
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        let message = devices[0].say("body later", &mut dice);
        let log = &mut devices[1].log;
        log.insert(message.without_body()).unwrap();
        assert_eq!(log.missing_bodies().collect::<Vec<_>>(), [&message.hash()]);

        let request = SyncRequest::for_log(log);
        assert_eq!(request.want_bodies, vec![message.hash()]);
        let response = respond(&devices[0].log, &request, BatchLimits::default()).unwrap();
        let log = &mut devices[1].log;
        let mut attached = false;
        for entry in response.entries {
            let outputs = log.insert(entry).unwrap();
            attached |= outputs.contains(&LogOutput::Event(LogEvent::BodyAttached {
                entry: message.hash(),
            }));
        }
        assert!(attached);
        assert!(log.missing_bodies().next().is_none());
        assert_eq!(devices[1].texts(), ["body later"]);
    }

    #[test]
    fn a_fork_seen_in_opposite_orders_shows_as_divergence() {
        let mut dice = Dice::new();
        let mut devices = chat(false, false, &mut dice);
        let draft = || Draft::Text {
            text: "x".into(),
            reply_to: None,
        };
        let one = devices[0].compose(draft(), &mut dice).unwrap();
        let two = devices[0].compose(draft(), &mut dice).unwrap();
        let mut left = ChatLog::new(CHAT);
        let mut right = ChatLog::new(CHAT);
        pull(&mut left, &devices[0].log);
        pull(&mut right, &devices[0].log);
        left.insert(one.clone()).unwrap();
        assert!(left.insert(two.clone()).is_err());
        right.insert(two).unwrap();
        assert!(right.insert(one).is_err());
        let (l, r) = (ChatSummary::of(&left), ChatSummary::of(&right));
        assert!(!in_sync(&l, &r));
        assert!(diverged(&l, &r));
        assert!(!they_have_more(&left, &r));
        assert_eq!(left.fork_evidence().len(), 1);
        assert_eq!(right.fork_evidence().len(), 1);
    }

    #[test]
    fn records_are_checked_on_decode() {
        let mut dice = Dice::new();
        let devices = chat(false, false, &mut dice);
        let log = &devices[0].log;
        let request = SyncRequest::for_log(log);
        assert_eq!(SyncRequest::decode(&request.encode()).unwrap(), request);

        let mut unsorted = ChatSummary::of(log);
        let progress = DeviceProgress {
            device: unsorted.devices[0].device,
            count: 1,
        };
        unsorted.devices.push(progress);
        assert!(ChatSummary::decode(&unsorted.encode()).is_err());

        let mut other_chat = request.clone();
        other_chat.chat = ChatId([0; 16]);
        assert!(SyncRequest::decode(&other_chat.encode()).is_err());
        assert_eq!(
            respond(log, &other_chat, BatchLimits::default()),
            Err(SyncError::WrongChat {
                expected: CHAT,
                got: ChatId([0; 16])
            })
        );

        let response = respond(
            log,
            &SyncRequest::for_log(&ChatLog::new(CHAT)),
            BatchLimits::default(),
        )
        .unwrap();
        assert_eq!(SyncResponse::decode(&response.encode()).unwrap(), response);
        let mut huge = response.encode();
        huge.resize(SyncResponse::MAX_LEN + 1, 0);
        assert!(matches!(
            SyncResponse::decode(&huge),
            Err(DecodeError::TooLong { .. })
        ));
    }
}
