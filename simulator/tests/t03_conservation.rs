//! Every arrived request completes, or is reported as rejected or unfinished, under every
//! policy; latencies are positive and ordered (TTFT <= E2E).

use shared::replay::PolicyKind;
use simulator::arrivals::Request;
use simulator::routing::RoutingPool;
use simulator::{simulate, GpuType, ModelShape, SimConfig};

const SMALL: &str = r#"{"model_type": "olmoe", "hidden_size": 512, "intermediate_size": 256,
 "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "num_experts": 8,
 "num_experts_per_tok": 2, "vocab_size": 1000}"#;

fn popularity() -> Vec<Vec<f64>> {
    (0..4)
        .map(|l| (0..8).map(|e| 1.0 + ((e * 5 + l) % 8) as f64).collect())
        .collect()
}

#[test]
fn every_request_is_accounted_for() {
    let model = ModelShape::from_config_json(SMALL, 2).unwrap();
    let routing = RoutingPool::from_popularity(&popularity(), 2, 7, "test".into()).unwrap();
    let mut reqs: Vec<Request> = (0..60)
        .map(|i| Request {
            arrival_s: i as f64 * 0.01,
            prompt_tokens: 1 + (i * 37) % 300,
            output_tokens: (i * 13) % 40,
        })
        .collect();
    // One request too large for any GPU's KV cache: rejected, not lost.
    reqs.push(Request {
        arrival_s: 0.3,
        prompt_tokens: 1 << 40,
        output_tokens: 1,
    });
    let mut cfg = SimConfig::new(4, GpuType::A100.profile());
    cfg.token_budget_per_gpu = 64;
    cfg.max_seqs_per_gpu = 4;
    let mut calls = 0;
    let reports = simulate(&cfg, &model, &routing, &reqs, 1.0, &PolicyKind::ALL, &mut |_, _, _| {
        calls += 1
    })
    .unwrap();
    assert!(calls > 0, "progress is reported");
    for r in &reports {
        let s = r.summary.as_ref().unwrap();
        assert_eq!(s.requests_arrived, reqs.len(), "{}", s.policy);
        assert_eq!(s.requests_rejected, 1, "{}", s.policy);
        assert_eq!(s.requests_unfinished, 0, "{}", s.policy);
        assert_eq!(
            s.requests_completed + s.requests_rejected + s.requests_unfinished,
            reqs.len()
        );
        assert!(
            s.ttft_s.p50 > 0.0 && s.ttft_s.p99 <= s.e2e_s.p99 + 1e-12,
            "{}",
            s.policy
        );
        assert!(s.cost_gpu_mem_gb_s > 0.0 && s.cost_usd > 0.0);
        assert!((0.0..=1.0).contains(&s.balancedness_mean));
    }
    // Deterministic for a seed.
    let again = simulate(
        &cfg,
        &model,
        &routing,
        &reqs,
        1.0,
        &[PolicyKind::Moeless],
        &mut |_, _, _| {},
    )
    .unwrap();
    let a = reports[2].summary.as_ref().unwrap();
    let b = again[0].summary.as_ref().unwrap();
    assert_eq!(a.e2e_s, b.e2e_s);
}

/// With central attention one engine device takes every request: nothing is lost, the step
/// limits apply to it (one device admits what four did), and dispatch crosses the link even
/// for a single expert GPU.
#[test]
fn central_attention_accounts_for_every_request_and_pays_the_link() {
    let model = ModelShape::from_config_json(SMALL, 2).unwrap();
    let routing = RoutingPool::from_popularity(&popularity(), 2, 7, "test".into()).unwrap();
    let reqs: Vec<Request> = (0..40)
        .map(|i| Request {
            arrival_s: i as f64 * 0.02,
            prompt_tokens: 1 + (i * 37) % 200,
            output_tokens: 1 + (i * 13) % 30,
        })
        .collect();
    let run = |gpus: usize, central: bool| {
        let mut cfg = SimConfig::new(gpus, GpuType::A100.profile());
        cfg.central_attention = central;
        cfg.token_budget_per_gpu = 64;
        cfg.max_seqs_per_gpu = 8;
        let r = simulate(
            &cfg,
            &model,
            &routing,
            &reqs,
            1.0,
            &[PolicyKind::Static],
            &mut |_, _, _| {},
        )
        .unwrap();
        r.into_iter().next().unwrap()
    };
    for gpus in [1, 4] {
        let r = run(gpus, true);
        let s = r.summary.as_ref().unwrap();
        assert_eq!(s.requests_completed, reqs.len(), "{gpus} GPUs");
        assert!(s.ttft_s.p50 > 0.0 && s.ttft_s.p99 <= s.e2e_s.p99 + 1e-12);
    }
    // One expert GPU: data-parallel attention has no communication, central attention does.
    let (dp, central) = (run(1, false), run(1, true));
    let min = |r: &simulator::report::PolicyReport| r.moe_layer_s.iter().copied().fold(f32::INFINITY, f32::min);
    assert!(
        min(&central) > min(&dp),
        "central {} vs data-parallel {}",
        min(&central),
        min(&dp)
    );
    // Central attention with 4 expert GPUs serves all attention from one device: slower E2E
    // than spreading it over the four.
    let (dp4, c4) = (run(4, false), run(4, true));
    assert!(c4.summary.unwrap().e2e_s.mean > dp4.summary.unwrap().e2e_s.mean);
}
