//! Hand-written SVG charts (no plotting crate): line charts and stacked bars.

use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 420.0;
const L: f64 = 70.0;
const R: f64 = 160.0;
const T: f64 = 40.0;
const B: f64 = 50.0;
const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn header(title: &str, xlabel: &str, ylabel: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>
"#,
        (L + W - R) / 2.0,
        esc(title),
        (L + W - R) / 2.0,
        H - 10.0,
        esc(xlabel),
        (T + H - B) / 2.0,
        (T + H - B) / 2.0,
        esc(ylabel)
    );
    s
}

fn axes(s: &mut String, x0: f64, x1: f64, y0: f64, y1: f64) {
    let _ = writeln!(
        s,
        r#"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="black"/>"#,
        W - L - R,
        H - T - B
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let px = L + f * (W - L - R);
        let py = H - B - f * (H - T - B);
        let _ = writeln!(
            s,
            r##"<text x="{px}" y="{}" text-anchor="middle">{}</text><text x="{}" y="{}" text-anchor="end">{}</text><line x1="{L}" x2="{}" y1="{py}" y2="{py}" stroke="#ddd"/>"##,
            H - B + 16.0,
            fmt(x0 + f * (x1 - x0)),
            L - 5.0,
            py + 4.0,
            fmt(y0 + f * (y1 - y0)),
            W - R
        );
    }
}

fn fmt(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

/// A line chart of named series of (x, y) points.
pub fn line_chart(title: &str, xlabel: &str, ylabel: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let pts = series
        .iter()
        .flat_map(|s| s.1.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, 0.0f64, f64::MIN);
    for p in pts {
        x0 = x0.min(p.0);
        x1 = x1.max(p.0);
        y0 = y0.min(p.1);
        y1 = y1.max(p.1);
    }
    if x0 > x1 {
        (x0, x1, y1) = (0.0, 1.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let mut s = header(title, xlabel, ylabel);
    axes(&mut s, x0, x1, y0, y1);
    for (i, (name, p)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let mut d = String::new();
        // Thin long series to at most ~2000 points.
        let stride = (p.len() / 2000).max(1);
        for (j, &(x, y)) in p
            .iter()
            .enumerate()
            .filter(|(j, _)| j % stride == 0 || *j + 1 == p.len())
        {
            if !(x.is_finite() && y.is_finite()) {
                continue;
            }
            let px = L + (x - x0) / (x1 - x0) * (W - L - R);
            let py = H - B - (y - y0) / (y1 - y0) * (H - T - B);
            let _ = write!(d, "{}{px:.1},{py:.1} ", if j == 0 || d.is_empty() { "M" } else { "L" });
        }
        let _ = writeln!(s, r#"<path d="{d}" fill="none" stroke="{c}" stroke-width="1.6"/>"#);
        let ly = T + 14.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            W - R + 10.0,
            W - R + 30.0,
            W - R + 35.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The empirical CDF of `values` as (value, fraction) points.
pub fn cdf(values: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len().max(1) as f64;
    v.iter().enumerate().map(|(i, &x)| (x, (i + 1) as f64 / n)).collect()
}

/// Stacked bars: one bar per label, one segment per part name.
pub fn stacked_bars(title: &str, ylabel: &str, parts: &[&str], bars: &[(String, Vec<f64>)]) -> String {
    let ymax = bars
        .iter()
        .map(|b| b.1.iter().sum::<f64>())
        .fold(0.0, f64::max)
        .max(1e-9);
    let mut s = header(title, "policy", ylabel);
    axes(&mut s, 0.0, 0.0, 0.0, ymax);
    let n = bars.len().max(1) as f64;
    let slot = (W - L - R) / n;
    for (i, (label, vals)) in bars.iter().enumerate() {
        let x = L + i as f64 * slot + slot * 0.2;
        let mut y = H - B;
        for (j, v) in vals.iter().enumerate() {
            let h = v / ymax * (H - T - B);
            y -= h;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{}"/>"#,
                slot * 0.6,
                COLORS[j % COLORS.len()]
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x + slot * 0.3,
            H - B - 4.0 - (H - T - B) * vals.iter().sum::<f64>() / ymax,
            esc(label)
        );
    }
    for (j, p) in parts.iter().enumerate() {
        let ly = T + 14.0 + j as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="14" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            W - R + 10.0,
            ly - 8.0,
            COLORS[j % COLORS.len()],
            W - R + 30.0,
            ly + 2.0,
            esc(p)
        );
    }
    s.push_str("</svg>\n");
    s
}
