//! Request arrivals from real traces: the Azure LLM inference trace 2023 (CSV) and Mooncake
//! (JSONL). Times are seconds from the first request; lengths are tokens. Read by the simulator,
//! `moeless bench serve` and the fault-injection harness's inference load.

use std::io::BufRead;

/// A trace that cannot be read, or a window that cannot be cut from it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArrivalError {
    #[error("arrivals line {line}: {msg}")]
    Line { line: usize, msg: String },
    #[error("arrivals: the trace holds no requests{0}")]
    Empty(String),
    #[error("duration must be a positive number of seconds, got {0}")]
    BadDuration(f64),
    #[error("rate scale must be positive, got {0}")]
    BadRateScale(f64),
    #[error("arrivals: {0}")]
    Format(String),
}

/// One request as the trace gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request {
    pub arrival_s: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
}

fn io_err(line: usize, e: std::io::Error) -> ArrivalError {
    ArrivalError::Line {
        line,
        msg: e.to_string(),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD HH:MM:SS[.fraction]` to seconds since the epoch.
fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let mut t = time.split(':');
    let (h, mi) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let sec: f64 = t.next()?.parse().ok()?;
    if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0.0..61.0).contains(&sec) {
        return None;
    }
    Some((days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60) as f64 + sec)
}

/// Azure LLM inference trace 2023 (`TIMESTAMP,ContextTokens,GeneratedTokens`).
pub fn parse_azure_csv(input: impl BufRead) -> Result<Vec<Request>, ArrivalError> {
    let mut lines = input.lines();
    let header = match lines.next() {
        None => return Err(ArrivalError::Empty(" (no header)".into())),
        Some(h) => h.map_err(|e| io_err(1, e))?,
    };
    let cols: Vec<&str> = header.trim_start_matches('\u{feff}').trim().split(',').collect();
    if cols != ["TIMESTAMP", "ContextTokens", "GeneratedTokens"] {
        return Err(ArrivalError::Line {
            line: 1,
            msg: format!("header `{header}`, expected `TIMESTAMP,ContextTokens,GeneratedTokens`"),
        });
    }
    let mut out = Vec::new();
    let mut t0 = None;
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let line = line.map_err(|e| io_err(n, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 3 {
            return Err(ArrivalError::Line {
                line: n,
                msg: format!("{} fields, expected 3", f.len()),
            });
        }
        let ts = parse_timestamp(f[0]).ok_or_else(|| ArrivalError::Line {
            line: n,
            msg: format!("bad TIMESTAMP `{}`", f[0]),
        })?;
        let num = |k: usize, name: &str| {
            f[k].trim().parse::<usize>().map_err(|_| ArrivalError::Line {
                line: n,
                msg: format!("bad {name} `{}`", f[k]),
            })
        };
        let (p, o) = (num(1, "ContextTokens")?, num(2, "GeneratedTokens")?);
        let base = *t0.get_or_insert(ts);
        out.push(Request {
            arrival_s: ts - base,
            prompt_tokens: p,
            output_tokens: o,
        });
    }
    finish(out)
}

/// Mooncake JSONL (`{"timestamp": ms, "input_length": n, "output_length": n, ...}`).
pub fn parse_mooncake_jsonl(input: impl BufRead) -> Result<Vec<Request>, ArrivalError> {
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| io_err(n, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| ArrivalError::Line {
            line: n,
            msg: format!("not JSON: {e}"),
        })?;
        let field = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_f64)
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| ArrivalError::Line {
                    line: n,
                    msg: format!("missing or negative `{k}`"),
                })
        };
        out.push(Request {
            arrival_s: field("timestamp")? / 1000.0,
            prompt_tokens: field("input_length")? as usize,
            output_tokens: field("output_length")? as usize,
        });
    }
    finish(out)
}

/// Pick the reader from the first line: JSON object (Mooncake) or the Azure header.
pub fn parse_auto(text: &str) -> Result<Vec<Request>, ArrivalError> {
    if text.trim_start().starts_with('{') {
        parse_mooncake_jsonl(text.as_bytes())
    } else {
        parse_azure_csv(text.as_bytes())
    }
}

fn finish(mut out: Vec<Request>) -> Result<Vec<Request>, ArrivalError> {
    if out.is_empty() {
        return Err(ArrivalError::Empty(String::new()));
    }
    // Traces are nearly sorted; keep arrival order stable for equal times.
    out.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    let t0 = out[0].arrival_s;
    for r in &mut out {
        r.arrival_s -= t0;
    }
    Ok(out)
}

/// The requests arriving before `duration_s`, with arrival times divided by `rate_scale` (a
/// scale of 8 replays the trace eight times as fast) and repeated end to end until the
/// duration is covered (the trace's own span plus its mean gap per repetition).
pub fn window(reqs: &[Request], duration_s: f64, rate_scale: f64) -> Result<Vec<Request>, ArrivalError> {
    if !(duration_s.is_finite() && duration_s > 0.0) {
        return Err(ArrivalError::BadDuration(duration_s));
    }
    if !(rate_scale.is_finite() && rate_scale > 0.0) {
        return Err(ArrivalError::BadRateScale(rate_scale));
    }
    let last = reqs.last().ok_or_else(|| ArrivalError::Empty(String::new()))?.arrival_s;
    let period = (last + last / reqs.len().max(1) as f64).max(1e-3) / rate_scale;
    let mut out = Vec::new();
    let mut rep = 0usize;
    loop {
        let base = rep as f64 * period;
        if base >= duration_s {
            break;
        }
        for r in reqs {
            let t = base + r.arrival_s / rate_scale;
            if t >= duration_s {
                break;
            }
            out.push(Request { arrival_s: t, ..*r });
        }
        rep += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_rows_become_relative_seconds() {
        let t =
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,374,44\n2023-11-16 18:15:50.0,396,109\n";
        let r = parse_azure_csv(t.as_bytes()).unwrap();
        assert_eq!(r.len(), 2);
        assert!((r[1].arrival_s - 3.5).abs() < 1e-9);
        assert_eq!(r[1].output_tokens, 109);
    }

    #[test]
    fn timestamps_cross_midnight() {
        let a = parse_timestamp("2023-12-31 23:59:59").unwrap();
        let b = parse_timestamp("2024-01-01 00:00:01").unwrap();
        assert_eq!(b - a, 2.0);
    }
}
