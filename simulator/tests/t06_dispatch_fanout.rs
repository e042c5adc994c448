//! Dispatch fan-out: with data-parallel attention an all-to-all sends a token once to each
//! distinct GPU that runs one of its experts. Sampled steps count those copies with the
//! policy's own token-to-instance matching; the communication time follows them.

use shared::replay::PolicyKind;
use simulator::arrivals::Request;
use simulator::report::Summary;
use simulator::routing::RoutingPool;
use simulator::{simulate, GpuType, ModelShape, SimConfig};

fn model(top_k: usize) -> ModelShape {
    let json = format!(
        r#"{{"model_type": "olmoe", "hidden_size": 512, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
        "num_experts": 8, "num_experts_per_tok": {top_k}, "vocab_size": 1000}}"#
    );
    ModelShape::from_config_json(&json, 2).unwrap()
}

fn routing(top_k: usize) -> RoutingPool {
    let pop: Vec<Vec<f64>> = (0..4)
        .map(|l| (0..8).map(|e| 1.0 + ((e * 5 + l) % 8) as f64).collect())
        .collect();
    RoutingPool::from_popularity(&pop, top_k, 7, "test".into()).unwrap()
}

fn run(cfg: &SimConfig, top_k: usize, reqs: &[Request], policies: &[PolicyKind]) -> Vec<Summary> {
    simulate(
        cfg,
        &model(top_k),
        &routing(top_k),
        reqs,
        1.0,
        policies,
        &mut |_, _, _| {},
    )
    .unwrap()
    .into_iter()
    .map(|r| r.summary.unwrap())
    .collect()
}

fn traffic() -> Vec<Request> {
    (0..40)
        .map(|i| Request {
            arrival_s: i as f64 * 0.02,
            prompt_tokens: 1 + (i * 37) % 200,
            output_tokens: 1 + (i * 13) % 30,
        })
        .collect()
}

fn config(every: usize) -> SimConfig {
    let mut cfg = SimConfig::new(4, GpuType::A100.profile());
    cfg.token_budget_per_gpu = 64;
    cfg.max_seqs_per_gpu = 4;
    cfg.fanout_sample_every = every;
    cfg
}

#[test]
fn fanout_lies_between_one_and_top_k_for_every_policy() {
    for every in [1, 3] {
        for s in run(&config(every), 2, &traffic(), &PolicyKind::ALL) {
            let f = s.dispatch_fanout_mean.expect("sampled");
            // 8 experts on 4 GPUs: some tokens find both their experts on one GPU.
            assert!((1.0..2.0).contains(&f), "{} every {every}: {f}", s.policy);
        }
    }
    for s in run(&config(0), 2, &traffic(), &PolicyKind::ALL) {
        assert_eq!(s.dispatch_fanout_mean, None, "{}", s.policy);
    }
}

/// One 64-token prompt producing one token: a single step, the same under both models, so
/// every MoE layer's time differs only by the dispatch volume, which fan-out can only shrink.
#[test]
fn fewer_copies_mean_less_communication_in_the_same_step() {
    let reqs = [Request {
        arrival_s: 0.0,
        prompt_tokens: 64,
        output_tokens: 1,
    }];
    for p in [PolicyKind::Static, PolicyKind::Moeless] {
        let per_choice = &run(&config(0), 2, &reqs, &[p])[0];
        let fanout = &run(&config(1), 2, &reqs, &[p])[0];
        assert_eq!(per_choice.steps, 1);
        assert_eq!(fanout.steps, 1);
        assert!(
            fanout.moe_layer_time_mean_s < per_choice.moe_layer_time_mean_s,
            "{p:?}: {} vs {}",
            fanout.moe_layer_time_mean_s,
            per_choice.moe_layer_time_mean_s
        );
        assert!(fanout.e2e_s.mean < per_choice.e2e_s.mean);
    }
}

/// A report without its fan-out, to compare runs that differ only there.
fn strip(s: &Summary) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap();
    v.as_object_mut().unwrap().remove("dispatch_fanout_mean");
    v
}

/// Top-1: every token has one expert, so one copy per choice is exact and sampling routes
/// changes nothing but the reported fan-out.
#[test]
fn top_one_routing_is_unchanged_by_sampling() {
    let off = run(&config(0), 1, &traffic(), &PolicyKind::ALL);
    let on = run(&config(1), 1, &traffic(), &PolicyKind::ALL);
    for (a, b) in off.iter().zip(&on) {
        assert_eq!(b.dispatch_fanout_mean, Some(1.0), "{}", b.policy);
        assert_eq!(strip(a), strip(b), "{}", a.policy);
    }
}

/// With one engine device in front of the GPUs the workers' requests carry a token once per
/// worker and their answers one summed row per token: both directions shrink with fan-out.
/// With top-1 both models agree exactly.
#[test]
fn central_attention_samples_both_directions() {
    let central = |every| {
        let mut cfg = config(every);
        cfg.central_attention = true;
        cfg
    };
    for s in run(&central(1), 2, &traffic(), &PolicyKind::ALL) {
        let f = s.dispatch_fanout_mean.expect("sampled");
        assert!((1.0..2.0).contains(&f), "{}: {f}", s.policy);
    }
    let reqs = [Request {
        arrival_s: 0.0,
        prompt_tokens: 64,
        output_tokens: 1,
    }];
    let per_choice = &run(&central(0), 2, &reqs, &[PolicyKind::Static])[0];
    let fanout = &run(&central(1), 2, &reqs, &[PolicyKind::Static])[0];
    assert!(fanout.moe_layer_time_mean_s < per_choice.moe_layer_time_mean_s);
    // Both directions shrink (workers sum a token's outputs). The engine's link carries every
    // token, against (g-1)/g of a GPU's with data-parallel attention, so more is saved; with
    // the combine left at one vector per choice it would be less (about half of this).
    let dp_per_choice = &run(&config(0), 2, &reqs, &[PolicyKind::Static])[0];
    let dp_fanout = &run(&config(1), 2, &reqs, &[PolicyKind::Static])[0];
    let saved = per_choice.moe_layer_time_mean_s - fanout.moe_layer_time_mean_s;
    let dp_saved = dp_per_choice.moe_layer_time_mean_s - dp_fanout.moe_layer_time_mean_s;
    assert!(saved > dp_saved && dp_saved > 0.0, "{saved} vs {dp_saved}");
    let off = run(&central(0), 1, &traffic(), &PolicyKind::ALL);
    let on = run(&central(1), 1, &traffic(), &PolicyKind::ALL);
    for (a, b) in off.iter().zip(&on) {
        assert_eq!(strip(a), strip(b), "{}", a.policy);
    }
}
