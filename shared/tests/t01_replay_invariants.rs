//! Replay invariants on random traces: every routed expert is served by an instance of the
//! plan (or counted as a stall), shares of each expert sum to 1, slot budgets hold, the report
//! can be recomputed from the recorded plans, and a run is a function of its inputs.

use proptest::prelude::*;
use shared::plan::split_tokens;
use shared::replay::{replay, PolicyKind, ReplayConfig, ReplayReport};
use shared::trace::Step;

const EXPERTS: usize = 16;
const LAYERS: usize = 3;

/// Steps of `tokens` top-k routes (k of 1..=3 distinct experts) over `EXPERTS` experts, skewed
/// toward a per-group hot set and, for k > 1, toward fixed expert pairs (so co-location has
/// something to learn). Returns the steps and k.
fn steps_strategy() -> impl Strategy<Value = (Vec<Step>, usize)> {
    (1usize..4, 2usize..12, 4usize..40, any::<u64>(), 1usize..=3).prop_map(|(groups, len, tokens, seed, k)| {
        let mut x = seed | 1;
        let mut next = move || {
            // xorshift64: deterministic from the proptest-chosen seed.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut steps = Vec::new();
        for g in 0..groups {
            let hot = (next() % EXPERTS as u64) as u32;
            for s in 0..len {
                let routes: Vec<Vec<u32>> = (0..LAYERS)
                    .map(|_| {
                        let mut r = Vec::with_capacity(tokens * k);
                        for _ in 0..tokens {
                            let first = if next() % 3 == 0 {
                                hot
                            } else {
                                (next() % EXPERTS as u64) as u32
                            };
                            let mut tok = vec![first];
                            while tok.len() < k {
                                let x = if next() % 2 == 0 {
                                    (first + 5 * tok.len() as u32) % EXPERTS as u32
                                } else {
                                    (next() % EXPERTS as u64) as u32
                                };
                                if !tok.contains(&x) {
                                    tok.push(x);
                                }
                            }
                            r.extend(tok);
                        }
                        r
                    })
                    .collect();
                steps.push(Step::new(g, s, routes, EXPERTS));
            }
        }
        (steps, k)
    })
}

fn check(steps: &[Step], r: &ReplayReport, cfg: &ReplayConfig) -> Result<(), TestCaseError> {
    prop_assert_eq!(r.plans.len(), steps.len() * LAYERS);
    for (t, step) in steps.iter().enumerate() {
        for l in 0..LAYERS {
            let plan = &r.plans[t * LAYERS + l];
            let mut tokens = vec![0u32; cfg.gpus];
            let mut split = Vec::new();
            for (e, &c) in step.counts[l].iter().enumerate() {
                let inst: Vec<_> = plan.instances.iter().filter(|i| i.expert as usize == e).collect();
                if inst.is_empty() {
                    prop_assert_eq!(c, 0, "step {} layer {}: expert {} routed but unserved", t, l, e);
                    continue;
                }
                let shares: Vec<f64> = inst.iter().map(|i| i.share).collect();
                let sum: f64 = shares.iter().sum();
                prop_assert!((sum - 1.0).abs() < 1e-9, "shares of expert {} sum to {}", e, sum);
                prop_assert!(shares.iter().all(|s| *s >= 0.0));
                split_tokens(c, &shares, &mut split);
                for (i, n) in inst.iter().zip(&split) {
                    tokens[i.gpu as usize] += n;
                }
            }
            prop_assert_eq!(&tokens, &r.gpu_tokens[t][l], "step {} layer {}", t, l);
        }
    }
    let mut bal = 0.0;
    for per_step in &r.gpu_tokens {
        for g in per_step {
            let total: u32 = g.iter().sum();
            let max = *g.iter().max().unwrap();
            bal += if max == 0 {
                1.0
            } else {
                total as f64 / cfg.gpus as f64 / max as f64
            };
        }
    }
    let bal = bal / (steps.len() * LAYERS) as f64;
    prop_assert!((bal - r.balancedness_mean).abs() < 1e-9);
    prop_assert!(r.balancedness_mean > 0.0 && r.balancedness_mean <= 1.0 + 1e-12);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_policy_serves_all_tokens_within_budget(
        (steps, k) in steps_strategy(),
        gpus in prop::sample::select(vec![2usize, 4, 8]),
        extra in 0usize..3,
        delay in 0usize..3,
        keep_alive in 0usize..4,
        scale_to_zero in prop::option::of(0usize..3),
        rehome_interval in 0usize..4,
        colocate_slack in prop::sample::select(vec![0.0f64, 0.2]),
    ) {
        let slots = EXPERTS / gpus + extra;
        let mut cfg = ReplayConfig::new(gpus, slots);
        cfg.creation_delay = delay;
        cfg.keep_alive = keep_alive;
        cfg.eplb_interval = 3;
        cfg.eplb_window = 4;
        cfg.record_plans = true;
        cfg.rehome_interval = rehome_interval;
        cfg.colocate_slack = colocate_slack;
        for policy in PolicyKind::ALL {
            let mut c = cfg.clone();
            // EPLB loads its next plan beside the old one; with no delay it swaps in place.
            if policy == PolicyKind::Eplb { c.creation_delay = 0; }
            if policy == PolicyKind::Moeless { c.scale_to_zero_after = scale_to_zero; }
            let r = replay(&steps, EXPERTS, k, policy, &c).unwrap();
            check(&steps, &r, &c)?;
            // Every token goes to at least one and at most k GPUs per layer.
            let token_layers = steps.iter().map(|s| s.routes[0].len() / k).sum::<usize>() * LAYERS;
            prop_assert_eq!(r.dispatch_token_layers, token_layers as u64);
            prop_assert!(r.dispatch_gpu_copies >= r.dispatch_token_layers);
            prop_assert!(r.dispatch_gpu_copies <= r.dispatch_token_layers * k as u64);
            prop_assert!(r.peak_gpu_slots <= slots, "{}: {} slots used of {}", r.policy, r.peak_gpu_slots, slots);
            if policy != PolicyKind::Moeless || scale_to_zero.is_none() {
                prop_assert_eq!(r.cold_start_stalls, 0, "{} stalled", r.policy);
            }
            let again = replay(&steps, EXPERTS, k, policy, &c).unwrap();
            prop_assert_eq!(&r, &again, "{} is not deterministic", r.policy);
        }
    }
}

#[test]
fn budget_too_small_is_an_error() {
    let steps = vec![Step::new(0, 0, vec![vec![0, 1]], 4)];
    let cfg = ReplayConfig::new(1, 3);
    let e = replay(&steps, 4, 1, PolicyKind::Moeless, &cfg).unwrap_err();
    assert!(e.to_string().contains("budget too small"), "{e}");
}

/// Predictor knobs out of range are a typed error naming the knob; in range they change the
/// prediction (the knob is wired through), and the defaults are what `ReplayConfig::new` uses.
#[test]
fn predictor_knobs_are_checked_and_used() {
    use shared::predict::{evaluate, PredictorKind, PredictorParams};
    let steps: Vec<Step> = (0..6)
        .map(|i| Step::new(0, i, vec![vec![(i % 4) as u32, 0, 0, 1]], 4))
        .collect();
    let mut cfg = ReplayConfig::new(2, 3);
    assert_eq!(cfg.predictor_params, PredictorParams::default());
    for (decay, history, what) in [(0.0, 0.3, "decay"), (0.9, 1.5, "history"), (f64::NAN, 0.3, "decay")] {
        cfg.predictor_params = PredictorParams {
            temporal_decay: decay,
            temporal_history: history,
        };
        let e = replay(&steps, 4, 1, PolicyKind::Moeless, &cfg).unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
    let tv = |history| {
        let p = PredictorParams {
            temporal_history: history,
            ..Default::default()
        };
        evaluate(PredictorKind::Temporal, &p, &steps, 1, 4, 1).tv_error_mean
    };
    assert_ne!(tv(0.0), tv(1.0));
}

/// A from-scratch MoEless plan is the same whether its layers are planned on one thread or
/// split over several (layers are independent), and every plan keeps each expert's shares
/// summing to 1 within the instance budget.
#[test]
fn moeless_plan_is_the_same_on_any_number_of_threads() {
    use shared::plan::LoadMatrix;
    use shared::replay::moeless_plan_with_threads;
    let mut x = 12345u64;
    let loads: Vec<Vec<f64>> = (0..7)
        .map(|_| {
            (0..32)
                .map(|e| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 1000) as f64 / (1 + e % 5) as f64
                })
                .collect()
        })
        .collect();
    let loads = LoadMatrix::new(loads).expect("loads");
    let mut cfg = ReplayConfig::new(8, 5);
    cfg.instance_budget = Some(36);
    let one = moeless_plan_with_threads(&loads, &cfg, 1).expect("plan");
    assert_eq!(one.layers.len(), 7);
    for layer in &one.layers {
        assert!(layer.instances.len() <= 36);
        let mut sums = [0.0f64; 32];
        for i in &layer.instances {
            sums[i.expert as usize] += i.share;
        }
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-9), "{sums:?}");
    }
    for threads in [2, 3, 7, 64] {
        assert_eq!(
            moeless_plan_with_threads(&loads, &cfg, threads).expect("plan"),
            one,
            "{threads} threads"
        );
    }
}
