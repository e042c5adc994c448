//! The API side of one request: validated parameters, the sequences it submits, and the
//! stream of per-choice updates (incremental text, stop strings, finish reasons) it reads back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::api::{FinishReason, GenerationFields, Usage};
use crate::error::ApiError;
use crate::metrics;
use crate::sampling::{SamplingParams, TokenLogprob};
use crate::scheduler::{SchedulerHandle, SeqEvent, SeqRequest};
use crate::tokenizer::{IncrementalDecoder, StopMatcher, TextTokenizer};

/// What a generation request asks for, checked once.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub n: usize,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub return_token_ids: bool,
    /// Log-probabilities of each generated token with this many alternatives (set by the
    /// route: [`completion_logprobs`], [`chat_logprobs`]).
    pub logprobs: Option<usize>,
    /// Log-probabilities of the prompt's tokens too (completions with `echo`).
    pub prompt_logprobs: Option<usize>,
}

/// Limits the validation needs from the server.
pub struct Limits {
    pub max_model_len: usize,
    pub vocab: usize,
    pub max_n: usize,
}

pub(crate) const MAX_STOPS: usize = 16;

impl GenParams {
    /// `max_tokens_override` is chat's `max_completion_tokens`, which wins over `max_tokens`.
    pub fn validate(f: &GenerationFields, max_tokens_override: Option<i64>, lim: &Limits) -> Result<Self, ApiError> {
        let n = f.n.unwrap_or(1);
        if n < 1 || n as usize > lim.max_n {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be between 1 and {}, got {n}", lim.max_n),
            ));
        }
        let (max_param, max_tokens) = match (max_tokens_override, f.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max_tokens = match max_tokens {
            Some(m) if m < 1 => {
                return Err(ApiError::invalid_param(
                    max_param,
                    format!("{max_param} must be at least 1, got {m}"),
                ))
            }
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        let temperature = f.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature must be in [0, 2], got {temperature}"),
            ));
        }
        let top_p = f.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match f.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("top_k must be -1 (disabled) or at least 1, got {k}"),
                ))
            }
        };
        for (name, v) in [
            ("frequency_penalty", f.frequency_penalty),
            ("presence_penalty", f.presence_penalty),
        ] {
            if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return Err(ApiError::invalid_param(
                    name,
                    format!("{name} must be in [-2, 2], got {}", v.unwrap_or_default()),
                ));
            }
        }
        let repetition_penalty = f.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
            return Err(ApiError::invalid_param(
                "repetition_penalty",
                format!("repetition_penalty must be above 0, got {repetition_penalty}"),
            ));
        }
        let stops = f.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        if stops.len() > MAX_STOPS || stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid_param(
                "stop",
                format!("stop takes at most {MAX_STOPS} non-empty strings"),
            ));
        }
        let stop_token_ids = f.stop_token_ids.clone().unwrap_or_default();
        if let Some(&id) = stop_token_ids.iter().find(|&&id| id as usize >= lim.vocab) {
            return Err(ApiError::invalid_param(
                "stop_token_ids",
                format!("token id {id} is outside the vocabulary (size {})", lim.vocab),
            ));
        }
        if f.stream_options.is_some() && !f.stream {
            return Err(ApiError::invalid_param(
                "stream_options",
                "stream_options can only be set when stream is true",
            ));
        }
        Ok(Self {
            n: n as usize,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                seed: f.seed,
                presence_penalty: f.presence_penalty.unwrap_or(0.0),
                frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
                repetition_penalty,
            },
            stops,
            stop_token_ids,
            ignore_eos: f.ignore_eos,
            stream: f.stream,
            include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
            return_token_ids: f.return_token_ids,
            logprobs: None,
            prompt_logprobs: None,
        })
    }
}

/// Most alternatives a request may ask for per token (vLLM's default `max_logprobs`).
pub const MAX_LOGPROBS: u64 = 20;

fn logprobs_count(param: &str, v: &Value) -> Result<usize, ApiError> {
    v.as_u64()
        .filter(|&k| k <= MAX_LOGPROBS)
        .map(|k| k as usize)
        .ok_or_else(|| {
            ApiError::invalid_param(
                param,
                format!("{param} must be an integer in [0, {MAX_LOGPROBS}], got {v}"),
            )
        })
}

/// `/v1/completions`' `logprobs`: how many alternatives to report per token (`null` or
/// `false`: no log-probabilities).
pub fn completion_logprobs(v: Option<&Value>) -> Result<Option<usize>, ApiError> {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
        Some(v) => logprobs_count("logprobs", v).map(Some),
    }
}

