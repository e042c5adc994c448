//! A byte-bounded least-recently-used map: what a device keeps resident when host-side owners
//! come and go (expert instances scale to zero; their device copies must not pile up).

use std::collections::HashMap;
use std::hash::Hash;

pub struct LruBytes<K, V> {
    budget: usize,
    used: usize,
    tick: u64,
    entries: HashMap<K, (V, usize, u64)>,
}

impl<K: Eq + Hash + Clone, V: Clone> LruBytes<K, V> {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    pub fn used_bytes(&self) -> usize {
        self.used
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value, marked as just used.
    pub fn get(&mut self, k: &K) -> Option<V> {
        self.tick += 1;
        let t = self.tick;
        self.entries.get_mut(k).map(|e| {
            e.2 = t;
            e.0.clone()
        })
    }

    /// Removes least recently used entries until `bytes` more fit (or nothing is left);
    /// returns how many were evicted. Call before creating the value, so its memory is freed
    /// first.
    pub fn make_room(&mut self, bytes: usize) -> usize {
        let mut evicted = 0;
        while self.used + bytes > self.budget && !self.entries.is_empty() {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.2)
                .map(|(k, _)| k.clone())
                .expect("not empty");
            if let Some((_, b, _)) = self.entries.remove(&oldest) {
                self.used -= b;
                evicted += 1;
            }
        }
        evicted
    }

    /// Inserts (replacing an entry with the same key). An entry larger than the whole budget is
    /// still kept, alone: the caller needs it now.
    pub fn insert(&mut self, k: K, v: V, bytes: usize) {
        if let Some((_, b, _)) = self.entries.remove(&k) {
            self.used -= b;
        }
        self.make_room(bytes);
        self.tick += 1;
        self.used += bytes;
        self.entries.insert(k, (v, bytes, self.tick));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_first_and_never_exceeds_the_budget() {
        let mut c = LruBytes::new(100);
        c.insert("a", 1, 40);
        c.insert("b", 2, 40);
        assert_eq!(c.get(&"a"), Some(1)); // a is now newer than b
        c.insert("c", 3, 40); // evicts b
        assert_eq!(c.get(&"b"), None);
        assert_eq!(c.get(&"a"), Some(1));
        assert_eq!(c.used_bytes(), 80);
        c.insert("a", 9, 10); // replacing frees the old size
        assert_eq!(c.used_bytes(), 50);
        c.insert("huge", 4, 500); // larger than the budget: kept alone
        assert_eq!(c.len(), 1);
        assert_eq!(c.used_bytes(), 500);
        c.insert("d", 5, 1);
        assert_eq!(c.get(&"huge"), None);
        assert!(c.used_bytes() <= c.budget_bytes());
    }
}
