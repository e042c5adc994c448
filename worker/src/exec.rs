//! Runs expert functions on the instances a worker holds: the one piece of code behind both the
//! QUIC server and the engine's in-process fast path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use data_plane::backend::Backend;
use data_plane::config::ModelConfig;
use data_plane::instances::{InstanceError, InstanceManager};
use data_plane::tensor::Tensor;
use rayon::prelude::*;
use shared::ExpertKey;

use crate::wire::ErrorCode;

/// Why a batch of expert work failed on this worker.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecError {
    pub code: ErrorCode,
    pub message: String,
}

impl ExecError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<InstanceError> for ExecError {
    fn from(e: InstanceError) -> Self {
        let code = match &e {
            InstanceError::OutOfMemory { .. } => ErrorCode::OutOfMemory,
            _ => ErrorCode::LoadFailed,
        };
        ExecError::new(code, e.to_string())
    }
}

/// One model's instances on one worker, and the compute they run on.
pub struct Executor {
    pub model: String,
    pub config: Arc<ModelConfig>,
    pub instances: Arc<InstanceManager>,
    backend: Arc<dyn Backend>,
    pool: Option<rayon::ThreadPool>,
    /// Tokens per expert since the last [`Executor::take_loads`].
    loads: Mutex<HashMap<ExpertKey, u64>>,
}

impl Executor {
    /// `threads`: size of this executor's compute pool (0 = the global rayon pool).
    pub fn new(
        model: String,
        config: Arc<ModelConfig>,
        instances: Arc<InstanceManager>,
        backend: Arc<dyn Backend>,
        threads: usize,
    ) -> Self {
        let pool = (threads > 0)
            .then(|| rayon::ThreadPoolBuilder::new().num_threads(threads).build().ok())
            .flatten();
        Self {
            model,
            config,
            instances,
            backend,
            pool,
            loads: Mutex::new(HashMap::new()),
        }
    }

    fn check(&self, layer: u32, key: ExpertKey, input: &Tensor) -> Result<(), ExecError> {
        let cfg = &self.config;
        let (l, e) = (key.layer as usize, key.expert as usize);
        if key.layer != layer
            || l >= cfg.num_layers
            || cfg.layer_ffn[l] != data_plane::config::FfnKind::Moe
            || e >= cfg.moe.num_experts
        {
            return Err(ExecError::new(
                ErrorCode::BadFrame,
                format!("{key} is not a routed expert of layer {layer} of {}", self.model),
            ));
        }
        if input.cols() != cfg.hidden_size || input.shape().len() != 2 {
            return Err(ExecError::new(
                ErrorCode::BadFrame,
                format!(
                    "expert {key} got rows of width {}, the model's hidden size is {}",
                    input.cols(),
                    cfg.hidden_size
                ),
            ));
        }
        Ok(())
    }

    fn run_one(&self, key: ExpertKey, input: &Tensor) -> Result<Tensor, ExecError> {
        let w = self.instances.acquire(key)?;
        let out = w.forward(self.backend.as_ref(), input);
        self.instances.record_tokens(key, input.rows() as u64);
        Ok(out)
    }

    /// Runs every task of one layer; one output per task, in order. Blocking (call from a
    /// blocking thread).
    pub fn run(&self, layer: u32, tasks: &[(ExpertKey, &Tensor)]) -> Result<Vec<Tensor>, ExecError> {
        for (key, input) in tasks {
            self.check(layer, *key, input)?;
        }
        let rows: usize = tasks.iter().map(|t| t.1.rows()).sum();
        let go = || -> Result<Vec<Tensor>, ExecError> {
            if data_plane::expert::run_side_by_side(tasks.len(), rows) {
                tasks.par_iter().map(|(k, x)| self.run_one(*k, x)).collect()
            } else {
                tasks.iter().map(|(k, x)| self.run_one(*k, x)).collect()
            }
        };
        let out = match &self.pool {
            Some(p) => p.install(go),
            None => go(),
        }?;
        if let Ok(mut loads) = self.loads.lock() {
            for (key, input) in tasks {
                *loads.entry(*key).or_default() += input.rows() as u64;
            }
        }
        Ok(out)
    }

    /// Runs every task of one layer and sums: row `s` of the answer (`[sums, hidden]`) is the
    /// sum, in task and row order, of `weight x output row` over the rows whose `combine`
    /// entry names `s`. Blocking.
    pub fn run_summed(
        &self,
        layer: u32,
        tasks: &[(ExpertKey, &Tensor)],
        combine: &[&[(u32, f32)]],
        sums: usize,
    ) -> Result<Tensor, ExecError> {
        let bad = |m: String| ExecError::new(ErrorCode::BadFrame, m);
        if combine.len() != tasks.len() {
            return Err(bad(format!(
                "{} combine tables for {} tasks",
                combine.len(),
                tasks.len()
            )));
        }
        for ((_, x), c) in tasks.iter().zip(combine) {
            if c.len() != x.rows() || c.iter().any(|&(s, _)| s as usize >= sums) {
                return Err(bad(format!(
                    "a task of {} rows has {} combine entries into {sums} sums",
                    x.rows(),
                    c.len()
                )));
            }
        }
        let outputs = self.run(layer, tasks)?;
        let mut out = Tensor::zeros(vec![sums, self.config.hidden_size]);
        for (y, c) in outputs.iter().zip(combine) {
            let (tokens, weights): (Vec<u32>, Vec<f32>) = c.iter().copied().unzip();
            data_plane::expert::add_weighted_rows(&mut out, y, &tokens, &weights)
                .map_err(|e| ExecError::new(ErrorCode::Internal, e.to_string()))?;
        }
        Ok(out)
    }

    /// Tokens per expert since the previous call.
    pub fn take_loads(&self) -> HashMap<ExpertKey, u64> {
        self.loads
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }
}
