//! Expert choices of simulated tokens, drawn from a routing trace.
//!
//! # Mapping (deterministic, seeded)
//! The trace is cut into *queries* (Llama-4 MMLU: one per `(subject, query_id)`, tokens ordered
//! by `token_idx`, prefill and decode kept apart; synthetic: one per batch slot of a generated
//! group, its decode steps in order). Simulated request `r` takes query
//! `splitmix64(seed ^ r) mod Q`; its prefill token `i` routes as that query's prefill token
//! `i mod P` and its decode token `j` as the query's decode token `j mod D` (queries without
//! decode tokens reuse their prefill tokens, and vice versa). So a request keeps one query's
//! temporal and cross-layer structure for its whole life, long requests cycle through it, and a
//! seed always gives the same routes.

use std::collections::BTreeMap;
use std::io::BufRead;

use shared::synth::{generate, SynthConfig};
use shared::trace::{Phase, TokenTrace};
use shared::trace_formats::LayerFractions;

use crate::SimError;

#[derive(Debug, Clone, Default)]
struct Query {
    prefill: Vec<u32>,
    decode: Vec<u32>,
    /// Per phase, counts of one whole pass over its tokens (`[layer * experts + expert]`),
    /// where that is cheaper than counting the tokens: long prompts cycle many times.
    prefill_cycle: Option<Vec<u32>>,
    decode_cycle: Option<Vec<u32>>,
}

/// Expert ids in the narrowest width that holds them. The table is read once per simulated
/// token and layer and is far larger than the caches (Qwen3's synthetic pool: 32,768 tokens x
/// 48 layers x top-8), so its width matters to the simulator's speed as much as the counting.
#[derive(Debug, Clone)]
enum Table {
    U8(Vec<u8>),
    U16(Vec<u16>),
}

impl Table {
    fn new(ids: Vec<u32>, num_experts: usize) -> Result<Self, SimError> {
        if num_experts <= 1 << 8 {
            Ok(Self::U8(ids.into_iter().map(|e| e as u8).collect()))
        } else if num_experts <= 1 << 16 {
            Ok(Self::U16(ids.into_iter().map(|e| e as u16).collect()))
        } else {
            Err(SimError::Routing(format!(
                "{num_experts} experts per layer: at most 65,536 are supported"
            )))
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::U8(t) => t.len(),
            Self::U16(t) => t.len(),
        }
    }

    /// Ids `range`, as one of two slices (the other empty).
    fn get(&self, range: std::ops::Range<usize>) -> (&[u8], &[u16]) {
        match self {
            Self::U8(t) => (&t[range], &[]),
            Self::U16(t) => (&[], &t[range]),
        }
    }
}

