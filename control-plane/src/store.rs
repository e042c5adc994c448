//! Durable Raft storage: one backend trait (`StorageBackend`), two backends (redb, the default,
//! and sled, picked with `StorageKind`), and openraft's log-storage and state-machine traits
//! implemented on top of any backend.
//!
//! Durability contract: every `StorageBackend` write returns only after the data is on disk
//! (redb commits with `Durability::Immediate`; sled flushes and fsyncs), so a vote or an append
//! is flushed before openraft acknowledges it to a peer. A failed write is an error that stops
//! Raft on this node (see `node`), never a silent success.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use futures_util::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, IOFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::{OptionalSend, RaftLogReader, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, RwLock};

use crate::failpoint::{self, Failpoints};
use crate::state::ClusterState;
use crate::types::{CommandResponse, TypeConfig};

mod redb_backend;
mod sled_backend;
mod wal_backend;

pub use redb_backend::RedbBackend;
pub use sled_backend::SledBackend;
pub use wal_backend::WalBackend;

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

/// Runs a third-party open that may panic on a damaged file; the panic becomes an error message.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        format!("the store is damaged (the storage engine panicked: {what})")
    })
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
/// (vote, committed id, purge point, snapshot). All writes are durable when they return, except
/// [`StorageBackend::put_meta_relaxed`].
pub trait StorageBackend: Send + Sync + 'static {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// A named value that may be lost in a crash (it becomes durable with the next durable
    /// write): only for values whose loss is safe, i.e. the committed log id, which Raft
    /// re-learns from the leader and which only spares re-applying entries after a restart.
    fn put_meta_relaxed(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put_meta(key, value)
    }
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError>;
    /// Entries with index in `[start, end)`, in order.
    fn range(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Removes entries with index >= `index`.
    fn truncate_from(&self, index: u64) -> Result<(), StoreError>;
    /// Removes entries with index <= `index`.
    fn purge_through(&self, index: u64) -> Result<(), StoreError>;
}

/// Which backend a node stores its log, vote and state machine in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StorageKind {
    /// redb: durable commits by default, passes the crash tests; the default.
    #[default]
    Redb,
    /// sled 0.34, the design card's choice (see docs/ARCHITECTURE.md for why it is not default).
    Sled,
    /// The log in preallocated append-only segment files with one `fdatasync` per append
    /// (etcd's WAL layout), the named values in redb: the lowest commit latency.
    Wal,
}

impl StorageKind {
    pub const ALL: [StorageKind; 3] = [StorageKind::Redb, StorageKind::Sled, StorageKind::Wal];

    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Redb => "redb",
            StorageKind::Sled => "sled",
            StorageKind::Wal => "wal",
        }
    }

    /// What this kind keeps under the data directory.
    fn file_name(self) -> &'static str {
        match self {
            StorageKind::Redb => redb_backend::FILE,
            StorageKind::Sled => sled_backend::DIR,
            StorageKind::Wal => wal_backend::DIR,
        }
    }
}

impl std::fmt::Display for StorageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown storage backend {0:?} (redb, sled, wal)")]
pub struct UnknownStorageKind(String);

impl FromStr for StorageKind {
    type Err = UnknownStorageKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "redb" => Ok(StorageKind::Redb),
            "sled" => Ok(StorageKind::Sled),
            "wal" => Ok(StorageKind::Wal),
            _ => Err(UnknownStorageKind(s.to_string())),
        }
    }
}

/// Opens the `kind` store under `dir`. Refuses a directory that holds the other kind's store:
/// starting a voter on an empty log next to its real one would let it vote as if it had lost
/// its disk.
pub fn open_backend(
    kind: StorageKind,
    dir: &Path,
    failpoints: Failpoints,
) -> Result<Arc<dyn StorageBackend>, StoreError> {
    for other in StorageKind::ALL {
        let path = dir.join(other.file_name());
        if other != kind && path.exists() {
            return Err(StoreError::Open {
                path: dir.join(kind.file_name()).display().to_string(),
                message: format!(
                    "{} already holds a {other} store; start this node with --storage {other}, or move it away",
                    path.display()
                ),
            });
        }
    }
    Ok(match kind {
        StorageKind::Redb => Arc::new(RedbBackend::open(dir, failpoints)?),
        StorageKind::Sled => Arc::new(SledBackend::open(dir, failpoints)?),
        StorageKind::Wal => Arc::new(WalBackend::open(dir, failpoints)?),
    })
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
    failpoints: Failpoints,
}

