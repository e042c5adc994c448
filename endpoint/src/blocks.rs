//! KV memory accounted in fixed-size blocks of positions. The scheduler grants a sequence the
//! blocks its positions need before each step and returns them when it finishes, is cancelled
//! or is preempted; when none are left, it preempts rather than overcommits.

#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(total: usize, block_size: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            total,
            free: (0..total as u32).rev().collect(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn used(&self) -> usize {
        self.total - self.free.len()
    }

    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Grows `table` to cover `positions`; all or nothing.
    pub fn ensure(&mut self, table: &mut Vec<u32>, positions: usize) -> bool {
        let need = self.blocks_for(positions).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        let at = self.free.len() - need;
        table.extend(self.free.drain(at..));
        true
    }

    pub fn can_grow(&self, table: &[u32], positions: usize) -> bool {
        self.blocks_for(positions).saturating_sub(table.len()) <= self.free.len()
    }

    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_all_or_nothing_and_returns_blocks() {
        let mut a = BlockAllocator::new(4, 16);
        let mut t1 = Vec::new();
        assert!(a.ensure(&mut t1, 33));
        assert_eq!(t1.len(), 3);
        let mut t2 = Vec::new();
        assert!(!a.ensure(&mut t2, 17));
        assert!(t2.is_empty());
        assert!(a.ensure(&mut t2, 16));
        assert_eq!(a.used(), 4);
        a.release(&mut t1);
        assert_eq!(a.used(), 1);
        assert!(t1.is_empty());
    }
}