/// Call `f` with the rows (`width` ids each) of `tokens`, 16 at a time. Counting a batch layer
/// by layer fetches its rows from memory side by side (rows of random tokens miss the caches)
/// while each layer's counters stay hot; token by token, the loads of one row at a time made
/// counting memory-latency bound.
fn for_each_batch<'a, T>(table: &'a [T], tokens: &[u32], width: usize, mut f: impl FnMut(&[&'a [T]])) {
    const BATCH: usize = 16;
    let mut rows: [&[T]; BATCH] = [&[]; BATCH];
    for batch in tokens.chunks(BATCH) {
        for (row, &t) in rows.iter_mut().zip(batch) {
            *row = &table[t as usize * width..(t as usize + 1) * width];
        }
        f(&rows[..batch.len()]);
    }
}

/// Add the rows of `tokens` (`layers x k` expert ids each) to `counts[layer][expert]`.
fn count_rows<T: Copy + Into<usize>>(table: &[T], tokens: &[u32], k: usize, counts: &mut [Vec<u32>]) {
    for_each_batch(table, tokens, counts.len() * k, |rows| {
        for (layer, c) in counts.iter_mut().enumerate() {
            for row in rows {
                for &e in &row[layer * k..(layer + 1) * k] {
                    c[e.into()] += 1;
                }
            }
        }
    });
}

/// [`count_rows`] for one-byte ids: counters of 256 per layer, indexed by the id itself (no
/// bounds check per increment), added to `counts` at the end.
fn count_rows_u8(table: &[u8], tokens: &[u32], k: usize, counts: &mut [Vec<u32>]) {
    let mut hist = vec![[0u32; 256]; counts.len()];
    for_each_batch(table, tokens, counts.len() * k, |rows| {
        for (layer, h) in hist.iter_mut().enumerate() {
            for row in rows {
                for &e in &row[layer * k..(layer + 1) * k] {
                    h[usize::from(e)] += 1;
                }
            }
        }
    });
    for (c, h) in counts.iter_mut().zip(&hist) {
        for (x, &y) in c.iter_mut().zip(h) {
            *x += y;
        }
    }
}

/// Routes of trace tokens, `table[token * layers * k ..]`, grouped into queries.
#[derive(Debug, Clone)]
pub struct RoutingPool {
    pub num_experts: usize,
    pub top_k: usize,
    pub layers: usize,
    /// Where the routes come from (for reports).
    pub source: String,
    table: Table,
    queries: Vec<Query>,
}

/// SplitMix64 finaliser: a well-mixed hash of `x`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl RoutingPool {
    /// From a per-token trace (the Llama-4-Maverick MMLU CSV).
    pub fn from_token_trace(trace: &TokenTrace) -> Result<Self, SimError> {
        let (layers, k) = (trace.num_layers(), trace.top_k);
        type QueryTokens = Vec<(Phase, u32, usize)>;
        let mut by_query: BTreeMap<(&str, u32), QueryTokens> = BTreeMap::new();
        for (i, t) in trace.tokens.iter().enumerate() {
            by_query
                .entry((t.subject.as_str(), t.query_id))
                .or_default()
                .push((t.phase, t.token_idx, i));
        }
        let mut table = Vec::with_capacity(trace.tokens.len() * layers * k);
        for t in &trace.tokens {
            table.extend_from_slice(&t.experts[..layers * k]);
        }
        let queries = by_query
            .into_values()
            .map(|mut toks| {
                toks.sort_by_key(|&(p, idx, _)| (p == Phase::Decode, idx));
                let pick = |ph| {
                    toks.iter()
                        .filter(|t| t.0 == ph)
                        .map(|t| t.2 as u32)
                        .collect::<Vec<_>>()
                };
                Query {
                    prefill: pick(Phase::Prefill),
                    decode: pick(Phase::Decode),
                    ..Default::default()
                }
            })
            .collect();
        Self::checked(trace.num_experts, k, layers, "per-token trace".into(), table, queries)
    }

    /// Synthetic routes from per-layer popularity (`shared::synth`, seeded): `groups` groups
    /// of `batch` queries with `steps` decode tokens each.
    pub fn from_popularity(popularity: &[Vec<f64>], top_k: usize, seed: u64, source: String) -> Result<Self, SimError> {
        let (groups, batch, steps) = (8, 64, 64);
        let cfg = SynthConfig::new(top_k, batch, groups, steps, seed);
        let gen = generate(popularity, None, &cfg)?;
        let layers = popularity.len();
        let experts = popularity.first().map_or(0, Vec::len);
        let mut table = Vec::with_capacity(groups * batch * steps * layers * top_k);
        let mut queries = vec![Query::default(); groups * batch];
        for (s, step) in gen.iter().enumerate() {
            let g = s / steps;
            let b_count = step.routes.first().map_or(0, |r| r.len() / top_k);
            for b in 0..b_count {
                let id = (table.len() / (layers * top_k)) as u32;
                for r in &step.routes {
                    table.extend_from_slice(&r[b * top_k..(b + 1) * top_k]);
                }
                queries[g * batch + b].decode.push(id);
            }
        }
        Self::checked(experts, top_k, layers, source, table, queries)
    }

    fn checked(
        num_experts: usize,
        top_k: usize,
        layers: usize,
        source: String,
        table: Vec<u32>,
        queries: Vec<Query>,
    ) -> Result<Self, SimError> {
        let queries: Vec<Query> = queries
            .into_iter()
            .filter(|q| !q.prefill.is_empty() || !q.decode.is_empty())
            .collect();
        if queries.is_empty() || layers == 0 || top_k == 0 {
            return Err(SimError::Routing("the trace holds no routed tokens".into()));
        }
        if let Some(&e) = table.iter().find(|&&e| e as usize >= num_experts) {
            return Err(SimError::ExpertMismatch {
                trace: e as usize + 1,
                model: num_experts,
            });
        }
        let mut pool = Self {
            num_experts,
            top_k,
            layers,
            source,
            table: Table::new(table, num_experts)?,
            queries,
        };
        // A pass over a list costs `len * layers * k` increments token by token and
        // `layers * experts` additions from its counts: keep the counts where they are at most
        // half the work (so they also take at most half the table's memory).
        let cycle = |pool: &Self, list: &[u32]| -> Option<Vec<u32>> {
            if list.len() * top_k < 2 * num_experts {
                return None;
            }
            let mut c = vec![vec![0u32; num_experts]; layers];
            pool.count_tokens(list, &mut c);
            Some(c.concat())
        };
        for i in 0..pool.queries.len() {
            let pc = cycle(&pool, &pool.queries[i].prefill);
            let dc = cycle(&pool, &pool.queries[i].decode);
            pool.queries[i].prefill_cycle = pc;
            pool.queries[i].decode_cycle = dc;
        }
        Ok(pool)
    }

    /// Read a routing file, choosing the format from its header: the Llama-4 per-token CSV
    /// (`subject,query_id,phase,token_idx,L..`) or Qwen3 per-layer fractions
    /// (`Layer,Language,Expert_..`, synthesised with `shared::synth` from the `language` rows, or
    /// the first language). `num_experts` is the model's, checked against the trace.
    pub fn read(input: impl BufRead, num_experts: usize, top_k: usize, seed: u64) -> Result<Self, SimError> {
        let mut input = input;
        let mut first = String::new();
        input.read_line(&mut first).map_err(|source| SimError::Io {
            what: "the routing trace".into(),
            source,
        })?;
        let rest = std::io::Read::chain(std::io::Cursor::new(first.clone()), input);
        if first.trim().is_empty() {
            return Err(SimError::Routing("the file is empty".into()));
        }
        if first.starts_with("subject,query_id,phase,token_idx") {
            // Parse with a generous expert bound, then compare with the model.
            let trace = TokenTrace::parse_top1_csv(rest, u32::MAX as usize)?;
            let seen = trace
                .tokens
                .iter()
                .flat_map(|t| t.experts.iter())
                .max()
                .map_or(0, |&m| m as usize + 1);
            if seen > num_experts {
                return Err(SimError::ExpertMismatch {
                    trace: seen,
                    model: num_experts,
                });
            }
            let mut t = trace;
            t.num_experts = num_experts;
            return Self::from_token_trace(&t);
        }
        if first.starts_with("Layer,Language") {
            let fr = LayerFractions::parse_csv(rest)?;
            if fr.num_experts != num_experts {
                return Err(SimError::ExpertMismatch {
                    trace: fr.num_experts,
                    model: num_experts,
                });
            }
            let (lang, _) = fr
                .rows
                .iter()
                .next()
                .ok_or_else(|| SimError::Routing("no (layer, language) rows".into()))?;
            let loads = fr.loads(lang).unwrap_or_default();
            return Self::from_popularity(
                &loads,
                top_k,
                seed,
                format!("synthetic from per-layer fractions ({lang})"),
            );
        }
        Err(SimError::Routing(format!(
            "unknown format (header `{}`): expected the per-token CSV or per-layer fractions",
            first.trim()
        )))
    }

    /// The trace query simulated request `request` follows.
    pub fn query_of(&self, request: u64, seed: u64) -> usize {
        (splitmix64(seed ^ request.wrapping_mul(0x2545_F491_4F6C_DD1D)) % self.queries.len() as u64) as usize
    }

    /// The trace token for token `pos` of `query` in `phase` (see the module mapping).
    #[inline]
    pub fn token(&self, query: usize, prefill: bool, pos: usize) -> usize {
        let list = self.phase(query, prefill).0;
        list[pos % list.len()] as usize
    }

    /// The token list a phase of `query` follows (the other phase's when it has none), with
    /// its whole-pass counts if kept.
    fn phase(&self, query: usize, prefill: bool) -> (&[u32], Option<&[u32]>) {
        let q = &self.queries[query];
        match (prefill, q.prefill.is_empty(), q.decode.is_empty()) {
            (true, false, _) | (false, _, true) => (&q.prefill, q.prefill_cycle.as_deref()),
            _ => (&q.decode, q.decode_cycle.as_deref()),
        }
    }

    /// The `top_k` experts of trace token `token` at MoE layer `layer`.
    #[inline]
    pub fn experts(&self, token: usize, layer: usize) -> impl Iterator<Item = u32> + '_ {
        let base = (token * self.layers + layer) * self.top_k;
        let (a, b) = self.table.get(base..base + self.top_k);
        a.iter().map(|&e| u32::from(e)).chain(b.iter().map(|&e| u32::from(e)))
    }

    /// Count the choices of tokens `start..start + n` of `query` in `phase` (the tokens
    /// [`Self::token`] names) at every layer: whole passes over the query's tokens are added to
    /// `counts[layer][expert]` from their precomputed counts, the other tokens are appended to
    /// `single` for [`Self::count_tokens`] (which counts many at once faster).
    pub fn count_range(
        &self,
        query: usize,
        prefill: bool,
        start: usize,
        n: usize,
        counts: &mut [Vec<u32>],
        single: &mut Vec<u32>,
    ) {
        let (list, cycle) = self.phase(query, prefill);
        let len = list.len();
        let end = start + n;
        let mut p = start;
        let mut i = start % len;
        if let Some(cyc) = cycle {
            while p < end && i != 0 {
                single.push(list[i]);
                p += 1;
                i = if i + 1 == len { 0 } else { i + 1 };
            }
            let full = (end - p) / len;
            if full > 0 {
                let f = full as u32;
                for (c, row) in counts.iter_mut().zip(cyc.chunks_exact(self.num_experts)) {
                    for (x, &y) in c.iter_mut().zip(row) {
                        *x += y * f;
                    }
                }
                p += full * len;
            }
        }
        while p < end {
            single.push(list[i]);
            p += 1;
            i = if i + 1 == len { 0 } else { i + 1 };
        }
    }

    /// Add the choices of trace tokens `tokens` at every layer to `counts[layer][expert]`.
    pub fn count_tokens(&self, tokens: &[u32], counts: &mut [Vec<u32>]) {
        match &self.table {
            Table::U8(t) => count_rows_u8(t, tokens, self.top_k, counts),
            Table::U16(t) => count_rows(t, tokens, self.top_k, counts),
        }
    }

    pub fn num_queries(&self) -> usize {
        self.queries.len()
    }

    /// The same queries and tokens keeping only MoE layers `0..n`: a shallower model routed
    /// like the trace's first `n` layers (the CPU validation runs a 4-layer model on the
    /// Llama-4 trace this way).
    pub fn first_layers(&self, n: usize) -> Result<Self, SimError> {
        if n == 0 || n > self.layers {
            return Err(SimError::LayerMismatch {
                trace: self.layers,
                model: n,
            });
        }
        let keep: Vec<usize> = (0..n).collect();
        let source = format!("{} (first {n} of {} MoE layers)", self.source, self.layers);
        self.keep_layers(&keep, source)
    }

    /// The same queries and tokens keeping `n` MoE layers spread evenly over the model (the
    /// middle layer of each of `n` equal runs; see [`sampled_layers`]): what the simulator
    /// runs when it simulates a sample of the layers (`SimConfig::sample_moe_layers`).
    pub fn sample_layers(&self, n: usize) -> Result<Self, SimError> {
        if n == 0 || n > self.layers {
            return Err(SimError::LayerMismatch {
                trace: self.layers,
                model: n,
            });
        }
        let keep = sampled_layers(self.layers, n);
        let source = format!("{} ({n} of {} MoE layers: {keep:?})", self.source, self.layers);
        self.keep_layers(&keep, source)
    }

    /// The pool with only MoE layers `keep` (in that order), each token keeping its choices.
    fn keep_layers(&self, keep: &[usize], source: String) -> Result<Self, SimError> {
        let (l, k) = (self.layers, self.top_k);
        let table = (0..self.table.len() / (l * k))
            .flat_map(|t| keep.iter().flat_map(move |&layer| self.experts(t, layer)))
            .collect();
        let queries = self
            .queries
            .iter()
            .map(|q| Query {
                prefill: q.prefill.clone(),
                decode: q.decode.clone(),
                ..Default::default()
            })
            .collect();
        Self::checked(self.num_experts, k, keep.len(), source, table, queries)
    }
}

