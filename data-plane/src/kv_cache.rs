//! Key/value caches: the rotated keys and values of every past position of a sequence, per
//! layer.
//!
//! Two stores sit behind one [`KvCache`]:
//! - *owned*: the sequence's own growable buffers (one-shot runs: `forward`, `generate`);
//! - *paged*: fixed-size blocks of a shared [`KvPool`] named by the sequence's block table
//!   (the server). Blocks are granted all-or-nothing, shared between sequences whose token
//!   prefixes fill the same blocks (prefix caching, keyed by a hash chained over the tokens of
//!   each full block, as vLLM does), and returned to the pool when the cache is dropped. A
//!   returned block that holds a cached prefix stays findable until the pool needs it for
//!   something else (least recently released first).
//!
//! Attention reads either store through a [`KvView`], which maps a position to its row.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Keys and values of positions `0..len` of one layer, as attention reads them.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    k: &'a [f32],
    v: &'a [f32],
    k_width: usize,
    v_width: usize,
    /// `(block table, block size)` for a paged store; rows are positions otherwise.
    table: Option<(&'a [u32], usize)>,
    len: usize,
}

impl<'a> KvView<'a> {
    /// Keys `[len, k_width]` and values `[len, v_width]` stored position after position.
    pub fn contiguous(k: &'a [f32], v: &'a [f32], k_width: usize, v_width: usize) -> Self {
        let len = k.len().checked_div(k_width).unwrap_or(0);
        Self {
            k,
            v,
            k_width,
            v_width,
            table: None,
            len,
        }
    }

    /// Positions visible.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn row(&self, pos: usize) -> usize {
        match self.table {
            None => pos,
            Some((table, bs)) => table[pos / bs] as usize * bs + pos % bs,
        }
    }

    /// The key row (all cached heads) of position `pos < len`.
    #[inline]
    pub fn key(&self, pos: usize) -> &'a [f32] {
        let r = self.row(pos);
        &self.k[r * self.k_width..(r + 1) * self.k_width]
    }

    /// The value row (all cached heads) of position `pos < len`.
    #[inline]
    pub fn value(&self, pos: usize) -> &'a [f32] {
        let r = self.row(pos);
        &self.v[r * self.v_width..(r + 1) * self.v_width]
    }

    /// Keys `[len, k_width]` and values `[len, v_width]` position after position: borrowed
    /// when the store already is, gathered through the block table otherwise.
    pub fn contiguous_kv(&self) -> (Cow<'a, [f32]>, Cow<'a, [f32]>) {
        if self.table.is_none() {
            return (
                Cow::Borrowed(&self.k[..self.len * self.k_width]),
                Cow::Borrowed(&self.v[..self.len * self.v_width]),
            );
        }
        let mut k = Vec::with_capacity(self.len * self.k_width);
        let mut v = Vec::with_capacity(self.len * self.v_width);
        for p in 0..self.len {
            k.extend_from_slice(self.key(p));
            v.extend_from_slice(self.value(p));
        }
        (Cow::Owned(k), Cow::Owned(v))
    }
}

/// Running out of KV blocks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache pool has {free} free blocks; the sequence needs {needed} more")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub free: usize,
}

/// One sequence's cache.
#[derive(Debug)]
pub struct KvCache {
    store: Store,
    k_width: usize,
    v_width: usize,
    /// Committed positions.
    len: usize,
    /// Positions of the step in flight (appended by each layer, committed after the last).
    pending: usize,
}

#[derive(Debug)]
enum Store {
    /// Per layer: (keys `[pos, k_width]`, values `[pos, v_width]`).
    Owned(Vec<(Vec<f32>, Vec<f32>)>),
    Paged(PagedSeq),
}

impl KvCache {
    /// An empty cache with its own buffers.
    pub fn new(num_layers: usize, k_width: usize, v_width: usize) -> Self {
        Self {
            store: Store::Owned(vec![(Vec::new(), Vec::new()); num_layers]),
            k_width,
            v_width,
            len: 0,
            pending: 0,
        }
    }

    /// Positions committed so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block table of a paged cache (`None` for an owned one).
    pub fn block_table(&self) -> Option<&[u32]> {
        match &self.store {
            Store::Owned(_) => None,
            Store::Paged(p) => Some(&p.table),
        }
    }

