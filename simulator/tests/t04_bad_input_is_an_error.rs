//! Bad input gives a clear error, never a panic.

use shared::replay::PolicyKind;
use simulator::arrivals::{self, Request};
use simulator::routing::RoutingPool;
use simulator::{simulate, GpuProfile, GpuType, ModelShape, SimConfig, SimError};

const SMALL: &str = r#"{"model_type": "olmoe", "hidden_size": 512, "intermediate_size": 256,
 "num_hidden_layers": 4, "num_attention_heads": 8, "num_experts": 8,
 "num_experts_per_tok": 2, "vocab_size": 1000}"#;

fn req() -> Vec<Request> {
    vec![Request {
        arrival_s: 0.0,
        prompt_tokens: 10,
        output_tokens: 3,
    }]
}

#[test]
fn unknown_gpu_type() {
    let e = "b200".parse::<GpuType>().unwrap_err();
    assert!(matches!(e, SimError::UnknownGpu(_)));
    assert!(e.to_string().contains("a6000, a100, h100, h200"), "{e}");
    assert_eq!("H100".parse::<GpuType>().unwrap(), GpuType::H100);
}

#[test]
fn device_profiles_from_json_are_checked() {
    let good = serde_json::to_string(&GpuType::H100.profile()).unwrap();
    assert_eq!(GpuProfile::from_json(&good).unwrap(), GpuType::H100.profile());
    for (field, value) in [
        ("peak_flops", "0.0"),
        ("hbm_bandwidth", "-1.0"),
        ("memory_efficiency", "1.5"),
        ("link_efficiency", "0.0"),
        ("kernel_overhead_s", "-0.001"),
        ("gpus_per_node", "0"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        let e = GpuProfile::from_json(&v.to_string()).unwrap_err();
        assert!(matches!(e, SimError::Config(_)), "{field}: {e}");
        assert!(e.to_string().contains(field), "{e}");
    }
    // Measured operator times: points must increase in tokens, times be positive.
    for ops in [
        r#"{"shape": "s", "expert_ffn_s": [], "layer_fixed_s": 0, "layer_per_token_s": 0, "layer_per_context_s": 0, "layer_per_prefill_product_s": 0}"#,
        r#"{"shape": "s", "expert_ffn_s": [[4, 1e-3], [2, 2e-3]], "layer_fixed_s": 0, "layer_per_token_s": 0, "layer_per_context_s": 0, "layer_per_prefill_product_s": 0}"#,
        r#"{"shape": "s", "expert_ffn_s": [[1, 0.0]], "layer_fixed_s": 0, "layer_per_token_s": 0, "layer_per_context_s": 0, "layer_per_prefill_product_s": 0}"#,
        r#"{"shape": "s", "expert_ffn_s": [[1, 1e-3]], "layer_fixed_s": -1, "layer_per_token_s": 0, "layer_per_context_s": 0, "layer_per_prefill_product_s": 0}"#,
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        v["measured"] = serde_json::from_str(ops).unwrap();
        let e = GpuProfile::from_json(&v.to_string()).unwrap_err();
        assert!(e.to_string().contains("measured"), "{e}");
    }
    for bad in ["", "{}", "[1, 2]", r#"{"name": "x"}"#] {
        assert!(matches!(GpuProfile::from_json(bad), Err(SimError::Config(_))), "{bad}");
    }
}

#[test]
fn trace_and_model_expert_counts_must_match() {
    // Per-layer fractions with 4 experts against a model with 8.
    let fr = "Layer,Language,Expert_0,Expert_1,Expert_2,Expert_3\n0,en,0.1,0.2,0.3,0.4\n";
    let e = RoutingPool::read(fr.as_bytes(), 8, 2, 0).unwrap_err();
    assert!(matches!(e, SimError::ExpertMismatch { trace: 4, model: 8 }), "{e}");
    // A per-token trace naming expert 9 against 8 experts.
    let t = "subject,query_id,phase,token_idx,L1\na,0,decode,0,9\n";
    let e = RoutingPool::read(t.as_bytes(), 8, 1, 0).unwrap_err();
    assert!(matches!(e, SimError::ExpertMismatch { trace: 10, model: 8 }), "{e}");
    // Layers: a 1-layer trace against the 4 MoE layers of the model.
    let model = ModelShape::from_config_json(SMALL, 2).unwrap();
    let t = "subject,query_id,phase,token_idx,L1\na,0,decode,0,3\n";
    let pool = RoutingPool::read(t.as_bytes(), 8, 1, 0).unwrap();
    let cfg = SimConfig::new(2, GpuType::A100.profile());
    let e = simulate(
        &cfg,
        &model,
        &pool,
        &req(),
        1.0,
        &[PolicyKind::Static],
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, SimError::LayerMismatch { trace: 1, model: 4 }), "{e}");
}

