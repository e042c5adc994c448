//! Log-probabilities in the two wire formats: the legacy one of `/v1/completions` and the
//! per-token list of chat completions.

use serde_json::{Map, Value};

use crate::api::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob};
use crate::sampling::TokenLogprob;
use crate::tokenizer::TextTokenizer;

/// A token as log-probabilities name it: its text and bytes, or `token_id:ID` when the model
/// was served without a tokenizer (vLLM's `return_tokens_as_token_ids` form).
pub fn token_piece(tok: Option<&TextTokenizer>, id: u32) -> (String, Vec<u8>) {
    match tok {
        Some(t) => t.token_piece(id),
        None => {
            let s = format!("token_id:{id}");
            let b = s.as_bytes().to_vec();
            (s, b)
        }
    }
}

/// Completions' format for `ids` and their log-probabilities; `offset` is the character offset
/// of the first token in the choice's text, advanced past them.
pub fn completion(
    tok: Option<&TextTokenizer>,
    ids: &[u32],
    lps: &[TokenLogprob],
    offset: &mut usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for (&id, lp) in ids.iter().zip(lps) {
        push_completion(&mut out, tok, id, Some(lp), offset);
    }
    out
}

/// Completions' format with `echo`: the prompt's tokens (the first without a log-probability,
/// the rest with `prompt_lps`), then the generated `ids`.
pub fn completion_echo(
    tok: Option<&TextTokenizer>,
    prompt: &[u32],
    prompt_lps: &[TokenLogprob],
    ids: &[u32],
    lps: &[TokenLogprob],
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0;
    let prompt_entries = prompt
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i.checked_sub(1).and_then(|j| prompt_lps.get(j))));
    for (id, lp) in prompt_entries.chain(ids.iter().copied().zip(lps.iter().map(Some))) {
        push_completion(&mut out, tok, id, lp, &mut offset);
    }
    out
}

fn push_completion(
    out: &mut CompletionLogprobs,
    tok: Option<&TextTokenizer>,
    id: u32,
    lp: Option<&TokenLogprob>,
    offset: &mut usize,
) {
    let (text, _) = token_piece(tok, id);
    // Keyed by token text: where two tokens read the same (partial characters read as U+FFFD),
    // the more likely one keeps the key. The token itself is always listed (up to
    // `logprobs + 1` entries, as OpenAI documents).
    let top = lp.map(|lp| {
        let mut top = Map::new();
        for &(t, l) in &lp.top {
            top.entry(token_piece(tok, t).0).or_insert(Value::from(l));
        }
        top.entry(text.clone()).or_insert(Value::from(lp.logprob));
        top
    });
    out.text_offset.push(*offset);
    *offset += text.chars().count();
    out.tokens.push(text);
    out.token_logprobs.push(lp.map(|lp| lp.logprob));
    out.top_logprobs.push(top);
}

/// Chat's format for `ids` and their log-probabilities.
pub fn chat(tok: Option<&TextTokenizer>, ids: &[u32], lps: &[TokenLogprob]) -> ChatLogprobs {
    let entry = |id: u32, logprob: f32| {
        let (token, bytes) = token_piece(tok, id);
        TopLogprob { token, logprob, bytes }
    };
    ChatLogprobs {
        content: ids
            .iter()
            .zip(lps)
            .map(|(&id, lp)| {
                let TopLogprob { token, logprob, bytes } = entry(id, lp.logprob);
                ChatTokenLogprob {
                    token,
                    logprob,
                    bytes,
                    top_logprobs: lp.top.iter().map(|&(t, l)| entry(t, l)).collect(),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_offsets_advance_by_token_text() {
        let tok = TextTokenizer::bytes();
        let lps = vec![
            TokenLogprob {
                logprob: -0.5,
                top: vec![(b'h' as u32, -0.5), (b'j' as u32, -1.5)],
            },
            TokenLogprob {
                logprob: -2.0,
                top: vec![(b'o' as u32, -0.25)],
            },
        ];
        let mut offset = 3;
        let c = completion(Some(&tok), &[b'h' as u32, b'i' as u32], &lps, &mut offset);
        assert_eq!(c.tokens, ["h", "i"]);
        assert_eq!(c.text_offset, [3, 4]);
        assert_eq!(offset, 5);
        assert_eq!(c.token_logprobs, [Some(-0.5), Some(-2.0)]);
        let top: Vec<Map<String, Value>> = c.top_logprobs.into_iter().flatten().collect();
        assert_eq!(top[0].len(), 2);
        assert_eq!(top[1].len(), 2, "the chosen token joins the alternatives");
        assert_eq!(top[1]["i"], Value::from(-2.0f32));
        // With echo: prompt "ab" (the first token has no log-probability), then "h".
        let e = completion_echo(
            Some(&tok),
            &[b'a' as u32, b'b' as u32],
            &lps[1..],
            &[b'h' as u32],
            &lps[..1],
        );
        assert_eq!(e.tokens, ["a", "b", "h"]);
        assert_eq!(e.token_logprobs, [None, Some(-2.0), Some(-0.5)]);
        assert!(e.top_logprobs[0].is_none() && e.top_logprobs[1].is_some());
        assert_eq!(e.text_offset, [0, 1, 2]);
        let chat = chat(None, &[7], &lps[..1]);
        assert_eq!(chat.content[0].token, "token_id:7");
        assert_eq!(chat.content[0].top_logprobs.len(), 2);
        assert_eq!(chat.content[0].top_logprobs[1].token, "token_id:106");
        // Two partial characters read alike: the more likely keeps the key.
        let partial = [TokenLogprob {
            logprob: -0.1,
            top: vec![(0xe2, -0.1), (0xc3, -0.2)],
        }];
        let c = completion(Some(&tok), &[0xe2], &partial, &mut 0);
        let top = c.top_logprobs[0].as_ref().unwrap();
        assert_eq!(top.len(), 1);
        assert_eq!(top["\u{FFFD}"], Value::from(-0.1f32));
    }
}
