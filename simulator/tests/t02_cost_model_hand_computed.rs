//! The cost model agrees with hand-computed roofline, communication, cold-start and billing
//! figures.

use simulator::cost::{AttentionWork, CostModel, Pricing};
use simulator::gpu::{GpuType, MeasuredOps, KERNEL_OVERHEAD_S, LINK_EFFICIENCY, LINK_LATENCY_S};
use simulator::ModelShape;

const MIXTRAL: &str = r#"{"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
 "num_experts_per_tok": 2, "vocab_size": 32000}"#;

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-12 + 1e-9 * b.abs(), "{a} vs {b}");
}

#[test]
fn mixtral_shape_and_bytes() {
    let m = ModelShape::from_config_json(MIXTRAL, 2).unwrap();
    assert_eq!((m.num_experts, m.top_k, m.moe_layers.len()), (8, 2, 32));
    // 3 x 4096 x 14336 x 2 bytes.
    close(m.expert_bytes(), 352_321_536.0);
    // KV: 32 layers x 2 x 8 heads x 128 dims x 2 bytes = 131,072 bytes per token.
    close(m.kv_bytes_per_token(), 131_072.0);
}

#[test]
fn expert_time_is_the_roofline() {
    let m = ModelShape::from_config_json(MIXTRAL, 2).unwrap();
    let p = GpuType::A100.profile();
    let c = CostModel::new(p, m, 8);
    // One token: memory-bound, weights + activations over 0.75 x 2,039 GB/s.
    let bytes = 352_321_536.0 + (2.0 * 4096.0 + 2.0 * 14336.0) * 2.0;
    close(c.expert_time(1), bytes / (2039e9 * 0.75) + 3.0 * KERNEL_OVERHEAD_S);
    // 4096 tokens: compute-bound, 2 x 4096 x 3 x 4096 x 14336 FLOPs over 0.70 x 312 TFLOP/s.
    let flops = 2.0 * 4096.0 * 3.0 * 4096.0 * 14336.0;
    close(c.expert_time(4096), flops / (312e12 * 0.70) + 3.0 * KERNEL_OVERHEAD_S);
    assert_eq!(c.expert_time(0), 0.0);
}

#[test]
fn communication_and_cold_start() {
    let m = ModelShape::from_config_json(MIXTRAL, 2).unwrap();
    let c = CostModel::new(GpuType::H100.profile(), m.clone(), 8);
    // 1000 vectors of 4096 bf16 within one node: latency + 8,192,000 B / (450 GB/s x 0.77).
    close(
        c.all_to_all_time(1000.0),
        LINK_LATENCY_S + 8_192_000.0 / (450e9 * LINK_EFFICIENCY),
    );
    // 16 GPUs: 7 of 15 peers in the node, 8 across; inter-node (50 GB/s) share sets the pace.
    let c16 = CostModel::new(GpuType::H100.profile(), m.clone(), 16);
    let per_byte = (7.0 / 15.0 / 450e9f64).max(8.0 / 15.0 / 50e9);
    close(c16.all_to_all_bandwidth(), LINK_EFFICIENCY / per_byte);
    // One GPU: no communication.
    assert_eq!(
        CostModel::new(GpuType::H100.profile(), m.clone(), 1).all_to_all_time(1000.0),
        0.0
    );
    // Cold start on an A6000: 352 MB over 25 GB/s plus 2 ms.
    let a = CostModel::new(GpuType::A6000.profile(), m, 8);
    close(a.cold_start_time(), 352_321_536.0 / 25e9 + 2e-3);
}

#[test]
fn measured_profile_fields_drive_the_roofline_and_links() {
    let m = ModelShape::from_config_json(MIXTRAL, 2).unwrap();
    let mut p = GpuType::A100.profile();
    p.kernel_overhead_s = 1e-3;
    p.link_latency_s = 2e-3;
    p.link_efficiency = 0.5;
    let c = CostModel::new(p.clone(), m.clone(), 8);
    let bytes = 352_321_536.0 + (2.0 * 4096.0 + 2.0 * 14336.0) * 2.0;
    close(c.expert_time(1), bytes / (2039e9 * 0.75) + 3e-3);
    close(c.all_to_all_time(1000.0), 2e-3 + 8_192_000.0 / (300e9 * 0.5));
    // Central attention: one expert GPU behind an engine device still pays the link.
    let mut c1 = CostModel::new(p, m, 1);
    assert_eq!(c1.all_to_all_time(1000.0), 0.0);
    c1.central_attention = true;
    close(c1.all_to_all_time(1000.0), 2e-3 + 8_192_000.0 / (300e9 * 0.5));
}