    /// Whether the cache could cover `positions` without taking blocks from anyone.
    pub fn can_grow_to(&self, positions: usize) -> bool {
        match &self.store {
            Store::Owned(_) => true,
            Store::Paged(p) => p.pool.can_grow(&p.table, positions),
        }
    }

    /// Makes the cache cover `positions`; all or nothing.
    pub fn grow_to(&mut self, positions: usize) -> Result<(), OutOfBlocks> {
        match &mut self.store {
            Store::Owned(_) => Ok(()),
            Store::Paged(p) => p.pool.grow(&mut p.table, positions),
        }
    }

    /// Prepares a step of `n` new positions: room for them, and nothing left over from a
    /// step that failed before it committed.
    pub fn begin_step(&mut self, n: usize) -> Result<(), OutOfBlocks> {
        self.grow_to(self.len + n)?;
        self.pending = n;
        if let Store::Owned(layers) = &mut self.store {
            for (k, v) in layers {
                k.truncate(self.len * self.k_width);
                v.truncate(self.len * self.v_width);
            }
        }
        Ok(())
    }

    /// Writes the keys and values of this step's positions for one layer.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let n = k.len().checked_div(self.k_width).unwrap_or(0);
        debug_assert_eq!(n * self.v_width, v.len());
        debug_assert!(n <= self.pending, "append outside begin_step");
        match &mut self.store {
            Store::Owned(layers) => {
                let (kk, vv) = &mut layers[layer];
                kk.truncate(self.len * self.k_width);
                vv.truncate(self.len * self.v_width);
                kk.extend_from_slice(k);
                vv.extend_from_slice(v);
            }
            Store::Paged(p) => p.pool.write(layer, &p.table, self.len, k, v),
        }
    }

    /// Runs `f` over the layer's keys and values: committed positions and this step's.
    pub fn with_layer<R>(&self, layer: usize, f: impl FnOnce(&KvView<'_>) -> R) -> R {
        let len = self.len + self.pending;
        match &self.store {
            Store::Owned(layers) => {
                let (k, v) = &layers[layer];
                let mut view = KvView::contiguous(k, v, self.k_width, self.v_width);
                view.len = view.len.min(len);
                f(&view)
            }
            Store::Paged(p) => {
                let data = p.pool.layers[layer].read().unwrap_or_else(|e| e.into_inner());
                let view = KvView {
                    k: &data.k,
                    v: &data.v,
                    k_width: self.k_width,
                    v_width: self.v_width,
                    table: Some((&p.table, p.pool.block_size)),
                    len,
                };
                f(&view)
            }
        }
    }

    /// Makes this step's positions part of the sequence (after every layer ran); `tokens` are
    /// the ids they came from (the keys of prefix caching).
    pub fn commit(&mut self, tokens: &[u32]) {
        self.len += tokens.len();
        self.pending = 0;
        if let Store::Paged(p) = &mut self.store {
            p.tokens.extend_from_slice(tokens);
            p.register_full_blocks(self.len);
        }
    }

    /// Bytes one more position takes across all layers (for block accounting by servers).
    pub fn bytes_per_position(&self) -> usize {
        let layers = match &self.store {
            Store::Owned(l) => l.len(),
            Store::Paged(p) => p.pool.layers.len(),
        };
        layers * (self.k_width + self.v_width) * 4
    }

    /// Bytes held (for a paged cache: of the blocks in its table).
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Owned(l) => l.iter().map(|(k, v)| (k.len() + v.len()) * 4).sum(),
            Store::Paged(p) => p.table.len() * p.pool.block_size * self.bytes_per_position(),
        }
    }
}

/// Where a paged sequence's positions live, and how far its blocks are registered.
#[derive(Debug)]
struct PagedSeq {
    pool: Arc<KvPool>,
    table: Vec<u32>,
    /// Token ids of the committed positions.
    tokens: Vec<u32>,
    /// Leading full blocks registered in (or found in) the prefix cache.
    registered: usize,
    /// Chain hash of the last of those blocks ([`CHAIN_SEED`] before the first).
    chain: u64,
}

impl PagedSeq {
    fn register_full_blocks(&mut self, len: usize) {
        if !self.pool.prefix_caching {
            return;
        }
        let bs = self.pool.block_size;
        let full = len / bs;
        if full <= self.registered {
            return;
        }
        let mut st = self.pool.state();
        while self.registered < full {
            let b = self.registered;
            let tokens = &self.tokens[b * bs..(b + 1) * bs];
            let hash = chain_hash(self.chain, tokens);
            st.register(self.table[b], hash, self.chain, tokens);
            self.chain = hash;
            self.registered += 1;
        }
    }
}

