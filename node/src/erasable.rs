//! Storage for data that must really disappear when it is deleted: secret
//! chats, and cloud-chat entries purged for everyone.
//!
//! The main store (sled) is log-structured: a deleted value stays in its
//! files until segments are reclaimed (checked: after `remove`, `flush` and
//! a reopen, the deleted bytes are still in sled's file). So erasable data
//! lives here instead, one small file per value:
//!
//! - a write goes to a temporary file that is fsynced and renamed into
//!   place, so readers see the old value or the new one, never a mix;
//! - the version it replaces is first kept under a hard link, then
//!   overwritten with zeros, fsynced and unlinked;
//! - a delete overwrites the file in place, fsyncs and unlinks it.
//!
//! On file systems that write in place (ext4, xfs) the old bytes are then
//! gone from the disk too. Copy-on-write file systems (btrfs, zfs) and SSD
//! wear levelling may keep old blocks; against that, callers store
//! ciphertext whose keys they erase the same way.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use crate::data_dir::{create_private_dir, read_bounded, write_atomic};

/// Largest value stored, in bytes.
pub const MAX_VALUE: u64 = 1 << 20;
const MAX_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ErasableError {
    #[error("invalid name {0:?}: use 1 to {MAX_NAME} of a-z, 0-9, '-' and '_'")]
    BadName(String),
    #[error("value of {0} bytes is larger than the {MAX_VALUE} allowed")]
    TooLarge(usize),
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

type Result<T> = std::result::Result<T, ErasableError>;

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ErasableError + '_ {
    move |source| ErasableError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Names become file names, and may come from the network: only a safe
/// alphabet, so nothing can point outside the store.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ErasableError::BadName(name.chars().take(40).collect()))
    }
}

pub struct ErasableStore {
    root: PathBuf,
}

