//! Readers for the routing data that is not a per-token top-1 trace: per-expert token counts
//! and cross-layer co-activation counts (OLMoE, Mixtral), per-layer activation fractions
//! (Qwen3-30B-A3B), and per-token top-k routes with router scores (FLAME-MoE).
//!
//! Like [`crate::trace`], readers take text and return typed errors naming line and field.

use std::collections::BTreeMap;
use std::io::BufRead;

use crate::trace::{Phase, TokenRoute, TokenTrace, TraceError};

/// Split a CSV reader into a checked header and numbered data rows.
struct Csv<R> {
    lines: std::io::Lines<R>,
    line: usize,
    cols: Vec<String>,
}

impl<R: BufRead> Csv<R> {
    /// Read the header; `expected` lists the leading column names that must match.
    fn open(input: R, expected: &[&str]) -> Result<Self, TraceError> {
        let mut lines = input.lines();
        let header = match lines.next() {
            None => return Err(TraceError::Empty),
            Some(h) => h.map_err(|source| TraceError::Io { line: 1, source })?,
        };
        let cols: Vec<String> = header.trim_end_matches('\r').split(',').map(str::to_string).collect();
        if cols.len() < expected.len() || cols.iter().zip(expected).any(|(c, e)| c != e) {
            return Err(TraceError::Header(format!(
                "expected columns starting `{}`, found `{header}`",
                expected.join(",")
            )));
        }
        Ok(Self { lines, line: 1, cols })
    }

    /// The next non-empty row, with exactly as many fields as the header.
    fn row(&mut self) -> Result<Option<Vec<String>>, TraceError> {
        loop {
            let Some(l) = self.lines.next() else { return Ok(None) };
            self.line += 1;
            let l = l.map_err(|source| TraceError::Io {
                line: self.line,
                source,
            })?;
            let l = l.trim_end_matches('\r');
            if l.is_empty() {
                continue;
            }
            let f: Vec<String> = l.split(',').map(str::to_string).collect();
            if f.len() != self.cols.len() {
                return Err(TraceError::FieldCount {
                    line: self.line,
                    expected: self.cols.len(),
                    found: f.len(),
                });
            }
            return Ok(Some(f));
        }
    }

    fn err(&self, fields: &[String], col: usize, reason: impl Into<String>) -> TraceError {
        TraceError::Field {
            line: self.line,
            field: self.cols[col].clone(),
            value: fields[col].clone(),
            reason: reason.into(),
        }
    }

    fn parse<T: std::str::FromStr>(&self, fields: &[String], col: usize) -> Result<T, TraceError>
    where
        T::Err: std::fmt::Display,
    {
        fields[col]
            .trim()
            .parse::<T>()
            .map_err(|e| self.err(fields, col, e.to_string()))
    }

    /// A finite, non-negative number.
    fn weight(&self, fields: &[String], col: usize) -> Result<f64, TraceError> {
        let v: f64 = self.parse(fields, col)?;
        if !v.is_finite() || v < 0.0 {
            return Err(self.err(fields, col, "must be finite and >= 0"));
        }
        Ok(v)
    }
}

/// `(model, domain, selection)`: one series of a long-format counts file.
pub type SeriesKey = (String, String, String);
/// `(model, domain, selection, layer_a, layer_b)`: one co-activation table.
pub type PairKey = (String, String, String, u32, u32);
/// layer -> expert -> count.
pub type LayerCounts = BTreeMap<u32, BTreeMap<u32, u64>>;

/// Per-expert token counts of several models, domains and selection rules
/// (`model,hf_model_id,domain,selection,layer,expert,count`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertCounts {
    /// `(model, domain, selection)` -> layer -> expert -> count.
    pub series: BTreeMap<SeriesKey, LayerCounts>,
}

