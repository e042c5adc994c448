//! ServeGen-generated arrivals against the real fitted statistics in
//! `$MOELESS_SHARED_DIR/data/arrivals/servegen` (default `../shared`); a missing directory fails
//! unless `MOELESS_SKIP_REFERENCE=1`.

#[path = "../../shared/tests/common/mod.rs"]
mod common;

use simulator::arrivals::read_servegen_dir;

/// ServeGen's own per-10-minute totals (`derived_total_rate_per_10min_by_model.csv`), column
/// `model`, for the first `windows` windows.
fn derived_rates(dir: &std::path::Path, model: &str, windows: usize) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("derived_total_rate_per_10min_by_model.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == model).unwrap();
    lines
        .take(windows)
        .map(|l| l.split(',').nth(col).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn generated_rates_follow_servegens_totals_and_lengths_its_datasets() {
    let Some(dir) = common::reference_dir("data/arrivals/servegen") else {
        return;
    };
    for (model, scale) in [("language/m-large", 0.02), ("reason/deepseek-r1", 1.0)] {
        let pool = read_servegen_dir(&dir.join(model)).unwrap();
        let windows = 6;
        let reqs = pool.generate(0.0, 600.0 * windows as f64, scale, 11).unwrap();
        let want = derived_rates(&dir, model, windows);
        let total_want: f64 = want.iter().map(|r| r * scale * 600.0).sum();
        let total_got = reqs.len() as f64;
        // Bursty fits (CV up to ~10) leave sampling noise; over an hour the total is close.
        assert!(
            (total_got / total_want - 1.0).abs() < 0.15,
            "{model}: {total_got} requests generated, ServeGen's totals say {total_want:.0}"
        );
        for (w, r) in want.iter().enumerate() {
            let got = reqs
                .iter()
                .filter(|q| q.arrival_s >= 600.0 * w as f64 && q.arrival_s < 600.0 * (w + 1) as f64)
                .count() as f64;
            let exp = r * scale * 600.0;
            assert!(
                (got - exp).abs() < 0.35 * exp + 30.0,
                "{model} window {w}: {got} requests, expected ~{exp:.0}"
            );
        }
        assert!(reqs.iter().all(|q| q.prompt_tokens > 0));
        let mean_out = reqs.iter().map(|q| q.output_tokens as f64).sum::<f64>() / total_got;
        // Reasoning answers are long (DeepSeek-R1), chat answers short.
        if model.starts_with("reason") {
            assert!(mean_out > 1000.0, "{model}: mean output {mean_out}");
        } else {
            assert!(mean_out > 50.0 && mean_out < 1000.0, "{model}: mean output {mean_out}");
        }
    }
}
