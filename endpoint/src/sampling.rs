//! Next-token choice from one row of logits: penalties on the tokens seen so far (OpenAI's
//! presence and frequency penalties on the generated tokens, vLLM's repetition penalty on prompt
//! and generated tokens), then greedy, or temperature / top-k / top-p sampling with a
//! per-sequence random generator (seeded when the request gives a seed).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token generated so far (OpenAI, in [-2, 2]).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated (OpenAI, in [-2, 2]).
    pub frequency_penalty: f32,
    /// vLLM's: the logit of every token in the prompt or generated so far is divided by it when
    /// positive and multiplied by it when not (> 0; 1 is off).
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5 || self.top_k == 1
    }

    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    /// `logits` with the penalties applied, for a sequence whose tokens so far are `tokens`, the
    /// last `generated` of them generated (the rest is the prompt).
    pub fn penalize(&self, logits: &[f32], tokens: &[u32], generated: usize) -> Vec<f32> {
        let mut out = logits.to_vec();
        let prompt_len = tokens.len().saturating_sub(generated);
        if self.repetition_penalty != 1.0 {
            let mut seen = vec![false; out.len()];
            for &t in tokens {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (v, _) in out.iter_mut().zip(&seen).filter(|(_, &s)| s) {
                *v = if *v > 0.0 {
                    *v / self.repetition_penalty
                } else {
                    *v * self.repetition_penalty
                };
            }
        }
        if self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 {
            let mut counts = vec![0u32; out.len()];
            for &t in &tokens[prompt_len..] {
                if let Some(c) = counts.get_mut(t as usize) {
                    *c += 1;
                }
            }
            for (v, &c) in out.iter_mut().zip(&counts).filter(|(_, &c)| c > 0) {
                *v -= self.frequency_penalty * c as f32 + self.presence_penalty;
            }
        }
        out
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// `stream` separates the choices of one request (`n > 1`) that share a seed.
    pub fn new(params: SamplingParams, stream: u64) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            None => StdRng::from_entropy(),
        };
        Self { params, rng }
    }

    /// The next token of a sequence whose tokens so far are `tokens` (the last `generated` of
    /// them generated), from its next-token `logits`.
    pub fn sample(&mut self, logits: &[f32], tokens: &[u32], generated: usize) -> u32 {
        let penalized;
        let logits = if self.params.has_penalties() {
            penalized = self.params.penalize(logits, tokens, generated);
            &penalized[..]
        } else {
            logits
        };
        if self.params.is_greedy() || logits.is_empty() {
            return data_plane::engine::argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, v * inv_t))
            .collect();
        if cand.is_empty() {
            return data_plane::engine::argmax(logits);
        }
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.params.top_k > 0 && self.params.top_k < cand.len() {
            cand.select_nth_unstable_by(self.params.top_k - 1, desc);
            cand.truncate(self.params.top_k);
        }
        cand.sort_unstable_by(desc);
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|&(_, v)| f64::from(v - max).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= f64::from(self.params.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.gen::<f64>() * total;
        for (i, p) in probs[..keep].iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

/// The lowest log-probability reported (vLLM's floor; JSON has no -inf).
pub const MIN_LOGPROB: f32 = -9999.0;

/// Log-probabilities of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (ties to the
    /// lower id).
    pub top: Vec<(u32, f32)>,
}

/// `chosen`'s log-probability and the `top` most likely tokens under the model's next-token
/// distribution `log_softmax(logits)`, before penalties, temperature and truncation (vLLM's
/// default, `raw_logprobs`).
pub fn token_logprobs(logits: &[f32], chosen: u32, top: usize) -> TokenLogprob {
    let max = logits
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| f64::from(v - max).exp())
        .sum();
    let lse = max + sum.ln() as f32;
    let lp = |v: f32| {
        let x = v - lse;
        if x.is_nan() {
            MIN_LOGPROB
        } else {
            x.max(MIN_LOGPROB)
        }
    };
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = top.min(cand.len());
    if k > 0 && k < cand.len() {
        cand.select_nth_unstable_by(k - 1, desc);
    }
    cand.truncate(k);
    cand.sort_unstable_by(desc);
    TokenLogprob {
        logprob: logits.get(chosen as usize).map_or(MIN_LOGPROB, |&v| lp(v)),
        top: cand.into_iter().map(|(t, v)| (t, lp(v))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_tokens() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NEG_INFINITY];
        let lse = (1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp()).ln() as f32;
        let t = token_logprobs(&logits, 2, 3);
        assert!((t.logprob - (2.0 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = t.top.iter().map(|p| p.0).collect();
        assert_eq!(ids, [1, 3, 2], "most likely first, ties to the lower id");
        assert!((t.top[0].1 - (3.0 - lse)).abs() < 1e-6);
        let total: f32 = logits
            .iter()
            .map(|&v| token_logprobs(&logits, 0, 0).logprob - 1.0 + v)
            .map(f32::exp)
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "probabilities sum to one: {total}");
        assert_eq!(token_logprobs(&logits, 4, 0).logprob, MIN_LOGPROB, "-inf is floored");
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprobs(&logits, 0, 99).top.len(), 5);
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            0,
        );
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[], 0), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 0.4, 2.0, 1.9];
        for p in [
            SamplingParams {
                top_k: 1,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1e-6,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(p, 0);
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[], 0), 2);
            }
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            seed: Some(7),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p, 0);
            (0..30).map(|_| s.sample(&logits, &[], 0)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p, 0);
            (0..30).map(|_| s.sample(&logits, &[], 0)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 should not be constant");
    }

    #[test]
    fn penalties_follow_openai_and_vllm() {
        let greedy = |p: SamplingParams| Sampler::new(SamplingParams { temperature: 0.0, ..p }, 0);
        // Prompt [2], generated [0, 0]: token 0 was generated twice, token 2 is prompt only.
        let (logits, tokens) = ([3.0f32, 2.9, 2.95, -1.0], [2u32, 0, 0]);
        assert_eq!(greedy(SamplingParams::default()).sample(&logits, &tokens, 2), 0);
        let presence = SamplingParams {
            presence_penalty: 0.25,
            ..Default::default()
        };
        assert_eq!(presence.penalize(&logits, &tokens, 2), vec![2.75, 2.9, 2.95, -1.0]);
        assert_eq!(
            greedy(presence).sample(&logits, &tokens, 2),
            2,
            "the prompt is not penalised"
        );
        let frequency = SamplingParams {
            frequency_penalty: 0.125,
            ..Default::default()
        };
        assert_eq!(frequency.penalize(&logits, &tokens, 2), vec![2.75, 2.9, 2.95, -1.0]);
        let negative = SamplingParams {
            frequency_penalty: -1.0,
            ..Default::default()
        };
        assert_eq!(
            negative.penalize(&logits, &tokens, 2)[0],
            5.0,
            "a negative penalty favours repeats"
        );
        // Repetition (vLLM): prompt and generated alike, divided when positive, multiplied when not.
        let repetition = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        assert_eq!(repetition.penalize(&logits, &[3, 0], 1), vec![1.5, 2.9, 2.95, -2.0]);
        assert_eq!(greedy(repetition).sample(&logits, &[3, 0], 1), 2);
        assert_eq!(repetition.penalize(&logits, &[], 0), logits.to_vec());
    }
}
