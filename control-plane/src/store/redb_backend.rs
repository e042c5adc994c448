//! The default backend: redb, one file, copy-on-write B-trees, fsync on every commit.

use std::path::Path;
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{catch_panic, StorageBackend, StoreError};
use crate::failpoint::{self, Failpoints};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

/// The file under the data directory.
pub const FILE: &str = "raft.redb";

pub struct RedbBackend {
    db: redb::Database,
    failpoints: Failpoints,
}

impl RedbBackend {
    /// Opens (or creates) `dir/raft.redb`. Waits up to 5 s for a previous owner of the file
    /// (a process or node being shut down) to release it.
    pub fn open(dir: &Path, failpoints: Failpoints) -> Result<Self, StoreError> {
        let path = dir.join(FILE);
        let open_err = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let db = loop {
            match catch_panic(|| redb::Database::create(&path)).map_err(&open_err)? {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(open_err(e.to_string())),
            }
        };
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        txn.open_table(LOG).map_err(|e| open_err(e.to_string()))?;
        txn.open_table(META).map_err(|e| open_err(e.to_string()))?;
        txn.commit().map_err(|e| open_err(e.to_string()))?;
        Ok(Self { db, failpoints })
    }

    /// One transaction, committed with redb's default `Durability::Immediate` (fsync).
    fn write(
        &self,
        before_flush: Option<&'static str>,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(StoreError::io)?;
        f(&txn).map_err(StoreError::io)?;
        if let Some(point) = before_flush {
            self.failpoints.hit_blocking(point).map_err(StoreError::io)?;
        }
        txn.commit().map_err(StoreError::io)
    }
}

impl StorageBackend for RedbBackend {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::io)?;
        let table = txn.open_table(META).map_err(StoreError::io)?;
        let value = table.get(key).map_err(StoreError::io)?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(None, |txn| {
            txn.open_table(META)?.insert(key, value)?;
            Ok(())
        })
    }

    fn put_meta_relaxed(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(StoreError::io)?;
        txn.set_durability(redb::Durability::None).map_err(StoreError::io)?;
        {
            let mut table = txn.open_table(META).map_err(StoreError::io)?;
            table.insert(key, value).map_err(StoreError::io)?;
        }
        txn.commit().map_err(StoreError::io)
    }

    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.write(Some(failpoint::APPEND_BEFORE_FLUSH), |txn| {
            let mut table = txn.open_table(LOG)?;
            for (index, bytes) in entries {
                table.insert(index, bytes.as_slice())?;
            }
            Ok(())
        })
    }

    fn range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::io)?;
        let table = txn.open_table(LOG).map_err(StoreError::io)?;
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        for item in table.range(start..end).map_err(StoreError::io)? {
            let (k, v) = item.map_err(StoreError::io)?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read().map_err(StoreError::io)?;
        let table = txn.open_table(LOG).map_err(StoreError::io)?;
        let last = table.last().map_err(StoreError::io)?;
        Ok(last.map(|(k, v)| (k.value(), v.value().to_vec())))
    }

    fn truncate_from(&self, index: u64) -> Result<(), StoreError> {
        self.write(None, |txn| {
            txn.open_table(LOG)?.retain_in(index.., |_, _| false)?;
            Ok(())
        })
    }

    fn purge_through(&self, index: u64) -> Result<(), StoreError> {
        self.write(None, |txn| {
            txn.open_table(LOG)?.retain_in(..=index, |_, _| false)?;
            Ok(())
        })
    }
}
