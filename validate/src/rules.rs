//! Pass / fail rules: op classes, per-dtype default tolerances, TOML overrides, and the judgement of one
//! probe (msProbe-style, see `shared/reference/validation.md`):
//!
//! 1. structural, always an error: missing probe, shape, NaN/Inf pattern;
//! 2. by op class: index outputs (expert ids, indexer top-k) must select the same sets, except flips
//!    between near-equal scores (benign); float outputs must keep cosine >= `cosine_min`; logits must
//!    keep KL <= `kl_max`; matmul-class outputs report ULP errors (a gate only with `ulp_gate = true`:
//!    "< `ulp_share` of elements beyond `ulp` ULPs" holds for single ops, not for chains of them);
//! 3. reference-relative (the main gate): `rel_l2(candidate, golden) <= k * rel_l2(reference, golden) +
//!    rel_l2_floor`, k = 2 (f32) or 3 (f16/bf16). The golden defaults to the reference itself, so the
//!    gate becomes `rel_l2 <= rel_l2_floor`; pass `--golden` (e.g. an f32 CPU trace) when the reference
//!    was itself computed on another accelerator;
//! 4. warnings: cosine < 0.99, thousandth ratio below 0.7, error amplification >= 10x across a layer.

use crate::filter::glob_match;
use crate::Error;
use serde::{Deserialize, Serialize};
use v4_model::probe::{point, Scope};

/// The compute dtype whose defaults apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Hf32,
    F16,
    Bf16,
}

impl Dtype {
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "hf32" => Ok(Self::Hf32),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(Error::Options(format!(
                "unknown dtype `{s}` (f32, hf32, f16, bf16)"
            ))),
        }
    }

    pub fn mantissa_bits(self) -> i32 {
        match self {
            Self::F32 => 23,
            Self::Hf32 | Self::F16 => 10,
            Self::Bf16 => 7,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Hf32 => "hf32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// Built-in defaults. The floors are relative L2 errors a correct port stays under on V4's probe
    /// chain (measured: f32 NPU emulation vs ndarray and HF PyTorch vs ndarray stay near 1e-6; bf16 mixed
    /// precision near 1e-2 after four layers).
    pub fn defaults(self) -> Tolerance {
        let (floor, k, cos, small, kl, tie_rel, elem) = match self {
            Self::F32 => (1e-4, 2.0, 0.99999, 1e-6, 1e-6, 1e-4, 1e-6),
            Self::Hf32 | Self::F16 => (2e-2, 3.0, 0.999, 1e-3, 1e-3, 2e-3, 1e-3),
            Self::Bf16 => (8e-2, 3.0, 0.99, 1e-3, 5e-3, 1e-2, 4e-3),
        };
        Tolerance {
            rel_l2_floor: floor,
            k_ref: k,
            cosine_min: cos,
            small_value: small,
            elementwise: elem,
            kl_max: kl,
            ulp: 1.0,
            ulp_share: 1e-3,
            ulp_gate: false,
            tie_abs: small,
            tie_rel,
            max_harmful_flips: 0.0,
            skip: false,
        }
    }
}

/// What a probe computes, for the class rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpClass {
    /// Integer ids (expert ids, top-k indices): exact, near ties allowed.
    Index,
    /// Outputs of matmul chains (projections, attention core, expert outputs, scores).
    Matmul,
    /// Vector ops (norms, mHC mixing, streams, routing weights).
    Vector,
    /// Logits: a probability output (KL checked).
    Logits,
}

/// The class of a probe name.
pub fn op_class(name: &str) -> OpClass {
    match (Scope::parse(name), crate::point_of(name)) {
        (_, point::ROUTER_INDICES | point::INDEXER_TOPK) => OpClass::Index,
        (None, point::LOGITS) => OpClass::Logits,
        (
            _,
            point::ATTN_Q
            | point::ATTN_KV
            | point::ATTN_CORE
            | point::ATTN_OUTPUT
            | point::FFN_OUTPUT
            | point::COMPRESSOR_ENTRIES
            | point::INDEXER_SCORES
            | point::ROUTER_SCORES,
        ) => OpClass::Matmul,
        _ => OpClass::Vector,
    }
}

