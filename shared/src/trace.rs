//! Routing-trace readers and the fixed batching rule used by replay.
//!
//! Readers parse from text (`&str` or any `BufRead`); opening files is the caller's job, so the
//! core stays free of I/O. Every malformed input is a [`TraceError`] naming the line and field.

use std::collections::BTreeMap;
use std::io::BufRead;

use thiserror::Error;

/// Why a trace could not be read. Line numbers are 1-based and count the header.
#[derive(Debug, Error)]
pub enum TraceError {
    #[error("reading trace line {line}: {source}")]
    Io {
        line: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("trace is empty (no header line)")]
    Empty,
    #[error("trace header: {0}")]
    Header(String),
    #[error("trace line {line}: expected {expected} fields, found {found} (truncated or malformed row)")]
    FieldCount { line: usize, expected: usize, found: usize },
    #[error("trace line {line}, field `{field}`: {reason} (value `{value}`)")]
    Field {
        line: usize,
        field: String,
        value: String,
        reason: String,
    },
    #[error("trace has no tokens of phase {0}")]
    NoTokens(Phase),
    #[error("batch size must be at least 1")]
    ZeroBatch,
}

/// Which part of a request a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Prefill,
    Decode,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        })
    }
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "prefill" => Ok(Phase::Prefill),
            "decode" => Ok(Phase::Decode),
            other => Err(format!("unknown phase `{other}` (expected prefill or decode)")),
        }
    }
}

/// One token of a per-token top-k trace: the experts it was routed to at every MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRoute {
    pub subject: String,
    pub query_id: u32,
    pub phase: Phase,
    pub token_idx: u32,
    /// `experts[moe_layer * k + j]`: the j-th choice at the `moe_layer`-th MoE layer.
    pub experts: Vec<u32>,
}

/// A per-token routing trace (top-k choice per MoE layer).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTrace {
    /// Decoder-layer index of each MoE layer, in column order (e.g. 1, 3, .., 47 for Llama-4).
    pub layer_ids: Vec<u32>,
    pub num_experts: usize,
    pub top_k: usize,
    pub tokens: Vec<TokenRoute>,
}

impl TokenTrace {
    pub fn num_layers(&self) -> usize {
        self.layer_ids.len()
    }

    /// Parse the Llama-4-Maverick MMLU per-token top-1 CSV
    /// (`subject,query_id,phase,token_idx,L1,L3,..`). Every expert id must be below
    /// `num_experts` (128 for Llama-4-Maverick).
    pub fn parse_top1_csv(input: impl BufRead, num_experts: usize) -> Result<Self, TraceError> {
        let mut lines = input.lines();
        let header = match lines.next() {
            None => return Err(TraceError::Empty),
            Some(h) => h.map_err(|source| TraceError::Io { line: 1, source })?,
        };
        let cols: Vec<&str> = header.trim_end_matches('\r').split(',').collect();
        const FIXED: [&str; 4] = ["subject", "query_id", "phase", "token_idx"];
        if cols.len() <= FIXED.len() || cols[..FIXED.len()] != FIXED {
            return Err(TraceError::Header(format!(
                "expected `subject,query_id,phase,token_idx,L<n>,..`, found `{header}`"
            )));
        }
        let mut layer_ids = Vec::with_capacity(cols.len() - FIXED.len());
        for c in &cols[FIXED.len()..] {
            let id = c
                .strip_prefix('L')
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or_else(|| TraceError::Header(format!("layer column `{c}` is not L<n>")))?;
            layer_ids.push(id);
        }
        let expected = cols.len();
        let mut tokens = Vec::new();
        for (i, line) in lines.enumerate() {
            let line_no = i + 2;
            let line = line.map_err(|source| TraceError::Io { line: line_no, source })?;
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').collect();
            if fields.len() != expected {
                return Err(TraceError::FieldCount {
                    line: line_no,
                    expected,
                    found: fields.len(),
                });
            }
            let field_err = |col: usize, reason: String| TraceError::Field {
                line: line_no,
                field: cols[col].to_string(),
                value: fields[col].to_string(),
                reason,
            };
            let parse_u32 = |col: usize| {
                fields[col]
                    .trim()
                    .parse::<u32>()
                    .map_err(|e| field_err(col, e.to_string()))
            };
            let subject = fields[0].to_string();
            if subject.is_empty() {
                return Err(field_err(0, "empty subject".into()));
            }
            let query_id = parse_u32(1)?;
            let phase = fields[2].parse::<Phase>().map_err(|e| field_err(2, e))?;
            let token_idx = parse_u32(3)?;
            let mut experts = Vec::with_capacity(layer_ids.len());
            for col in FIXED.len()..expected {
                let e = parse_u32(col)?;
                if e as usize >= num_experts {
                    return Err(field_err(
                        col,
                        format!("expert id out of range (model has {num_experts} experts)"),
                    ));
                }
                experts.push(e);
            }
            tokens.push(TokenRoute {
                subject,
                query_id,
                phase,
                token_idx,
                experts,
            });
        }
        Ok(TokenTrace {
            layer_ids,
            num_experts,
            top_k: 1,
            tokens,
        })
    }

