//! Arrivals generated from Alibaba ServeGen's fitted per-client statistics
//! (`../shared/data/arrivals/servegen`), for horizons longer than any recorded trace.
//!
//! A ServeGen client directory holds `chunk-<client>-trace.csv` (one row per 10-minute window:
//! `start_s,rate,cv,family,shape,scale`, family `Gamma` or `Weibull` fitted to that window's
//! inter-arrival times, empty when the client sent nothing) and, for some clients,
//! `chunk-<client>-dataset.json` (per 6-hour window, the `input_tokens` / `output_tokens`
//! distributions as `{tokens: probability}` maps).
//!
//! Generation, per client and window with a positive rate: inter-arrival times are drawn from
//! the fitted family and shape and scaled so that their mean is `1 / (rate * rate_scale)` (the
//! family sets the burstiness, the window's rate the volume); the first arrival of a window is a
//! uniform fraction of a draw after its start. Lengths come from the client's dataset window
//! holding the arrival, or, for clients without one (most `language/m-large` clients), from a
//! client drawn at random among those with data for that window. The 14 recorded days repeat
//! when the horizon runs past them. Everything is a function of the texts and the seed.

use std::collections::BTreeMap;

use crate::arrivals::{ArrivalError, Request};
use crate::synth::SplitMix;

/// Seconds one trace row covers.
pub const TRACE_WINDOW_S: f64 = 600.0;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Family {
    Gamma,
    Weibull,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    start_s: f64,
    rate: f64,
    family: Family,
    shape: f64,
}

/// A discrete distribution of token counts, as a cumulative table.
#[derive(Debug, Clone, PartialEq)]
struct Lengths {
    values: Vec<usize>,
    cdf: Vec<f64>,
}

impl Lengths {
    fn sample(&self, u: f64) -> usize {
        let x = u * self.cdf.last().copied().unwrap_or(0.0);
        let i = self.cdf.partition_point(|&c| c <= x).min(self.values.len() - 1);
        self.values[i]
    }
}

#[derive(Debug, Clone, PartialEq)]
struct DataWindow {
    start_s: f64,
    input: Lengths,
    output: Lengths,
}

#[derive(Debug, Clone, PartialEq)]
struct Client {
    name: String,
    windows: Vec<Window>,
    data: Vec<DataWindow>,
}

/// The clients of one ServeGen model category (e.g. `language/m-large`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServeGenPool {
    clients: Vec<Client>,
    /// Span of the recorded windows; generation repeats it.
    period_s: f64,
}

fn bad(what: &str, line: usize, msg: impl Into<String>) -> ArrivalError {
    ArrivalError::Format(format!("ServeGen {what}, line {line}: {}", msg.into()))
}

/// Parse a `{224: 0.0003, 225: 0.0008, ...}` map (Python's dict repr) into a length table;
/// `None` for an empty map (a window in which the client sent nothing).
fn parse_lengths(what: &str, text: &str) -> Result<Option<Lengths>, ArrivalError> {
    let inner = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| bad(what, 0, "expected a {tokens: probability} map"))?;
    let mut pairs: Vec<(usize, f64)> = Vec::new();
    for item in inner.split(',').filter(|s| !s.trim().is_empty()) {
        let (k, v) = item
            .split_once(':')
            .ok_or_else(|| bad(what, 0, format!("`{}` is not `tokens: probability`", item.trim())))?;
        let k: f64 = k
            .trim()
            .parse()
            .map_err(|_| bad(what, 0, format!("token count `{}`", k.trim())))?;
        let v: f64 = v
            .trim()
            .parse()
            .map_err(|_| bad(what, 0, format!("probability `{}`", v.trim())))?;
        if !(k.is_finite() && k >= 0.0 && v.is_finite() && v >= 0.0) {
            return Err(bad(what, 0, format!("`{}` is out of range", item.trim())));
        }
        pairs.push((k.round() as usize, v));
    }
    pairs.sort_by_key(|p| p.0);
    let mut acc = 0.0;
    let mut out = Lengths {
        values: Vec::with_capacity(pairs.len()),
        cdf: Vec::with_capacity(pairs.len()),
    };
    for (k, v) in pairs {
        acc += v;
        out.values.push(k);
        out.cdf.push(acc);
    }
    Ok((acc > 0.0).then_some(out))
}

