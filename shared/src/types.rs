//! Identifiers every part of MoEless speaks in.

use std::fmt;

/// One routed expert of one MoE layer: the unit MoEless treats as a serverless function.
///
/// `layer` is the *decoder* layer index (as in Hugging Face checkpoints), not the index among
/// MoE layers, so that keys stay stable for models with dense first layers (DeepSeek-V3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    pub layer: u32,
    pub expert: u32,
}

impl ExpertKey {
    pub fn new(layer: usize, expert: usize) -> Self {
        Self {
            layer: layer as u32,
            expert: expert as u32,
        }
    }
}

impl fmt::Display for ExpertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{}E{}", self.layer, self.expert)
    }
}

/// A worker process (one GPU or one CPU device) of the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

/// One live instance of an expert function. Several instances of the same expert may exist
/// (replicas); tokens of that expert are split across them by dispatch shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId {
    pub key: ExpertKey,
    pub replica: u32,
}
