//! Failpoints: named places on the storage path where a test or a chaos scenario makes a node
//! crash, fail an I/O or stall, to prove that nothing unpersisted is ever acknowledged.
//!
//! Off unless the process asks for them: `MOELESS_FAILPOINTS` set (even to an empty string)
//! enables them, `MOELESS_FAILPOINTS="append-before-flush=abort;vote-before-write=sleep(50)"`
//! also arms some at start, and `PUT /v1/debug/failpoints` (admin token) changes them at run time.
//! Compiled in always, so the chaos suite drives the binary that ships; an unarmed point costs
//! one relaxed atomic load.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The environment variable read by `Failpoints::from_env`.
pub const ENV: &str = "MOELESS_FAILPOINTS";

/// Before a batch of log entries is handed to the backend.
pub const APPEND_BEFORE_WRITE: &str = "append-before-write";
/// Inside the backend: entries written into its buffers (sled) or transaction (redb), not yet
/// flushed to disk.
pub const APPEND_BEFORE_FLUSH: &str = "append-before-flush";
/// Entries flushed to disk, not yet acknowledged to Raft (so not to the leader or a client).
pub const APPEND_BEFORE_ACK: &str = "append-before-ack";
/// Before a vote is saved.
pub const VOTE_BEFORE_WRITE: &str = "vote-before-write";
/// Before a batch of committed entries is applied to the state machine.
pub const APPLY_BEFORE: &str = "apply-before";

/// Every point, in the order a write meets them.
pub const POINTS: &[&str] = &[
    VOTE_BEFORE_WRITE,
    APPEND_BEFORE_WRITE,
    APPEND_BEFORE_FLUSH,
    APPEND_BEFORE_ACK,
    APPLY_BEFORE,
];

/// What a point does when reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Off,
    /// `std::process::abort()`: a crash, no destructor or shutdown path runs.
    Abort,
    /// The storage operation fails with an I/O error, as a failed fsync would.
    Error,
    /// Stall this long, then carry on.
    Sleep(Duration),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Off => f.write_str("off"),
            Action::Abort => f.write_str("abort"),
            Action::Error => f.write_str("error"),
            Action::Sleep(d) => write!(f, "sleep({})", d.as_millis()),
        }
    }
}

impl FromStr for Action {
    type Err = FailpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || FailpointError::BadAction(s.to_string());
        match s.trim() {
            "off" => Ok(Action::Off),
            "abort" => Ok(Action::Abort),
            "error" => Ok(Action::Error),
            other => {
                let ms = other
                    .strip_prefix("sleep(")
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(bad)?;
                let ms: u64 = ms.trim().parse().map_err(|_| bad())?;
                Ok(Action::Sleep(Duration::from_millis(ms)))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailpointError {
    #[error("unknown failpoint {0:?} (known: {known})", known = POINTS.join(", "))]
    UnknownPoint(String),
    #[error("unknown failpoint action {0:?} (off, abort, error, sleep(MS))")]
    BadAction(String),
    #[error("failpoint setting {0:?} is not NAME=ACTION")]
    Malformed(String),
    #[error("failpoints are disabled; start the node with {ENV} set (it may be empty) to enable them")]
    Disabled,
}

#[derive(Debug, Default)]
struct Inner {
    enabled: bool,
    /// True while any point has an action other than `Off`: the fast path reads only this.
    armed: AtomicBool,
    actions: RwLock<BTreeMap<&'static str, Action>>,
}

/// A node's failpoints; cheap to clone (shared). `Default` is disabled.
#[derive(Debug, Clone, Default)]
pub struct Failpoints {
    inner: Arc<Inner>,
}

/// Parses `NAME=ACTION;NAME=ACTION` (empty parts ignored).
pub fn parse_spec(spec: &str) -> Result<Vec<(&'static str, Action)>, FailpointError> {
    spec.split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (name, action) = part
                .split_once('=')
                .ok_or_else(|| FailpointError::Malformed(part.to_string()))?;
            parse_setting(name, action)
        })
        .collect()
}

/// Checks one `NAME`, `ACTION` pair.
pub fn parse_setting(name: &str, action: &str) -> Result<(&'static str, Action), FailpointError> {
    Ok((point(name.trim())?, action.parse()?))
}

fn point(name: &str) -> Result<&'static str, FailpointError> {
    POINTS
        .iter()
        .copied()
        .find(|p| *p == name)
        .ok_or_else(|| FailpointError::UnknownPoint(name.to_string()))
}