#[test]
fn measured_operator_times_replace_the_roofline_for_their_shape_only() {
    let m = ModelShape::from_config_json(MIXTRAL, 2).unwrap();
    let mut p = GpuType::A100.profile();
    p.measured = Some(MeasuredOps {
        shape: m.shape_key(),
        expert_ffn_s: vec![(1, 1e-3), (4, 2e-3), (16, 8e-3)],
        layer_fixed_s: 1e-4,
        layer_per_token_s: 1e-5,
        layer_per_context_s: 1e-7,
        layer_per_prefill_product_s: 1e-9,
        step_fixed_s: 2e-4,
        step_per_sequence_s: 1e-5,
        request_overhead_s: 3e-3,
        expert_task_overhead_s: 0.0,
        per_extra_worker_s: 0.0,
    });
    let c = CostModel::new(p.clone(), m.clone(), 8);
    assert!(c.uses_measured_ops());
    close(c.expert_time(1), 1e-3);
    close(c.expert_time(2), 1e-3 + 1e-3 / 3.0);
    close(c.expert_time(10), 2e-3 + 6e-3 * 6.0 / 12.0);
    // Past the last point: proportional to tokens.
    close(c.expert_time(32), 16e-3);
    assert_eq!(c.expert_time(0), 0.0);
    // A remote worker's per-task overhead is added to every call that has tokens.
    let mut q = p.clone();
    if let Some(ms) = q.measured.as_mut() {
        ms.expert_task_overhead_s = 5e-5;
    }
    let cq = CostModel::new(q.clone(), m.clone(), 8);
    close(cq.expert_time(1), 1e-3 + 5e-5);
    close(cq.expert_time(32), 16e-3 + 5e-5);
    assert_eq!(cq.expert_time(0), 0.0);
    // Each further worker a layer reaches costs the engine a message pair, only when attention
    // runs on an engine in front of remote workers.
    if let Some(ms) = q.measured.as_mut() {
        ms.per_extra_worker_s = 2e-4;
    }
    let mut cf = CostModel::new(q, m.clone(), 8);
    assert_eq!(
        cf.fanout_time(3),
        0.0,
        "GPUs in an all-to-all pay no per-worker message"
    );
    cf.central_attention = true;
    assert_eq!(cf.fanout_time(0), 0.0);
    assert_eq!(cf.fanout_time(1), 0.0);
    close(cf.fanout_time(3), 4e-4);
    assert_eq!(c.fanout_time(3), 0.0, "no term without a measured value");
    let w = AttentionWork {
        prefill_tokens: 10,
        prefill_context_products: 50.0,
        decode_tokens: 2,
        decode_context: 300,
    };
    close(
        c.attention_time(&w, true),
        1e-4 + 12.0 * 1e-5 + 300.0 * 1e-7 + 50.0 * 1e-9,
    );
    assert_eq!(c.lm_head_time(12), 0.0, "the LM head is inside the measured layers");
    close(c.step_overhead(3), 2e-4 + 3e-5);
    close(c.request_overhead(), 3e-3);
    assert_eq!(c.step_overhead(0), 0.0);
    // Another shape falls back to the roofline.
    let other = ModelShape::from_config_json(&MIXTRAL.replace("14336", "7168"), 2).unwrap();
    let c = CostModel::new(p, other.clone(), 8);
    assert!(!c.uses_measured_ops());
    assert_eq!(c.step_overhead(3), 0.0);
    assert_eq!(c.request_overhead(), 0.0);
    assert_eq!(c.expert_time(1), c.ffn_time(1, 7168));
}

#[test]
fn billing_in_both_currencies() {
    let p = Pricing {
        usd_per_gpu_hour: 2.0,
        gpu_memory_gb: 80.0,
    };
    // 8 GPUs for an hour: 28,800 GPU-s -> $16.
    close(p.serverful_usd(28_800.0), 16.0);
    // 40 GB held for an hour = half a GPU-hour -> $1.
    close(p.serverless_usd(40.0 * 3600.0), 1.0);
}
