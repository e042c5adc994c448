//! Linearizability checking of concurrent histories: Wing & Gong's search with Lowe's
//! memoization of (linearized set, model state), as in porcupine and Knossos' "linear" checker.
//!
//! A history is a list of [`Operation`]s with call and return times. An operation whose outcome
//! is unknown (timed out, connection lost) may or may not have taken effect, at any moment after
//! its call: its return time is infinity and its output unconstrained. Operations known to have
//! failed without effect are simply left out of the history by the caller.
//!
//! The search walks a doubly linked list of call and return entries ordered by time: it
//! linearizes an operation whose call is reachable before the first pending return if the model
//! accepts it from the current state, backtracks when it reaches a return whose operation is not
//! linearized, and skips (state, linearized set) pairs it has already explored.

use std::collections::HashSet;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A sequential specification.
pub trait Model {
    type State: Clone + Eq + Hash;
    type Input;
    type Output;

    fn init(&self) -> Self::State;

    /// The state after applying `input` to `state` if `output` can be its answer; `None` if it
    /// cannot. `output` is `None` for an operation of unknown outcome (any answer is fine).
    fn step(&self, state: &Self::State, input: &Self::Input, output: Option<&Self::Output>) -> Option<Self::State>;

    /// Groups of operation indices that can be checked independently (P-compositionality, e.g.
    /// one group per key). By default the whole history is one group.
    fn partition(&self, ops: &[Operation<Self::Input, Self::Output>]) -> Vec<Vec<usize>> {
        vec![(0..ops.len()).collect()]
    }
}

/// One operation of a history. Times are in any monotonic unit (the harness uses nanoseconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Operation<I, O> {
    pub client: u64,
    pub input: I,
    /// `None`: unknown outcome.
    pub output: Option<O>,
    pub call: u64,
    /// `None`: unknown outcome, the operation may take effect at any time after `call`.
    pub ret: Option<u64>,
}

impl<I, O> Operation<I, O> {
    /// An operation that returned `output` at `ret`.
    pub fn ok(client: u64, input: I, output: O, call: u64, ret: u64) -> Self {
        Self {
            client,
            input,
            output: Some(output),
            call,
            ret: Some(ret.max(call)),
        }
    }