impl ErasableStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        create_private_dir(&root).map_err(io_at(&root))?;
        let store = Self { root };
        store.recover()?;
        Ok(store)
    }

    fn path(&self, space: &str, key: &str) -> Result<PathBuf> {
        check_name(space)?;
        check_name(key)?;
        Ok(self.root.join(space).join(key))
    }

    /// Stores `value` durably (on disk when this returns), wiping the
    /// version it replaces.
    pub fn put(&self, space: &str, key: &str, value: &[u8]) -> Result<()> {
        if value.len() as u64 > MAX_VALUE {
            return Err(ErasableError::TooLarge(value.len()));
        }
        let path = self.path(space, key)?;
        let dir = self.root.join(space);
        create_private_dir(&dir).map_err(io_at(&dir))?;
        // Keep the old version reachable until the new one is in place.
        let old = dir.join(format!(".{key}.old"));
        // Left over by a crash mid-replace: it may hold an old version.
        if old.exists() {
            discard_leftover(&old, &path).map_err(io_at(&old))?;
        }
        let had_old = fs::hard_link(&path, &old).is_ok();
        write_atomic(&path, value, true).map_err(io_at(&path))?;
        if had_old {
            wipe(&old).map_err(io_at(&old))?;
        }
        Ok(())
    }

    pub fn get(&self, space: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(space, key)?;
        match read_bounded(&path, MAX_VALUE) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Overwrites and removes a value; returns whether it existed.
    pub fn delete(&self, space: &str, key: &str) -> Result<bool> {
        let path = self.path(space, key)?;
        match wipe(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// The keys of a space, sorted.
    pub fn keys(&self, space: &str) -> Result<Vec<String>> {
        check_name(space)?;
        let dir = self.root.join(space);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_at(&dir)(e)),
        };
        let mut keys: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|k| check_name(k).is_ok())
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Applies many writes and deletes with two file-system syncs in all,
    /// instead of several per value: everything is written, replaced
    /// versions and deleted values are overwritten with zeros, one sync
    /// makes all of it durable, then the wiped files are unlinked and a
    /// second sync makes that durable. Later operations on the same value
    /// supersede earlier ones. When this returns, every operation is on disk.
    pub fn apply(&self, ops: Vec<Op>) -> Result<()> {
        use std::collections::BTreeMap;
        let mut last: BTreeMap<(String, String), Option<Vec<u8>>> = BTreeMap::new();
        let mut dropped_spaces = Vec::new();
        for op in ops {
            match op {
                Op::Put { space, key, value } => {
                    if value.len() as u64 > MAX_VALUE {
                        return Err(ErasableError::TooLarge(value.len()));
                    }
                    self.path(&space, &key)?;
                    last.insert((space, key), Some(value));
                }
                Op::Delete { space, key } => {
                    self.path(&space, &key)?;
                    last.insert((space, key), None);
                }
                Op::DeleteSpace { space } => {
                    for key in self.keys(&space)? {
                        last.insert((space.clone(), key), None);
                    }
                    last.retain(|(s, _), v| s != &space || v.is_none());
                    dropped_spaces.push(space);
                }
            }
        }
        let result = self.apply_final(&last, dropped_spaces);
        // Values may be secrets (session keys): no copy outlives the write.
        for v in last.values_mut().flatten() {
            zeroize::Zeroize::zeroize(v);
        }
        result
    }

    fn apply_final(
        &self,
        last: &std::collections::BTreeMap<(String, String), Option<Vec<u8>>>,
        dropped_spaces: Vec<String>,
    ) -> Result<()> {
        if last.is_empty() && dropped_spaces.is_empty() {
            return Ok(());
        }
        // Phase 1: new versions in place; the versions they replace stay
        // reachable under a hard link.
        let mut to_wipe: Vec<PathBuf> = Vec::new();
        for ((space, key), value) in last {
            let dir = self.root.join(space);
            let path = dir.join(key);
            let old = dir.join(format!(".{key}.old"));
            if old.exists() {
                discard_leftover(&old, &path).map_err(io_at(&old))?;
            }
            match value {
                Some(value) => {
                    create_private_dir(&dir).map_err(io_at(&dir))?;
                    if fs::hard_link(&path, &old).is_ok() {
                        to_wipe.push(old);
                    }
                    write_unsynced(&path, value).map_err(io_at(&path))?;
                }
                None => {
                    if path.exists() {
                        to_wipe.push(path);
                    }
                }
            }
        }
        for space in &dropped_spaces {
            // Whatever else is in the space, leftovers of a crash included.
            for e in fs::read_dir(self.root.join(space))
                .into_iter()
                .flatten()
                .flatten()
            {
                if !to_wipe.contains(&e.path()) && e.path().is_file() {
                    to_wipe.push(e.path());
                }
            }
        }
        // The new versions are durable before any old one is touched, so a
        // power cut never leaves a value with neither version.
        sync_file_system(&self.root).map_err(io_at(&self.root))?;
        // Phase 2: the replaced and deleted bytes become zeros on disk.
        for p in &to_wipe {
            overwrite(p).map_err(io_at(p))?;
        }
        sync_file_system(&self.root).map_err(io_at(&self.root))?;
        // Phase 3: only zeros are left to unlink. (An unlink lost to a power
        // cut leaves a zero-filled file, which loading skips.)
        for p in &to_wipe {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(p)(e)),
            }
        }
        for space in dropped_spaces {
            let dir = self.root.join(&space);
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&dir)(e)),
            }
        }
        Ok(())
    }

    /// Wipes what a crash left behind: temporary files of unfinished writes
    /// and old versions that were never wiped.
    fn recover(&self) -> Result<()> {
        let Ok(spaces) = fs::read_dir(&self.root) else {
            return Ok(());
        };
        for dir in spaces.flatten().filter(|e| e.path().is_dir()) {
            for e in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix('.') else {
                    continue;
                };
                let p = e.path();
                if let Some(key) = rest.strip_suffix(".old") {
                    discard_leftover(&p, &dir.path().join(key)).map_err(io_at(&p))?;
                } else if rest.ends_with(".tmp") {
                    wipe(&p).map_err(io_at(&p))?;
                }
            }
        }
        Ok(())
    }

    /// The spaces whose names start with `prefix`, sorted.
    pub fn spaces(&self, prefix: &str) -> Result<Vec<String>> {
        let entries = fs::read_dir(&self.root).map_err(io_at(&self.root))?;
        let mut spaces: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|s| s.starts_with(prefix) && check_name(s).is_ok())
            .collect();
        spaces.sort();
        Ok(spaces)
    }

    /// Wipes every value of a space and removes it.
    pub fn delete_space(&self, space: &str) -> Result<()> {
        for key in self.keys(space)? {
            self.delete(space, &key)?;
        }
        let dir = self.root.join(space);
        for leftover in fs::read_dir(&dir).into_iter().flatten().flatten() {
            wipe(&leftover.path()).map_err(io_at(&leftover.path()))?;
        }
        match fs::remove_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&dir)(e)),
        }
    }
}

/// One write of a batch (see [`ErasableStore::apply`]).
#[derive(Debug)]
pub enum Op {
    Put {
        space: String,
        key: String,
        value: Vec<u8>,
    },
    Delete {
        space: String,
        key: String,
    },
    DeleteSpace {
        space: String,
    },
}