#[test]
fn empty_traces() {
    assert!(matches!(arrivals::parse_auto(""), Err(SimError::EmptyArrivals(_))));
    let header_only = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
    assert!(matches!(
        arrivals::parse_azure_csv(header_only.as_bytes()),
        Err(SimError::EmptyArrivals(_))
    ));
    assert!(matches!(
        arrivals::parse_mooncake_jsonl("".as_bytes()),
        Err(SimError::EmptyArrivals(_))
    ));
    assert!(matches!(
        RoutingPool::read("".as_bytes(), 8, 2, 0),
        Err(SimError::Routing(_))
    ));
    let model = ModelShape::from_config_json(SMALL, 2).unwrap();
    let pool = RoutingPool::from_popularity(&vec![vec![1.0; 8]; 4], 2, 0, "t".into()).unwrap();
    let cfg = SimConfig::new(2, GpuType::A100.profile());
    let e = simulate(&cfg, &model, &pool, &[], 1.0, &[PolicyKind::Static], &mut |_, _, _| {}).unwrap_err();
    assert!(matches!(e, SimError::EmptyArrivals(_)), "{e}");
}

#[test]
fn negative_or_bad_durations() {
    assert!(matches!(
        arrivals::window(&req(), -5.0, 1.0),
        Err(SimError::BadDuration(_))
    ));
    assert!(matches!(
        arrivals::window(&req(), f64::NAN, 1.0),
        Err(SimError::BadDuration(_))
    ));
    assert!(matches!(arrivals::window(&req(), 5.0, 0.0), Err(SimError::Config(_))));
    let model = ModelShape::from_config_json(SMALL, 2).unwrap();
    let pool = RoutingPool::from_popularity(&vec![vec![1.0; 8]; 4], 2, 0, "t".into()).unwrap();
    let cfg = SimConfig::new(2, GpuType::A100.profile());
    let e = simulate(
        &cfg,
        &model,
        &pool,
        &req(),
        -1.0,
        &[PolicyKind::Static],
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, SimError::BadDuration(_)), "{e}");
}

#[test]
fn malformed_files_name_the_problem() {
    let e = ModelShape::from_config_json(r#"{"hidden_size": 8}"#, 2).unwrap_err();
    assert!(e.to_string().contains("num_hidden_layers"), "{e}");
    assert!(ModelShape::from_config_json("not json", 2).is_err());
    let bad = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,12,x\n";
    let e = arrivals::parse_azure_csv(bad.as_bytes()).unwrap_err();
    assert!(matches!(e, SimError::Arrivals { line: 2, .. }), "{e}");
    let e = arrivals::parse_mooncake_jsonl(r#"{"timestamp": -1, "input_length": 3, "output_length": 1}"#.as_bytes())
        .unwrap_err();
    assert!(e.to_string().contains("timestamp"), "{e}");
}

#[test]
fn a_model_too_big_for_the_gpus_is_an_error() {
    // Llama-4-Maverick-like expert sizes on 2 A6000s.
    let big = r#"{"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
      "num_hidden_layers": 48, "interleave_moe_layer_step": 2, "num_attention_heads": 40,
      "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 128, "num_experts_per_tok": 1,
      "vocab_size": 202048}"#;
    let model = ModelShape::from_config_json(big, 2).unwrap();
    let cfg = SimConfig::new(2, GpuType::A6000.profile());
    let e = simulator::engine::layout(&cfg, &model).unwrap_err();
    assert!(matches!(e, SimError::DoesNotFit(_)), "{e}");
}
