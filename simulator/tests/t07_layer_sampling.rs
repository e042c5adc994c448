//! Simulating a sample of the MoE layers (`SimConfig::sample_moe_layers`): every layer is the
//! exact run; a sample counts each simulated layer for the layers it stands for, so time,
//! memory and instances stay on the whole model's scale.

use shared::replay::PolicyKind;
use simulator::arrivals::Request;
use simulator::report::PolicyReport;
use simulator::routing::RoutingPool;
use simulator::{simulate, GpuType, ModelShape, SimConfig, SimError};

const EIGHT_LAYERS: &str = r#"{"model_type": "olmoe", "hidden_size": 512, "intermediate_size": 256,
 "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8, "num_experts": 8,
 "num_experts_per_tok": 2, "vocab_size": 1000}"#;

fn run(sample: Option<usize>, policies: &[PolicyKind]) -> Result<Vec<PolicyReport>, SimError> {
    let model = ModelShape::from_config_json(EIGHT_LAYERS, 2).unwrap();
    // Layers alike in skew (a different hot expert each), as the sample assumes.
    let pop: Vec<Vec<f64>> = (0..8)
        .map(|l| {
            (0..8)
                .map(|e| if e == l { 6.0 } else { 1.0 + (e % 3) as f64 })
                .collect()
        })
        .collect();
    let routing = RoutingPool::from_popularity(&pop, 2, 7, "test".into()).unwrap();
    let reqs: Vec<Request> = (0..200)
        .map(|i| Request {
            arrival_s: i as f64 * 0.01,
            prompt_tokens: 1 + (i * 37) % 200,
            output_tokens: 1 + (i * 13) % 60,
        })
        .collect();
    let mut cfg = SimConfig::new(4, GpuType::A100.profile());
    cfg.token_budget_per_gpu = 128;
    cfg.max_seqs_per_gpu = 16;
    cfg.sample_moe_layers = sample;
    simulate(&cfg, &model, &routing, &reqs, 2.0, policies, &mut |_, _, _| {})
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!(
        (a - b).abs() <= tol * b.abs(),
        "{what}: sampled {a} vs every layer {b} (tolerance {tol})"
    );
}

#[test]
fn sampling_every_layer_is_the_exact_run() {
    let all = run(None, &PolicyKind::ALL).unwrap();
    let same = run(Some(8), &PolicyKind::ALL).unwrap();
    let more = run(Some(100), &[PolicyKind::Moeless]).unwrap();
    for (a, b) in all.iter().zip(&same) {
        let (a, b) = (a.summary.as_ref().unwrap(), b.summary.as_ref().unwrap());
        assert_eq!(a.moe_layers_simulated, 8);
        assert_eq!(b.moe_layers_simulated, 8);
        assert_eq!(a.e2e_s, b.e2e_s, "{}", a.policy);
        assert_eq!(a.cost_gpu_mem_gb_s, b.cost_gpu_mem_gb_s, "{}", a.policy);
        assert_eq!(a.moe_layer_time_mean_s, b.moe_layer_time_mean_s, "{}", a.policy);
    }
    let m = more[0].summary.as_ref().unwrap();
    assert_eq!(
        m.e2e_s,
        all[2].summary.as_ref().unwrap().e2e_s,
        "more than the model has: all of them"
    );
}

#[test]
fn a_sample_of_layers_stands_for_the_whole_model() {
    let all = run(None, &PolicyKind::ALL).unwrap();
    let two = run(Some(2), &PolicyKind::ALL).unwrap();
    for (a, b) in two.iter().zip(&all) {
        let (a, b) = (a.summary.as_ref().unwrap(), b.summary.as_ref().unwrap());
        let p = &a.policy;
        assert_eq!(a.moe_layers_simulated, 2);
        assert_eq!(a.requests_completed, b.requests_completed, "{p}");
        // Time per step counts each simulated layer four times: latencies stay on scale.
        close(a.e2e_s.mean, b.e2e_s.mean, 0.15, &format!("{p} E2E mean"));
        close(
            a.moe_layer_time_mean_s,
            b.moe_layer_time_mean_s,
            0.25,
            &format!("{p} MoE layer mean"),
        );
        // Instances (and the memory they hold) count for the layers they stand for.
        close(
            a.mem_expert_gb_s,
            b.mem_expert_gb_s,
            0.15,
            &format!("{p} expert memory"),
        );
        close(
            a.instances_over_time.iter().map(|x| x[1]).sum::<f64>(),
            b.instances_over_time.iter().map(|x| x[1]).sum::<f64>(),
            0.15,
            &format!("{p} instances per layer over time"),
        );
    }
    // Static placement holds the same instances on every layer: its memory scales exactly.
    let (a, b) = (two[0].summary.as_ref().unwrap(), all[0].summary.as_ref().unwrap());
    assert_eq!(a.policy, "static");
    close(a.mem_expert_gb_s, b.mem_expert_gb_s, 0.02, "static expert memory");
}

#[test]
fn sampling_no_layer_is_an_error() {
    let e = run(Some(0), &[PolicyKind::Static]).unwrap_err();
    assert!(matches!(e, SimError::Config(_)), "{e}");
}