impl ExpertCounts {
    pub fn parse_long_csv(input: impl BufRead) -> Result<Self, TraceError> {
        let mut csv = Csv::open(
            input,
            &[
                "model",
                "hf_model_id",
                "domain",
                "selection",
                "layer",
                "expert",
                "count",
            ],
        )?;
        let mut series: BTreeMap<SeriesKey, LayerCounts> = BTreeMap::new();
        while let Some(f) = csv.row()? {
            let layer: u32 = csv.parse(&f, 4)?;
            let expert: u32 = csv.parse(&f, 5)?;
            let count: u64 = csv.parse(&f, 6)?;
            let key = (f[0].clone(), f[2].clone(), f[3].clone());
            if series
                .entry(key)
                .or_default()
                .entry(layer)
                .or_default()
                .insert(expert, count)
                .is_some()
            {
                return Err(csv.err(&f, 5, "duplicate (model, domain, selection, layer, expert)"));
            }
        }
        Ok(Self { series })
    }

    /// Loads of one series as `(layer ids, loads[layer][expert])`; experts absent from a layer
    /// have count 0; the expert count is one past the largest id seen in the series.
    pub fn loads(&self, model: &str, domain: &str, selection: &str) -> Option<(Vec<u32>, Vec<Vec<f64>>)> {
        let s = self.series.get(&(model.into(), domain.into(), selection.into()))?;
        let experts = s.values().flat_map(|m| m.keys()).max().map_or(0, |&e| e as usize + 1);
        let layers = s.keys().copied().collect();
        let loads = s
            .values()
            .map(|m| {
                let mut row = vec![0.0; experts];
                for (&e, &c) in m {
                    row[e as usize] = c as f64;
                }
                row
            })
            .collect();
        Some((layers, loads))
    }
}

/// Cross-layer co-activation counts (`model,domain,selection,layer_a,layer_b,expert_a,expert_b,count`):
/// how many tokens chose `expert_a` at `layer_a` and `expert_b` at `layer_b`.
#[derive(Debug, Clone, PartialEq)]
pub struct CoActivation {
    /// `(model, domain, selection, layer_a, layer_b)` -> `(expert_a, expert_b)` -> count.
    pub pairs: BTreeMap<PairKey, BTreeMap<(u32, u32), u64>>,
}

impl CoActivation {
    pub fn parse_long_csv(input: impl BufRead) -> Result<Self, TraceError> {
        let mut csv = Csv::open(
            input,
            &[
                "model",
                "domain",
                "selection",
                "layer_a",
                "layer_b",
                "expert_a",
                "expert_b",
                "count",
            ],
        )?;
        let mut pairs: BTreeMap<_, BTreeMap<(u32, u32), u64>> = BTreeMap::new();
        while let Some(f) = csv.row()? {
            let la: u32 = csv.parse(&f, 3)?;
            let lb: u32 = csv.parse(&f, 4)?;
            let ea: u32 = csv.parse(&f, 5)?;
            let eb: u32 = csv.parse(&f, 6)?;
            let c: u64 = csv.parse(&f, 7)?;
            let key = (f[0].clone(), f[1].clone(), f[2].clone(), la, lb);
            if pairs.entry(key).or_default().insert((ea, eb), c).is_some() {
                return Err(csv.err(&f, 6, "duplicate (expert_a, expert_b) pair"));
            }
        }
        Ok(Self { pairs })
    }

    /// Row-stochastic affinity `P(expert_b at layer_b | expert_a at layer_a)` as an
    /// `experts x experts` matrix (rows without observations are uniform).
    pub fn affinity(
        &self,
        model: &str,
        domain: &str,
        selection: &str,
        layer_a: u32,
        layer_b: u32,
    ) -> Option<Vec<Vec<f64>>> {
        let m = self
            .pairs
            .get(&(model.into(), domain.into(), selection.into(), layer_a, layer_b))?;
        let n = m.keys().map(|&(a, b)| a.max(b) as usize + 1).max().unwrap_or(0);
        let mut rows = vec![vec![0.0; n]; n];
        for (&(a, b), &c) in m {
            rows[a as usize][b as usize] = c as f64;
        }
        for r in &mut rows {
            let s: f64 = r.iter().sum();
            r.iter_mut()
                .for_each(|v| *v = if s > 0.0 { *v / s } else { 1.0 / n as f64 });
        }
        Some(rows)
    }
}

/// Per-layer expert activation fractions (Qwen3 analysis files:
/// `Layer,Language,Expert_0,..,Expert_{E-1}`), one row per (layer, language).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerFractions {
    pub num_experts: usize,
    /// language -> layer -> fractions (non-negative, as given; not renormalised).
    pub rows: BTreeMap<String, BTreeMap<u32, Vec<f64>>>,
}

