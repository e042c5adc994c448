//! Continuous batching. One thread owns the engine; every iteration it takes new sequences,
//! drops cancelled ones, schedules running sequences first (a decode token or the next prefill
//! chunk each) and then admits waiting ones under a token budget and `max_num_seqs`, runs one
//! engine step over the whole mixed batch, samples, and sends each new token to its request.
//! KV memory is a pool of paged blocks (`data_plane::kv_cache::KvPool`) granted before each
//! step; when blocks run out the most recently admitted sequence is preempted (its cache
//! dropped, recomputed later from its tokens). With prefix caching a sequence starts from the
//! cached blocks of the longest prefix of its tokens already computed by any sequence.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use data_plane::engine::Engine;
use data_plane::kv_cache::{KvCache, KvPool};
use data_plane::model::LogitsWanted;
use tokio::sync::mpsc;

use crate::api::FinishReason;
use crate::error::ApiError;
use crate::metrics::EngineMetrics;
use crate::sampling::{token_logprobs, Sampler, SamplingParams, TokenLogprob};

/// One sequence to generate (a request with `n` choices submits `n` of these).
#[derive(Debug)]
pub struct SeqRequest {
    /// Choice index within its request.
    pub index: usize,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Report each generated token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Report the log-probability of every prompt token after the first (given the tokens
    /// before it), with this many alternatives. Such a prompt is computed in full: it does
    /// not start from cached prefix blocks, whose logits were never kept.
    pub prompt_logprobs: Option<usize>,
    /// Tokens that end the sequence (EOS unless ignored, plus the request's stop ids).
    pub stop_token_ids: Vec<u32>,
    pub arrival: Instant,
    /// Set by the API layer when it no longer wants tokens (a stop string matched).
    pub cancel: Arc<AtomicBool>,
    /// Shared by all choices of a request; closed when the client goes away.
    pub events: mpsc::UnboundedSender<SeqEvent>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    Token {
        index: usize,
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    /// Log-probabilities of prompt tokens, in order, in one or more events (one per prefill
    /// chunk) before the first `Token`; the prompt's first token has none.
    PromptLogprobs {
        index: usize,
        logprobs: Vec<TokenLogprob>,
    },
    Finished {
        index: usize,
        reason: FinishReason,
    },
    Failed {
        index: usize,
        message: String,
    },
}

#[derive(Debug)]
enum Command {
    Submit(Vec<SeqRequest>),
    /// Finish every sequence now with `abort` (shutdown deadline passed).
    AbortAll,
    Shutdown,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub max_queued: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub prefix_caching: bool,
    pub model_name: String,
}

/// Live counters, readable from any thread (tests, health, admission).
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub steps: AtomicU64,
    /// Nanoseconds spent inside the engine's forward passes (what a step costs beyond the
    /// scheduler's own work: admission, sampling, streaming events out).
    pub forward_nanos: AtomicU64,
    pub preemptions: AtomicU64,
    pub cancelled: AtomicU64,
    /// Prompt tokens looked up in, and found in, the prefix cache at admission.
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub dead: AtomicBool,
}

#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<SchedulerStats>,
    /// Sequences submitted and not yet scheduled for the first time.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

impl SchedulerHandle {
    /// Hands sequences to the scheduler, or refuses with 429 (queue full) / 503 (stopped).
    pub fn submit(&self, seqs: Vec<SeqRequest>) -> Result<(), ApiError> {
        if self.stats.dead.load(Ordering::Relaxed) {
            return Err(ApiError::unavailable("The engine has stopped."));
        }
        let k = seqs.len();
        let before = self.queued.fetch_add(k, Ordering::AcqRel);
        if before + k > self.max_queued {
            self.queued.fetch_sub(k, Ordering::AcqRel);
            return Err(ApiError::queue_full(before));
        }
        self.tx.send(Command::Submit(seqs)).map_err(|_| {
            self.queued.fetch_sub(k, Ordering::AcqRel);
            ApiError::unavailable("The server is shutting down.")
        })
    }

    pub fn abort_all(&self) {
        let _ = self.tx.send(Command::AbortAll);
    }

    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    pub fn stats(&self) -> &Arc<SchedulerStats> {
        &self.stats
    }

