//! The alternative backend: sled 0.34 (the design card's store), two trees in one database.
//!
//! Every write returns only after `Db::flush` and an fsync of sled's data file. `Db::flush`
//! alone is not enough on Linux: sled 0.34 persists its IO buffers with `sync_file_range`,
//! which writes neither the file's metadata (its growing length) nor the drive's cache.
//! fsync is per file, not per descriptor, so a descriptor of our own does it.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{catch_panic, StorageBackend, StoreError};
use crate::failpoint::{self, Failpoints};

/// The directory under the data directory.
pub const DIR: &str = "raft.sled";

pub struct SledBackend {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// sled's data file, opened again only to fsync it.
    data_file: File,
    failpoints: Failpoints,
}

fn key(index: u64) -> [u8; 8] {
    // Big-endian so that byte order is index order.
    index.to_be_bytes()
}

fn index_of(bytes: &[u8]) -> Result<u64, StoreError> {
    let raw: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Decode {
        what: "log index",
        message: format!("{} bytes, expected 8", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(raw))
}

impl SledBackend {
    /// Opens (or creates) `dir/raft.sled`. Waits up to 5 s for a previous owner of the files
    /// (a process or node being shut down) to release its lock.
    pub fn open(dir: &Path, failpoints: Failpoints) -> Result<Self, StoreError> {
        let path = dir.join(DIR);
        let open_err = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let config = sled::Config::new().path(&path).cache_capacity(64 << 20);
        let deadline = Instant::now() + Duration::from_secs(5);
        let db = loop {
            // sled 0.34 panics on some damaged files (spacejam/sled#1145): a typed error instead.
            match catch_panic(|| config.open()).map_err(&open_err)? {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(open_err(e.to_string())),
            }
        };
        let log = db.open_tree("raft_log").map_err(|e| open_err(e.to_string()))?;
        let meta = db.open_tree("raft_meta").map_err(|e| open_err(e.to_string()))?;
        let data_file = File::open(path.join("db")).map_err(|e| open_err(format!("opening sled's data file: {e}")))?;
        Ok(Self {
            db,
            log,
            meta,
            data_file,
            failpoints,
        })
    }

    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(StoreError::io)?;
        self.data_file.sync_all().map_err(StoreError::io)
    }

    fn remove_range(&self, range: impl std::ops::RangeBounds<[u8; 8]>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(range) {
            let (k, _) = item.map_err(StoreError::io)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(StoreError::io)?;
        self.flush()
    }
}

impl StorageBackend for SledBackend {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self.meta.get(key).map_err(StoreError::io)?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta.insert(key, value).map_err(StoreError::io)?;
        self.flush()
    }

    fn put_meta_relaxed(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        // Reaches the disk with the next flush (every append flushes).
        self.meta.insert(key, value).map_err(StoreError::io).map(|_| ())
    }

    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (index, bytes) in entries {
            batch.insert(&key(*index)[..], bytes.as_slice());
        }
        self.log.apply_batch(batch).map_err(StoreError::io)?;
        self.failpoints
            .hit_blocking(failpoint::APPEND_BEFORE_FLUSH)
            .map_err(StoreError::io)?;
        self.flush()
    }

    fn range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if start >= end {
            return Ok(Vec::new());
        }
        self.log
            .range(key(start)..key(end))
            .map(|item| {
                let (k, v) = item.map_err(StoreError::io)?;
                Ok((index_of(&k)?, v.to_vec()))
            })
            .collect()
    }

    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        match self.log.last().map_err(StoreError::io)? {
            Some((k, v)) => Ok(Some((index_of(&k)?, v.to_vec()))),
            None => Ok(None),
        }
    }

    fn truncate_from(&self, index: u64) -> Result<(), StoreError> {
        self.remove_range(key(index)..)
    }

    fn purge_through(&self, index: u64) -> Result<(), StoreError> {
        self.remove_range(..=key(index))
    }
}
