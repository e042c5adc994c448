//! Durable Raft storage: one backend trait (`StorageBackend`), the redb backend, and openraft's
//! log-storage and state-machine traits implemented on top of any backend.
//!
//! Durability contract: every `StorageBackend` write returns only after the data is on disk
//! (redb commits with `Durability::Immediate`, i.e. fsync), so a vote or an append is flushed
//! before openraft acknowledges it to a peer.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, IOFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::{OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, RwLock};

use crate::state::ClusterState;
use crate::types::{CommandResponse, TypeConfig};

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("storage I/O: {0}")]
    Io(String),
    #[error("decoding stored {what}: {message}")]
    Decode { what: &'static str, message: String },
}

impl StoreError {
    fn io(e: impl std::fmt::Display) -> Self {
        StoreError::Io(e.to_string())
    }
}

impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Decode { .. } => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            _ => io::Error::other(e.to_string()),
        }
    }
}

/// What the Raft layer needs from a disk: a log keyed by index and a few named values
/// (vote, committed id, purge point, snapshot). All writes are durable when they return.
pub trait StorageBackend: Send + Sync + 'static {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError>;
    /// Entries with index in `[start, end)`, in order.
    fn range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Removes entries with index >= `index`.
    fn truncate_from(&self, index: u64) -> Result<(), StoreError>;
    /// Removes entries with index <= `index`.
    fn purge_through(&self, index: u64) -> Result<(), StoreError>;
}

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

/// The default backend: redb, one file, copy-on-write B-trees, fsync on every commit.
pub struct RedbBackend {
    db: redb::Database,
}

impl RedbBackend {
    /// Opens (or creates) `dir/raft.redb`. Waits up to 5 s for a previous owner of the file
    /// (a process or node being shut down) to release it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("raft.redb");
        let open_err = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let db = loop {
            match redb::Database::create(&path) {
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
        Ok(Self { db })
    }

    fn write(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(StoreError::io)?;
        f(&txn).map_err(StoreError::io)?;
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
        self.write(|txn| {
            txn.open_table(META)?.insert(key, value)?;
            Ok(())
        })
    }

    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.write(|txn| {
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
        self.write(|txn| {
            txn.open_table(LOG)?.retain_in(index.., |_, _| false)?;
            Ok(())
        })
    }

    fn purge_through(&self, index: u64) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(LOG)?.retain_in(..=index, |_, _| false)?;
            Ok(())
        })
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, io::Error> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, bytes: &[u8]) -> Result<T, io::Error> {
    serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Decode {
            what,
            message: e.to_string(),
        }
        .into()
    })
}

/// Runs a blocking backend call off the async threads (fsync can take milliseconds).
async fn blocking<T: Send + 'static>(
    backend: &Arc<dyn StorageBackend>,
    f: impl FnOnce(&dyn StorageBackend) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, io::Error> {
    let backend = Arc::clone(backend);
    tokio::task::spawn_blocking(move || f(backend.as_ref()))
        .await
        .map_err(io::Error::other)?
        .map_err(io::Error::from)
}

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "purged";
const KEY_SNAPSHOT: &str = "snapshot";

/// openraft's log storage on a `StorageBackend`.
#[derive(Clone)]
pub struct LogStore {
    backend: Arc<dyn StorageBackend>,
}

impl LogStore {
    pub fn new(backend: Arc<dyn StorageBackend>) -> Self {
        Self { backend }
    }