/// Removes an old version left by a crash. If it is still the live value
/// (the crash came between linking and replacing), only the extra name goes;
/// otherwise its bytes are wiped.
fn discard_leftover(old: &Path, live: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(a), Ok(b)) = (fs::metadata(old), fs::metadata(live))
            && (a.dev(), a.ino()) == (b.dev(), b.ino())
        {
            return fs::remove_file(old);
        }
    }
    wipe(old)
}

/// Writes a new version under a temporary name and renames it into place;
/// the caller syncs.
fn write_unsynced(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        opts.open(&tmp)?.write_all(contents)?;
    }
    fs::rename(&tmp, path)
}

/// Overwrites a file's bytes in place with zeros; the caller syncs.
fn overwrite(path: &Path) -> io::Result<()> {
    let len = fs::metadata(path)?.len();
    zero_fill(&mut fs::OpenOptions::new().write(true).open(path)?, len)
}

/// Writes `len` zeros from the file's current position; the caller syncs.
pub(crate) fn zero_fill(f: &mut fs::File, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Makes everything written under `root` durable: one `syncfs` on Linux
/// (one journal commit for the whole batch), a sync of each file elsewhere.
fn sync_file_system(root: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let dir = fs::File::open(root)?;
        // SAFETY: syncfs(2) on a descriptor we own for the whole call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        fn walk(p: &Path) -> io::Result<()> {
            for e in fs::read_dir(p)? {
                let e = e?;
                if e.file_type()?.is_dir() {
                    walk(&e.path())?;
                } else {
                    fs::File::open(e.path())?.sync_all()?;
                }
            }
            fs::File::open(p)?.sync_all()
        }
        walk(root)
    }
}