    /// An operation that may or may not have taken effect.
    pub fn unknown(client: u64, input: I, call: u64) -> Self {
        Self {
            client,
            input,
            output: None,
            call,
            ret: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No linearization exists. `partition` holds the operation indices of the failing group;
    /// `longest` the longest sequence of them that could be linearized, in order.
    NotLinearizable {
        partition: Vec<usize>,
        longest: Vec<usize>,
    },
    /// The search ran out of its time budget: neither proven nor refuted.
    Timeout,
}

impl Verdict {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

/// Checks `ops` against `model`, giving up after `budget`.
pub fn check<M: Model>(model: &M, ops: &[Operation<M::Input, M::Output>], budget: Duration) -> Verdict {
    let deadline = Instant::now() + budget;
    for part in model.partition(ops) {
        match check_partition(model, ops, &part, deadline) {
            Verdict::Linearizable => {}
            other => return other,
        }
    }
    Verdict::Linearizable
}

const NIL: usize = usize::MAX;
const HEAD: usize = 0;

#[derive(Clone, Copy)]
struct Entry {
    prev: usize,
    next: usize,
    /// Index into the partition.
    op: usize,
    is_call: bool,
    /// The call's return entry (calls only).
    ret: usize,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

struct EntryList(Vec<Entry>);

impl EntryList {
    /// Call and return entries in time order after a sentinel head; at equal times calls come
    /// first, so touching operations count as concurrent.
    fn new<I, O>(ops: &[Operation<I, O>], part: &[usize]) -> Self {
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * part.len());
        for (k, &i) in part.iter().enumerate() {
            events.push((ops[i].call, false, k));
            events.push((ops[i].ret.unwrap_or(u64::MAX), true, k));
        }
        events.sort_by_key(|&(t, is_ret, k)| (t, is_ret, k));
        let mut entries = vec![Entry {
            prev: NIL,
            next: NIL,
            op: NIL,
            is_call: false,
            ret: NIL,
        }];
        let mut call_of = vec![NIL; part.len()];
        for (t, (_, is_ret, k)) in events.into_iter().enumerate() {
            let idx = t + 1;
            entries.push(Entry {
                prev: idx - 1,
                next: NIL,
                op: k,
                is_call: !is_ret,
                ret: NIL,
            });
            entries[idx - 1].next = idx;
            if is_ret {
                entries[call_of[k]].ret = idx;
            } else {
                call_of[k] = idx;
            }
        }
        Self(entries)
    }

    fn unlink(&mut self, i: usize) {
        let Entry { prev, next, .. } = self.0[i];
        self.0[prev].next = next;
        if next != NIL {
            self.0[next].prev = prev;
        }
    }

    fn relink(&mut self, i: usize) {
        let Entry { prev, next, .. } = self.0[i];
        self.0[prev].next = i;
        if next != NIL {
            self.0[next].prev = i;
        }
    }

    /// Takes a call and its return out of the list.
    fn lift(&mut self, call: usize) {
        let ret = self.0[call].ret;
        self.unlink(call);
        self.unlink(ret);
    }

    /// Undoes the most recent `lift` (lifts are undone in reverse order).
    fn unlift(&mut self, call: usize) {
        let ret = self.0[call].ret;
        self.relink(ret);
        self.relink(call);
    }
}

fn check_partition<M: Model>(
    model: &M,
    ops: &[Operation<M::Input, M::Output>],
    part: &[usize],
    deadline: Instant,
) -> Verdict {
    let mut list = EntryList::new(ops, part);
    let mut state = model.init();
    let mut linearized = BitSet::new(part.len());
    let mut cache: HashSet<(BitSet, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut entry = list.0[HEAD].next;
    let mut steps: u64 = 0;
    while list.0[HEAD].next != NIL {
        steps += 1;
        if steps & 4095 == 0 && Instant::now() > deadline {
            return Verdict::Timeout;
        }
        let e = list.0[entry];
        let op = &ops[part[e.op]];
        if e.is_call {
            if let Some(next_state) = model.step(&state, &op.input, op.output.as_ref()) {
                let mut bits = linearized.clone();
                bits.set(e.op);
                if cache.insert((bits.clone(), next_state.clone())) {
                    stack.push((entry, std::mem::replace(&mut state, next_state)));
                    linearized = bits;
                    list.lift(entry);
                    if stack.len() > longest.len() {
                        longest = stack.iter().map(|&(c, _)| part[list.0[c].op]).collect();
                    }
                    entry = list.0[HEAD].next;
                    continue;
                }
            }
            entry = e.next;
        } else {
            // The first pending return. If its operation's outcome is unknown, so is every
            // operation left (unknown returns sort last): they may all never have taken effect.
            if op.ret.is_none() {
                return Verdict::Linearizable;
            }
            let Some((call, previous)) = stack.pop() else {
                return Verdict::NotLinearizable {
                    partition: part.to_vec(),
                    longest,
                };
            };
            state = previous;
            linearized.clear(list.0[call].op);
            list.unlift(call);
            entry = list.0[call].next;
        }
    }
    Verdict::Linearizable
}

/// A single register holding `V`, written and read whole (the policy document).
#[derive(Debug, Clone)]
pub struct Register<V> {
    pub initial: V,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterInput<V> {
    Write(V),
    Read,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterOutput<V> {
    Written,
    Read(V),
}

impl<V: Clone + Eq + Hash> Model for Register<V> {
    type State = V;
    type Input = RegisterInput<V>;
    type Output = RegisterOutput<V>;

    fn init(&self) -> V {
        self.initial.clone()
    }

    fn step(&self, state: &V, input: &Self::Input, output: Option<&Self::Output>) -> Option<V> {
        match (input, output) {
            (RegisterInput::Write(v), None | Some(RegisterOutput::Written)) => Some(v.clone()),
            (RegisterInput::Read, None) => Some(state.clone()),
            (RegisterInput::Read, Some(RegisterOutput::Read(v))) if v == state => Some(state.clone()),
            _ => None,
        }
    }
}

/// Independent registers by key, checked one key at a time.
#[derive(Debug, Clone)]
pub struct KeyValue<K, V> {
    /// The value every key holds before the history.
    pub initial: V,
    _key: std::marker::PhantomData<K>,
}

impl<K, V> KeyValue<K, V> {
    pub fn new(initial: V) -> Self {
        Self {
            initial,
            _key: std::marker::PhantomData,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed<K, I> {
    pub key: K,
    pub input: I,
}

impl<K: Clone + Eq + Hash + Ord, V: Clone + Eq + Hash> Model for KeyValue<K, V> {
    /// Each partition holds one key, so the state is that key's value.
    type State = V;
    type Input = Keyed<K, RegisterInput<V>>;
    type Output = RegisterOutput<V>;

    fn init(&self) -> V {
        self.initial.clone()
    }

    fn step(&self, state: &V, input: &Self::Input, output: Option<&Self::Output>) -> Option<V> {
        Register {
            initial: self.initial.clone(),
        }
        .step(state, &input.input, output)
    }

    fn partition(&self, ops: &[Operation<Self::Input, Self::Output>]) -> Vec<Vec<usize>> {
        let mut by_key: std::collections::BTreeMap<&K, Vec<usize>> = std::collections::BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            by_key.entry(&op.input.key).or_default().push(i);
        }
        by_key.into_values().collect()
    }
}

/// Placement plans: an append-only log whose entries get consecutive epochs; a read returns the
/// latest entry. `T` identifies a plan (the harness uses a unique `reason`). Epochs are shared
/// with writers outside the history (the control plane's own plans for other models): `foreign`
/// holds the epochs they took, which a commit in the history may skip, and no other.
#[derive(Debug, Clone)]
pub struct PlanLog<T> {
    pub initial_epoch: u64,
    pub initial_latest: Option<T>,
    pub foreign: std::collections::BTreeSet<u64>,
}

impl<T> PlanLog<T> {
    /// The epoch a commit after `epoch` takes: the next one no foreign plan took.
    fn next_epoch(&self, epoch: u64) -> u64 {
        let mut e = epoch + 1;
        while self.foreign.contains(&e) {
            e += 1;
        }
        e
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanInput<T> {
    Commit(T),
    ReadLatest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanOutput<T> {
    Committed { epoch: u64 },
    Latest { epoch: u64, plan: Option<T> },
}

impl<T: Clone + Eq + Hash> Model for PlanLog<T> {
    /// (latest epoch, latest plan)
    type State = (u64, Option<T>);
    type Input = PlanInput<T>;
    type Output = PlanOutput<T>;

    fn init(&self) -> Self::State {
        (self.initial_epoch, self.initial_latest.clone())
    }

    fn step(&self, state: &Self::State, input: &Self::Input, output: Option<&Self::Output>) -> Option<Self::State> {
        match (input, output) {
            (PlanInput::Commit(t), None) => Some((self.next_epoch(state.0), Some(t.clone()))),
            (PlanInput::Commit(t), Some(PlanOutput::Committed { epoch })) if *epoch == self.next_epoch(state.0) => {
                Some((*epoch, Some(t.clone())))
            }
            (PlanInput::ReadLatest, None) => Some(state.clone()),
            (PlanInput::ReadLatest, Some(PlanOutput::Latest { epoch, plan }))
                if *epoch == state.0 && *plan == state.1 =>
            {
                Some(state.clone())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type RegOp = Operation<RegisterInput<u64>, RegisterOutput<u64>>;

    const BUDGET: Duration = Duration::from_secs(10);

    fn w(client: u64, v: u64, call: u64, ret: u64) -> RegOp {
        Operation::ok(client, RegisterInput::Write(v), RegisterOutput::Written, call, ret)
    }
    fn r(client: u64, v: u64, call: u64, ret: u64) -> RegOp {
        Operation::ok(client, RegisterInput::Read, RegisterOutput::Read(v), call, ret)
    }
    fn check_reg(ops: &[RegOp]) -> Verdict {
        check(&Register { initial: 0 }, ops, BUDGET)
    }

    #[test]
    fn empty_history_is_linearizable() {
        assert_eq!(check_reg(&[]), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_read_may_see_either_value() {
        // w(1) overlaps both reads: one sees the old value, one the new.
        let ops = [w(0, 1, 0, 100), r(1, 0, 10, 20), r(2, 1, 30, 40)];
        assert!(check_reg(&ops).is_linearizable());
    }

    #[test]
    fn new_old_inversion_is_not_linearizable() {
        // The classic: while w(1) is in flight one read sees 1, a strictly later read sees 0.
        let ops = [w(0, 1, 0, 100), r(1, 1, 10, 20), r(2, 0, 30, 40)];
        assert!(matches!(check_reg(&ops), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn stale_read_after_a_completed_write_is_not_linearizable() {
        let ops = [w(0, 1, 0, 10), r(1, 0, 20, 30)];
        assert!(!check_reg(&ops).is_linearizable());
    }

    #[test]
    fn porcupine_register_examples() {
        // porcupine's README example: put(100) || get() -> 100 || get() -> 0, overlapping.
        let ok = [w(0, 100, 0, 100), r(1, 100, 25, 75), r(2, 0, 30, 60)];
        assert!(check_reg(&ok).is_linearizable());
        // ...and the variant where the read of 0 starts after the read of 100 returned.
        let bad = [w(0, 200, 0, 100), r(1, 200, 10, 30), r(2, 0, 40, 90)];
        assert!(!check_reg(&bad).is_linearizable());
    }

    #[test]
    fn lost_acknowledged_write_is_detected() {
        // w(1) and then w(2) are acknowledged; a later read still shows 1: w(2) was lost.
        let ops = [w(0, 1, 0, 10), w(1, 2, 20, 30), r(2, 1, 100, 110)];
        assert!(!check_reg(&ops).is_linearizable());
        // Same for the plan log: an acknowledged commit that a later read does not show.
        let model = PlanLog {
            initial_epoch: 0,
            initial_latest: None,
            foreign: Default::default(),
        };
        let plans = [
            Operation::ok(0, PlanInput::Commit("a"), PlanOutput::Committed { epoch: 1 }, 0, 10),
            Operation::ok(
                1,
                PlanInput::ReadLatest,
                PlanOutput::Latest { epoch: 0, plan: None },
                20,
                30,
            ),
        ];
        assert!(!check(&model, &plans, BUDGET).is_linearizable());
    }

    #[test]
    fn duplicate_epochs_are_not_linearizable() {
        let model = PlanLog {
            initial_epoch: 4,
            initial_latest: Some("x"),
            foreign: Default::default(),
        };
        let ok = [
            Operation::ok(0, PlanInput::Commit("a"), PlanOutput::Committed { epoch: 5 }, 0, 50),
            Operation::ok(1, PlanInput::Commit("b"), PlanOutput::Committed { epoch: 6 }, 10, 40),
            Operation::ok(
                2,
                PlanInput::ReadLatest,
                PlanOutput::Latest {
                    epoch: 6,
                    plan: Some("b"),
                },
                60,
                70,
            ),
        ];
        assert!(check(&model, &ok, BUDGET).is_linearizable());
        let mut dup = ok.clone();
        dup[1].output = Some(PlanOutput::Committed { epoch: 5 });
        assert!(!check(&model, &dup, BUDGET).is_linearizable());
    }

    #[test]
    fn commits_skip_foreign_epochs_and_no_others() {
        let model = PlanLog {
            initial_epoch: 1,
            initial_latest: Some("x"),
            foreign: [2, 3].into_iter().collect(),
        };
        let commit =
            |c, p, epoch, call, ret| Operation::ok(c, PlanInput::Commit(p), PlanOutput::Committed { epoch }, call, ret);
        let read = |epoch, plan| Operation::ok(9, PlanInput::ReadLatest, PlanOutput::Latest { epoch, plan }, 60, 70);
        // Epochs 2 and 3 went to another model's plans: the next commit takes 4.
        assert!(check(&model, &[commit(0, "a", 4, 0, 10), read(4, Some("a"))], BUDGET).is_linearizable());
        // 5 would skip 4, which no foreign plan took.
        assert!(!check(&model, &[commit(0, "a", 5, 0, 10)], BUDGET).is_linearizable());
        // Nor may a commit take a foreign epoch.
        assert!(!check(&model, &[commit(0, "a", 3, 0, 10)], BUDGET).is_linearizable());
        // Two commits: 4 then 5, in either real-time order the epochs say.
        let two = [commit(0, "a", 5, 0, 50), commit(1, "b", 4, 10, 40), read(5, Some("a"))];
        assert!(check(&model, &two, BUDGET).is_linearizable());
    }

    #[test]
    fn unknown_write_may_or_may_not_take_effect() {
        let unknown = Operation::unknown(0, RegisterInput::Write(7), 0);
        // Never observed: fine.
        assert!(check_reg(&[unknown.clone(), r(1, 0, 10, 20)]).is_linearizable());
        // Observed long after its call: fine, it took effect late.
        assert!(check_reg(&[unknown.clone(), r(1, 0, 10, 20), r(1, 7, 1000, 1010)]).is_linearizable());
        // But once observed, it cannot be undone.
        let ops = [unknown, r(1, 7, 10, 20), r(2, 0, 30, 40)];
        assert!(!check_reg(&ops).is_linearizable());
    }

    #[test]
    fn unknown_write_cannot_take_effect_before_its_call() {
        let ops = [r(1, 7, 0, 10), Operation::unknown(0, RegisterInput::Write(7), 20)];
        assert!(!check_reg(&ops).is_linearizable());
    }

    #[test]
    fn keys_are_checked_independently() {
        let model = KeyValue::<&str, u64>::new(0);
        let kw = |c, k, v, a, b| {
            Operation::ok(
                c,
                Keyed {
                    key: k,
                    input: RegisterInput::Write(v),
                },
                RegisterOutput::Written,
                a,
                b,
            )
        };
        let kr = |c, k, v, a, b| {
            Operation::ok(
                c,
                Keyed {
                    key: k,
                    input: RegisterInput::Read,
                },
                RegisterOutput::Read(v),
                a,
                b,
            )
        };
        let ok = [kw(0, "x", 1, 0, 10), kr(1, "y", 0, 20, 30), kr(1, "x", 1, 40, 50)];
        assert!(check(&model, &ok, BUDGET).is_linearizable());
        let bad = [kw(0, "x", 1, 0, 10), kr(1, "y", 0, 20, 30), kr(1, "x", 0, 40, 50)];
        match check(&model, &bad, BUDGET) {
            Verdict::NotLinearizable { partition, .. } => assert_eq!(partition, vec![0, 2]),
            other => panic!("expected a violation on key x, got {other:?}"),
        }
    }

    /// A tiny deterministic generator (xorshift), so the tests need no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Histories of a real atomic register: each operation takes effect at one instant inside
    /// its interval; `clients` run concurrently.
    fn atomic_history(seed: u64, clients: u64, per_client: u64) -> Vec<RegOp> {
        let mut rng = Rng(seed);
        // (effect time, client, is_write, value, call, ret)
        let mut planned = Vec::new();
        let mut next_value = 1;
        for c in 0..clients {
            let mut t = rng.next() % 10;
            for _ in 0..per_client {
                let call = t;
                let effect = call + 1 + rng.next() % 20;
                let ret = effect + 1 + rng.next() % 20;
                let write = rng.next() & 1 == 0;
                planned.push((effect, c, write, next_value, call, ret));
                next_value += 1;
                t = ret + 1 + rng.next() % 5;
            }
        }
        planned.sort();
        let mut value = 0;
        planned
            .into_iter()
            .map(|(_, c, write, v, call, ret)| {
                if write {
                    value = v;
                    w(c, v, call, ret)
                } else {
                    r(c, value, call, ret)
                }
            })
            .collect()
    }

    #[test]
    fn histories_of_an_atomic_register_are_linearizable_and_corruption_is_caught() {
        for seed in 1..=20u64 {
            let ops = atomic_history(seed * 7919, 5, 200);
            assert_eq!(check_reg(&ops), Verdict::Linearizable, "seed {seed}");
            // A read returning a value never written cannot be linearized.
            let mut bad = ops.clone();
            let i = bad.iter().position(|o| o.input == RegisterInput::Read).expect("a read");
            bad[i].output = Some(RegisterOutput::Read(u64::MAX));
            assert!(!check_reg(&bad).is_linearizable(), "seed {seed}");
        }
    }

    #[test]
    fn time_budget_is_respected() {
        // Many concurrent unobserved writes and a final impossible read: the search is
        // exponential, so a tiny budget must end in Timeout (or a quick refutation), not hang.
        let mut ops: Vec<RegOp> = (0..40).map(|i| w(i, i + 1, 0, 1000)).collect();
        ops.push(r(99, 12345, 2000, 2001));
        let started = Instant::now();
        let v = check(&Register { initial: 0 }, &ops, Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!v.is_linearizable());
    }
}