impl Drop for PagedSeq {
    fn drop(&mut self) {
        self.pool.release(&mut self.table);
    }
}

const CHAIN_SEED: u64 = 0x6d6f_656c_6573_7321;

fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: stable within a process, which is all a pool needs.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug, Default)]
struct LayerBlocks {
    /// `[num_blocks * block_size, k_width]`.
    k: Vec<f32>,
    /// `[num_blocks * block_size, v_width]`.
    v: Vec<f32>,
}

const NIL: u32 = u32::MAX;

/// Block bookkeeping of a pool. Everything is sized at construction, so serving allocates
/// nothing here however many blocks come and go.
#[derive(Debug)]
struct BlockState {
    block_size: usize,
    /// Blocks holding nothing worth keeping.
    free: Vec<u32>,
    /// Sequences whose table holds each block.
    refs: Vec<u32>,
    /// Per block: registered in `by_hash`, its chain hash and its parent's, and its tokens
    /// (`tokens[b * block_size..]`), enough to confirm that a hash hit is a true match.
    registered: Vec<bool>,
    hash: Vec<u64>,
    parent: Vec<u64>,
    tokens: Vec<u32>,
    by_hash: HashMap<u64, u32>,
    /// Registered blocks no sequence holds, least recently released first: free to reuse,
    /// still findable until then. A doubly linked list through `prev`/`next`.
    lru_head: u32,
    lru_tail: u32,
    lru_len: usize,
    prev: Vec<u32>,
    next: Vec<u32>,
    in_lru: Vec<bool>,
}

impl BlockState {
    fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            registered: vec![false; num_blocks],
            hash: vec![0; num_blocks],
            parent: vec![0; num_blocks],
            tokens: vec![0; num_blocks * block_size],
            // Twice the most entries it can hold: tombstones never force a reallocation.
            by_hash: HashMap::with_capacity(2 * num_blocks),
            lru_head: NIL,
            lru_tail: NIL,
            lru_len: 0,
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            in_lru: vec![false; num_blocks],
        }
    }

    fn available(&self) -> usize {
        self.free.len() + self.lru_len
    }

    fn lru_push_back(&mut self, b: u32) {
        let i = b as usize;
        self.prev[i] = self.lru_tail;
        self.next[i] = NIL;
        match self.lru_tail {
            NIL => self.lru_head = b,
            t => self.next[t as usize] = b,
        }
        self.lru_tail = b;
        self.in_lru[i] = true;
        self.lru_len += 1;
    }

    fn lru_remove(&mut self, b: u32) {
        let i = b as usize;
        if !self.in_lru[i] {
            return;
        }
        let (p, n) = (self.prev[i], self.next[i]);
        match p {
            NIL => self.lru_head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.lru_tail = p,
            n => self.prev[n as usize] = p,
        }
        self.in_lru[i] = false;
        self.lru_len -= 1;
    }

    /// Takes a block for new contents: a plain free one, else the least recently released
    /// cached one (forgetting what it cached).
    fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.lru_head;
                if b == NIL {
                    return None;
                }
                self.lru_remove(b);
                self.unregister(b);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    fn unregister(&mut self, b: u32) {
        let i = b as usize;
        if std::mem::take(&mut self.registered[i]) {
            self.by_hash.remove(&self.hash[i]);
        }
    }

    /// Adds a reference to a cached block (taking it off the evictable list if it was there).
    fn hold(&mut self, b: u32) {
        if self.refs[b as usize] == 0 {
            self.lru_remove(b);
        }
        self.refs[b as usize] += 1;
    }

    /// Drops a reference; an unreferenced block becomes evictable (registered) or free.
    fn drop_ref(&mut self, b: u32) {
        let i = b as usize;
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] > 0 {
            return;
        }
        if self.registered[i] {
            self.lru_push_back(b);
        } else {
            self.free.push(b);
        }
    }

    fn register(&mut self, b: u32, hash: u64, parent: u64, tokens: &[u32]) {
        let i = b as usize;
        // A block with the same contents registered first keeps the entry; this one is
        // freed as an ordinary block when its sequence lets go.
        if self.registered[i] || self.by_hash.contains_key(&hash) {
            return;
        }
        self.by_hash.insert(hash, b);
        self.registered[i] = true;
        self.hash[i] = hash;
        self.parent[i] = parent;
        let bs = self.block_size;
        self.tokens[i * bs..(i + 1) * bs].copy_from_slice(tokens);
    }

    /// The registered block holding `tokens` after the prefix whose chain hash is `parent`.
    fn lookup(&self, hash: u64, parent: u64, tokens: &[u32]) -> Option<u32> {
        let &b = self.by_hash.get(&hash)?;
        let (i, bs) = (b as usize, self.block_size);
        (self.registered[i] && self.parent[i] == parent && self.tokens[i * bs..(i + 1) * bs] == *tokens).then_some(b)
    }
}