impl LayerFractions {
    pub fn parse_csv(input: impl BufRead) -> Result<Self, TraceError> {
        let mut csv = Csv::open(input, &["Layer", "Language"])?;
        let num_experts = csv.cols.len() - 2;
        for (i, c) in csv.cols[2..].iter().enumerate() {
            if *c != format!("Expert_{i}") {
                return Err(TraceError::Header(format!(
                    "column {} is `{c}`, expected `Expert_{i}`",
                    i + 3
                )));
            }
        }
        if num_experts == 0 {
            return Err(TraceError::Header("no Expert_<n> columns".into()));
        }
        let mut rows: BTreeMap<String, BTreeMap<u32, Vec<f64>>> = BTreeMap::new();
        while let Some(f) = csv.row()? {
            let layer: u32 = csv.parse(&f, 0)?;
            let fr = (2..f.len()).map(|c| csv.weight(&f, c)).collect::<Result<Vec<_>, _>>()?;
            if rows.entry(f[1].clone()).or_default().insert(layer, fr).is_some() {
                return Err(csv.err(&f, 0, "duplicate (layer, language)"));
            }
        }
        Ok(Self { num_experts, rows })
    }

    /// `loads[layer][expert]` of one language, layers in ascending order.
    pub fn loads(&self, language: &str) -> Option<Vec<Vec<f64>>> {
        Some(self.rows.get(language)?.values().cloned().collect())
    }
}

/// A per-token top-k trace with the router score of every choice.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredTrace {
    pub trace: TokenTrace,
    /// `scores[token][moe_layer * k + j]`, aligned with `trace.tokens[token].experts`.
    pub scores: Vec<Vec<f32>>,
}

impl ScoredTrace {
    /// Parse FLAME-MoE's derived top-6 CSV
    /// (`phase,position_folder,layer,row,seq_idx,tok_in_seq,e1..e6,s1..s6`), one row per
    /// (layer, token). `prefill` rows are prefill token `tok_in_seq` of sequence `seq_idx`;
    /// `position` rows are decode tokens, their position given by `position_folder`
    /// (`1st`, `2nd`, .. `10th`). Every token must have a row at every layer of the file.
    pub fn parse_flame_topk_csv(input: impl BufRead, num_experts: usize) -> Result<Self, TraceError> {
        let mut csv = Csv::open(
            input,
            &["phase", "position_folder", "layer", "row", "seq_idx", "tok_in_seq"],
        )?;
        let rest = csv.cols.len() - 6;
        let k = rest / 2;
        let names_ok = rest % 2 == 0
            && k > 0
            && (0..k).all(|j| csv.cols[6 + j] == format!("e{}", j + 1) && csv.cols[6 + k + j] == format!("s{}", j + 1));
        if !names_ok {
            return Err(TraceError::Header(
                "expected e1..ek then s1..sk after tok_in_seq".into(),
            ));
        }
        // (phase, seq, position) -> layer -> (experts, scores), plus the line of first sight.
        type Routes = BTreeMap<u32, (Vec<u32>, Vec<f32>)>;
        let mut toks: BTreeMap<(Phase, u32, u32), (usize, Routes)> = BTreeMap::new();
        let mut layers = std::collections::BTreeSet::new();
        while let Some(f) = csv.row()? {
            let phase = match f[0].as_str() {
                "prefill" => Phase::Prefill,
                "position" => Phase::Decode,
                _ => return Err(csv.err(&f, 0, "expected `prefill` or `position`")),
            };
            let layer: u32 = csv.parse(&f, 2)?;
            let seq: u32 = csv.parse(&f, 4)?;
            let pos: u32 = match phase {
                Phase::Prefill => csv.parse(&f, 5)?,
                Phase::Decode => {
                    let digits: String = f[1].chars().take_while(char::is_ascii_digit).collect();
                    match digits.parse::<u32>() {
                        Ok(n) if n >= 1 => n - 1,
                        _ => return Err(csv.err(&f, 1, "expected an ordinal like `1st`")),
                    }
                }
            };
            let mut experts = Vec::with_capacity(k);
            let mut scores = Vec::with_capacity(k);
            for j in 0..k {
                let e: u32 = csv.parse(&f, 6 + j)?;
                if e as usize >= num_experts {
                    return Err(csv.err(&f, 6 + j, format!("expert id out of range ({num_experts} experts)")));
                }
                let s = csv.weight(&f, 6 + k + j)? as f32;
                experts.push(e);
                scores.push(s);
            }
            layers.insert(layer);
            let line = csv.line;
            let entry = toks.entry((phase, seq, pos)).or_insert_with(|| (line, BTreeMap::new()));
            if entry.1.insert(layer, (experts, scores)).is_some() {
                return Err(csv.err(&f, 2, "duplicate row for this token and layer"));
            }
        }
        let layer_ids: Vec<u32> = layers.into_iter().collect();
        let mut tokens = Vec::with_capacity(toks.len());
        let mut all_scores = Vec::with_capacity(toks.len());
        for ((phase, seq, pos), (line, per_layer)) in toks {
            if per_layer.len() != layer_ids.len() {
                let missing = layer_ids
                    .iter()
                    .find(|l| !per_layer.contains_key(l))
                    .copied()
                    .unwrap_or(0);
                return Err(TraceError::Field {
                    line,
                    field: "layer".into(),
                    value: missing.to_string(),
                    reason: format!("token (seq {seq}, position {pos}) has no row for this layer"),
                });
            }
            let mut experts = Vec::with_capacity(layer_ids.len() * k);
            let mut scores = Vec::with_capacity(layer_ids.len() * k);
            for (e, s) in per_layer.into_values() {
                experts.extend(e);
                scores.extend(s);
            }
            tokens.push(TokenRoute {
                subject: "flame".into(),
                query_id: seq,
                phase,
                token_idx: pos,
                experts,
            });
            all_scores.push(scores);
        }
        Ok(Self {
            trace: TokenTrace {
                layer_ids,
                num_experts,
                top_k: k,
                tokens,
            },
            scores: all_scores,
        })
    }
}