    pub fn is_alive(&self) -> bool {
        !self.stats.dead.load(Ordering::Relaxed) && !self.tx.is_closed()
    }
}

struct Seq {
    req: SeqRequest,
    /// Prompt followed by every generated token.
    tokens: Vec<u32>,
    generated: usize,
    /// Positions whose keys and values are in `cache`.
    computed: usize,
    /// Prompt tokens whose log-probabilities were sent (they are not sent again when a
    /// preempted sequence recomputes its prompt).
    prompt_logprobs_sent: usize,
    /// Paged in the scheduler's pool; dropping it returns its blocks.
    cache: KvCache,
    sampler: Sampler,
    /// Still counted in the admission queue (never scheduled yet).
    in_queue: bool,
    last_token_at: Option<Instant>,
}

impl Seq {
    fn send(&self, ev: SeqEvent) {
        let _ = self.req.events.send(ev);
    }

    fn is_cancelled(&self) -> bool {
        self.req.events.is_closed() || self.req.cancel.load(Ordering::Relaxed)
    }
}

/// Starts the scheduler thread; it owns `engine` until it exits.
pub fn spawn(
    engine: Engine,
    cfg: SchedulerConfig,
) -> std::io::Result<(SchedulerHandle, std::thread::JoinHandle<Result<(), String>>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(SchedulerStats::default());
    stats.kv_blocks_total.store(cfg.num_blocks, Ordering::Relaxed);
    let queued = Arc::new(AtomicUsize::new(0));
    let handle = SchedulerHandle {
        tx,
        stats: stats.clone(),
        queued: queued.clone(),
        max_queued: cfg.max_queued,
    };
    let sched = Scheduler {
        pool: engine.new_kv_pool(cfg.block_size, cfg.num_blocks, cfg.prefix_caching),
        metrics: EngineMetrics::new(&cfg.model_name),
        engine,
        cfg,
        rx,
        waiting: VecDeque::new(),
        running: Vec::new(),
        stats,
        queued,
        stop: false,
    };
    let join = std::thread::Builder::new()
        .name("moeless-scheduler".into())
        .spawn(move || sched.run())?;
    Ok((handle, join))
}

struct Scheduler {
    engine: Engine,
    cfg: SchedulerConfig,
    rx: mpsc::UnboundedReceiver<Command>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    pool: Arc<KvPool>,
    stats: Arc<SchedulerStats>,
    queued: Arc<AtomicUsize>,
    metrics: EngineMetrics,
    stop: bool,
}

impl Scheduler {
    fn run(mut self) -> Result<(), String> {
        let result = self.run_loop();
        if let Err(message) = &result {
            self.stats.dead.store(true, Ordering::Relaxed);
            self.fail_all(message);
        }
        self.publish();
        result
    }

