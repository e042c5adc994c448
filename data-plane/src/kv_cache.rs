//! Per-sequence key/value cache: rotated keys and values of every past position, per layer.

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer: (keys `[pos, k_width]`, values `[pos, v_width]`).
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    k_width: usize,
    v_width: usize,
    len: usize,
}

impl KvCache {
    pub fn new(num_layers: usize, k_width: usize, v_width: usize) -> Self {
        Self {
            layers: vec![(Vec::new(), Vec::new()); num_layers],
            k_width,
            v_width,
            len: 0,
        }
    }

    /// Positions committed so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the keys and values of this step's tokens for one layer.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(k.len() / self.k_width, v.len() / self.v_width);
        let (kk, vv) = &mut self.layers[layer];
        kk.extend_from_slice(k);
        vv.extend_from_slice(v);
    }

    /// All keys and values of a layer, including this step's appends.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    /// Marks `n` appended positions as part of the sequence (after every layer ran).
    pub fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Drops positions from `len` on (e.g. to recompute after preemption).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        for (k, v) in &mut self.layers {
            k.truncate(self.len * self.k_width);
            v.truncate(self.len * self.v_width);
        }
    }

    /// Bytes one more position takes across all layers (for block accounting by servers).
    pub fn bytes_per_position(&self) -> usize {
        self.layers.len() * (self.k_width + self.v_width) * 4
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| (k.len() + v.len()) * 4).sum()
    }
}
