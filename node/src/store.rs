//! The node's store. This is the only module that knows the backend (sled);
//! everything else sees named keyspaces of bytes.
//!
//! Durability rule: a write that anyone (a peer or the user) will be told
//! about goes through a `*_durable` method, which returns only after the
//! backend has flushed it to disk. Concurrent durable writes share flushes
//! (group commit), so many in flight cost about one fsync.

use std::{path::Path, sync::Arc};

use tokio::sync::Notify;

use tern_protocol::{DecodeError, Record};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store error: {0}")]
    Backend(#[from] sled::Error),
    #[error("stored record under {key} is damaged: {source}")]
    Damaged { key: String, source: DecodeError },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The whole store: a set of named keyspaces.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    flush_wanted: Arc<Notify>,
}

impl Store {
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            // Background flushes bound how much buffered (non-durable) data a
            // crash can lose; durable writes do not wait for them.
            .flush_every_ms(Some(500))
            .open()?;
        Ok(Self {
            db,
            flush_wanted: Arc::new(Notify::new()),
        })
    }

    pub fn keyspace(&self, name: &str) -> Result<Keyspace> {
        Ok(Keyspace {
            tree: self.db.open_tree(name)?,
            db: self.db.clone(),
            flush_wanted: self.flush_wanted.clone(),
        })
    }

    /// Flushes everything written so far; returns once it is on disk.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Runs the one task that serves `*_soon` writes: each wake-up flushes
    /// everything written so far, so a burst of writes costs one flush and
    /// the pending work is a single flag, never a queue.
    pub fn spawn_background_flusher(&self) -> tokio::task::JoinHandle<()> {
        let db = self.db.clone();
        let wanted = self.flush_wanted.clone();
        tokio::spawn(async move {
            loop {
                wanted.notified().await;
                if let Err(e) = db.flush_async().await {
                    tracing::warn!("background store flush failed: {e}");
                }
            }
        })
    }
}

/// One named keyspace of the store.
#[derive(Clone)]
pub struct Keyspace {
    tree: sled::Tree,
    db: sled::Db,
    flush_wanted: Arc<Notify>,
}

impl Keyspace {
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    /// Inserts and returns once the write is on disk.
    pub async fn insert_durable(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.tree.insert(key, value)?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Inserts and flushes, blocking the calling thread until the write is
    /// on disk: for a service thread of its own, where a later step must
    /// not happen unless this write survives a crash.
    pub fn insert_now(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.tree.insert(key, value)?;
        self.db.flush()?;
        Ok(())
    }

    /// Inserts and asks the background flusher to flush, without waiting:
    /// on disk within milliseconds, for state the node needs after a crash
    /// (its address book, its ports) but must not block on. Without a
    /// flusher running, sled's periodic flush (500 ms) still applies.
    pub fn insert_soon(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.tree.insert(key, value)?;
        self.flush_in_background();
        Ok(())
    }

    pub fn remove_soon(&self, key: &[u8]) -> Result<()> {
        self.tree.remove(key)?;
        self.flush_in_background();
        Ok(())
    }

    fn flush_in_background(&self) {
        self.flush_wanted.notify_one();
    }

    pub async fn remove_durable(&self, key: &[u8]) -> Result<()> {
        self.tree.remove(key)?;
        self.db.flush_async().await?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// All entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + '_ {
        self.tree
            .iter()
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
    }

    pub fn get_record<R: Record>(&self, key: &[u8]) -> Result<Option<R>> {
        self.get(key)?
            .map(|bytes| {
                R::decode(&bytes).map_err(|source| StoreError::Damaged {
                    key: String::from_utf8_lossy(key).into_owned(),
                    source,
                })
            })
            .transpose()
    }

    pub fn insert_record_soon<R: Record>(&self, key: &[u8], record: &R) -> Result<()> {
        self.insert_soon(key, &record.encode())
    }

    /// Returns once everything written so far (to any keyspace) is on disk.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn durable_writes_survive_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = Store::open(tmp.path(), 1 << 20).unwrap();
            let ks = store.keyspace("k").unwrap();
            ks.insert_durable(b"a", b"1").await.unwrap();
            ks.insert_durable(b"b", b"2").await.unwrap();
            ks.remove_durable(b"a").await.unwrap();
        }
        // sled's own flush thread may hold the file lock for a moment after
        // the drop; wait for it rather than fail on a loaded machine.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let store = loop {
            match Store::open(tmp.path(), 1 << 20) {
                Ok(s) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let ks = store.keyspace("k").unwrap();
        assert_eq!(ks.get(b"a").unwrap(), None);
        assert_eq!(ks.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(ks.len(), 1);
    }

    #[tokio::test]
    async fn damaged_records_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), 1 << 20).unwrap();
        let ks = store.keyspace("k").unwrap();
        ks.insert_durable(b"cert", &[1, 2, 3]).await.unwrap();
        assert!(matches!(
            ks.get_record::<tern_protocol::DeviceCertificate>(b"cert"),
            Err(StoreError::Damaged { .. })
        ));
    }
}