/// Every tolerance of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    /// The floor of the reference-relative relative-L2 gate.
    pub rel_l2_floor: f64,
    /// The multiplier of the reference's own error against the golden.
    pub k_ref: f64,
    pub cosine_min: f64,
    /// Small-value floor of relative errors (|r| below it counts as this).
    pub small_value: f64,
    /// The msProbe element-wise threshold (fp32 1e-6, fp16 1e-3, bf16 4e-3): reported as the share of
    /// elements beyond it.
    pub elementwise: f64,
    pub kl_max: f64,
    pub ulp: f64,
    pub ulp_share: f64,
    pub ulp_gate: bool,
    pub tie_abs: f64,
    pub tie_rel: f64,
    /// Share of rows allowed to flip beyond the near-tie margin (index outputs).
    pub max_harmful_flips: f64,
    /// Do not judge this probe (reported only).
    pub skip: bool,
}

/// Optional overrides, as written in the TOML file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Override {
    #[serde(default)]
    pub pattern: Option<String>,
    pub rel_l2_floor: Option<f64>,
    pub k_ref: Option<f64>,
    pub cosine_min: Option<f64>,
    pub small_value: Option<f64>,
    pub elementwise: Option<f64>,
    pub kl_max: Option<f64>,
    pub ulp: Option<f64>,
    pub ulp_share: Option<f64>,
    pub ulp_gate: Option<bool>,
    pub tie_abs: Option<f64>,
    pub tie_rel: Option<f64>,
    pub max_harmful_flips: Option<f64>,
    pub skip: Option<bool>,
}

impl Override {
    fn apply(&self, t: &mut Tolerance) {
        macro_rules! set {
            ($($f:ident),*) => {$(if let Some(v) = self.$f { t.$f = v; })*};
        }
        set!(
            rel_l2_floor,
            k_ref,
            cosine_min,
            small_value,
            elementwise,
            kl_max,
            ulp,
            ulp_share,
            ulp_gate,
            tie_abs,
            tie_rel,
            max_harmful_flips,
            skip
        );
    }
}

/// The tolerance file:
///
/// ```toml
/// dtype = "bf16"                 # optional: force the dtype whose defaults apply
/// [defaults]                     # optional: every probe
/// rel_l2_floor = 1e-3
/// [[probe]]                      # per-probe overrides, later entries win
/// pattern = "layers.*.attn.core"
/// rel_l2_floor = 5e-3
/// cosine_min = 0.999
/// [[probe]]
/// pattern = "layers.0.ffn.router.indices"
/// skip = true
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Tolerances {
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub defaults: Override,
    #[serde(default)]
    pub probe: Vec<Override>,
}

impl Tolerances {
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::Options(format!("invalid tolerance file: {e}")))
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(Error::io(path))?;
        Self::from_toml(&text).map_err(|e| Error::Options(format!("{}: {e}", path.display())))
    }

    /// The tolerance of probe `name` for `dtype`.
    pub fn resolve(&self, name: &str, dtype: Dtype) -> Tolerance {
        let mut t = dtype.defaults();
        self.defaults.apply(&mut t);
        for o in &self.probe {
            if o.pattern.as_deref().is_some_and(|p| glob_match(p, name)) {
                o.apply(&mut t);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides() {
        let t = Tolerances::from_toml(
            "[defaults]\nrel_l2_floor = 1e-3\n[[probe]]\npattern = \"layers.*.attn.core\"\ncosine_min = 0.5\n\
             [[probe]]\npattern = \"layers.2.*\"\nskip = true\n",
        )
        .unwrap();
        let core = t.resolve("layers.1.attn.core", Dtype::F32);
        assert_eq!(core.rel_l2_floor, 1e-3);
        assert_eq!(core.cosine_min, 0.5);
        let q = t.resolve("layers.1.attn.q", Dtype::F32);
        assert_eq!(q.cosine_min, Dtype::F32.defaults().cosine_min);
        assert!(t.resolve("layers.2.attn.q", Dtype::Bf16).skip);
        assert!(Tolerances::from_toml("[defaults]\nnope = 1").is_err());
        assert_eq!(op_class("layers.3.ffn.router.indices"), OpClass::Index);
        assert_eq!(op_class("layers.3.attn.core"), OpClass::Matmul);
        assert_eq!(op_class("layers.3.input"), OpClass::Vector);
        assert_eq!(op_class("logits"), OpClass::Logits);
    }
}