impl ServeGenPool {
    /// Build a pool from each client's trace CSV text and, where it has one, its dataset JSON
    /// text: `(client name, trace, dataset)`.
    pub fn from_texts(clients: Vec<(String, String, Option<String>)>) -> Result<Self, ArrivalError> {
        let mut out = Vec::with_capacity(clients.len());
        let mut end: f64 = 0.0;
        for (name, trace, dataset) in clients {
            let mut windows = Vec::new();
            for (i, line) in trace.lines().enumerate() {
                let line_no = i + 1;
                if line.trim().is_empty() {
                    continue;
                }
                let f: Vec<&str> = line.split(',').map(str::trim).collect();
                if f.len() != 6 {
                    return Err(bad(
                        &format!("{name} trace"),
                        line_no,
                        "expected start,rate,cv,family,shape,scale",
                    ));
                }
                let num = |j: usize, what: &str| -> Result<f64, ArrivalError> {
                    let v: f64 = f[j]
                        .parse()
                        .map_err(|_| bad(&format!("{name} trace"), line_no, format!("{what} `{}`", f[j])))?;
                    if v.is_finite() && v >= 0.0 {
                        Ok(v)
                    } else {
                        Err(bad(
                            &format!("{name} trace"),
                            line_no,
                            format!("{what} {v} is out of range"),
                        ))
                    }
                };
                let start_s = num(0, "window start")?;
                let rate = num(1, "rate")?;
                end = end.max(start_s + TRACE_WINDOW_S);
                if rate == 0.0 {
                    continue;
                }
                let family = match f[3] {
                    "Gamma" => Family::Gamma,
                    "Weibull" => Family::Weibull,
                    other => {
                        return Err(bad(
                            &format!("{name} trace"),
                            line_no,
                            format!("unknown family `{other}` (Gamma or Weibull)"),
                        ))
                    }
                };
                let shape = num(4, "shape")?;
                if shape <= 0.0 {
                    return Err(bad(&format!("{name} trace"), line_no, "shape must be positive"));
                }
                windows.push(Window {
                    start_s,
                    rate,
                    family,
                    shape,
                });
            }
            windows.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
            let mut data = Vec::new();
            if let Some(text) = dataset {
                let what = format!("{name} dataset");
                let v: BTreeMap<String, BTreeMap<String, serde_json::Value>> =
                    serde_json::from_str(&text).map_err(|e| bad(&what, e.line(), e.to_string()))?;
                for (start, fields) in v {
                    let start_s: f64 = start
                        .parse()
                        .map_err(|_| bad(&what, 0, format!("window `{start}` is not a number of seconds")))?;
                    let field = |k: &str| -> Result<Option<Lengths>, ArrivalError> {
                        let s = fields
                            .get(k)
                            .and_then(|x| x.as_str())
                            .ok_or_else(|| bad(&what, 0, format!("window {start} has no `{k}` map")))?;
                        parse_lengths(&format!("{what} window {start} {k}"), s)
                    };
                    // Windows without requests carry empty maps: lengths come from the last
                    // earlier window that has them.
                    if let (Some(input), Some(output)) = (field("input_tokens")?, field("output_tokens")?) {
                        data.push(DataWindow { start_s, input, output });
                    }
                }
                data.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
            }
            out.push(Client { name, windows, data });
        }
        if out.iter().all(|c| c.windows.is_empty()) {
            return Err(ArrivalError::Empty(
                " (no ServeGen client has a window with requests)".into(),
            ));
        }
        if out.iter().all(|c| c.data.is_empty()) {
            return Err(ArrivalError::Format(
                "ServeGen: no client has a dataset (chunk-N-dataset.json) to draw lengths from".into(),
            ));
        }
        Ok(Self {
            clients: out,
            period_s: end,
        })
    }

    /// Number of clients.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Seconds of recorded windows (generation repeats them beyond).
    pub fn period_s(&self) -> f64 {
        self.period_s
    }