/// Chat's `logprobs` (a boolean) and `top_logprobs` (alternatives per token, needs
/// `logprobs: true` when above 0).
pub fn chat_logprobs(logprobs: Option<&Value>, top_logprobs: Option<&Value>) -> Result<Option<usize>, ApiError> {
    let on = match logprobs {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ApiError::invalid_param(
                "logprobs",
                format!("logprobs must be a boolean, got {v}"),
            ))
        }
    };
    let top = match top_logprobs {
        None | Some(Value::Null) => 0,
        Some(v) => logprobs_count("top_logprobs", v)?,
    };
    if top > 0 && !on {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            "top_logprobs needs logprobs to be true",
        ));
    }
    Ok(on.then_some(top))
}

/// Checks one prompt against the vocabulary and context length; returns its `max_tokens`.
pub fn check_prompt(prompt: &[u32], max_tokens: Option<usize>, lim: &Limits, param: &str) -> Result<usize, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::invalid_param(param, "the prompt must not be empty"));
    }
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= lim.vocab) {
        return Err(ApiError::invalid_param(
            param,
            format!("token id {id} is outside the vocabulary (size {})", lim.vocab),
        ));
    }
    let (p, m) = (prompt.len(), lim.max_model_len);
    if p >= m {
        let mut e = ApiError::invalid_param(
            param,
            format!(
                "This model's maximum context length is {m} tokens. However, your request has {p} input tokens. \
                 Please reduce the length of the input."
            ),
        );
        e.code = Some("context_length_exceeded");
        return Err(e);
    }
    match max_tokens {
        Some(mt) if p.saturating_add(mt) > m => {
            let mut e = ApiError::invalid_param(
                "max_tokens",
                format!(
                    "This model's maximum context length is {m} tokens. However, you requested {} tokens \
                     ({p} in the input, {mt} in the completion). Please reduce the length of the input or \
                     completion.",
                    p.saturating_add(mt)
                ),
            );
            e.code = Some("context_length_exceeded");
            Err(e)
        }
        Some(mt) => Ok(mt),
        None => Ok(m - p),
    }
}

struct ChoiceState {
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    cancel: Arc<AtomicBool>,
    finished: Option<FinishReason>,
    tokens: Vec<u32>,
    /// Log-probabilities of `tokens`, when asked for.
    logprobs: Vec<TokenLogprob>,
    /// Of the prompt's tokens after the first, when asked for.
    prompt_logprobs: Vec<TokenLogprob>,
    /// Token ids not yet reported (their text is still held back).
    unreported: Vec<u32>,
    unreported_logprobs: Vec<TokenLogprob>,
}

/// One update of one choice: new text, the token ids it came from, maybe its end.
#[derive(Debug, Clone, Default)]
pub struct ChoiceUpdate {
    pub index: usize,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Log-probabilities of `token_ids`, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    pub error: Option<String>,
}

/// A submitted request, read back choice update by choice update. Dropping it cancels every
/// unfinished choice (the scheduler sees the closed channel and frees their KV blocks).
pub struct Generation {
    rx: mpsc::UnboundedReceiver<SeqEvent>,
    tokenizer: Option<Arc<TextTokenizer>>,
    choices: Vec<ChoiceState>,
    open: usize,
    prompt_tokens: usize,
    arrival: Instant,
    model: String,
}

