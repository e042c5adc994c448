//! The Raft type configuration and the commands the replicated state machine accepts.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::state::{ModelSpec, PlanIntent, PolicyConfig, PredictorUpdate, WorkerSpec};

/// A control-plane node as stored in the Raft membership: where its peers and its admins reach it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeInfo {
    pub raft_addr: String,
    pub admin_addr: String,
}

/// `HOST:PORT` where HOST is an IP (`[v6]` in brackets) or a DNS name, resolved when dialled,
/// and PORT is not 0: what a Raft peer address may be (`--peers`, `POST /v1/members`).
pub fn is_host_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} admin={}", self.raft_addr, self.admin_addr)
    }
}

/// A write to the replicated state machine. Every variant is validated in `state::ClusterState::apply`;
/// an invalid command is answered with `CommandResponse::Rejected`, never applied half-way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    RegisterWorker(WorkerSpec),
    DrainWorker {
        worker: u64,
    },
    /// The leader saw no heartbeat from this worker within the timeout.
    MarkWorkerDead {
        worker: u64,
    },
    /// A dead worker heartbeats again (a draining or active worker is left as it is).
    MarkWorkerAlive {
        worker: u64,
    },
    PutModel(ModelSpec),
    /// An engine registers the model it serves (EngineService.RegisterModel): created if new,
    /// its weights path updated if the shape matches, rejected if a model of that name has
    /// another shape. Decided in one step of the state machine, so two engines registering
    /// different shapes at once cannot both succeed.
    RegisterModel(ModelSpec),
    /// Commits a plan under the next epoch. With `expected_epoch`, only if the current epoch is that one.
    CommitPlan {
        intent: PlanIntent,
        expected_epoch: Option<u64>,
    },
    SetPolicy(PolicyConfig),
    UpdatePredictor(PredictorUpdate),
    /// Records the cost of a window in the ledger.
    RecordCost {
        window_end_ms: u64,
        gpu_seconds: f64,
        cold_starts: u64,
        note: String,
    },
    /// `command` at most once per `key`: applying a key seen among the last
    /// [`crate::state::REQUEST_KEY_LIMIT`] keys answers what the first application answered and
    /// changes nothing. Every write goes through [`crate::Node::write`] wrapped in one, so a
    /// write retried after an ambiguous failure (a forward that timed out, a leader that lost
    /// its term after appending) is applied once. `digest` (of the serialized command) catches
    /// a client that reuses a key for a different command.
    Keyed {
        key: String,
        digest: u64,
        command: Box<Command>,
    },
}

impl Command {
    /// `self` under an idempotency key (unchanged if it already has one).
    pub fn keyed(self, key: String) -> Command {
        match self {
            keyed @ Command::Keyed { .. } => keyed,
            command => Command::Keyed {
                digest: command.digest(),
                key,
                command: Box::new(command),
            },
        }
    }

    /// FNV-1a of the JSON encoding: the same on every replica and every build.
    pub fn digest(&self) -> u64 {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::RegisterWorker(w) => write!(f, "register-worker({})", w.id),
            Command::DrainWorker { worker } => write!(f, "drain-worker({worker})"),
            Command::MarkWorkerDead { worker } => write!(f, "mark-worker-dead({worker})"),
            Command::MarkWorkerAlive { worker } => write!(f, "mark-worker-alive({worker})"),
            Command::PutModel(m) => write!(f, "put-model({})", m.name),
            Command::RegisterModel(m) => write!(f, "register-model({})", m.name),
            Command::CommitPlan { intent, .. } => write!(f, "commit-plan({})", intent.model),
            Command::SetPolicy(_) => write!(f, "set-policy"),
            Command::UpdatePredictor(p) => write!(f, "update-predictor({})", p.name),
            Command::RecordCost { window_end_ms, .. } => write!(f, "record-cost({window_end_ms})"),
            Command::Keyed { command, .. } => command.fmt(f),
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandResponse {
    Applied,
    PlanCommitted {
        epoch: u64,
    },
    PredictorVersion {
        version: u64,
    },
    /// RegisterModel: whether the model (or its new weights path) was written.
    ModelRegistered {
        created: bool,
    },
    /// The command was valid to replicate but not to apply (unknown worker, stale epoch, ...).
    Rejected {
        reason: String,
    },
}

// Standard Raft leader ids: one leader per term, a vote names a term and a candidate. openraft's
// default ("advanced") ids order leaders by (term, node id) so that two candidates of one term can
// both win; the election is still safe (log ids carry the node id) but "one leader per term", the
// invariant operators, our docs and the partition tests reason with, no longer holds. A session's
// partition test caught two leaders in term 11 under the advanced ids; see
// tests/t10_turmoil_partitions.rs.
openraft::declare_raft_types!(
    /// Raft types of the MoEless control plane.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = NodeInfo,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<Self::Term, Self::NodeId>,
        Vote = openraft::impls::Vote<Self::LeaderId>,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig, crate::store::StateMachineStore>;
