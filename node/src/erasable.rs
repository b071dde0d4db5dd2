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
        Ok(Self { root })
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
            wipe(&old).map_err(io_at(&old))?;
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

/// Overwrites a file's bytes in place with zeros, syncs, then unlinks it
/// and syncs its directory.
fn wipe(path: &Path) -> io::Result<()> {
    let len = fs::metadata(path)?.len();
    {
        let mut f = fs::OpenOptions::new().write(true).open(path)?;
        let zeros = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
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
    use std::io::{Read, Seek, SeekFrom};

    const MARKER: &[u8] = b"ZEBRA-SECRET-MARKER-0123456789";

    /// Every file under `dir` that contains `needle`.
    fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if fs::read(&p)
                    .unwrap()
                    .windows(needle.len())
                    .any(|w| w == needle)
                {
                    found.push(p);
                }
            }
        }
        found
    }

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
