//! How prefill, decode and the cache scale with the context length: the measured table of
//! `v4 bench-infer --contexts`, its log-log slopes, and a self-contained SVG plot of it.
//!
//! A slope of 1 means linear growth, 2 quadratic (dense attention's prefill), 0 flat (what V4's sliding
//! window + top-k CSA + HCA should give decode per token).

use v4_plot::{Chart, Panel, Scale, Series};

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
    let panels = panels
        .iter()
        .map(|(label, slope, axes)| {
            let points: Vec<(f64, f64)> = rows
                .iter()
                .map(axes)
                .filter(|(x, y)| *x > 0.0 && *y > 0.0)
                .collect();
            panel(label, *slope, points)
        })
        .collect();
    Chart {
        title: title.to_string(),
        panel_width: 330.0,
        panel_height: 260.0,
        panels,
    }
    .svg()
}

/// One log-log panel of `points`, with guides of slope 1 and 2 from the first point to the last x.
fn panel(label: &str, slope: Option<f64>, points: Vec<(f64, f64)>) -> Panel {
    let slope_text = slope.map_or(String::new(), |p| format!(" (slope {p:.2})"));
    let mut panel = Panel::new(&format!("{label}{slope_text}"), Scale::Log, Scale::Log);
    panel.x_ticks = points.iter().map(|&(x, _)| (x, tokens(x))).collect();
    if let (Some(&(fx, fy)), Some(&(lx, _))) = (points.first(), points.last()) {
        for (k, color) in [(1, "#4a4"), (2, "#c44")] {
            let end = fy * (lx / fx).powi(k);
            panel
                .series
                .push(Series::guide(&format!("x^{k}"), color, vec![(fx, fy), (lx, end)]));
        }
    }
    panel
        .series
        .push(Series::line("", "#225", points).with_value_labels());
    panel
}

fn tokens(x: f64) -> String {
    if x >= 1024.0 {
        format!("{:.0}K", x / 1024.0)
    } else {
        format!("{x:.0}")
    }
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
