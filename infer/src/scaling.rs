//! How prefill, decode and the cache scale with the context length: the measured table of
//! `v4 bench-infer --contexts`, its log-log slopes, and a self-contained SVG plot of it.
//!
//! A slope of 1 means linear growth, 2 quadratic (dense attention's prefill), 0 flat (what V4's sliding
//! window + top-k CSA + HCA should give decode per token).

use std::fmt::Write;

/// One context length's measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScalingRow {
    /// Total tokens: prompt + generated.
    pub context: usize,
    /// Prompt tokens (prefilled).
    pub prompt: usize,
    /// Wall time of the prefill.
    pub prefill_s: f64,
    /// Mean wall time of one decode step.
    pub decode_ms: f64,
    /// Bytes of the decoding state at the end (f32).
    pub cache_bytes: f64,
}

/// Least-squares slope of `ln y` against `ln x`: the exponent `p` of `y ~ x^p`. None with fewer than two
/// distinct positive points.
pub fn log_log_slope(points: &[(f64, f64)]) -> Option<f64> {
    let logs: Vec<(f64, f64)> = points
        .iter()
        .filter(|(x, y)| *x > 0.0 && *y > 0.0)
        .map(|(x, y)| (x.ln(), y.ln()))
        .collect();
    let n = logs.len() as f64;
    let mx = logs.iter().map(|p| p.0).sum::<f64>() / n;
    let my = logs.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = logs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = logs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (logs.len() >= 2 && sxx > 0.0).then(|| sxy / sxx)
}

/// The slopes of the three curves: (prefill time vs prompt, decode time per token vs context, cache
/// bytes vs context).
pub fn slopes(rows: &[ScalingRow]) -> (Option<f64>, Option<f64>, Option<f64>) {
    let curve =
        |f: &dyn Fn(&ScalingRow) -> (f64, f64)| log_log_slope(&rows.iter().map(f).collect::<Vec<_>>());
    (
        curve(&|r| (r.prompt as f64, r.prefill_s)),
        curve(&|r| (r.context as f64, r.decode_ms)),
        curve(&|r| (r.context as f64, r.cache_bytes)),
    )
}

/// Picks a panel's (x, y) from a row.
type Axes = dyn Fn(&ScalingRow) -> (f64, f64);

/// Three log-log panels (prefill seconds, decode ms per token, cache MiB against the context), each with
/// dashed guides of slope 1 and 2 through its first point, so linear and quadratic growth can be read
/// off directly.
pub fn svg(rows: &[ScalingRow], title: &str) -> String {
    let (pw, ph, margin) = (330.0, 260.0, 55.0);
    let width = 3.0 * (pw + margin) + margin;
    let height = ph + 2.0 * margin + 20.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{margin}\" y=\"20\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    let (p_prefill, p_decode, p_cache) = slopes(rows);
    let panels: [(&str, Option<f64>, Box<Axes>); 3] = [
        (
            "prefill time (s) vs prompt",
            p_prefill,
            Box::new(|r| (r.prompt as f64, r.prefill_s)),
        ),
        (
            "decode ms/token vs context",
            p_decode,
            Box::new(|r| (r.context as f64, r.decode_ms)),
        ),
        (
            "cache MiB (f32) vs context",
            p_cache,
            Box::new(|r| (r.context as f64, r.cache_bytes / (1u64 << 20) as f64)),
        ),
    ];
    for (i, (label, slope, f)) in panels.iter().enumerate() {
        let points: Vec<(f64, f64)> = rows.iter().map(f).filter(|(x, y)| *x > 0.0 && *y > 0.0).collect();
        let x0 = margin + i as f64 * (pw + margin);
        let y0 = margin + 10.0;
        panel(&mut s, &points, label, *slope, x0, y0, pw, ph);
    }
    s.push_str("</svg>\n");
    s
}

#[allow(clippy::too_many_arguments)]
fn panel(
    s: &mut String,
    points: &[(f64, f64)],
    label: &str,
    slope: Option<f64>,
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
) {
    let _ = writeln!(
        s,
        "<rect x=\"{x0}\" y=\"{y0}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#888\"/>"
    );
    let slope_text = slope.map_or(String::new(), |p| format!(" (slope {p:.2})"));
    let _ = writeln!(
        s,
        "<text x=\"{x0}\" y=\"{}\">{}{slope_text}</text>",
        y0 - 6.0,
        escape(label)
    );
    let Some(&(fx, fy)) = points.first() else {
        return;
    };
    let (lx_min, lx_max) = min_max(points.iter().map(|p| p.0.log2()));
    // The y range covers the data and the slope-2 guide across the x range, so the guides stay visible.
    let span = (lx_max - lx_min).max(1e-9);
    let (ly_min, ly_max) = min_max(
        points
            .iter()
            .map(|p| p.1.log2())
            .chain([fy.log2(), fy.log2() + 2.0 * span]),
    );
    let ly_span = (ly_max - ly_min).max(1e-9);
    let px = |x: f64| x0 + 10.0 + (w - 20.0) * (x.log2() - lx_min) / span;
    let py = |y: f64| y0 + h - 10.0 - (h - 20.0) * (y.log2() - ly_min) / ly_span;
    for (k, color) in [(1.0, "#4a4"), (2.0, "#c44")] {
        let x_end = points.last().map_or(fx, |p| p.0);
        let y_end = fy * (x_end / fx).powf(k);
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">x^{k}</text>",
            px(fx),
            py(fy),
            px(x_end),
            py(y_end),
            px(x_end) - 22.0,
            py(y_end) + 12.0
        );
    }
    let path: Vec<String> = points
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
        .collect();
    let _ = writeln!(
        s,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#225\" stroke-width=\"2\"/>",
        path.join(" ")
    );
    for &(x, y) in points {
        let _ = writeln!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#225\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\">{}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\" text-anchor=\"middle\">{}</text>",
            px(x),
            py(y),
            px(x) + 4.0,
            py(y) - 5.0,
            short(y),
            px(x),
            y0 + h + 14.0,
            tokens(x)
        );
    }
}

fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn tokens(x: f64) -> String {
    if x >= 1024.0 {
        format!("{:.0}K", x / 1024.0)
    } else {
        format!("{x:.0}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slopes_recover_the_exponents_of_power_laws() {
        let rows: Vec<ScalingRow> = [1024usize, 4096, 16384, 65536]
            .iter()
            .map(|&n| ScalingRow {
                context: n,
                prompt: n,
                prefill_s: 3e-4 * (n as f64).powi(2),
                decode_ms: 12.0,
                cache_bytes: 600.0 * n as f64,
            })
            .collect();
        let (prefill, decode, cache) = slopes(&rows);
        assert!((prefill.unwrap() - 2.0).abs() < 1e-9);
        assert!(decode.unwrap().abs() < 1e-9);
        assert!((cache.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(log_log_slope(&[(1.0, 1.0)]), None);

        let plot = svg(&rows, "a < b");
        assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
        assert_eq!(plot.matches("<circle").count(), 12);
        assert!(plot.contains("a &lt; b") && plot.contains("(slope 2.00)"));
    }
}