    fn run_loop(&mut self) -> Result<(), String> {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish();
                match self.rx.blocking_recv() {
                    Some(c) => self.handle(c),
                    None => return Ok(()),
                }
            }
            while let Ok(c) = self.rx.try_recv() {
                self.handle(c);
            }
            if self.stop {
                return Ok(());
            }
            self.reap_cancelled();
            let plan = self.schedule();
            if !plan.is_empty() {
                self.execute(&plan)?;
            }
            self.publish();
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Submit(reqs) => {
                for req in reqs {
                    let sampler = Sampler::new(req.sampling, req.index as u64);
                    self.waiting.push_back(Seq {
                        tokens: req.prompt.clone(),
                        generated: 0,
                        computed: 0,
                        prompt_logprobs_sent: 0,
                        cache: self.pool.new_cache(),
                        sampler,
                        in_queue: true,
                        last_token_at: None,
                        req,
                    });
                }
            }
            Command::AbortAll => self.finish_all(FinishReason::Abort),
            Command::Shutdown => {
                self.finish_all(FinishReason::Abort);
                self.stop = true;
            }
        }
    }

    fn take_all(&mut self) -> Vec<Seq> {
        let mut all: Vec<Seq> = self.running.drain(..).collect();
        all.extend(self.waiting.drain(..));
        all
    }

    fn finish_all(&mut self, reason: FinishReason) {
        for s in self.take_all() {
            s.send(SeqEvent::Finished {
                index: s.req.index,
                reason,
            });
            self.drop_seq(s);
        }
    }

    fn fail_all(&mut self, message: &str) {
        for s in self.take_all() {
            s.send(SeqEvent::Failed {
                index: s.req.index,
                message: message.to_string(),
            });
            self.drop_seq(s);
        }
    }

    /// Returns a sequence's queue slot; its cache (and so its blocks) goes with it.
    fn drop_seq(&mut self, s: Seq) {
        if s.in_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn reap_cancelled(&mut self) {
        let mut gone = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].is_cancelled() {
                gone.push(self.running.remove(i));
            } else {
                i += 1;
            }
        }
        let (keep, cancelled): (VecDeque<Seq>, VecDeque<Seq>) = self.waiting.drain(..).partition(|s| !s.is_cancelled());
        self.waiting = keep;
        gone.extend(cancelled);
        for s in gone {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            self.drop_seq(s);
        }
    }

    fn preempt(&mut self, mut s: Seq) {
        s.computed = 0;
        s.cache = self.pool.new_cache();
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        self.metrics.preemptions.increment(1);
        self.waiting.push_front(s);
    }

    /// Chooses this step's batch: `(index into running, tokens to feed)`.
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut plan = Vec::new();
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (computed, total) = (self.running[i].computed, self.running[i].tokens.len());
            let n = (total - computed).min(budget);
            let mut granted = false;
            loop {
                if self.running[i].cache.grow_to(computed + n).is_ok() {
                    granted = true;
                    break;
                }
                if self.running.len() > i + 1 {
                    if let Some(victim) = self.running.pop() {
                        self.preempt(victim);
                        preempted = true;
                        continue;
                    }
                }
                break;
            }
            if !granted {
                let me = self.running.remove(i);
                self.preempt(me);
                preempted = true;
                break;
            }
            plan.push((i, n));
            budget -= n;
            i += 1;
        }
        // Admitting while preempting would only thrash.
        if preempted {
            return plan;
        }
        let now = Instant::now();
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(front) = self.waiting.front_mut() else { break };
            let hit = if front.computed == 0 && front.req.prompt_logprobs.is_none() {
                self.pool.attach_prefix(&mut front.cache, &front.tokens)
            } else {
                0
            };
            front.computed += hit;
            let n = (front.tokens.len() - front.computed).min(budget);
            if front.cache.grow_to(front.computed + n).is_err() {
                // Not admitted: let go of the cached blocks found for it too.
                if hit > 0 {
                    front.cache = self.pool.new_cache();
                    front.computed = 0;
                }
                break;
            }
            let Some(mut s) = self.waiting.pop_front() else { break };
            if self.pool.prefix_caching() {
                let queried = s.tokens.len() as u64;
                self.stats.prefix_queries.fetch_add(queried, Ordering::Relaxed);
                self.stats.prefix_hits.fetch_add(hit as u64, Ordering::Relaxed);
                self.metrics.prefix_queries.increment(queried);
                self.metrics.prefix_hits.increment(hit as u64);
            }
            if s.in_queue {
                s.in_queue = false;
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.metrics
                    .queue_time
                    .record(now.duration_since(s.req.arrival).as_secs_f64());
                self.metrics.prompt_tokens.increment(s.req.prompt.len() as u64);
            }
            self.running.push(s);
            plan.push((self.running.len() - 1, n));
            budget -= n;
        }
        plan
    }

    fn execute(&mut self, plan: &[(usize, usize)]) -> Result<(), String> {
        let mut caches: Vec<KvCache> = plan
            .iter()
            .map(|&(i, _)| std::mem::replace(&mut self.running[i].cache, KvCache::new(0, 1, 1)))
            .collect();
        let toks: Vec<&[u32]> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                &s.tokens[s.computed..s.computed + n]
            })
            .collect();
        // Every position's logits only when a prompt chunk in this batch needs them.
        let wanted = if plan.iter().any(|&(i, _)| {
            let s = &self.running[i];
            s.req.prompt_logprobs.is_some() && s.computed < s.req.prompt.len()
        }) {
            LogitsWanted::All
        } else {
            LogitsWanted::Last
        };
        let engine = &self.engine;
        let started = Instant::now();
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| engine.step(&mut caches, &toks, wanted)));
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.forward_nanos.fetch_add(nanos, Ordering::Relaxed);
        for (&(i, _), c) in plan.iter().zip(caches) {
            self.running[i].cache = c;
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match res {
            Err(_) => return Err("the engine panicked during a step".into()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "engine step failed; failing its batch");
                let mut failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                failed.sort_unstable();
                for &i in failed.iter().rev() {
                    let s = self.running.remove(i);
                    s.send(SeqEvent::Failed {
                        index: s.req.index,
                        message: e.to_string(),
                    });
                    self.drop_seq(s);
                }
                return Ok(());
            }
            Ok(Ok((logits, routing))) => {
                let experts = self.engine.config().moe.num_experts;
                for r in &routing {
                    self.metrics.record_routing(r.layer, experts, &r.ids);
                }
                logits
            }
        };
        let now = Instant::now();
        let mut done: Vec<(usize, FinishReason)> = Vec::new();
        let mut generated = 0u64;
        for (j, &(i, n)) in plan.iter().enumerate() {
            let s = &mut self.running[i];
            if let (Some(k), Some(l)) = (s.req.prompt_logprobs, logits.get(j)) {
                // Row r of a full chunk predicts position computed + r + 1.
                let (prompt_len, from) = (s.req.prompt.len(), s.computed);
                let lps: Vec<TokenLogprob> = (from + 1..from + 1 + n)
                    .filter(|&pos| pos < prompt_len && pos > s.prompt_logprobs_sent && pos - 1 - from < l.rows())
                    .map(|pos| token_logprobs(l.row(pos - 1 - from), s.req.prompt[pos], k))
                    .collect();
                if !lps.is_empty() {
                    s.prompt_logprobs_sent += lps.len();
                    s.send(SeqEvent::PromptLogprobs {
                        index: s.req.index,
                        logprobs: lps,
                    });
                }
            }
            s.computed += n;
            if s.computed < s.tokens.len() {
                continue; // the middle of a chunked prefill: no token yet
            }
            let Some(row) = logits.get(j).filter(|l| l.rows() > 0).map(|l| l.row(l.rows() - 1)) else {
                done.push((i, FinishReason::Error));
                continue;
            };
            let t = s.sampler.sample(row, &s.tokens, s.generated);
            let logprob = s.req.logprobs.map(|k| token_logprobs(row, t, k));
            s.tokens.push(t);
            s.generated += 1;
            generated += 1;
            match s.last_token_at {
                None => self
                    .metrics
                    .ttft
                    .record(now.duration_since(s.req.arrival).as_secs_f64()),
                Some(prev) => self.metrics.itl.record(now.duration_since(prev).as_secs_f64()),
            }
            s.last_token_at = Some(now);
            let _ = s.req.events.send(SeqEvent::Token {
                index: s.req.index,
                id: t,
                logprob,
            });
            if s.req.stop_token_ids.contains(&t) {
                done.push((i, FinishReason::Stop));
            } else if s.generated >= s.req.max_tokens || s.tokens.len() >= self.cfg.max_model_len {
                done.push((i, FinishReason::Length));
            }
        }
        self.metrics.generation_tokens.increment(generated);
        done.sort_unstable_by_key(|d| d.0);
        for &(i, reason) in done.iter().rev() {
            let s = self.running.remove(i);
            s.send(SeqEvent::Finished {
                index: s.req.index,
                reason,
            });
            self.drop_seq(s);
        }
        Ok(())
    }

    fn publish(&self) {
        let (r, w, used) = (self.running.len(), self.waiting.len(), self.pool.blocks_in_use());
        self.stats.running.store(r, Ordering::Relaxed);
        self.stats.waiting.store(w, Ordering::Relaxed);
        self.stats.kv_blocks_used.store(used, Ordering::Relaxed);
        self.metrics.running.set(r as f64);
        self.metrics.waiting.set(w as f64);
        let total = self.pool.num_blocks().max(1);
        self.metrics.kv_usage.set(used as f64 / total as f64);
    }
}
