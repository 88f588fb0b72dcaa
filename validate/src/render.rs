//! Writing a report: the terminal summary, CSV, HTML with its per-layer error plot, and the files.

use crate::options::RunMode;
use crate::report::{ProbeResult, Report, Status};
use crate::{Error, Result};
use std::fmt::Write as _;
use std::path::Path;
use v4_formats::atomic;
use v4_plot::{Chart, Panel, Scale, Series};

impl Report {
    /// The terminal summary: policy diff first, then per-layer errors, localisation, worst probes.
    pub fn summary(&self, top: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "reference: {} ({}, {})  candidate: {} ({})  tolerances: {} defaults{}",
            self.reference_path,
            self.reference.backend,
            self.reference.dtype,
            self.candidate.backend,
            self.candidate.dtype,
            self.dtype.name(),
            self.golden
                .as_ref()
                .map_or(String::new(), |g| format!(", golden {g}"))
        );
        if self.policy_diff.is_empty() {
            let _ = writeln!(s, "precision policy: identical");
        } else {
            let _ = writeln!(s, "precision policy diff (reference -> candidate):");
            let unrec = "(unrecorded)";
            for d in self
                .policy_diff
                .iter()
                .filter(|d| d.reference != unrec && d.candidate != unrec)
            {
                let _ = writeln!(s, "  {:<16} {} -> {}", d.key, d.reference, d.candidate);
            }
            for (side, only) in [("reference", true), ("candidate", false)] {
                let keys: Vec<String> = self
                    .policy_diff
                    .iter()
                    .filter(|d| {
                        if only {
                            d.candidate == unrec
                        } else {
                            d.reference == unrec
                        }
                    })
                    .map(|d| format!("{}={}", d.key, if only { &d.reference } else { &d.candidate }))
                    .collect();
                if !keys.is_empty() {
                    let _ = writeln!(s, "  recorded by the {side} only: {}", keys.join(", "));
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        for (mode, loc) in &self.localisation {
            let rs: Vec<&ProbeResult> = self.results.iter().filter(|r| r.mode == *mode).collect();
            let count = |st| rs.iter().filter(|r| r.status == st).count();
            let _ = writeln!(
                s,
                "\n[{mode:?}] {} probes: {} pass, {} warn, {} fail, {} skipped",
                rs.len(),
                count(Status::Pass),
                count(Status::Warn),
                count(Status::Fail),
                count(Status::Skip)
            );
            for l in self.layers.iter().filter(|l| l.mode == *mode) {
                let _ = writeln!(
                    s,
                    "  {:<8} max rel L2 {:>9.3e}  ({}){}",
                    l.layer.map_or("head".to_string(), |i| format!("layer {i}")),
                    l.max_rel_l2,
                    l.worst_probe,
                    if l.failed > 0 {
                        format!("  {} FAILED", l.failed)
                    } else {
                        String::new()
                    }
                );
            }
            match (&loc.first_divergent_layer, &loc.first_divergent_probe) {
                (Some(l), Some(p)) => {
                    let _ = writeln!(s, "  first divergent layer: {l}, first divergent op: {p}");
                }
                (None, Some(p)) => {
                    let _ = writeln!(s, "  first divergence: {p} (after the layers)");
                }
                _ => {
                    let _ = writeln!(s, "  no divergence");
                }
            }
            if let Some(p) = &loc.first_nonfinite {
                let _ = writeln!(s, "  first NaN/Inf origin: {p}");
            }
        }
        let _ = writeln!(s, "\nworst probes:");
        let _ = writeln!(
            s,
            "  {:<10} {:<6} {:<34} {:>10} {:>10} {:>10} {:>10}  detail",
            "mode", "status", "probe", "rel_l2", "cosine", "max_abs", "within1e-3"
        );
        for r in self.worst_first().into_iter().take(top) {
            let (rel, cos, abs, w) = r
                .float
                .map_or(("-".into(), "-".into(), "-".into(), "-".into()), |f| {
                    (
                        format!("{:.3e}", f.rel_l2),
                        format!("{:.6}", f.cosine),
                        format!("{:.3e}", f.max_abs),
                        format!("{:.4}", f.within_1e3),
                    )
                });
            let mut detail: Vec<String> = r.reasons.iter().chain(&r.warnings).cloned().collect();
            if let Some(i) = &r.index {
                detail.insert(0, format!("exact {:.4} IoU {:.4}", i.exact_match, i.iou));
            }
            let _ = writeln!(
                s,
                "  {:<10} {:<6} {:<34} {:>10} {:>10} {:>10} {:>10}  {}",
                format!("{:?}", r.mode).to_lowercase(),
                format!("{:?}", r.status).to_uppercase(),
                r.name,
                rel,
                cos,
                abs,
                w,
                detail.join("; ")
            );
        }
        let _ = writeln!(s, "\nRESULT: {}", if self.passed { "PASS" } else { "FAIL" });
        s
    }

    /// CSV, one row per probe.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "mode,probe,reference,layer,class,status,rel_l2,bound,golden_rel_l2,sqnr_db,cosine,max_abs,mean_abs,max_rel,mean_rel,rmse,within_1e3,within_5e3,ulp_max,ulp_mean,ulp_beyond_1,kl,elementwise_beyond,exact_match,iou,benign_flips,harmful_flips,stats_diff,checksum_equal,reasons\n",
        );
        let o = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:e}"));
        for r in &self.results {
            let f = r.float;
            let i = r.index;
            let _ = writeln!(
                s,
                "{:?},{},{},{},{:?},{:?},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\"",
                r.mode,
                r.name,
                r.reference,
                r.layer.map_or(String::new(), |l| l.to_string()),
                r.class,
                r.status,
                o(f.map(|f| f.rel_l2)),
                o(r.rel_l2_bound),
                o(r.golden_rel_l2),
                o(f.map(|f| f.sqnr_db)),
                o(f.map(|f| f.cosine)),
                o(f.map(|f| f.max_abs)),
                o(f.map(|f| f.mean_abs)),
                o(f.map(|f| f.max_rel)),
                o(f.map(|f| f.mean_rel)),
                o(f.map(|f| f.rmse)),
                o(f.map(|f| f.within_1e3)),
                o(f.map(|f| f.within_5e3)),
                o(f.map(|f| f.ulp_max)),
                o(f.map(|f| f.ulp_mean)),
                o(f.map(|f| f.ulp_beyond_1)),
                o(f.and_then(|f| f.kl)),
                o(r.elementwise_beyond),
                o(i.map(|i| i.exact_match)),
                o(i.map(|i| i.iou)),
                i.map_or(String::new(), |i| i.benign_flips.to_string()),
                i.map_or(String::new(), |i| i.harmful_flips.to_string()),
                o(r.stats_l2_diff),
                r.checksum_equal.map_or(String::new(), |b| b.to_string()),
                r.reasons.join("; ").replace('"', "'")
            );
        }
        s
    }

    /// A self-contained HTML page: verdict, policy diff, localisation, a per-layer error plot (inline
    /// SVG, log scale) and the probe table worst first.
    pub fn html(&self) -> String {
        let esc = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let mut h = String::from(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>v4 validate</title><style>\
             body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}\
             td,th{border:1px solid #ccc;padding:2px 6px}.fail{background:#fdd}.warn{background:#ffd}\
             .pass{background:#dfd}</style></head><body>",
        );
        let _ = write!(
            h,
            "<h1>v4 validate: <span class=\"{}\">{}</span></h1><p>reference <code>{}</code> ({}, {}) vs candidate ({}, {}); tolerances: {} defaults</p>",
            if self.passed { "pass" } else { "fail" },
            if self.passed { "PASS" } else { "FAIL" },
            esc(&self.reference_path),
            esc(&self.reference.backend),
            esc(&self.reference.dtype),
            esc(&self.candidate.backend),
            esc(&self.candidate.dtype),
            self.dtype.name()
        );
        h.push_str(
            "<h2>Precision policy diff</h2><table><tr><th>key</th><th>reference</th><th>candidate</th></tr>",
        );
        for d in &self.policy_diff {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&d.key),
                esc(&d.reference),
                esc(&d.candidate)
            );
        }
        h.push_str("</table><h2>Localisation</h2><ul>");
        for (mode, l) in &self.localisation {
            let _ = write!(
                h,
                "<li>{mode:?}: first divergent layer {}, op {}; first NaN/Inf {}</li>",
                l.first_divergent_layer.map_or("none".into(), |x| x.to_string()),
                esc(l.first_divergent_probe.as_deref().unwrap_or("none")),
                esc(l.first_nonfinite.as_deref().unwrap_or("none"))
            );
        }
        h.push_str("</ul><h2>Worst relative L2 per layer</h2>");
        h.push_str(&self.svg());
        h.push_str("<h2>Probes (worst first)</h2><table><tr><th>mode</th><th>status</th><th>probe</th><th>class</th><th>rel L2</th><th>bound</th><th>cosine</th><th>max abs</th><th>max rel</th><th>within 1e-3</th><th>ULP max</th><th>KL</th><th>IoU</th><th>detail</th></tr>");
        for r in self.worst_first() {
            let f = r.float;
            let g = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3e}"));
            let _ = write!(
                h,
                "<tr class=\"{}\"><td>{:?}</td><td>{:?}</td><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                format!("{:?}", r.status).to_lowercase(),
                r.mode,
                r.status,
                esc(&r.name),
                r.class,
                g(f.map(|f| f.rel_l2)),
                g(r.rel_l2_bound),
                f.map_or("-".into(), |f| format!("{:.6}", f.cosine)),
                g(f.map(|f| f.max_abs)),
                g(f.map(|f| f.max_rel)),
                f.map_or("-".into(), |f| format!("{:.4}", f.within_1e3)),
                g(f.map(|f| f.ulp_max)),
                g(f.and_then(|f| f.kl)),
                r.index.map_or("-".into(), |i| format!("{:.4}", i.iou)),
                esc(&r.reasons.iter().chain(&r.warnings).cloned().collect::<Vec<_>>().join("; "))
            );
        }
        h.push_str("</table>");
        for n in &self.notes {
            let _ = write!(h, "<p>note: {}</p>", esc(n));
        }
        h.push_str("</body></html>\n");
        h
    }

    /// The worst relative L2 error per layer (then the head), propagated and isolated, on a log axis
    /// reaching down to 1e-8.
    fn svg(&self) -> String {
        let mut panel = Panel::new("max relative L2 error per layer", Scale::Linear, Scale::Log);
        panel.y_decades = true;
        panel.y_include = vec![1e-8];
        for (mode, color) in [(RunMode::Propagated, "#c33"), (RunMode::Isolated, "#36c")] {
            let curve = self.layer_curve(mode);
            if curve.is_empty() {
                continue;
            }
            if panel.x_ticks.is_empty() {
                panel.x_ticks = curve
                    .iter()
                    .enumerate()
                    .map(|(i, (layer, _))| (i as f64, layer.map_or("head".into(), |l| format!("L{l}"))))
                    .collect();
            }
            let points = curve.iter().enumerate().map(|(i, p)| (i as f64, p.1)).collect();
            panel
                .series
                .push(Series::line(&format!("{mode:?}"), color, points));
        }
        Chart {
            title: String::new(),
            panel_width: 560.0,
            panel_height: 200.0,
            panels: vec![panel],
        }
        .svg()
    }

    /// Writes `report.json`, `report.csv` and `report.html` into `dir` (created).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let put = |name: &str, text: String| -> Result<()> {
            atomic::write_bytes(&dir.join(name), text.as_bytes()).map_err(|e| Error::io(&e.path)(e.source))
        };
        let json =
            serde_json::to_string_pretty(self).map_err(|e| Error::trace(&dir.join("report.json"), e))?;
        put("report.json", json)?;
        put("report.csv", self.csv())?;
        put("report.html", self.html())
    }
}