    /// Cut the trace into replay steps with the fixed batching rule: queries sorted by
    /// `(subject, query_id)`, grouped `batch` at a time; step `s` of a group takes each query's
    /// `s`-th token of `phase` (tokens ordered by `token_idx`), for `s` below the group's
    /// shortest length in that phase. Queries without tokens of `phase` are skipped.
    pub fn batch_steps(&self, phase: Phase, batch: usize) -> Result<Vec<Step>, TraceError> {
        if batch == 0 {
            return Err(TraceError::ZeroBatch);
        }
        let mut queries: BTreeMap<(&str, u32), Vec<&TokenRoute>> = BTreeMap::new();
        for t in self.tokens.iter().filter(|t| t.phase == phase) {
            queries.entry((t.subject.as_str(), t.query_id)).or_default().push(t);
        }
        if queries.is_empty() {
            return Err(TraceError::NoTokens(phase));
        }
        for toks in queries.values_mut() {
            toks.sort_by_key(|t| t.token_idx);
        }
        let queries: Vec<Vec<&TokenRoute>> = queries.into_values().collect();
        let (l, k) = (self.num_layers(), self.top_k);
        let mut steps = Vec::new();
        for (group, members) in queries.chunks(batch).enumerate() {
            let len = members.iter().map(|q| q.len()).min().unwrap_or(0);
            for s in 0..len {
                let mut routes = vec![Vec::with_capacity(members.len() * k); l];
                for q in members {
                    let t = q[s];
                    for (layer, r) in routes.iter_mut().enumerate() {
                        r.extend_from_slice(&t.experts[layer * k..(layer + 1) * k]);
                    }
                }
                steps.push(Step::new(group, s, routes, self.num_experts));
            }
        }
        Ok(steps)
    }
}

/// One forward step of one batch: what every token chose at every MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Which batch (group of queries) this step belongs to; steps of a group are consecutive.
    pub group: usize,
    /// Index of the step within its group.
    pub index: usize,
    /// `routes[layer]`: expert choices of all tokens at that MoE layer (token-major, k per token).
    /// Left empty by producers whose consumer reads counts only (see
    /// `replay::Replayer::needs_routes`).
    pub routes: Vec<Vec<u32>>,
    /// `counts[layer][expert]`: tokens routed to each expert.
    pub counts: Vec<Vec<u32>>,
}

impl Step {
    pub fn new(group: usize, index: usize, routes: Vec<Vec<u32>>, num_experts: usize) -> Self {
        let counts = routes
            .iter()
            .map(|r| {
                let mut c = vec![0u32; num_experts];
                for &e in r {
                    c[e as usize] += 1;
                }
                c
            })
            .collect();
        Step {
            group,
            index,
            routes,
            counts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "subject,query_id,phase,token_idx,L1,L3\n\
        a,0,prefill,0,1,2\n\
        a,0,decode,1,3,0\n\
        a,0,decode,2,3,1\n\
        a,1,decode,1,2,2\n\
        b,0,decode,1,0,0\n\
        b,0,decode,2,0,1\n\
        b,0,decode,3,1,1\n";

    #[test]
    fn parses_and_batches_by_subject_and_query() {
        let t = TokenTrace::parse_top1_csv(SMALL.as_bytes(), 4).unwrap();
        assert_eq!(t.layer_ids, vec![1, 3]);
        assert_eq!(t.tokens.len(), 7);
        let steps = t.batch_steps(Phase::Decode, 2).unwrap();
        // group 0 = (a,0),(a,1): shortest has 1 decode token; group 1 = (b,0): 3 tokens.
        assert_eq!(steps.len(), 1 + 3);
        assert_eq!(steps[0].routes[0], vec![3, 2]);
        assert_eq!(steps[0].counts[1], vec![1, 0, 1, 0]);
        assert_eq!((steps[3].group, steps[3].index), (1, 2));
        assert_eq!(steps[3].routes, vec![vec![1], vec![1]]);
    }

    #[test]
    fn malformed_rows_name_line_and_field() {
        let bad = "subject,query_id,phase,token_idx,L1\na,0,decode,1,x\n";
        let e = TokenTrace::parse_top1_csv(bad.as_bytes(), 4).unwrap_err();
        assert!(
            matches!(e, TraceError::Field { line: 2, ref field, .. } if field == "L1"),
            "{e}"
        );
        let trunc = "subject,query_id,phase,token_idx,L1,L3\na,0,decode,1,1,2\na,0,dec";
        let e = TokenTrace::parse_top1_csv(trunc.as_bytes(), 4).unwrap_err();
        assert!(matches!(e, TraceError::FieldCount { line: 3, .. }), "{e}");
        let range = "subject,query_id,phase,token_idx,L1\na,0,decode,1,4\n";
        let e = TokenTrace::parse_top1_csv(range.as_bytes(), 4).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let phase = "subject,query_id,phase,token_idx,L1\na,0,warmup,1,1\n";
        assert!(TokenTrace::parse_top1_csv(phase.as_bytes(), 4).is_err());
        assert!(matches!(
            TokenTrace::parse_top1_csv("".as_bytes(), 4),
            Err(TraceError::Empty)
        ));
        assert!(matches!(
            TokenTrace::parse_top1_csv("a,b,c\n".as_bytes(), 4),
            Err(TraceError::Header(_))
        ));
    }
}
