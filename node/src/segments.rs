//! An append-only, group-committed record log whose records can be purged
//! for real: the storage for cloud-chat logs.
//!
//! Neither existing store fits chat logs:
//! - sled keeps deleted bytes in its log, so delete-for-everyone would leave
//!   the ciphertext on disk;
//! - the erasable store spends a file (and its syncs) per value, far too
//!   many for 10,000 messages a second or a 1 GiB history.
//!
//! So a chat's log is a directory of segment files. Records are appended to
//! the newest segment, and many appends share one `fdatasync`
//! ([`SegmentLog::sync`]). A purge rewrites the segments that hold the purged
//! records: a new file without their bytes is written, synced and renamed
//! into place. The old file, still open, is then overwritten with zeros and
//! synced before it is closed, so the purged bytes are gone from the disk
//! (on file systems that write in place; see [`crate::erasable`]).
//!
//! A record on disk is a magic byte, the value's length (u32 LE), a 32-byte
//! key, the value, and an 8-byte check: CRC-32 of the header (magic, length,
//! key) and CRC-32 of the value, each u32 LE. (Records written before this
//! format have the magic `0xA7` and the first 8 bytes of BLAKE3(key ‖ value)
//! instead; they are still read. The check only finds torn and damaged
//! records, so it need not resist forgery: a cloud entry is verified by its
//! own hashes and signature when its chat is loaded, and CRC-32 costs a
//! tenth of BLAKE3 on a storage peer's hot path.) At open, every
//! segment is scanned. A damaged record at the end of the newest segment is
//! an append that a crash interrupted, and is cut off. Damage anywhere else
//! is an error.

use std::{
    cell::RefCell,
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, BufReader, IoSlice, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use crate::data_dir::create_private_dir;

/// Records checked with CRC-32 (written now).
const MAGIC: u8 = 0xA8;
/// Records checked with BLAKE3 (read only).
const MAGIC_BLAKE3: u8 = 0xA7;
const HEADER: usize = 1 + 4 + 32;
const CHECK: usize = 8;
/// Largest value stored.
pub const MAX_VALUE: usize = 1 << 20;
/// A segment is closed and a new one started beyond this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;

pub type Key = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error(
        "{path} is damaged at byte {offset} (not at the end of the newest segment, so not an interrupted append)"
    )]
    Damaged { path: String, offset: u64 },
    #[error("value of {0} bytes is larger than the {MAX_VALUE} allowed")]
    TooLarge(usize),
}

type Result<T> = std::result::Result<T, SegmentError>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SegmentError + '_ {
    move |source| SegmentError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Clone, Copy, Debug)]
struct Location {
    segment: u32,
    /// Offset of the record's header in its segment.
    offset: u64,
    len: u32,
}

struct Segment {
    number: u32,
    path: PathBuf,
    bytes: u64,
}

/// One chat's log on disk.
/// A segment's writes still to be flushed to disk ([`SegmentLog::sync_later`]).
pub struct PendingSync {
    file: File,
    path: PathBuf,
}

impl PendingSync {
    /// Blocks until the writes are on disk.
    pub fn run(self) -> Result<()> {
        self.file.sync_data().map_err(io_at(&self.path))
    }
}

pub struct SegmentLog {
    dir: PathBuf,
    segments: Vec<Segment>,
    index: HashMap<Key, Location>,
    /// Segments still holding replaced versions of a key.
    stale: HashMap<Key, Vec<u32>>,
    active: File,
    /// Read handles of segments, opened on first read; dropped when a purge
    /// rewrites segments.
    readers: RefCell<HashMap<u32, File>>,
    unsynced: bool,
    segment_bytes: u64,
    /// Makes the next append fail as a full disk would.
    #[cfg(test)]
    pub(crate) fail_next_append: bool,
}

fn checksum(header: &[u8; HEADER], value: &[u8]) -> [u8; CHECK] {
    let mut out = [0u8; CHECK];
    out[..4].copy_from_slice(&crc32fast::hash(header).to_le_bytes());
    out[4..].copy_from_slice(&crc32fast::hash(value).to_le_bytes());
    out
}

