//! Localisation: per-layer summaries, the first divergent layer of each mode, the drift of a propagated run
//! told from a backend bug, and the verdict.

use crate::options::RunMode;
use crate::report::{LayerSummary, Localisation, ProbeResult, Report, Status, DRIFT};

/// Whether a failure reason is about error size (which accumulated drift explains) rather than structure.
fn is_drift(reason: &str) -> bool {
    ["relative L2", "cosine", "KL ", "stats differ"]
        .iter()
        .any(|p| reason.starts_with(p))
        || reason.contains("beyond near ties")
        || reason.contains(" ULP (")
}

impl Report {
    /// Per-layer summaries, localisation, the verdict.
    pub fn finish(&mut self, num_layers: usize) {
        self.layers.clear();
        self.localisation.clear();
        self.demote_propagated_drift();
        for mode in [RunMode::Propagated, RunMode::Isolated] {
            let rs: Vec<&ProbeResult> = self.results.iter().filter(|r| r.mode == mode).collect();
            if rs.is_empty() {
                continue;
            }
            let slots: Vec<Option<usize>> = (0..num_layers).map(Some).chain([None]).collect();
            for slot in slots {
                let here: Vec<&&ProbeResult> = rs.iter().filter(|r| r.layer == slot).collect();
                if here.is_empty() {
                    continue;
                }
                let worst = here
                    .iter()
                    .filter_map(|r| Some((r.float?.rel_l2, r.name.clone())))
                    .fold((0.0f64, String::new()), |a, b| {
                        if b.0 > a.0 || b.0.is_nan() {
                            b
                        } else {
                            a
                        }
                    });
                self.layers.push(LayerSummary {
                    mode,
                    layer: slot,
                    max_rel_l2: worst.0,
                    worst_probe: worst.1,
                    failed: here.iter().filter(|r| r.status == Status::Fail).count(),
                    probes: here.len(),
                });
            }
            let mut loc = Localisation::default();
            // Results are in forward order (layer by layer, op by op).
            let key = |r: &ProbeResult| r.layer.unwrap_or(usize::MAX);
            if let Some(first) = rs
                .iter()
                .filter(|r| r.status == Status::Fail || r.drifted())
                .min_by_key(|r| key(r))
            {
                loc.first_divergent_layer = first.layer;
                loc.first_divergent_probe = Some(first.name.clone());
            }
            loc.first_nonfinite = rs
                .iter()
                .find(|r| r.candidate_nonfinite > r.reference_nonfinite)
                .map(|r| r.name.clone());
            self.localisation.push((mode, loc));
        }
        self.passed = !self.results.iter().any(|r| r.status == Status::Fail);
    }

    /// With isolated results to judge the backend by, a propagated probe that fails only on error size
    /// (not on structure: NaN/Inf, shape, dtype, a missing probe) shows drift the precision path
    /// accumulates over layers, which a correct backend has too: it becomes a warning, and the verdict
    /// rests on the isolated per-layer gates. The propagated localisation still names where drift first
    /// crossed the bounds.
    fn demote_propagated_drift(&mut self) {
        if !self.results.iter().any(|r| r.mode == RunMode::Isolated) {
            return;
        }
        let mut demoted = 0;
        for r in &mut self.results {
            if r.mode == RunMode::Propagated
                && r.status == Status::Fail
                && r.reasons.iter().all(|x| is_drift(x))
            {
                r.warnings
                    .extend(r.reasons.drain(..).map(|x| format!("{DRIFT}{x}")));
                r.status = Status::Warn;
                demoted += 1;
            }
        }
        if demoted > 0 {
            self.notes.push(format!(
                "{demoted} propagated probes exceed their bounds through accumulated drift only; \
                 the isolated per-layer gates, which a backend bug breaks, decide the result"
            ));
        }
    }
}
