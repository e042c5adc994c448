//! `moeless sim-validate` runs a small workload on the real engine with two worker processes
//! and in the simulator with the profile it measured, and reports every metric on both sides;
//! `moeless sim --device-profile` reads the profile it wrote. Reads the reference data.

use std::process::Command;

use data_plane::reference::shared_dir;

#[test]
fn sim_validate_reports_every_metric_and_its_profile_drives_sim() {
    let Some(shared) = shared_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("validate");
    let run = Command::new(env!("CARGO_BIN_EXE_moeless"))
        .args([
            "sim-validate",
            "--workers",
            "2",
            "--duration",
            "10",
            "--length-scale",
            "0.02",
        ])
        .args([
            "--hidden",
            "64",
            "--ffn",
            "64",
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
        ])
        .arg("--model-dir")
        .arg(dir.path().join("models"))
        .arg("--out")
        .arg(&out)
        .env("MOELESS_SHARED_DIR", &shared)
        .output()
        .expect("running moeless");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "sim-validate failed: {stderr}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("validation.json")).unwrap()).unwrap();
    let requests = doc["workload"]["requests"].as_u64().unwrap();
    assert!(requests > 5, "{requests} requests");
    assert_eq!(doc["sim"]["requests_completed"].as_u64(), Some(requests));
    assert!(doc["real"]["moe_layer_calls"].as_u64().unwrap() > 0);
    for (name, m) in doc["metrics"].as_object().unwrap() {
        let (r, s) = (m["real"].as_f64().unwrap(), m["sim"].as_f64().unwrap());
        assert!(r > 0.0 && s > 0.0, "{name}: real {r}, sim {s}");
        assert!(m["error_pct"].as_f64().unwrap().is_finite(), "{name}");
    }
    // Every real MoE-layer call is priced by the simulator's cost model, and a window of them
    // replayed on the idle cluster (both ways).
    let priced = doc["real_calls_priced"].as_array().unwrap();
    assert_eq!(priced.len(), 4);
    assert_eq!(priced[0]["tokens"], "all");
    assert_eq!(priced[0]["calls"], doc["real"]["moe_layer_calls"]);
    assert!(priced[0]["priced_mean_s"].as_f64().unwrap() > 0.0);
    assert!(priced[0]["replayed"].as_u64().unwrap() > 0);
    for k in ["replayed_idle_mean_s", "replayed_after_work_mean_s"] {
        assert!(priced[0][k].as_f64().unwrap() > 0.0, "{k}");
    }
    let split: u64 = priced[1..].iter().map(|g| g["calls"].as_u64().unwrap()).sum();
    assert_eq!(Some(split), priced[0]["calls"].as_u64(), "the groups split the calls");
    // The cost of each further worker a call reaches is measured and in the profile.
    let extra = doc["profile"]["measured"]["per_extra_worker_s"].as_f64().unwrap();
    assert!(extra.is_finite() && extra >= 0.0, "{extra}");
    let passes = doc["calibration"].as_array().unwrap();
    assert_eq!(passes.len(), 4, "two calibrations before the run, two after");
    for c in passes {
        assert!(c["per_extra_worker_s"].as_f64().is_some());
        for b in c["overhead_bursts"].as_array().unwrap() {
            assert!(b["forward_s"].as_f64().unwrap() > 0.0, "the scheduler timed its passes");
        }
    }
    for f in [
        "validation_e2e_cdf.svg",
        "validation_ttft_cdf.svg",
        "validation_moe_layer_cdf.svg",
    ] {
        assert!(std::fs::read_to_string(out.join(f)).unwrap().starts_with("<svg"), "{f}");
    }

    // The measured profile drives `moeless sim` with central attention (the same shape, as
    // deep as the routing trace: 24 MoE layers).
    let models = dir.path().join("models");
    let model_dir = std::fs::read_dir(&models).unwrap().next().unwrap().unwrap().path();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = 24.into();
    let config_path = dir.path().join("config24.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let sim_out = dir.path().join("sim");
    let sim = Command::new(env!("CARGO_BIN_EXE_moeless"))
        .arg("sim")
        .arg("--model-config")
        .arg(&config_path)
        .arg("--routing-trace")
        .arg(shared.join("data/routing/llama4-maverick-mmlu/top1_per_token.csv"))
        .arg("--arrivals")
        .arg(shared.join("data/arrivals/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"))
        .args([
            "--gpus",
            "2",
            "--policies",
            "static",
            "--duration",
            "5",
            "--weight-bytes",
            "4",
            "--sample-moe-layers",
            "6",
        ])
        .arg("--device-profile")
        .arg(out.join("profile.json"))
        .arg("--central-attention")
        .arg("--out")
        .arg(&sim_out)
        .output()
        .expect("running moeless sim");
    assert!(
        sim.status.success(),
        "sim failed: {}",
        String::from_utf8_lossy(&sim.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sim_out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["config"]["gpu_type"], doc["profile"]["name"]);
    assert_eq!(report["config"]["central_attention"], true);
    assert!(report["policies"][0]["requests_completed"].as_u64().unwrap() > 0);
    // 6 of the 24 MoE layers simulated, each standing for 4.
    assert_eq!(report["config"]["sample_moe_layers"], 6);
    assert_eq!(report["policies"][0]["moe_layers_simulated"], 6);
}