    async fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &'static str) -> Result<Option<T>, io::Error> {
        let bytes = blocking(&self.backend, move |b| b.get_meta(key)).await?;
        bytes.map(|b| decode(key, &b)).transpose()
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), io::Error> {
        let bytes = encode(value)?;
        blocking(&self.backend, move |b| b.put_meta(key, &bytes)).await
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.saturating_add(1),
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        let rows = blocking(&self.backend, move |b| b.range(start, end)).await?;
        rows.iter().map(|(_, bytes)| decode("log entry", bytes)).collect()
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.get_meta(KEY_VOTE).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogIdOf<TypeConfig>> = self.get_meta(KEY_PURGED).await?;
        let last = blocking(&self.backend, |b| b.last()).await?;
        let last_log_id = match last {
            Some((_, bytes)) => Some(decode::<Entry>("log entry", &bytes)?.log_id()),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        self.put_meta(KEY_VOTE, vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        self.put_meta(KEY_COMMITTED, &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self
            .get_meta::<Option<LogIdOf<TypeConfig>>>(KEY_COMMITTED)
            .await?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| Ok((e.index(), encode(&e)?)))
            .collect::<Result<_, io::Error>>()?;
        let result = blocking(&self.backend, move |b| b.append(&rows)).await;
        // Only now is the data on disk: acknowledge the flush to openraft.
        match result {
            Ok(()) => {
                callback.io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        blocking(&self.backend, move |b| b.truncate_from(from)).await
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        // Record the purge point first: entries left behind by a crash are below it and ignored.
        self.put_meta(KEY_PURGED, &log_id).await?;
        let index = log_id.index();
        blocking(&self.backend, move |b| b.purge_through(index)).await
    }
}

/// The state machine data plus what Raft needs to resume it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogIdOf<TypeConfig>>,
    last_membership: StoredMembershipOf<TypeConfig>,
    state: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
}

/// The state machine: applied state in memory, snapshots on disk; on restart the last snapshot is
/// loaded and openraft re-applies the committed log after it.
#[derive(Clone)]
pub struct StateMachineStore {
    backend: Arc<dyn StorageBackend>,
    applied: Arc<RwLock<Applied>>,
    epoch_tx: Arc<watch::Sender<u64>>,
}

pub type Snapshot = SnapshotOf<TypeConfig, Vec<u8>>;

impl StateMachineStore {
    pub async fn open(backend: Arc<dyn StorageBackend>) -> Result<Self, io::Error> {
        let stored = blocking(&backend, |b| b.get_meta(KEY_SNAPSHOT)).await?;
        let applied = match stored {
            Some(bytes) => {
                let snap: StoredSnapshot = decode("snapshot", &bytes)?;
                decode::<Applied>("snapshot data", &snap.data)?
            }
            None => Applied::default(),
        };
        let (epoch_tx, _) = watch::channel(applied.state.current_epoch());
        Ok(Self {
            backend,
            applied: Arc::new(RwLock::new(applied)),
            epoch_tx: Arc::new(epoch_tx),
        })
    }

    /// A copy of the applied state (reads are local; callers decide on linearizability).
    pub async fn state(&self) -> ClusterState {
        self.applied.read().await.state.clone()
    }

    /// Reads the applied state through `f` without copying it.
    pub async fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.applied.read().await.state)
    }

    /// The epoch of the latest applied plan, updated as plans are applied.
    pub fn watch_epoch(&self) -> watch::Receiver<u64> {
        self.epoch_tx.subscribe()
    }

    fn publish_epoch(&self, epoch: u64) {
        self.epoch_tx.send_if_modified(|e| {
            let changed = *e != epoch;
            *e = epoch;
            changed
        });
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (data, meta) = {
            let applied = self.applied.read().await;
            let meta = SnapshotMetaOf::<TypeConfig> {
                last_log_id: applied.last_applied,
                last_membership: applied.last_membership.clone(),
            };
            (encode(&*applied)?, meta)
        };
        let stored = encode(&StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })?;
        blocking(&self.backend, move |b| b.put_meta(KEY_SNAPSHOT, &stored)).await?;
        Ok(Snapshot { meta, snapshot: data })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        let a = self.applied.read().await;
        Ok((a.last_applied, a.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut applied = self.applied.write().await;
        while let Some((entry, responder)) = entries.try_next().await? {
            let log_id = entry.log_id();
            let index = log_id.index();
            let response = match entry.payload {
                openraft::EntryPayload::Blank => CommandResponse::Applied,
                openraft::EntryPayload::Normal(cmd) => applied.state.apply(index, cmd),
                openraft::EntryPayload::Membership(m) => {
                    applied.last_membership = StoredMembershipOf::<TypeConfig>::new(Some(log_id), m);
                    CommandResponse::Applied
                }
            };
            applied.last_applied = Some(log_id);
            if let Some(r) = responder {
                r.send(response);
            }
        }
        self.publish_epoch(applied.state.current_epoch());
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let new: Applied = decode("snapshot data", &snapshot)?;
        let stored = encode(&StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        })?;
        blocking(&self.backend, move |b| b.put_meta(KEY_SNAPSHOT, &stored)).await?;
        let epoch = new.state.current_epoch();
        *self.applied.write().await = new;
        self.publish_epoch(epoch);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let stored = blocking(&self.backend, |b| b.get_meta(KEY_SNAPSHOT)).await?;
        stored
            .map(|bytes| {
                let s: StoredSnapshot = decode("snapshot", &bytes)?;
                Ok(Snapshot {
                    meta: s.meta,
                    snapshot: s.data,
                })
            })
            .transpose()
    }
}