impl Generation {
    /// Submits `n` sequences per prompt (choice index `prompt * n + j`).
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        scheduler: &SchedulerHandle,
        tokenizer: Option<Arc<TextTokenizer>>,
        model: &str,
        prompts: Vec<(Vec<u32>, usize)>,
        params: &GenParams,
        eos: &[u32],
        arrival: Instant,
    ) -> Result<Self, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stop_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend_from_slice(eos);
        }
        let mut seqs = Vec::new();
        let mut choices = Vec::new();
        let prompt_tokens = prompts.iter().map(|(p, _)| p.len()).sum();
        for (prompt, max_tokens) in prompts {
            for _ in 0..params.n {
                let cancel = Arc::new(AtomicBool::new(false));
                seqs.push(SeqRequest {
                    index: choices.len(),
                    prompt: prompt.clone(),
                    max_tokens,
                    sampling: params.sampling,
                    logprobs: params.logprobs,
                    prompt_logprobs: params.prompt_logprobs,
                    stop_token_ids: stop_ids.clone(),
                    arrival,
                    cancel: cancel.clone(),
                    events: tx.clone(),
                });
                choices.push(ChoiceState {
                    decoder: IncrementalDecoder::default(),
                    stop: StopMatcher::new(params.stops.clone()),
                    cancel,
                    finished: None,
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    prompt_logprobs: Vec::new(),
                    unreported: Vec::new(),
                    unreported_logprobs: Vec::new(),
                });
            }
        }
        scheduler.submit(seqs)?;
        Ok(Self {
            rx,
            tokenizer,
            open: choices.len(),
            choices,
            prompt_tokens,
            arrival,
            model: model.to_string(),
        })
    }

    pub fn num_choices(&self) -> usize {
        self.choices.len()
    }

    pub fn usage(&self) -> Usage {
        let completion_tokens = self.choices.iter().map(|c| c.tokens.len()).sum();
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            total_tokens: self.prompt_tokens + completion_tokens,
        }
    }

    pub fn token_ids(&self, index: usize) -> Vec<u32> {
        self.choices.get(index).map(|c| c.tokens.clone()).unwrap_or_default()
    }

    /// Log-probabilities of a choice's tokens (empty unless asked for).
    pub fn logprobs(&self, index: usize) -> &[TokenLogprob] {
        self.choices
            .get(index)
            .map(|c| c.logprobs.as_slice())
            .unwrap_or_default()
    }

    /// Log-probabilities of a choice's prompt tokens after the first (empty unless asked for).
    pub fn prompt_logprobs(&self, index: usize) -> &[TokenLogprob] {
        self.choices
            .get(index)
            .map(|c| c.prompt_logprobs.as_slice())
            .unwrap_or_default()
    }

    fn finish(&mut self, index: usize, reason: FinishReason) {
        let c = &mut self.choices[index];
        c.finished = Some(reason);
        c.cancel.store(true, Ordering::Relaxed);
        self.open -= 1;
        metrics::record_finished(&self.model, reason, self.arrival.elapsed().as_secs_f64());
    }

    /// The next update, or `None` once every choice has finished.
    pub async fn next(&mut self) -> Option<ChoiceUpdate> {
        loop {
            if self.open == 0 {
                return None;
            }
            let Some(ev) = self.rx.recv().await else {
                // The scheduler went away without finishing this choice.
                let index = self.choices.iter().position(|c| c.finished.is_none())?;
                self.finish(index, FinishReason::Error);
                return Some(ChoiceUpdate {
                    index,
                    finish: Some(FinishReason::Error),
                    error: Some("the engine stopped".into()),
                    ..Default::default()
                });
            };
            let index = match &ev {
                SeqEvent::Token { index, .. }
                | SeqEvent::PromptLogprobs { index, .. }
                | SeqEvent::Finished { index, .. }
                | SeqEvent::Failed { index, .. } => *index,
            };
            if self.choices.get(index).is_none_or(|c| c.finished.is_some()) {
                continue;
            }
            match ev {
                SeqEvent::Token { id, logprob, .. } => {
                    let tok = self.tokenizer.clone();
                    let c = &mut self.choices[index];
                    c.tokens.push(id);
                    c.unreported.push(id);
                    if let Some(lp) = logprob {
                        c.logprobs.push(lp.clone());
                        c.unreported_logprobs.push(lp);
                    }
                    let delta = match &tok {
                        Some(t) => match c.decoder.push(t, id) {
                            Ok(d) => d,
                            Err(e) => return Some(self.fail(index, e.to_string())),
                        },
                        None => String::new(),
                    };
                    let (text, hit) = c.stop.push(&delta);
                    // Without a tokenizer every token is reported; with one, only new text.
                    if text.is_empty() && !hit && tok.is_some() {
                        continue;
                    }
                    let token_ids = std::mem::take(&mut c.unreported);
                    let logprobs = std::mem::take(&mut c.unreported_logprobs);
                    let finish = hit.then_some(FinishReason::Stop);
                    if hit {
                        self.finish(index, FinishReason::Stop);
                    }
                    return Some(ChoiceUpdate {
                        index,
                        text,
                        token_ids,
                        logprobs,
                        finish,
                        error: None,
                    });
                }
                SeqEvent::Finished { reason, .. } => {
                    let tok = self.tokenizer.clone();
                    let c = &mut self.choices[index];
                    let tail = match &tok {
                        Some(t) => c.decoder.finish(t).unwrap_or_default(),
                        None => String::new(),
                    };
                    let (mut text, hit) = c.stop.push(&tail);
                    if !hit {
                        text.push_str(&c.stop.flush());
                    }
                    let reason = if hit { FinishReason::Stop } else { reason };
                    let token_ids = std::mem::take(&mut c.unreported);
                    let logprobs = std::mem::take(&mut c.unreported_logprobs);
                    self.finish(index, reason);
                    return Some(ChoiceUpdate {
                        index,
                        text,
                        token_ids,
                        logprobs,
                        finish: Some(reason),
                        error: None,
                    });
                }
                SeqEvent::PromptLogprobs { logprobs, .. } => self.choices[index].prompt_logprobs.extend(logprobs),
                SeqEvent::Failed { message, .. } => return Some(self.fail(index, message)),
            }
        }
    }

    fn fail(&mut self, index: usize, message: String) -> ChoiceUpdate {
        self.finish(index, FinishReason::Error);
        ChoiceUpdate {
            index,
            finish: Some(FinishReason::Error),
            error: Some(message),
            ..Default::default()
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let unfinished: Vec<usize> = (0..self.choices.len())
            .filter(|&i| self.choices[i].finished.is_none())
            .collect();
        for i in unfinished {
            self.finish(i, FinishReason::Abort);
        }
    }
}