impl LogStore {
    pub fn new(backend: Arc<dyn StorageBackend>, failpoints: Failpoints) -> Self {
        Self { backend, failpoints }
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
        self.failpoints.hit(failpoint::VOTE_BEFORE_WRITE).await?;
        self.put_meta(KEY_VOTE, vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        // Not fsynced: it was one of the two fsyncs of every write on every node, and losing it
        // in a crash is safe (the id is never ahead of what is committed, and Raft re-learns
        // it). Acknowledged writes stay durable through the log append.
        let bytes = encode(&committed)?;
        blocking(&self.backend, move |b| b.put_meta_relaxed(KEY_COMMITTED, &bytes)).await
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
        let failpoints = self.failpoints.clone();
        let result = async {
            failpoints.hit(failpoint::APPEND_BEFORE_WRITE).await?;
            blocking(&self.backend, move |b| b.append(&rows)).await?;
            failpoints.hit(failpoint::APPEND_BEFORE_ACK).await
        }
        .await;
        // Only now is the data on disk: acknowledge the flush to openraft. An error stops Raft
        // on this node; the entries are never acknowledged.
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
    failpoints: Failpoints,
}

pub type Snapshot = SnapshotOf<TypeConfig, Vec<u8>>;

impl StateMachineStore {
    pub async fn open(backend: Arc<dyn StorageBackend>, failpoints: Failpoints) -> Result<Self, io::Error> {
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
            failpoints,
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
        self.failpoints.hit(failpoint::APPLY_BEFORE).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [StorageKind; 3] = StorageKind::ALL;

    fn exercise(b: &dyn StorageBackend) {
        let rows: Vec<(u64, Vec<u8>)> = (1..=10).map(|i| (i, format!("entry {i}").into_bytes())).collect();
        b.append(&rows).unwrap();
        assert_eq!(b.range(3, 6).unwrap(), rows[2..5].to_vec());
        assert!(b.range(6, 3).unwrap().is_empty());
        assert_eq!(b.last().unwrap(), Some(rows[9].clone()));
        b.truncate_from(8).unwrap();
        assert_eq!(b.last().unwrap(), Some(rows[6].clone()));
        b.purge_through(2).unwrap();
        assert_eq!(b.range(0, u64::MAX).unwrap(), rows[2..7].to_vec());
        b.put_meta("vote", b"v1").unwrap();
        b.put_meta("vote", b"v2").unwrap();
        assert_eq!(b.get_meta("vote").unwrap().as_deref(), Some(&b"v2"[..]));
        assert_eq!(b.get_meta("nothing").unwrap(), None);
    }

    #[test]
    fn both_backends_keep_the_log_and_meta_across_reopen() {
        for kind in KINDS {
            let dir = tempfile::tempdir().unwrap();
            {
                let b = open_backend(kind, dir.path(), Failpoints::default()).unwrap();
                exercise(b.as_ref());
            }
            let b = open_backend(kind, dir.path(), Failpoints::default()).unwrap();
            assert_eq!(b.range(0, u64::MAX).unwrap().len(), 5, "{kind}");
            assert_eq!(b.last().unwrap().map(|(i, _)| i), Some(7), "{kind}");
            assert_eq!(b.get_meta("vote").unwrap().as_deref(), Some(&b"v2"[..]), "{kind}");
        }
    }

    #[test]
    fn damaged_store_files_are_a_typed_error() {
        for kind in KINDS {
            let dir = tempfile::tempdir().unwrap();
            let garbage: Vec<u8> = (0..64 * 1024u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            match kind {
                StorageKind::Redb => std::fs::write(dir.path().join(redb_backend::FILE), &garbage).unwrap(),
                StorageKind::Sled => {
                    let d = dir.path().join(sled_backend::DIR);
                    std::fs::create_dir_all(&d).unwrap();
                    std::fs::write(d.join("conf"), &garbage[..512]).unwrap();
                    std::fs::write(d.join("db"), &garbage).unwrap();
                }
                StorageKind::Wal => {
                    let d = dir.path().join(wal_backend::DIR);
                    std::fs::create_dir_all(&d).unwrap();
                    std::fs::write(d.join(redb_backend::FILE), &garbage).unwrap();
                }
            }
            let err = open_backend(kind, dir.path(), Failpoints::default()).err();
            assert!(matches!(err, Some(StoreError::Open { .. })), "{kind}: {err:?}");
        }
    }

    #[test]
    fn a_directory_keeps_its_backend() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_backend(StorageKind::Redb, dir.path(), Failpoints::default()).unwrap());
        let err = open_backend(StorageKind::Sled, dir.path(), Failpoints::default()).err();
        assert!(
            matches!(&err, Some(StoreError::Open { message, .. }) if message.contains("--storage redb")),
            "{err:?}"
        );
        assert_eq!("SLED".parse::<StorageKind>(), Ok(StorageKind::Sled));
        assert!("rocksdb".parse::<StorageKind>().is_err());
    }

    #[test]
    fn an_injected_flush_failure_fails_the_append_and_keeps_nothing() {
        for kind in KINDS {
            let dir = tempfile::tempdir().unwrap();
            let fp = Failpoints::enabled("append-before-flush=error").unwrap();
            {
                let b = open_backend(kind, dir.path(), fp.clone()).unwrap();
                assert!(b.append(&[(1, b"x".to_vec())]).is_err(), "{kind}");
            }
            if kind == StorageKind::Redb {
                // An uncommitted redb transaction is rolled back; sled keeps the buffered
                // write in memory (and may flush it later), which is why a failed append stops
                // Raft on the node instead of carrying on.
                let b = open_backend(kind, dir.path(), Failpoints::default()).unwrap();
                assert_eq!(b.last().unwrap(), None);
            }
        }
    }
}