/// Fixed-size KV blocks shared by the sequences of one engine.
pub struct KvPool {
    block_size: usize,
    num_blocks: usize,
    k_width: usize,
    v_width: usize,
    prefix_caching: bool,
    layers: Vec<RwLock<LayerBlocks>>,
    state: Mutex<BlockState>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("block_size", &self.block_size)
            .field("num_blocks", &self.num_blocks)
            .field("layers", &self.layers.len())
            .field("prefix_caching", &self.prefix_caching)
            .finish_non_exhaustive()
    }
}

/// Shape and size of a [`KvPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPoolConfig {
    pub num_layers: usize,
    /// Floats of one position's keys (all cached heads) in one layer.
    pub k_width: usize,
    pub v_width: usize,
    /// Positions per block.
    pub block_size: usize,
    pub num_blocks: usize,
    pub prefix_caching: bool,
}

impl KvPool {
    /// Allocates the whole pool up front (zeroed pages, so memory is committed as blocks are
    /// first written).
    pub fn new(c: KvPoolConfig) -> Arc<Self> {
        let bs = c.block_size.max(1);
        let rows = c.num_blocks * bs;
        let layers = (0..c.num_layers)
            .map(|_| {
                RwLock::new(LayerBlocks {
                    k: vec![0.0; rows * c.k_width],
                    v: vec![0.0; rows * c.v_width],
                })
            })
            .collect();
        Arc::new(Self {
            block_size: bs,
            num_blocks: c.num_blocks,
            k_width: c.k_width,
            v_width: c.v_width,
            prefix_caching: c.prefix_caching,
            layers,
            state: Mutex::new(BlockState::new(c.num_blocks, bs)),
        })
    }