fn checksum_blake3(key: &Key, value: &[u8]) -> [u8; CHECK] {
    let mut h = blake3::Hasher::new();
    h.update(key);
    h.update(value);
    let mut out = [0u8; CHECK];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECK]);
    out
}

fn record_header(key: &Key, len: usize) -> [u8; HEADER] {
    let mut header = [0u8; HEADER];
    header[0] = MAGIC;
    header[1..5].copy_from_slice(&(len as u32).to_le_bytes());
    header[5..].copy_from_slice(key);
    header
}

fn encode(key: &Key, value: &[u8], out: &mut Vec<u8>) {
    let header = record_header(key, value.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(value);
    out.extend_from_slice(&checksum(&header, value));
}

/// Read handles one log keeps open at most.
const MAX_READERS: usize = 2;

/// Most slices one `writev` is given (Linux takes up to 1024).
const MAX_IOV: usize = 1024;

/// Writes every slice, in order, with as few system calls as the kernel
/// allows (the standard library's own `write_all_vectored` is unstable).
fn write_all_vectored(file: &mut File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        let upto = slices.len().min(MAX_IOV);
        match file.write_vectored(&slices[..upto]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn segment_path(dir: &Path, number: u32) -> PathBuf {
    dir.join(format!("seg-{number:08}.log"))
}

/// What reading at a position found.
enum Read1 {
    /// A clean end of the file.
    End,
    /// A damaged or partial record.
    Damaged,
    Record(Key, Vec<u8>),
}

/// The key and value length a record header names, or `None` if it is
/// not a record header.
fn parse_header(header: &[u8; HEADER]) -> Option<(Key, usize)> {
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !matches!(header[0], MAGIC | MAGIC_BLAKE3) || len > MAX_VALUE {
        return None;
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&header[5..]);
    Some((key, len))
}

/// Whether `check` is the check of a record with this header and value.
fn check_holds(header: &[u8; HEADER], key: &Key, value: &[u8], check: &[u8]) -> bool {
    let expected = match header[0] {
        MAGIC => checksum(header, value),
        _ => checksum_blake3(key, value),
    };
    expected[..] == *check
}

/// Appends exactly `n` bytes from `r` to `buf`, or returns `false` at the
/// end of the input. The bytes are read into `buf`'s spare capacity, not
/// into memory zeroed first (a record is up to a megabyte, read often).
fn read_n(r: &mut impl Read, n: usize, buf: &mut Vec<u8>) -> io::Result<bool> {
    buf.reserve_exact(n);
    let want = buf.len() + n;
    r.take(n as u64).read_to_end(buf)?;
    Ok(buf.len() == want)
}

/// Reads one record at the reader's position.
fn read_record(r: &mut impl Read) -> io::Result<Read1> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut header[got..])? {
            0 if got == 0 => return Ok(Read1::End),
            0 => return Ok(Read1::Damaged),
            n => got += n,
        }
    }
    let Some((key, len)) = parse_header(&header) else {
        return Ok(Read1::Damaged);
    };
    let mut rest = Vec::new();
    if !read_n(r, len + CHECK, &mut rest)? {
        return Ok(Read1::Damaged);
    }
    let (value, check) = rest.split_at(len);
    if !check_holds(&header, &key, value, check) {
        return Ok(Read1::Damaged);
    }
    rest.truncate(len);
    Ok(Read1::Record(key, rest))
}

/// A value read by [`SegmentLog::get`]: the whole record as it was read
/// from the disk, seen as its value (no second copy of the value).
pub struct Value {
    record: Vec<u8>,
}

impl std::ops::Deref for Value {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.record[HEADER..self.record.len() - CHECK]
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Value").field(&&**self).finish()
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Value {
    fn eq(&self, other: &&[u8; N]) -> bool {
        **self == other[..]
    }
}

impl SegmentLog {
    /// Opens (or creates) the log in `dir`, cutting off an append that a
    /// crash interrupted.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with_segment_size(dir, SEGMENT_BYTES)
    }