/// A vLLM FusedMoE route log (JSON lines): a `meta` record (`model_id`, `layers_logged`,
/// `top_k`, optionally `num_experts`) and then one `route` record per token and logged layer
/// (`req_id`, `token_idx`, `layer`, `topk_ids`, `topk_weights`), in forward-pass order.
/// Request boundaries are not kept by these logs, so tokens stay in log order.
#[derive(Debug, Clone, PartialEq)]
pub struct VllmRoutes {
    pub model: String,
    pub layer_ids: Vec<u32>,
    pub num_experts: usize,
    pub top_k: usize,
    /// `routes[token]`: top-k ids per logged layer, layer-major (`layer * k + j`).
    pub routes: Vec<Vec<u32>>,
    /// Tokens kept.
    pub tokens: usize,
    /// Records dropped as vLLM warm-up passes (runs of identical `topk_ids`).
    pub dropped_warmup: usize,
}

impl VllmRoutes {
    /// Runs of at least this many consecutive tokens with identical routes are vLLM's dummy
    /// profiling / warm-up passes (thousands of records), not routing, and are dropped.
    pub const WARMUP_RUN: usize = 32;

    /// Parse the log. `num_experts` overrides the meta record's (which some logs lack; then it
    /// is required). Warm-up runs (see [`Self::WARMUP_RUN`]) are dropped, wherever they are.
    pub fn parse_jsonl(input: impl BufRead, num_experts: Option<usize>) -> Result<Self, TraceError> {
        let mut lines = input.lines().enumerate();
        let (meta, line_no) = loop {
            match lines.next() {
                None => return Err(TraceError::Empty),
                Some((i, l)) => {
                    let l = l.map_err(|source| TraceError::Io { line: i + 1, source })?;
                    if !l.trim().is_empty() {
                        break (json_line(&l, i + 1)?, i + 1);
                    }
                }
            }
        };
        let header = |what: &str| TraceError::Header(format!("vLLM meta record (line {line_no}): {what}"));
        if meta.get("type").and_then(serde_json::Value::as_str) != Some("meta") {
            return Err(header("the first record must have \"type\": \"meta\""));
        }
        let model = meta
            .get("model_id")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?")
            .to_string();
        let layer_ids: Vec<u32> = meta
            .get("layers_logged")
            .and_then(serde_json::Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect()
            })
            .ok_or_else(|| header("`layers_logged` must be an array of layer ids"))?;
        let top_k = meta
            .get("top_k")
            .and_then(serde_json::Value::as_u64)
            .filter(|&k| k > 0)
            .ok_or_else(|| header("`top_k` must be a positive integer"))? as usize;
        let num_experts = num_experts
            .or_else(|| {
                meta.get("num_experts")
                    .and_then(serde_json::Value::as_u64)
                    .map(|n| n as usize)
            })
            .ok_or_else(|| header("no `num_experts`: pass the number of experts"))?;
        if layer_ids.is_empty() || num_experts < top_k {
            return Err(header("needs at least one logged layer and num_experts >= top_k"));
        }
        let mut routes: Vec<Vec<u32>> = Vec::new();
        let mut current: Vec<u32> = Vec::with_capacity(layer_ids.len() * top_k);
        let mut last_line = line_no;
        for (i, l) in lines {
            let line = i + 1;
            last_line = line;
            let l = l.map_err(|source| TraceError::Io { line, source })?;
            if l.trim().is_empty() {
                continue;
            }
            let v = json_line(&l, line)?;
            let field = |name: &str, value: &serde_json::Value, reason: &str| TraceError::Field {
                line,
                field: name.into(),
                value: value.to_string(),
                reason: reason.into(),
            };
            let null = serde_json::Value::Null;
            let ty = v.get("type").unwrap_or(&null);
            if ty.as_str() != Some("route") {
                return Err(field("type", ty, "expected `route`"));
            }
            let layer = v.get("layer").unwrap_or(&null);
            let want = layer_ids[current.len() / top_k];
            if layer.as_u64() != Some(u64::from(want)) {
                return Err(field(
                    "layer",
                    layer,
                    &format!("expected layer {want} (layers_logged order)"),
                ));
            }
            let ids = v.get("topk_ids").unwrap_or(&null);
            let arr = ids
                .as_array()
                .filter(|a| a.len() == top_k)
                .ok_or_else(|| field("topk_ids", ids, &format!("expected an array of {top_k} ids")))?;
            for x in arr {
                match x.as_u64() {
                    Some(e) if (e as usize) < num_experts => current.push(e as u32),
                    _ => return Err(field("topk_ids", ids, &format!("ids must be below {num_experts}"))),
                }
            }
            if current.len() == layer_ids.len() * top_k {
                routes.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            return Err(TraceError::Field {
                line: last_line,
                field: "layer".into(),
                value: String::new(),
                reason: "the log ends in the middle of a token (not every logged layer has a record)".into(),
            });
        }
        let before = routes.len();
        let mut kept = Vec::with_capacity(routes.len());
        let mut i = 0;
        while i < routes.len() {
            let run = routes[i..].iter().take_while(|r| **r == routes[i]).count();
            if run < Self::WARMUP_RUN {
                kept.extend_from_slice(&routes[i..i + run]);
            }
            i += run;
        }
        let routes = kept;
        let dropped = before - routes.len();
        Ok(Self {
            model,
            tokens: routes.len(),
            dropped_warmup: dropped * layer_ids.len(),
            layer_ids,
            num_experts,
            top_k,
            routes,
        })
    }