    fn state(&self) -> MutexGuard<'_, BlockState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty cache whose positions will live in this pool.
    pub fn new_cache(self: &Arc<Self>) -> KvCache {
        KvCache {
            store: Store::Paged(PagedSeq {
                pool: self.clone(),
                table: Vec::new(),
                tokens: Vec::new(),
                registered: 0,
                chain: CHAIN_SEED,
            }),
            k_width: self.k_width,
            v_width: self.v_width,
            len: 0,
            pending: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    /// Blocks held by at least one sequence.
    pub fn blocks_in_use(&self) -> usize {
        let st = self.state();
        self.num_blocks - st.available()
    }

    /// Blocks that hold a findable cached prefix (held or not).
    pub fn cached_blocks(&self) -> usize {
        self.state().by_hash.len()
    }

    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Starts an empty cache of this pool with the longest run of cached full blocks that
    /// `tokens` begins with, leaving at least the last token to compute (its logits are
    /// wanted). Returns the positions found (a multiple of the block size); the caller feeds
    /// the tokens from there.
    pub fn attach_prefix(&self, cache: &mut KvCache, tokens: &[u32]) -> usize {
        let Store::Paged(p) = &mut cache.store else { return 0 };
        if !self.prefix_caching || cache.len != 0 || !p.table.is_empty() || !std::ptr::eq(&*p.pool, self) {
            return 0;
        }
        let bs = self.block_size;
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        let mut st = self.state();
        let mut chain = CHAIN_SEED;
        for b in 0..max_blocks {
            let block = &tokens[b * bs..(b + 1) * bs];
            let hash = chain_hash(chain, block);
            let Some(found) = st.lookup(hash, chain, block) else {
                break;
            };
            st.hold(found);
            p.table.push(found);
            chain = hash;
        }
        let matched = p.table.len() * bs;
        p.tokens.extend_from_slice(&tokens[..matched]);
        p.registered = p.table.len();
        p.chain = chain;
        cache.len = matched;
        matched
    }

    fn can_grow(&self, table: &[u32], positions: usize) -> bool {
        self.blocks_for(positions).saturating_sub(table.len()) <= self.state().available()
    }

    fn grow(&self, table: &mut Vec<u32>, positions: usize) -> Result<(), OutOfBlocks> {
        let needed = self.blocks_for(positions).saturating_sub(table.len());
        if needed == 0 {
            return Ok(());
        }
        let mut st = self.state();
        let free = st.available();
        if needed > free {
            return Err(OutOfBlocks { needed, free });
        }
        for _ in 0..needed {
            match st.take() {
                Some(b) => table.push(b),
                None => return Err(OutOfBlocks { needed, free: 0 }),
            }
        }
        Ok(())
    }

    fn release(&self, table: &mut Vec<u32>) {
        let mut st = self.state();
        // Last block first: a sequence's tail is evicted before the prefix others may share.
        for b in table.drain(..).rev() {
            st.drop_ref(b);
        }
    }

    /// Writes rows for positions `start..` of one layer through `table`.
    fn write(&self, layer: usize, table: &[u32], start: usize, k: &[f32], v: &[f32]) {
        let (kw, vw, bs) = (self.k_width, self.v_width, self.block_size);
        let n = k.len().checked_div(kw).unwrap_or(0);
        let mut data = self.layers[layer].write().unwrap_or_else(|e| e.into_inner());
        for i in 0..n {
            let pos = start + i;
            let r = table[pos / bs] as usize * bs + pos % bs;
            data.k[r * kw..(r + 1) * kw].copy_from_slice(&k[i * kw..(i + 1) * kw]);
            data.v[r * vw..(r + 1) * vw].copy_from_slice(&v[i * vw..(i + 1) * vw]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize, bs: usize, prefix: bool) -> Arc<KvPool> {
        KvPool::new(KvPoolConfig {
            num_layers: 2,
            k_width: 3,
            v_width: 2,
            block_size: bs,
            num_blocks: blocks,
            prefix_caching: prefix,
        })
    }

    /// Runs one "step" of `tokens` on `cache`, writing rows derived from (token, layer).
    fn step(cache: &mut KvCache, tokens: &[u32]) -> Result<(), OutOfBlocks> {
        cache.begin_step(tokens.len())?;
        for layer in 0..2 {
            let k: Vec<f32> = tokens.iter().flat_map(|&t| [t as f32, layer as f32, 1.0]).collect();
            let v: Vec<f32> = tokens.iter().flat_map(|&t| [-(t as f32), layer as f32]).collect();
            cache.append(layer, &k, &v);
        }
        cache.commit(tokens);
        Ok(())
    }

    fn keys(cache: &KvCache, layer: usize) -> Vec<f32> {
        cache.with_layer(layer, |v| v.contiguous_kv().0.into_owned())
    }

    #[test]
    fn paged_views_match_owned_buffers() {
        let p = pool(8, 2, false);
        // Interleave two sequences so their blocks are not consecutive.
        let (mut a, mut b, mut own) = (p.new_cache(), p.new_cache(), KvCache::new(2, 3, 2));
        for chunk in [&[5u32, 6, 7][..], &[8], &[9, 10, 11]] {
            step(&mut a, chunk).unwrap();
            step(&mut b, &[1]).unwrap();
            step(&mut own, chunk).unwrap();
        }
        assert_eq!(a.len(), 7);
        for layer in 0..2 {
            assert_eq!(keys(&a, layer), keys(&own, layer));
            a.with_layer(layer, |v| {
                own.with_layer(layer, |o| {
                    for pos in 0..7 {
                        assert_eq!(v.key(pos), o.key(pos));
                        assert_eq!(v.value(pos), o.value(pos));
                    }
                })
            });
        }
        let t = a.block_table().unwrap();
        assert_eq!(t.len(), 4);
        assert!(t.windows(2).any(|w| w[1] != w[0] + 1), "blocks interleaved: {t:?}");
        assert_eq!(p.blocks_in_use(), 4 + 2);
    }

    #[test]
    fn blocks_are_all_or_nothing_and_return_on_drop() {
        let p = pool(4, 16, false);
        let mut a = p.new_cache();
        a.grow_to(33).unwrap();
        assert_eq!(a.block_table().unwrap().len(), 3);
        let mut b = p.new_cache();
        assert_eq!(b.grow_to(17), Err(OutOfBlocks { needed: 2, free: 1 }));
        assert!(b.block_table().unwrap().is_empty());
        assert!(!b.can_grow_to(17) && b.can_grow_to(16));
        b.grow_to(16).unwrap();
        assert_eq!(p.blocks_in_use(), 4);
        drop(a);
        assert_eq!(p.blocks_in_use(), 1);
        drop(b);
        assert_eq!(p.blocks_in_use(), 0);
    }

    #[test]
    fn a_failed_step_leaves_no_rows_behind() {
        let mut own = KvCache::new(2, 3, 2);
        step(&mut own, &[1, 2]).unwrap();
        own.begin_step(1).unwrap();
        own.append(0, &[9.0, 9.0, 9.0], &[9.0, 9.0]); // layer 1 never ran; no commit
        step(&mut own, &[3]).unwrap();
        assert_eq!(own.len(), 3);
        assert_eq!(keys(&own, 0), [1.0, 0.0, 1.0, 2.0, 0.0, 1.0, 3.0, 0.0, 1.0]);
    }

    #[test]
    fn prefix_blocks_are_shared_and_survive_release_until_evicted() {
        let p = pool(6, 2, true);
        let prompt = [1u32, 2, 3, 4, 5];
        let mut a = p.new_cache();
        step(&mut a, &prompt).unwrap();
        assert_eq!(p.cached_blocks(), 2, "two full blocks registered");
        // Same prompt: both full blocks found, the last token is left to compute.
        let mut b = p.new_cache();
        assert_eq!(p.attach_prefix(&mut b, &prompt), 4);
        assert_eq!(&b.block_table().unwrap()[..2], &a.block_table().unwrap()[..2]);
        step(&mut b, &prompt[4..]).unwrap();
        assert_eq!(keys(&a, 1), keys(&b, 1));
        assert_eq!(p.blocks_in_use(), 4, "3 of a, 1 of b beyond the shared 2");
        // A prompt of exactly two blocks finds only the first (its last token is computed).
        let mut c = p.new_cache();
        assert_eq!(p.attach_prefix(&mut c, &prompt[..4]), 2);
        drop(c);
        // Diverging in the second block: only the first is shared.
        let mut d = p.new_cache();
        assert_eq!(p.attach_prefix(&mut d, &[1, 2, 3, 9, 5]), 2);
        drop(d);
        // Same tokens at other positions do not match (the hash chains from the start).
        let mut e = p.new_cache();
        assert_eq!(p.attach_prefix(&mut e, &[3, 4, 1, 2, 7]), 0);
        drop(e);
        drop(a);
        drop(b);
        assert_eq!(p.blocks_in_use(), 0);
        assert_eq!(p.cached_blocks(), 2, "released cached blocks stay findable");
        let mut f = p.new_cache();
        assert_eq!(p.attach_prefix(&mut f, &prompt), 4);
        drop(f);
        // Filling the pool with other contents evicts them.
        let mut g = p.new_cache();
        step(&mut g, &[7u32; 12]).unwrap();
        assert_eq!(p.blocks_in_use(), 6);
        let mut h = p.new_cache();
        assert_eq!(p.attach_prefix(&mut h, &prompt), 0);
        assert!(p.cached_blocks() <= 6);
    }

    #[test]
    fn eviction_takes_a_sequences_tail_before_its_prefix() {
        let p = pool(4, 2, true);
        let mut a = p.new_cache();
        step(&mut a, &[1, 2, 3, 4, 5, 6]).unwrap();
        drop(a);
        assert_eq!((p.blocks_in_use(), p.cached_blocks()), (0, 3));
        let mut g = p.new_cache();
        g.grow_to(4).unwrap(); // the one free block, then one cached block
        assert_eq!(p.cached_blocks(), 2);
        let mut b = p.new_cache();
        assert_eq!(
            p.attach_prefix(&mut b, &[1, 2, 3, 4, 5, 6, 7]),
            4,
            "the first two blocks survive"
        );
    }

    #[test]
    fn without_prefix_caching_nothing_is_found() {
        let p = pool(4, 2, false);
        let mut a = p.new_cache();
        step(&mut a, &[1, 2, 3]).unwrap();
        let mut b = p.new_cache();
        assert_eq!(p.attach_prefix(&mut b, &[1, 2, 3]), 0);
        assert_eq!(p.cached_blocks(), 0);
    }
}