impl Failpoints {
    /// Enabled, with the points of `spec` armed.
    pub fn enabled(spec: &str) -> Result<Self, FailpointError> {
        let fp = Self {
            inner: Arc::new(Inner {
                enabled: true,
                ..Inner::default()
            }),
        };
        for (name, action) in parse_spec(spec)? {
            fp.set(name, action)?;
        }
        Ok(fp)
    }

    /// From `MOELESS_FAILPOINTS`: disabled when it is unset.
    pub fn from_env() -> Result<Self, FailpointError> {
        match std::env::var(ENV) {
            Ok(spec) => Self::enabled(&spec),
            Err(_) => Ok(Self::default()),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.enabled
    }

    pub fn set(&self, name: &str, action: Action) -> Result<(), FailpointError> {
        if !self.inner.enabled {
            return Err(FailpointError::Disabled);
        }
        let name = point(name)?;
        let mut actions = self.inner.actions.write().unwrap_or_else(|e| e.into_inner());
        if action == Action::Off {
            actions.remove(name);
        } else {
            actions.insert(name, action);
        }
        self.inner.armed.store(!actions.is_empty(), Ordering::Release);
        tracing::warn!(failpoint = name, %action, "failpoint set");
        Ok(())
    }

    /// The armed points and their actions.
    pub fn list(&self) -> BTreeMap<String, String> {
        let actions = self.inner.actions.read().unwrap_or_else(|e| e.into_inner());
        actions.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn action(&self, name: &'static str) -> Option<Action> {
        if !self.inner.armed.load(Ordering::Relaxed) {
            return None;
        }
        let actions = self.inner.actions.read().unwrap_or_else(|e| e.into_inner());
        actions.get(name).copied()
    }

    /// Reached `name` on a blocking thread (inside a backend).
    pub fn hit_blocking(&self, name: &'static str) -> io::Result<()> {
        match self.action(name) {
            None | Some(Action::Off) => Ok(()),
            Some(Action::Sleep(d)) => {
                std::thread::sleep(d);
                Ok(())
            }
            Some(a) => fire(name, a),
        }
    }

    /// Reached `name` on an async task.
    pub async fn hit(&self, name: &'static str) -> io::Result<()> {
        match self.action(name) {
            None | Some(Action::Off) => Ok(()),
            Some(Action::Sleep(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(a) => fire(name, a),
        }
    }
}

fn fire(name: &'static str, action: Action) -> io::Result<()> {
    if action == Action::Abort {
        // stderr is unbuffered: the line is out before the process dies.
        eprintln!("failpoint {name}: abort");
        std::process::abort();
    }
    tracing::warn!(failpoint = name, "failpoint: injected I/O error");
    Err(io::Error::other(format!("failpoint {name}: injected I/O error")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_reject_garbage() {
        let fp = Failpoints::enabled("append-before-flush=abort; vote-before-write=sleep(20);").unwrap();
        let listed = fp.list();
        assert_eq!(listed["append-before-flush"], "abort");
        assert_eq!(listed["vote-before-write"], "sleep(20)");
        fp.set(APPEND_BEFORE_FLUSH, Action::Off).unwrap();
        assert_eq!(fp.list().len(), 1);
        assert!(Failpoints::enabled("").unwrap().list().is_empty());
        assert_eq!(
            Failpoints::enabled("nope=abort").unwrap_err(),
            FailpointError::UnknownPoint("nope".into())
        );
        assert!(matches!(
            Failpoints::enabled("apply-before=explode"),
            Err(FailpointError::BadAction(_))
        ));
        assert!(matches!(
            Failpoints::enabled("apply-before=sleep(x)"),
            Err(FailpointError::BadAction(_))
        ));
        assert!(matches!(
            Failpoints::enabled("apply-before"),
            Err(FailpointError::Malformed(_))
        ));
        assert_eq!(
            Failpoints::default().set(APPLY_BEFORE, Action::Error),
            Err(FailpointError::Disabled)
        );
    }

    #[test]
    fn error_action_fails_the_operation_and_off_clears_it() {
        let fp = Failpoints::enabled("append-before-write=error").unwrap();
        assert!(fp.hit_blocking(APPEND_BEFORE_WRITE).is_err());
        assert!(fp.hit_blocking(APPEND_BEFORE_ACK).is_ok());
        fp.set(APPEND_BEFORE_WRITE, Action::Off).unwrap();
        assert!(fp.hit_blocking(APPEND_BEFORE_WRITE).is_ok());
        assert!(Failpoints::default().hit_blocking(APPEND_BEFORE_WRITE).is_ok());
    }
}