    /// Requests arriving in `[start_s, start_s + duration_s)` of the recorded days, at
    /// `rate_scale` times the recorded rates; arrival times relative to `start_s`, sorted.
    pub fn generate(
        &self,
        start_s: f64,
        duration_s: f64,
        rate_scale: f64,
        seed: u64,
    ) -> Result<Vec<Request>, ArrivalError> {
        if !(duration_s.is_finite() && duration_s > 0.0) {
            return Err(ArrivalError::BadDuration(duration_s));
        }
        if !(rate_scale.is_finite() && rate_scale > 0.0) {
            return Err(ArrivalError::BadRateScale(rate_scale));
        }
        if !(start_s.is_finite() && start_s >= 0.0) {
            return Err(ArrivalError::Format(format!(
                "start must be >= 0 seconds, got {start_s}"
            )));
        }
        let period = self.period_s;
        let with_data: Vec<usize> = (0..self.clients.len())
            .filter(|&c| !self.clients[c].data.is_empty())
            .collect();
        let mut out = Vec::new();
        let end = start_s + duration_s;
        for (ci, client) in self.clients.iter().enumerate() {
            let mut rng = SplitMix(seed ^ (ci as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            // Windows repeat every `period`: walk the repetitions the horizon touches.
            let first_rep = (start_s / period).floor() as u64;
            let last_rep = (end / period).floor() as u64;
            for rep in first_rep..=last_rep {
                let base = rep as f64 * period;
                for w in &client.windows {
                    let (w0, w1) = (base + w.start_s, base + w.start_s + TRACE_WINDOW_S);
                    if w1 <= start_s || w0 >= end {
                        continue;
                    }
                    let mean = 1.0 / (w.rate * rate_scale);
                    let unit_mean = match w.family {
                        Family::Gamma => w.shape,
                        Family::Weibull => gamma_fn(1.0 + 1.0 / w.shape),
                    };
                    let scale = mean / unit_mean;
                    let draw = |rng: &mut SplitMix| {
                        scale
                            * match w.family {
                                Family::Gamma => sample_gamma(rng, w.shape),
                                Family::Weibull => sample_weibull(rng, w.shape),
                            }
                    };
                    let mut t = w0 + rng.unit() * draw(&mut rng);
                    while t < w1 {
                        if t >= start_s && t < end {
                            let tod = t - base;
                            let src = if client.data.is_empty() {
                                &self.clients[with_data[(rng.next() % with_data.len() as u64) as usize]]
                            } else {
                                client
                            };
                            let d = data_window(&src.data, tod);
                            out.push(Request {
                                arrival_s: t - start_s,
                                prompt_tokens: d.input.sample(rng.unit()),
                                output_tokens: d.output.sample(rng.unit()),
                            });
                        }
                        t += draw(&mut rng);
                    }
                }
            }
        }
        if out.is_empty() {
            return Err(ArrivalError::Empty(format!(
                " in ServeGen's [{start_s}, {end}) s at rate scale {rate_scale}"
            )));
        }
        out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
        Ok(out)
    }

    /// Client names (as given), for reports.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.clients.iter().map(|c| c.name.as_str())
    }
}

/// The dataset window holding time of day `t` (the last one with data starting at or before
/// it; the first one before any).
fn data_window(data: &[DataWindow], t: f64) -> &DataWindow {
    let i = data.partition_point(|d| d.start_s <= t);
    &data[i.saturating_sub(1)]
}

/// Weibull with unit scale: `(-ln U)^(1/k)`.
fn sample_weibull(rng: &mut SplitMix, k: f64) -> f64 {
    let u = 1.0 - rng.unit(); // (0, 1]
    (-u.ln()).powf(1.0 / k)
}

/// Gamma with unit scale (Marsaglia and Tsang; shapes below 1 through `G(a+1) U^(1/a)`).
fn sample_gamma(rng: &mut SplitMix, a: f64) -> f64 {
    if a < 1.0 {
        let u = 1.0 - rng.unit();
        return sample_gamma(rng, a + 1.0) * u.powf(1.0 / a);
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = rng.normal();
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = 1.0 - rng.unit();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// The Gamma function for positive arguments (Lanczos, g = 7; ~1e-13 relative).
fn gamma_fn(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma_fn(1.0 - x));
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, &g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset() -> String {
        r#"{"0": {"input_tokens": "{100: 0.5, 300: 0.5}", "output_tokens": "{10: 1.0}"},
            "21600": {"input_tokens": "{2000: 1.0}", "output_tokens": "{20: 1.0}"}}"#
            .to_string()
    }

    fn pool(trace: &str) -> ServeGenPool {
        ServeGenPool::from_texts(vec![
            ("a".into(), trace.into(), Some(dataset())),
            ("b".into(), "0,2.0,1.0,Weibull,1.0,0.5\n".into(), None),
        ])
        .unwrap()
    }

    #[test]
    fn gamma_function_matches_known_values() {
        for (x, want) in [
            (1.0, 1.0),
            (5.0, 24.0),
            (0.5, std::f64::consts::PI.sqrt()),
            (3.5, 3.323_350_970_447_843),
        ] {
            assert!((gamma_fn(x) - want).abs() < 1e-10 * want, "{x}: {}", gamma_fn(x));
        }
    }

    #[test]
    fn samplers_have_unit_scale_means() {
        let mut rng = SplitMix(7);
        for a in [0.06, 0.5, 1.0, 3.0] {
            let n = 200_000;
            let m: f64 = (0..n).map(|_| sample_gamma(&mut rng, a)).sum::<f64>() / n as f64;
            assert!((m - a).abs() < 0.05 * a.max(0.2), "gamma({a}) mean {m}");
        }
        for k in [0.4, 1.0, 2.0] {
            let n = 200_000;
            let m: f64 = (0..n).map(|_| sample_weibull(&mut rng, k)).sum::<f64>() / n as f64;
            let want = gamma_fn(1.0 + 1.0 / k);
            assert!((m - want).abs() < 0.05 * want, "weibull({k}) mean {m} want {want}");
        }
    }

    #[test]
    fn rates_lengths_and_windows_follow_the_fits() {
        // Client a: 10 req/s in the first window, nothing in the second, 1 req/s in the third.
        let p = pool("0,10.0,1.0,Gamma,1.0,0.1\n600,0,0,,0,0\n1200,1.0,2.0,Gamma,0.25,4.0\n");
        assert_eq!(p.period_s(), 1800.0);
        let r = p.generate(0.0, 1800.0, 1.0, 3).unwrap();
        assert!(r.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
        let count = |lo: f64, hi: f64| r.iter().filter(|x| x.arrival_s >= lo && x.arrival_s < hi).count() as f64;
        // a: 6000 in the first window, b (2 req/s): 1200 more.
        assert!((count(0.0, 600.0) - 7200.0).abs() < 400.0, "{}", count(0.0, 600.0));
        assert_eq!(count(600.0, 1200.0), 0.0);
        assert!(count(1200.0, 1800.0) > 200.0 && count(1200.0, 1800.0) < 1400.0);
        // Lengths come from the dataset (b borrows a's).
        assert!(r
            .iter()
            .all(|x| [100, 300].contains(&x.prompt_tokens) && x.output_tokens == 10));
        // Rate scale 4: four times the requests; a window later in the horizon wraps around.
        let r4 = p.generate(0.0, 600.0, 4.0, 3).unwrap();
        assert!((r4.len() as f64 / count(0.0, 600.0) - 4.0).abs() < 0.3);
        let wrapped = p.generate(1800.0, 600.0, 1.0, 3).unwrap();
        assert!((wrapped.len() as f64 - 7200.0).abs() < 400.0);
        // Deterministic by seed.
        assert_eq!(r, p.generate(0.0, 1800.0, 1.0, 3).unwrap());
        assert_ne!(r, p.generate(0.0, 1800.0, 1.0, 4).unwrap());
    }

    #[test]
    fn lengths_follow_the_dataset_window_of_the_day() {
        let p = ServeGenPool::from_texts(vec![(
            "a".into(),
            "21600,1.0,1.0,Gamma,1.0,1.0\n".into(),
            Some(dataset()),
        )])
        .unwrap();
        let r = p.generate(21600.0, 600.0, 1.0, 1).unwrap();
        assert!(r.iter().all(|x| x.prompt_tokens == 2000 && x.output_tokens == 20));
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let bad_rows = [
            "0,1.0,1.0,Lognormal,1.0,1.0\n",
            "0,-1.0,1.0,Gamma,1.0,1.0\n",
            "0,1.0,1.0,Gamma,0,1.0\n",
            "0,1.0,1.0,Gamma\n",
            "zero,1.0,1.0,Gamma,1.0,1.0\n",
        ];
        for row in bad_rows {
            let e = ServeGenPool::from_texts(vec![("a".into(), row.into(), Some(dataset()))]).unwrap_err();
            assert!(matches!(e, ArrivalError::Format(_)), "{row}: {e:?}");
        }
        for ds in [
            "not json",
            r#"{"0": {"input_tokens": "{1: 1.0}"}}"#,
            r#"{"0": {"input_tokens": "{x: 1}", "output_tokens": "{1: 1}"}}"#,
            r#"{"0": {"input_tokens": "{1: 0}", "output_tokens": "{1: 1}"}}"#,
        ] {
            let e = ServeGenPool::from_texts(vec![("a".into(), "0,1.0,1.0,Gamma,1.0,1.0\n".into(), Some(ds.into()))])
                .unwrap_err();
            assert!(matches!(e, ArrivalError::Format(_)), "{ds}: {e:?}");
        }
        assert!(matches!(
            ServeGenPool::from_texts(vec![("a".into(), "0,0,0,,0,0\n".into(), Some(dataset()))]),
            Err(ArrivalError::Empty(_))
        ));
        assert!(matches!(
            ServeGenPool::from_texts(vec![("a".into(), "0,1.0,1.0,Gamma,1.0,1.0\n".into(), None)]),
            Err(ArrivalError::Format(_))
        ));
        let p = pool("0,1.0,1.0,Gamma,1.0,1.0\n");
        assert!(matches!(
            p.generate(0.0, -1.0, 1.0, 0),
            Err(ArrivalError::BadDuration(_))
        ));
        assert!(matches!(
            p.generate(0.0, 1.0, 0.0, 0),
            Err(ArrivalError::BadRateScale(_))
        ));
        assert!(matches!(
            p.generate(f64::NAN, 1.0, 1.0, 0),
            Err(ArrivalError::Format(_))
        ));
    }
}