/// `n` of `layers` layers spread evenly: the middle of each of `n` equal runs of layers
/// (systematic sampling), e.g. 12 of 48 -> 2, 6, 10, .., 46. All of them when `n >= layers`.
pub fn sampled_layers(layers: usize, n: usize) -> Vec<usize> {
    if n >= layers {
        return (0..layers).collect();
    }
    (0..n).map(|i| ((2 * i + 1) * layers) / (2 * n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_layers_keeps_each_tokens_leading_choices() {
        let pop: Vec<Vec<f64>> = (0..3)
            .map(|l| (0..8).map(|e| 1.0 + ((e * 3 + l) % 5) as f64).collect())
            .collect();
        let pool = RoutingPool::from_popularity(&pop, 2, 7, "test".into()).unwrap();
        let two = pool.first_layers(2).unwrap();
        assert_eq!((two.layers, two.num_queries()), (2, pool.num_queries()));
        for q in [0, 5, pool.num_queries() - 1] {
            for p in 0..10 {
                let (a, b) = (pool.token(q, false, p), two.token(q, false, p));
                assert_eq!(a, b);
                for layer in 0..2 {
                    assert!(pool.experts(a, layer).eq(two.experts(b, layer)));
                }
            }
        }
        assert!(pool.first_layers(0).is_err());
        assert!(pool.first_layers(4).is_err());
    }

    #[test]
    fn sampled_layers_spread_evenly_and_keep_each_tokens_choices() {
        assert_eq!(sampled_layers(48, 12), (0..12).map(|i| 4 * i + 2).collect::<Vec<_>>());
        assert_eq!(sampled_layers(48, 1), vec![24]);
        assert_eq!(sampled_layers(5, 2), vec![1, 3]);
        assert_eq!(sampled_layers(4, 4), vec![0, 1, 2, 3]);
        assert_eq!(sampled_layers(4, 9), vec![0, 1, 2, 3]);
        let pop: Vec<Vec<f64>> = (0..6)
            .map(|l| (0..8).map(|e| 1.0 + ((e * 3 + l) % 5) as f64).collect())
            .collect();
        let pool = RoutingPool::from_popularity(&pop, 2, 7, "test".into()).unwrap();
        let three = pool.sample_layers(3).unwrap();
        assert_eq!((three.layers, three.num_queries()), (3, pool.num_queries()));
        for q in [0, 9, pool.num_queries() - 1] {
            for p in 0..10 {
                let (a, b) = (pool.token(q, false, p), three.token(q, false, p));
                for (i, layer) in [1, 3, 5].into_iter().enumerate() {
                    assert!(pool.experts(a, layer).eq(three.experts(b, i)));
                }
            }
        }
        assert!(pool.sample_layers(0).is_err());
        assert!(pool.sample_layers(7).is_err());
    }

    /// Counting a range through whole-pass counts gives exactly the token-by-token counts.
    #[test]
    fn range_counts_equal_token_by_token_counts() {
        // 8 experts: one-byte table; 300: two-byte table.
        for experts in [8, 300] {
            range_counts_case(experts);
        }
    }

    fn range_counts_case(experts: usize) {
        let (layers, k) = (3, 2);
        let pop: Vec<Vec<f64>> = (0..layers)
            .map(|l| (0..experts).map(|e| 1.0 + ((e * 7 + l) % 5) as f64).collect())
            .collect();
        let pool = RoutingPool::from_popularity(&pop, k, 5, "test".into()).unwrap();
        assert_eq!(
            pool.queries.iter().all(|q| q.decode_cycle.is_some()),
            64 * k >= 2 * experts,
            "whole-pass counts are kept where cheaper"
        );
        for (query, prefill, start, n) in [
            (0, true, 0, 1),
            (3, true, 5, 200),
            (7, false, 63, 2),
            (9, true, 64, 128),
            (11, false, 0, 0),
            (2, true, 17, 1000),
        ] {
            let mut want = vec![vec![0u32; experts]; layers];
            for p in start..start + n {
                for (layer, w) in want.iter_mut().enumerate() {
                    for e in pool.experts(pool.token(query, prefill, p), layer) {
                        w[e as usize] += 1;
                    }
                }
            }
            let (mut got, mut single) = (vec![vec![0u32; experts]; layers], Vec::new());
            pool.count_range(query, prefill, start, n, &mut got, &mut single);
            pool.count_tokens(&single, &mut got);
            assert_eq!(got, want, "{experts} experts, query {query} tokens {start}..+{n}");
        }
    }

    /// The narrow table holds exactly the generator's choices, in both widths.
    #[test]
    fn table_holds_the_generated_routes() {
        for experts in [8, 300] {
            let (layers, k, seed) = (2, 3, 11);
            let pop: Vec<Vec<f64>> = (0..layers)
                .map(|l| (0..experts).map(|e| 1.0 + ((e + l) % 7) as f64).collect())
                .collect();
            let pool = RoutingPool::from_popularity(&pop, k, seed, "test".into()).unwrap();
            let gen = generate(&pop, None, &SynthConfig::new(k, 64, 8, 64, seed)).unwrap();
            for (s, step) in gen.iter().enumerate().step_by(7) {
                for b in [0, 13, 63] {
                    for (layer, r) in step.routes.iter().enumerate() {
                        let got: Vec<u32> = pool.experts(s * 64 + b, layer).collect();
                        assert_eq!(got, r[b * k..(b + 1) * k], "{experts} experts, step {s}");
                    }
                }
            }
        }
        assert!(matches!(Table::new(vec![0], 1 << 17), Err(SimError::Routing(_))));
    }
}