    /// [`Self::open`] with another segment size (tests use small ones).
    pub fn open_with_segment_size(dir: impl Into<PathBuf>, segment_bytes: u64) -> Result<Self> {
        let dir = dir.into();
        create_private_dir(&dir).map_err(io_at(&dir))?;
        let mut numbers: Vec<u32> = fs::read_dir(&dir)
            .map_err(io_at(&dir))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok())
            .collect();
        numbers.sort_unstable();
        if numbers.is_empty() {
            numbers.push(0);
        }
        let mut log_index: HashMap<Key, Location> = HashMap::new();
        let mut stale: HashMap<Key, Vec<u32>> = HashMap::new();
        let mut segments = Vec::new();
        let last = numbers.len() - 1;
        for (i, &number) in numbers.iter().enumerate() {
            let path = segment_path(&dir, number);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_at(&path))?;
            let mut reader = BufReader::with_capacity(1 << 20, &file);
            let mut offset = 0u64;
            loop {
                match read_record(&mut reader).map_err(io_at(&path))? {
                    Read1::End => break,
                    Read1::Record(key, value) => {
                        let len = value.len() as u32;
                        let loc = Location {
                            segment: number,
                            offset,
                            len,
                        };
                        if let Some(old) = log_index.insert(key, loc) {
                            let segs = stale.entry(key).or_default();
                            if !segs.contains(&old.segment) {
                                segs.push(old.segment);
                            }
                        }
                        offset += (HEADER + value.len() + CHECK) as u64;
                    }
                    Read1::Damaged if i == last && !valid_record_after(&path, offset) => {
                        tracing::warn!(path = %path.display(), offset, "cutting off an interrupted append");
                        file.set_len(offset).map_err(io_at(&path))?;
                        file.sync_data().map_err(io_at(&path))?;
                        break;
                    }
                    Read1::Damaged => {
                        return Err(SegmentError::Damaged {
                            path: path.display().to_string(),
                            offset,
                        });
                    }
                }
            }
            segments.push(Segment {
                number,
                path,
                bytes: offset,
            });
        }
        let active_path = segments[last].path.clone();
        let active = OpenOptions::new()
            .append(true)
            .open(&active_path)
            .map_err(io_at(&active_path))?;
        sync_dir(&dir);
        Ok(Self {
            dir,
            segments,
            index: log_index,
            stale,
            active,
            readers: RefCell::new(HashMap::new()),
            unsynced: false,
            segment_bytes,
            #[cfg(test)]
            fail_next_append: false,
        })
    }

    /// Appends records; they are durable after the next [`Self::sync`].
    /// A key appended again replaces its earlier version (whose bytes stay
    /// until that segment is next rewritten; use [`Self::purge`] to make
    /// them go).
    pub fn append(&mut self, records: &[(Key, &[u8])]) -> Result<()> {
        if let Some((_, v)) = records.iter().find(|(_, v)| v.len() > MAX_VALUE) {
            return Err(SegmentError::TooLarge(v.len()));
        }
        if self
            .segments
            .last()
            .is_some_and(|s| s.bytes >= self.segment_bytes)
        {
            self.roll()?;
        }
        // Headers and checks here; values are written from where they are.
        let mut framing = Vec::with_capacity(records.len());
        let seg = self
            .segments
            .last_mut()
            .expect("a log always has a segment");
        let mut offset = seg.bytes;
        let mut placed = Vec::with_capacity(records.len());
        for (key, value) in records {
            let header = record_header(key, value.len());
            framing.push((header, checksum(&header, value)));
            placed.push((
                *key,
                Location {
                    segment: seg.number,
                    offset,
                    len: value.len() as u32,
                },
            ));
            offset += (HEADER + value.len() + CHECK) as u64;
        }
        let mut slices = Vec::with_capacity(records.len() * 3);
        for ((header, check), (_, value)) in framing.iter().zip(records) {
            slices.extend([
                IoSlice::new(header),
                IoSlice::new(value),
                IoSlice::new(check),
            ]);
        }
        #[cfg(test)]
        let written = match std::mem::take(&mut self.fail_next_append) {
            true => Err(io::Error::from(io::ErrorKind::StorageFull)),
            false => write_all_vectored(&mut self.active, &mut slices),
        };
        #[cfg(not(test))]
        let written = write_all_vectored(&mut self.active, &mut slices);
        if let Err(e) = written {
            // Leave the file as it was, so the index stays true.
            let _ = self.active.set_len(seg.bytes);
            return Err(io_at(&seg.path)(e));
        }
        seg.bytes = offset;
        for (key, loc) in placed {
            if let Some(old) = self.index.insert(key, loc) {
                let segs = self.stale.entry(key).or_default();
                if !segs.contains(&old.segment) {
                    segs.push(old.segment);
                }
            }
        }
        self.unsynced = true;
        Ok(())
    }

    /// Makes every append so far durable: one `fdatasync` for all of them.
    pub fn sync(&mut self) -> Result<()> {
        if self.unsynced {
            let path = &self.segments.last().expect("a log has a segment").path;
            self.active.sync_data().map_err(io_at(path))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// What [`Self::sync`] would flush, for flushing on another thread:
    /// the active segment's file (a second handle), if anything was written
    /// since the last sync. The log counts it as synced from here on; a
    /// caller whose flush fails must stop using the log and reopen it.
    pub fn sync_later(&mut self) -> Result<Option<PendingSync>> {
        if !self.unsynced {
            return Ok(None);
        }
        let path = self
            .segments
            .last()
            .expect("a log has a segment")
            .path
            .clone();
        let file = self.active.try_clone().map_err(io_at(&path))?;
        self.unsynced = false;
        Ok(Some(PendingSync { file, path }))
    }

    fn roll(&mut self) -> Result<()> {
        self.sync()?;
        let number = self.segments.last().map_or(0, |s| s.number + 1);
        let path = segment_path(&self.dir, number);
        self.active = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io_at(&path))?;
        sync_dir(&self.dir);
        self.segments.push(Segment {
            number,
            path,
            bytes: 0,
        });
        Ok(())
    }

    pub fn get(&self, key: &Key) -> Result<Option<Value>> {
        let Some(loc) = self.index.get(key) else {
            return Ok(None);
        };
        let path = segment_path(&self.dir, loc.segment);
        let mut readers = self.readers.borrow_mut();
        if readers.len() >= MAX_READERS && !readers.contains_key(&loc.segment) {
            // Bounded: a node keeping many chats must not run out of files.
            readers.clear();
        }
        let file = match readers.entry(loc.segment) {
            std::collections::hash_map::Entry::Occupied(f) => f.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(File::open(&path).map_err(io_at(&path))?)
            }
        };
        // The whole record, checked as at open: the disk may have changed
        // since.
        let len = loc.len as usize;
        let mut record = Vec::new();
        file.seek(SeekFrom::Start(loc.offset))
            .map_err(io_at(&path))?;
        let whole = read_n(file, HEADER + len + CHECK, &mut record).map_err(io_at(&path))?;
        let damaged = || SegmentError::Damaged {
            path: path.display().to_string(),
            offset: loc.offset,
        };
        if !whole {
            return Err(damaged());
        }
        let (header, rest) = record.split_at(HEADER);
        let header: &[u8; HEADER] = header.try_into().map_err(|_| damaged())?;
        let (value, check) = rest.split_at(len);
        match parse_header(header) {
            Some((k, l)) if k == *key && l == len && check_holds(header, &k, value, check) => {
                Ok(Some(Value { record }))
            }
            _ => Err(damaged()),
        }
    }

    pub fn contains(&self, key: &Key) -> bool {
        self.index.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes on disk, including replaced versions not yet rewritten.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Every current record in append order, read segment by segment with
    /// large sequential reads (what a catching-up replica is sent).
    pub fn scan(&self, mut f: impl FnMut(&Key, &[u8])) -> Result<()> {
        for seg in &self.segments {
            let file = File::open(&seg.path).map_err(io_at(&seg.path))?;
            let mut r = BufReader::with_capacity(1 << 20, file.take(seg.bytes));
            let mut offset = 0u64;
            loop {
                let (key, value) = match read_record(&mut r).map_err(io_at(&seg.path))? {
                    Read1::End => break,
                    Read1::Record(k, v) => (k, v),
                    Read1::Damaged => {
                        return Err(SegmentError::Damaged {
                            path: seg.path.display().to_string(),
                            offset,
                        });
                    }
                };
                let current = self
                    .index
                    .get(&key)
                    .is_some_and(|l| l.segment == seg.number && l.offset == offset);
                if current {
                    f(&key, &value);
                }
                offset += (HEADER + value.len() + CHECK) as u64;
            }
        }
        Ok(())
    }

    /// Keys in append order: segments are numbered and records within one
    /// keep their order, so (segment, offset) is the order of appending.
    pub fn keys(&self) -> Vec<Key> {
        let mut all: Vec<(u32, u64, Key)> = self
            .index
            .iter()
            .map(|(k, l)| (l.segment, l.offset, *k))
            .collect();
        all.sort_unstable();
        all.into_iter().map(|(_, _, k)| k).collect()
    }

    /// Purges for real: each key in `changes` is removed (`None`) or
    /// replaced in place by a new value (`Some`, e.g. an entry without its
    /// body). Every segment that held an old version is rewritten without
    /// it, and the old file's bytes are overwritten with zeros. Durable
    /// when this returns.
    pub fn purge(&mut self, changes: &[(Key, Option<&[u8]>)]) -> Result<()> {
        self.sync()?;
        // Rewritten segments are new files: read them anew.
        self.readers.get_mut().clear();
        let wanted: HashMap<Key, Option<&[u8]>> = changes
            .iter()
            .filter(|(k, _)| self.index.contains_key(k))
            .map(|(k, v)| (*k, *v))
            .collect();
        if let Some(v) = wanted.values().flatten().find(|v| v.len() > MAX_VALUE) {
            return Err(SegmentError::TooLarge(v.len()));
        }
        // The segments holding any version of a purged key, current or replaced.
        let mut touched: Vec<u32> = wanted
            .keys()
            .flat_map(|k| {
                let current = self.index.get(k).map(|l| l.segment);
                let old = self.stale.get(k).into_iter().flatten().copied();
                current.into_iter().chain(old)
            })
            .collect();
        touched.sort_unstable();
        touched.dedup();
        for number in touched {
            self.rewrite(number, &wanted)?;
        }
        Ok(())
    }

    /// Rewrites one segment without the old versions of `wanted` keys (and
    /// without any replaced version), if it holds any.
    fn rewrite(&mut self, number: u32, wanted: &HashMap<Key, Option<&[u8]>>) -> Result<()> {
        let path = segment_path(&self.dir, number);
        let seg_bytes = self
            .segments
            .iter()
            .find(|s| s.number == number)
            .map_or(0, |s| s.bytes);
        // Read and later zeroed through the same handle: after the rename it
        // is the only way left to the old bytes.
        let mut old = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        let mut r = BufReader::with_capacity(1 << 20, (&old).take(seg_bytes));
        let mut out = Vec::new();
        let mut moved = Vec::new();
        let mut changed = false;
        let mut offset = 0u64;
        loop {
            let (key, value) = match read_record(&mut r).map_err(io_at(&path))? {
                Read1::End => break,
                Read1::Record(k, v) => (k, v),
                Read1::Damaged => {
                    return Err(SegmentError::Damaged {
                        path: path.display().to_string(),
                        offset,
                    });
                }
            };
            let size = (HEADER + value.len() + CHECK) as u64;
            let current = self
                .index
                .get(&key)
                .is_some_and(|l| l.segment == number && l.offset == offset);
            offset += size;
            if !current {
                changed = true; // a replaced version: drop its bytes too
                continue;
            }
            let new_value = match wanted.get(&key) {
                None => Some(value.as_slice()),
                Some(replacement) => {
                    changed |= *replacement != Some(value.as_slice());
                    *replacement
                }
            };
            if let Some(v) = new_value {
                moved.push((key, out.len() as u64, v.len() as u32));
                encode(&key, v, &mut out);
            } else {
                moved.push((key, u64::MAX, 0));
            }
        }
        drop(r);
        if !changed {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".seg-{number:08}.tmp"));
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_at(&tmp))?;
            f.write_all(&out).map_err(io_at(&tmp))?;
            f.sync_all().map_err(io_at(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_at(&path))?;
        sync_dir(&self.dir);
        // The new file is in place: from here on the index must describe it,
        // whatever happens to the old one.
        for (key, new_offset, len) in moved {
            if new_offset == u64::MAX {
                self.index.remove(&key);
                self.stale.remove(&key);
            } else {
                self.index.insert(
                    key,
                    Location {
                        segment: number,
                        offset: new_offset,
                        len,
                    },
                );
            }
        }
        // Replaced versions in this segment are gone with it.
        self.stale.retain(|_, segs| {
            segs.retain(|s| *s != number);
            !segs.is_empty()
        });
        if let Some(seg) = self.segments.iter_mut().find(|s| s.number == number) {
            seg.bytes = out.len() as u64;
        }
        if self.segments.last().is_some_and(|s| s.number == number) {
            self.active = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_at(&path))?;
        }
        // The old inode is still open: overwrite what it held, then let go.
        old.seek(SeekFrom::Start(0)).map_err(io_at(&path))?;
        crate::erasable::zero_fill(&mut old, seg_bytes).map_err(io_at(&path))?;
        old.sync_all().map_err(io_at(&path))?;
        Ok(())
    }
}