    /// Replay steps of `batch` consecutive tokens (the last step may be smaller), all in one
    /// group: the log is one stream, so step-to-step predictors carry over.
    pub fn consecutive_steps(&self, batch: usize) -> Result<Vec<crate::trace::Step>, TraceError> {
        if batch == 0 {
            return Err(TraceError::ZeroBatch);
        }
        if self.routes.is_empty() {
            return Err(TraceError::NoTokens(Phase::Decode));
        }
        let (l, k) = (self.layer_ids.len(), self.top_k);
        Ok(self
            .routes
            .chunks(batch)
            .enumerate()
            .map(|(s, toks)| {
                let mut per_layer = vec![Vec::with_capacity(toks.len() * k); l];
                for t in toks {
                    for (layer, r) in per_layer.iter_mut().enumerate() {
                        r.extend_from_slice(&t[layer * k..(layer + 1) * k]);
                    }
                }
                crate::trace::Step::new(0, s, per_layer, self.num_experts)
            })
            .collect())
    }
}

/// One JSON object per line, or an error naming the line.
fn json_line(text: &str, line: usize) -> Result<serde_json::Value, TraceError> {
    serde_json::from_str(text).map_err(|e| TraceError::Field {
        line,
        field: "json".into(),
        value: text.chars().take(60).collect(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_fill_missing_experts_and_reject_bad_rows() {
        let ok = "model,hf_model_id,domain,selection,layer,expert,count\n\
                  m,h,d,top1,0,0,5\nm,h,d,top1,0,2,1\nm,h,d,top1,7,1,3\n";
        let c = ExpertCounts::parse_long_csv(ok.as_bytes()).unwrap();
        let (layers, loads) = c.loads("m", "d", "top1").unwrap();
        assert_eq!(layers, vec![0, 7]);
        assert_eq!(loads, vec![vec![5.0, 0.0, 1.0], vec![0.0, 3.0, 0.0]]);
        assert!(c.loads("m", "x", "top1").is_none());
        let bad = "model,hf_model_id,domain,selection,layer,expert,count\nm,h,d,top1,0,0,-5\n";
        let e = ExpertCounts::parse_long_csv(bad.as_bytes()).unwrap_err();
        assert!(
            matches!(e, TraceError::Field { line: 2, ref field, .. } if field == "count"),
            "{e}"
        );
        let trunc = "model,hf_model_id,domain,selection,layer,expert,count\nm,h,d,top1,0\n";
        let e = ExpertCounts::parse_long_csv(trunc.as_bytes()).unwrap_err();
        assert!(matches!(e, TraceError::FieldCount { line: 2, .. }), "{e}");
        let dup = "model,hf_model_id,domain,selection,layer,expert,count\nm,h,d,t,0,0,1\nm,h,d,t,0,0,2\n";
        assert!(ExpertCounts::parse_long_csv(dup.as_bytes()).is_err());
        assert!(matches!(
            ExpertCounts::parse_long_csv("a,b\n".as_bytes()),
            Err(TraceError::Header(_))
        ));
    }

    #[test]
    fn coactivation_rows_normalise() {
        let s = "model,domain,selection,layer_a,layer_b,expert_a,expert_b,count\n\
                 m,d,topk,0,7,0,0,3\nm,d,topk,0,7,0,1,1\nm,d,topk,0,7,1,1,2\n";
        let c = CoActivation::parse_long_csv(s.as_bytes()).unwrap();
        let a = c.affinity("m", "d", "topk", 0, 7).unwrap();
        assert_eq!(a, vec![vec![0.75, 0.25], vec![0.0, 1.0]]);
        let bad = "model,domain,selection,layer_a,layer_b,expert_a,expert_b,count\nm,d,topk,0,7,x,0,3\n";
        let e = CoActivation::parse_long_csv(bad.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("expert_a"), "{e}");
    }

    #[test]
    fn fractions_by_language_and_layer() {
        let s = "Layer,Language,Expert_0,Expert_1\n1,English,0.25,0.75\n0,English,0.5,0.5\n0,Hebrew,1,0\n";
        let f = LayerFractions::parse_csv(s.as_bytes()).unwrap();
        assert_eq!(f.num_experts, 2);
        assert_eq!(f.loads("English").unwrap(), vec![vec![0.5, 0.5], vec![0.25, 0.75]]);
        let nan = "Layer,Language,Expert_0\n0,English,NaN\n";
        let e = LayerFractions::parse_csv(nan.as_bytes()).unwrap_err();
        assert!(
            matches!(e, TraceError::Field { line: 2, ref field, .. } if field == "Expert_0"),
            "{e}"
        );
        assert!(LayerFractions::parse_csv("Layer,Language,Expert_1\n".as_bytes()).is_err());
    }

    #[test]
    fn vllm_log_drops_warm_up_and_batches_in_order() {
        let meta = r#"{"type": "meta", "model_id": "m", "layers_logged": [0], "top_k": 2, "num_experts": 4}"#;
        let r = |a: u32, b: u32| {
            format!(r#"{{"type": "route", "req_id": "r0", "token_idx": 0, "layer": 0, "topk_ids": [{a}, {b}]}}"#)
        };
        let warm = vec![r(0, 1); VllmRoutes::WARMUP_RUN];
        let log = [
            vec![meta.to_string()],
            warm.clone(),
            vec![r(2, 3), r(1, 2)],
            warm,
            vec![r(3, 0)],
        ]
        .concat()
        .join("\n");
        let v = VllmRoutes::parse_jsonl(log.as_bytes(), None).unwrap();
        assert_eq!(
            (v.tokens, v.dropped_warmup, v.top_k),
            (3, 2 * VllmRoutes::WARMUP_RUN, 2)
        );
        let steps = v.consecutive_steps(2).unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[0].routes[0], vec![2, 3, 1, 2]);
        assert_eq!(steps[1].counts[0], vec![1, 0, 0, 1]);
        let bad = [meta.to_string(), r(0, 9)].join("\n");
        let e = VllmRoutes::parse_jsonl(bad.as_bytes(), None).unwrap_err();
        assert!(
            matches!(e, TraceError::Field { line: 2, ref field, .. } if field == "topk_ids"),
            "{e}"
        );
        let trunc = [meta.to_string(), "{\"type\": \"route\", \"lay".to_string()].join("\n");
        let e = VllmRoutes::parse_jsonl(trunc.as_bytes(), None).unwrap_err();
        assert!(
            matches!(e, TraceError::Field { line: 2, ref field, .. } if field == "json"),
            "{e}"
        );
        let no_experts = r#"{"type": "meta", "layers_logged": [0], "top_k": 2}"#;
        assert!(matches!(
            VllmRoutes::parse_jsonl(no_experts.as_bytes(), None),
            Err(TraceError::Header(_))
        ));
        assert!(VllmRoutes::parse_jsonl(no_experts.as_bytes(), Some(4)).is_ok());
        assert!(matches!(
            VllmRoutes::parse_jsonl("".as_bytes(), None),
            Err(TraceError::Empty)
        ));
    }

    #[test]
    fn flame_rows_become_top_k_tokens() {
        let h = "phase,position_folder,layer,row,seq_idx,tok_in_seq,e1,e2,s1,s2\n";
        let s = format!(
            "{h}prefill,-,2,0,0,0,1,3,0.5,0.25\nprefill,-,3,0,0,0,2,0,0.6,0.1\n\
             position,1st,2,0,0,-,0,1,0.4,0.3\nposition,1st,3,0,0,-,3,2,0.2,0.1\n"
        );
        let t = ScoredTrace::parse_flame_topk_csv(s.as_bytes(), 4).unwrap();
        assert_eq!(t.trace.top_k, 2);
        assert_eq!(t.trace.layer_ids, vec![2, 3]);
        assert_eq!(t.trace.tokens.len(), 2);
        let pre = t.trace.tokens.iter().position(|x| x.phase == Phase::Prefill).unwrap();
        assert_eq!(t.trace.tokens[pre].experts, vec![1, 3, 2, 0]);
        assert_eq!(t.scores[pre], vec![0.5, 0.25, 0.6, 0.1]);
        let steps = t.trace.batch_steps(Phase::Decode, 8).unwrap();
        assert_eq!(steps[0].counts[1], vec![0, 0, 1, 1]);
        // A token missing one layer names the line where the token first appeared.
        let missing = format!("{h}prefill,-,2,0,0,0,1,3,0.5,0.25\nprefill,-,3,0,0,1,2,0,0.6,0.1\n");
        let e = ScoredTrace::parse_flame_topk_csv(missing.as_bytes(), 4).unwrap_err();
        assert!(
            matches!(e, TraceError::Field { ref field, .. } if field == "layer"),
            "{e}"
        );
        let range = format!("{h}prefill,-,2,0,0,0,9,3,0.5,0.25\n");
        let e = ScoredTrace::parse_flame_topk_csv(range.as_bytes(), 4).unwrap_err();
        assert!(
            matches!(e, TraceError::Field { line: 2, ref field, .. } if field == "e1"),
            "{e}"
        );
        let ord = format!("{h}position,first,2,0,0,-,0,1,0.4,0.3\n");
        assert!(ScoredTrace::parse_flame_topk_csv(ord.as_bytes(), 4).is_err());
    }
}