/// Overwrites a file's bytes in place with zeros, syncs, then unlinks it
/// and syncs its directory.
fn wipe(path: &Path) -> io::Result<()> {
    let len = fs::metadata(path)?.len();
    {
        let mut f = fs::OpenOptions::new().write(true).open(path)?;
        zero_fill(&mut f, len)?;
        f.sync_all()?;
    }
    fs::remove_file(path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::files_containing;
    use std::io::{Read, Seek, SeekFrom};

    const MARKER: &[u8] = b"ZEBRA-SECRET-MARKER-0123456789";

    /// Every file under `dir` that contains `needle`.
    #[test]
    fn values_round_trip_and_list_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let s = ErasableStore::open(tmp.path().join("e")).unwrap();
        s.put("chat-1", "m-002", b"two").unwrap();
        s.put("chat-1", "m-001", b"one").unwrap();
        s.put("chat-1", "m-001", b"uno").unwrap();
        assert_eq!(
            s.get("chat-1", "m-001").unwrap().as_deref(),
            Some(&b"uno"[..])
        );
        assert_eq!(s.keys("chat-1").unwrap(), ["m-001", "m-002"]);
        assert_eq!(s.get("chat-1", "m-404").unwrap(), None);
        assert!(s.keys("nothing-here").unwrap().is_empty());
    }

    #[test]
    fn a_deleted_value_is_overwritten_before_it_is_unlinked() {
        let tmp = tempfile::tempdir().unwrap();
        let s = ErasableStore::open(tmp.path().join("e")).unwrap();
        s.put("chat", "m", MARKER).unwrap();
        // Hold the file open across the delete: its blocks must read zero.
        let mut held = fs::File::open(tmp.path().join("e/chat/m")).unwrap();
        assert!(s.delete("chat", "m").unwrap());
        held.seek(SeekFrom::Start(0)).unwrap();
        let mut after = Vec::new();
        held.read_to_end(&mut after).unwrap();
        assert_eq!(after.len(), MARKER.len());
        assert!(
            after.iter().all(|&b| b == 0),
            "old bytes still readable: {after:?}"
        );
        assert!(files_containing(tmp.path(), MARKER).is_empty());
        assert!(!s.delete("chat", "m").unwrap());
    }

    #[test]
    fn replacing_a_value_wipes_the_old_version() {
        let tmp = tempfile::tempdir().unwrap();
        let s = ErasableStore::open(tmp.path().join("e")).unwrap();
        s.put("chat", "meta", MARKER).unwrap();
        let mut held = fs::File::open(tmp.path().join("e/chat/meta")).unwrap();
        s.put("chat", "meta", b"edited").unwrap();
        let mut old = Vec::new();
        held.read_to_end(&mut old).unwrap();
        assert!(
            old.iter().all(|&b| b == 0),
            "previous version still readable"
        );
        assert!(files_containing(tmp.path(), MARKER).is_empty());
        assert_eq!(
            s.get("chat", "meta").unwrap().as_deref(),
            Some(&b"edited"[..])
        );
    }

    #[test]
    fn a_batch_writes_replaces_and_wipes_like_single_operations() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ErasableStore::open(tmp.path().join("e")).unwrap();
        store.put("chat", "old", b"REPLACED-SECRET-1").unwrap();
        store.put("chat", "gone", b"DELETED-SECRET-22").unwrap();
        store.put("other", "x", b"IN-A-DROPPED-SPACE").unwrap();
        let held_old = fs::File::open(tmp.path().join("e/chat/old")).unwrap();
        let held_gone = fs::File::open(tmp.path().join("e/chat/gone")).unwrap();
        let put = |s: &str, k: &str, v: &[u8]| Op::Put {
            space: s.into(),
            key: k.into(),
            value: v.to_vec(),
        };
        store
            .apply(vec![
                put("chat", "old", b"first new"),
                put("chat", "old", b"second new"),
                put("chat", "new", b"fresh"),
                put("chat", "gone", b"briefly back"),
                Op::Delete {
                    space: "chat".into(),
                    key: "gone".into(),
                },
                Op::DeleteSpace {
                    space: "other".into(),
                },
            ])
            .unwrap();
        assert_eq!(store.get("chat", "old").unwrap().unwrap(), b"second new");
        assert_eq!(store.get("chat", "new").unwrap().unwrap(), b"fresh");
        assert_eq!(store.get("chat", "gone").unwrap(), None);
        assert_eq!(store.keys("chat").unwrap(), ["new", "old"]);
        assert!(!tmp.path().join("e/other").exists());
        // The replaced and the deleted bytes were overwritten, not just unlinked.
        for mut held in [held_old, held_gone] {
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut held, &mut bytes).unwrap();
            assert!(
                bytes.iter().all(|&b| b == 0),
                "old bytes survive: {bytes:?}"
            );
        }
        for needle in ["REPLACED-SECRET", "DELETED-SECRET", "IN-A-DROPPED"] {
            assert!(files_containing(tmp.path(), needle.as_bytes()).is_empty());
        }
        assert!(store.apply(vec![put("../escape", "k", b"v")]).is_err());
    }

    #[test]
    fn leftovers_of_a_crash_are_wiped_at_open_without_touching_live_values() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("e");
        let store = ErasableStore::open(&root).unwrap();
        store.put("chat", "live", b"STILL-CURRENT").unwrap();
        store.put("chat", "other", b"NEW-VERSION").unwrap();
        drop(store);
        // A crash between linking the old version and replacing it…
        fs::hard_link(root.join("chat/live"), root.join("chat/.live.old")).unwrap();
        // …one after replacing but before wiping…
        fs::write(root.join("chat/.other.old"), b"OLD-SECRET-VERSION").unwrap();
        // …and one in the middle of writing a new version.
        fs::write(root.join("chat/.other.tmp"), b"HALF-WRITTEN-SECRET").unwrap();
        let store = ErasableStore::open(&root).unwrap();
        assert_eq!(
            store.get("chat", "live").unwrap().unwrap(),
            b"STILL-CURRENT"
        );
        assert_eq!(store.get("chat", "other").unwrap().unwrap(), b"NEW-VERSION");
        for needle in ["OLD-SECRET", "HALF-WRITTEN"] {
            assert!(files_containing(tmp.path(), needle.as_bytes()).is_empty());
        }
        let names: Vec<_> = fs::read_dir(root.join("chat"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn deleting_a_space_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let s = ErasableStore::open(tmp.path().join("e")).unwrap();
        for i in 0..20 {
            s.put("chat", &format!("m-{i:03}"), MARKER).unwrap();
        }
        s.delete_space("chat").unwrap();
        assert!(!tmp.path().join("e/chat").exists());
        assert!(files_containing(tmp.path(), MARKER).is_empty());
    }

    #[test]
    fn names_from_the_network_cannot_escape_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let s = ErasableStore::open(tmp.path().join("e")).unwrap();
        for bad in [
            "",
            "..",
            "../x",
            "a/b",
            "A",
            "x\0y",
            ".hidden",
            &"a".repeat(MAX_NAME + 1),
        ] {
            assert!(
                matches!(s.put("chat", bad, b"v"), Err(ErasableError::BadName(_))),
                "{bad:?}"
            );
            assert!(
                matches!(s.put(bad, "k", b"v"), Err(ErasableError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            s.put("chat", "k", &vec![0; MAX_VALUE as usize + 1]),
            Err(ErasableError::TooLarge(_))
        ));
        assert!(!tmp.path().join("x").exists());
    }
}