/// Whether any whole, valid record starts after `offset`: then the damage
/// is not an interrupted append (which leaves nothing valid behind it) but
/// lost data in the middle, and cutting the tail would drop acknowledged
/// records.
fn valid_record_after(path: &Path, offset: u64) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    let start = (offset as usize + 1).min(bytes.len());
    (start..bytes.len())
        .filter(|&p| matches!(bytes[p], MAGIC | MAGIC_BLAKE3))
        .any(|p| matches!(read_record(&mut &bytes[p..]), Ok(Read1::Record(..))))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::files_containing;

    fn key(i: u32) -> Key {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    #[test]
    fn appends_survive_a_reopen_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(tmp.path()).unwrap();
        let values: Vec<Vec<u8>> = (0..100u32)
            .map(|i| format!("value {i}").into_bytes())
            .collect();
        let batch: Vec<(Key, &[u8])> = (0..100)
            .map(|i| (key(i), values[i as usize].as_slice()))
            .collect();
        log.append(&batch[..50]).unwrap();
        log.append(&batch[50..]).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(tmp.path()).unwrap();
        assert_eq!(log.len(), 100);
        assert_eq!(log.get(&key(42)).unwrap().unwrap(), b"value 42");
        assert_eq!(log.keys()[0], key(0));
        let mut seen = Vec::new();
        log.scan(|k, v| seen.push((*k, v.to_vec()))).unwrap();
        assert_eq!(seen.len(), 100);
        assert_eq!(seen[99], (key(99), b"value 99".to_vec()));
        assert_eq!(log.get(&key(1000)).unwrap(), None);
    }

    #[test]
    fn a_record_damaged_after_open_is_an_error_when_read_not_a_wrong_value() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(tmp.path()).unwrap();
        log.append(&[(key(1), b"first value"), (key(2), b"second value")])
            .unwrap();
        log.sync().unwrap();
        assert_eq!(log.get(&key(2)).unwrap().unwrap(), b"second value");
        let seg = segment_path(tmp.path(), 0);
        let mut bytes = fs::read(&seg).unwrap();
        let at = bytes.len() - CHECK - 3;
        bytes[at] ^= 0x01;
        fs::write(&seg, &bytes).unwrap();
        assert!(matches!(
            log.get(&key(2)),
            Err(SegmentError::Damaged { .. })
        ));
        assert_eq!(log.get(&key(1)).unwrap().unwrap(), b"first value");

        // Cut short under the open log: the record read is short, which
        // is damage, not a value.
        fs::write(&seg, &bytes[..bytes.len() - 5]).unwrap();
        assert!(matches!(
            log.get(&key(2)),
            Err(SegmentError::Damaged { .. })
        ));
        assert_eq!(log.get(&key(1)).unwrap().unwrap(), b"first value");
    }

    #[test]
    fn one_append_of_more_records_than_one_writev_takes_keeps_them_all_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(tmp.path()).unwrap();
        let values: Vec<Vec<u8>> = (0..1500u32)
            .map(|i| vec![(i % 251) as u8; 1 + (i as usize % 700)])
            .collect();
        let batch: Vec<(Key, &[u8])> = (0..1500)
            .map(|i| (key(i), values[i as usize].as_slice()))
            .collect();
        log.append(&batch).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(tmp.path()).unwrap();
        let mut seen = Vec::new();
        log.scan(|k, v| seen.push((*k, v.to_vec()))).unwrap();
        let expected: Vec<(Key, Vec<u8>)> = (0..1500)
            .map(|i| (key(i), values[i as usize].clone()))
            .collect();
        assert!(seen == expected, "records lost or out of order");
    }

    /// A record as the first format wrote it: magic 0xA7, BLAKE3 check.
    fn encode_blake3(key: &Key, value: &[u8], out: &mut Vec<u8>) {
        out.push(MAGIC_BLAKE3);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(value);
        out.extend_from_slice(&checksum_blake3(key, value));
    }

    #[test]
    fn records_of_the_first_format_are_read_beside_new_ones_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        create_private_dir(tmp.path()).unwrap();
        let mut old = Vec::new();
        encode_blake3(&key(1), b"written by an older node", &mut old);
        encode_blake3(&key(2), b"also old", &mut old);
        fs::write(segment_path(tmp.path(), 0), &old).unwrap();
        let mut log = SegmentLog::open(tmp.path()).unwrap();
        assert_eq!(log.len(), 2);
        log.append(&[(key(3), b"new format"), (key(4), b"newest")])
            .unwrap();
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(tmp.path()).unwrap();
        assert_eq!(log.len(), 4);
        assert_eq!(
            log.get(&key(1)).unwrap().unwrap(),
            b"written by an older node"
        );
        assert_eq!(log.get(&key(3)).unwrap().unwrap(), b"new format");
        drop(log);

        // Either kind with a flipped value byte, or a new record with a
        // flipped key byte (its header check), followed by a whole record,
        // is damage, not a torn append.
        for at in [HEADER + 2, old.len() + HEADER + 2, old.len() + 10] {
            let seg = segment_path(tmp.path(), 0);
            let mut bytes = fs::read(&seg).unwrap();
            bytes[at] ^= 0x01;
            fs::write(&seg, &bytes).unwrap();
            let opened = SegmentLog::open(tmp.path());
            bytes[at] ^= 0x01;
            fs::write(&seg, &bytes).unwrap();
            assert!(
                matches!(opened, Err(SegmentError::Damaged { .. })),
                "a flipped byte at {at} went unnoticed"
            );
        }
        // A flipped length in the newest record's header fails its check, so
        // the record is cut off as a torn append.
        let seg = segment_path(tmp.path(), 0);
        let mut bytes = fs::read(&seg).unwrap();
        let newest = bytes.len() - (HEADER + b"newest".len() + CHECK);
        bytes[newest + 1] ^= 0x01;
        fs::write(&seg, &bytes).unwrap();
        let log = SegmentLog::open(tmp.path()).unwrap();
        assert_eq!(log.len(), 3, "the damaged newest record is cut off as torn");
        assert_eq!(log.get(&key(4)).unwrap(), None);
    }

    #[test]
    fn an_interrupted_append_is_cut_off_and_damage_elsewhere_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(tmp.path()).unwrap();
        log.append(&[(key(1), b"whole"), (key(2), b"also whole")])
            .unwrap();
        log.sync().unwrap();
        drop(log);
        let seg = segment_path(tmp.path(), 0);
        let good_len = fs::metadata(&seg).unwrap().len();
        // A crash in the middle of the next append.
        let mut partial = Vec::new();
        encode(&key(3), b"torn in half", &mut partial);
        partial.truncate(partial.len() / 2);
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&partial)
            .unwrap();
        let mut log = SegmentLog::open(tmp.path()).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(fs::metadata(&seg).unwrap().len(), good_len);
        // The log goes on where it was cut.
        log.append(&[(key(4), b"after the crash")]).unwrap();
        log.sync().unwrap();
        drop(log);
        assert_eq!(SegmentLog::open(tmp.path()).unwrap().len(), 3);

        // A flipped byte in the middle of the newest segment, with whole
        // records after it, is lost data, not a torn append: an error.
        let mut log = SegmentLog::open(tmp.path()).unwrap();
        log.append(&[(key(5), b"one more")]).unwrap();
        log.sync().unwrap();
        drop(log);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[HEADER + 1] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        assert!(matches!(
            SegmentLog::open(tmp.path()),
            Err(SegmentError::Damaged { .. })
        ));
        bytes[HEADER + 1] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();

        // A flipped byte in a sealed (not the newest) segment is an error.
        let mut bytes = fs::read(&seg).unwrap();
        bytes[HEADER + 2] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        fs::write(segment_path(tmp.path(), 1), b"").unwrap();
        assert!(matches!(
            SegmentLog::open(tmp.path()),
            Err(SegmentError::Damaged { .. })
        ));
    }

    #[test]
    fn a_purge_leaves_none_of_the_bytes_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(tmp.path()).unwrap();
        log.append(&[
            (key(1), b"KEEP-ME-V1"),
            (key(2), b"CIPHERTEXT-TO-PURGE"),
            (key(3), b"HEADER+BODY-OF-THREE"),
        ])
        .unwrap();
        // A replaced version lingers in the file until a purge rewrites it.
        log.append(&[
            (key(1), b"keep me, version two"),
            (key(3), b"HEADER+BODY-V2"),
        ])
        .unwrap();
        log.sync().unwrap();
        assert_eq!(
            files_containing(tmp.path(), b"HEADER+BODY-OF-THREE").len(),
            1
        );
        let seg = segment_path(tmp.path(), 0);
        let mut held = File::open(&seg).unwrap();

        log.purge(&[(key(2), None), (key(3), Some(b"HEADER-ONLY"))])
            .unwrap();
        assert_eq!(log.get(&key(2)).unwrap(), None);
        assert_eq!(log.get(&key(3)).unwrap().unwrap(), b"HEADER-ONLY");
        assert_eq!(log.get(&key(1)).unwrap().unwrap(), b"keep me, version two");
        for gone in [&b"CIPHERTEXT-TO-PURGE"[..], b"HEADER+BODY", b"KEEP-ME-V1"] {
            assert!(files_containing(tmp.path(), gone).is_empty());
        }
        // The old file's blocks were overwritten, not just unlinked.
        let mut old = Vec::new();
        held.read_to_end(&mut old).unwrap();
        assert!(!old.is_empty() && old.iter().all(|&b| b == 0));

        // Appends go on after the rewrite, and all of it survives a reopen.
        log.append(&[(key(5), b"after the purge")]).unwrap();
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(tmp.path()).unwrap();
        assert_eq!(log.len(), 3);
        assert_eq!(log.get(&key(5)).unwrap().unwrap(), b"after the purge");
        assert_eq!(log.get(&key(2)).unwrap(), None);
    }

    #[test]
    fn many_segments_roll_purge_and_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open_with_segment_size(tmp.path(), 1024).unwrap();
        let values: Vec<Vec<u8>> = (0..200u32)
            .map(|i| format!("record-{i:04}-{}", "x".repeat(50)).into_bytes())
            .collect();
        for chunk in (0..200u32).collect::<Vec<_>>().chunks(10) {
            let batch: Vec<(Key, &[u8])> = chunk
                .iter()
                .map(|&i| (key(i), values[i as usize].as_slice()))
                .collect();
            log.append(&batch).unwrap();
            log.sync().unwrap();
        }
        assert!(log.segments.len() > 10, "{} segments", log.segments.len());
        let purged: Vec<(Key, Option<&[u8]>)> =
            (0..200).step_by(7).map(|i| (key(i), None)).collect();
        log.purge(&purged).unwrap();
        drop(log);
        let log = SegmentLog::open_with_segment_size(tmp.path(), 1024).unwrap();
        assert_eq!(log.len(), 200 - purged.len());
        for i in 0..200u32 {
            let got = log.get(&key(i)).unwrap();
            assert_eq!(got.is_none(), i % 7 == 0, "record {i}");
            assert_eq!(
                files_containing(tmp.path(), format!("record-{i:04}-").as_bytes()).is_empty(),
                i % 7 == 0
            );
        }
    }

    #[test]
    fn oversized_values_are_refused_and_change_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(tmp.path()).unwrap();
        let big = vec![0u8; MAX_VALUE + 1];
        assert!(matches!(
            log.append(&[(key(1), b"fine"), (key(2), &big)]),
            Err(SegmentError::TooLarge(_))
        ));
        assert!(log.is_empty());
        assert_eq!(log.disk_bytes(), 0);
    }
}
