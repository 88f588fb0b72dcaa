//! Tensor names of the two layouts of a DeepSeek-V4 checkpoint, and the release's dtype plan.
//!
//! DeepSeek's release layout ("native", no `model.` prefix) stores each routed expert separately
//! (`layers.N.ffn.experts.E.{w1,w2,w3}.weight`); HF transformers fuses them per layer:
//! `model.layers.N.mlp.experts.gate_up_proj [E, 2I, D]` holds w1's rows then w3's rows of each
//! expert and `...experts.down_proj [E, D, I]` holds w2. Every other tensor maps one to one.
//!
//! HF does not instantiate the MTP block; this crate names it `model.mtp.K.*` with the same
//! per-layer names as `model.layers.N.*` plus `e_proj`, `h_proj`, `enorm`, `hnorm`, `norm` and
//! `hc_head.hc_{fn,base,scale}` (DeepSeek: `mtp.K.*`).

use std::cmp::Ordering;

/// The two naming schemes of a V4 checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// DeepSeek's release layout: `embed.weight`, `layers.N.attn.wq_a.weight`, per-expert
    /// `layers.N.ffn.experts.E.w1.weight`, `mtp.0.*`.
    DeepSeek,
    /// HF transformers: `model.embed_tokens.weight`, `model.layers.N.self_attn.q_a_proj.weight`,
    /// fused `model.layers.N.mlp.experts.gate_up_proj`.
    Hf,
}

impl Layout {
    /// Guesses the layout of a set of tensor names: HF names start with `model.` or `lm_head`.
    pub fn detect<'a>(mut names: impl Iterator<Item = &'a str>) -> Layout {
        if names.any(|n| n.starts_with("model.") || n.starts_with("lm_head.")) {
            Layout::Hf
        } else {
            Layout::DeepSeek
        }
    }
}

/// How the V4 release stores a tensor (the table in `checkpoint-formats.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DtypeClass {
    /// F8_E4M3 `[out, in]` + F8_E8M0 scales on a 128x128 grid: attention projections, indexer
    /// `wq_b`, shared experts, MTP `e_proj` / `h_proj`.
    Fp8Block,
    /// Routed experts: packed E2M1 `[out, in/2]` + E8M0 per 32 inputs.
    Fp4Expert,
    /// Embeddings, head, norms, router weight, compressor projections, indexer `weights_proj`.
    Bf16,
    /// mHC parameters, attention sinks, compressor `ape`, router bias.
    F32,
    /// Hash-routing table `gate.tid2eid`.
    I64,
}

/// A routed expert's weight and its slice of the HF fused tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExpertPart {
    /// `w1` (gate) `[I, D]`: rows `[0, I)` of `gate_up_proj[e]`.
    W1,
    /// `w3` (up) `[I, D]`: rows `[I, 2I)` of `gate_up_proj[e]`.
    W3,
    /// `w2` (down) `[D, I]`: `down_proj[e]`.
    W2,
}

impl ExpertPart {
    fn name(self) -> &'static str {
        match self {
            ExpertPart::W1 => "w1",
            ExpertPart::W3 => "w3",
            ExpertPart::W2 => "w2",
        }
    }
}

/// The two fused expert tensors of an HF MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FusedKind {
    /// `gate_up_proj [E, 2I, D]`: per expert, w1 then w3.
    GateUp,
    /// `down_proj [E, D, I]`: w2.
    Down,
}

impl FusedKind {
    /// The per-expert parts, in the order they are stacked inside one expert's slot.
    pub fn parts(self) -> &'static [ExpertPart] {
        match self {
            FusedKind::GateUp => &[ExpertPart::W1, ExpertPart::W3],
            FusedKind::Down => &[ExpertPart::W2],
        }
    }

    fn hf_suffix(self) -> &'static str {
        match self {
            FusedKind::GateUp => "mlp.experts.gate_up_proj",
            FusedKind::Down => "mlp.experts.down_proj",
        }
    }
}

/// Where a DeepSeek tensor lives in the HF layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HfLocation {
    /// A tensor of its own.
    Tensor(String),
    /// Expert `expert`'s `part` inside the fused tensor `fused`.
    Expert {
        fused: String,
        expert: usize,
        part: ExpertPart,
    },
}

/// What an HF tensor holds in DeepSeek terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeepSeekSource {
    /// One DeepSeek tensor.
    Tensor(String),
    /// All experts of the block `prefix` (`layers.N` or `mtp.K`), fused as `kind`.
    FusedExperts { prefix: String, kind: FusedKind },
}

use DtypeClass::*;

/// Model-level tensors: (DeepSeek, HF, class).
const TOP: &[(&str, &str, DtypeClass)] = &[
    ("embed.weight", "model.embed_tokens.weight", Bf16),
    ("head.weight", "lm_head.weight", Bf16),
    ("norm.weight", "model.norm.weight", Bf16),
    ("hc_head_fn", "model.hc_head.hc_fn", F32),
    ("hc_head_base", "model.hc_head.hc_base", F32),
    ("hc_head_scale", "model.hc_head.hc_scale", F32),
];

/// Per-block tensors (main layers and the MTP block), relative to the block prefix.
const BLOCK: &[(&str, &str, DtypeClass)] = &[
    ("attn_norm.weight", "input_layernorm.weight", Bf16),
    ("ffn_norm.weight", "post_attention_layernorm.weight", Bf16),
    ("hc_attn_fn", "attn_hc.fn", F32),
    ("hc_attn_base", "attn_hc.base", F32),
    ("hc_attn_scale", "attn_hc.scale", F32),
    ("hc_ffn_fn", "ffn_hc.fn", F32),
    ("hc_ffn_base", "ffn_hc.base", F32),
    ("hc_ffn_scale", "ffn_hc.scale", F32),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight", Fp8Block),
    ("attn.q_norm.weight", "self_attn.q_a_norm.weight", Bf16),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight", Fp8Block),
    ("attn.wkv.weight", "self_attn.kv_proj.weight", Fp8Block),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight", Bf16),
    ("attn.wo_a.weight", "self_attn.o_a_proj.weight", Fp8Block),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight", Fp8Block),
    ("attn.attn_sink", "self_attn.sinks", F32),
    (
        "attn.compressor.wkv.weight",
        "self_attn.compressor.kv_proj.weight",
        Bf16,
    ),
    (
        "attn.compressor.wgate.weight",
        "self_attn.compressor.gate_proj.weight",
        Bf16,
    ),
    ("attn.compressor.ape", "self_attn.compressor.position_bias", F32),
    (
        "attn.compressor.norm.weight",
        "self_attn.compressor.kv_norm.weight",
        Bf16,
    ),
    (
        "attn.indexer.wq_b.weight",
        "self_attn.compressor.indexer.q_b_proj.weight",
        Fp8Block,
    ),
    (
        "attn.indexer.weights_proj.weight",
        "self_attn.compressor.indexer.scorer.weights_proj.weight",
        Bf16,
    ),
    (
        "attn.indexer.compressor.wkv.weight",
        "self_attn.compressor.indexer.kv_proj.weight",
        Bf16,
    ),
    (
        "attn.indexer.compressor.wgate.weight",
        "self_attn.compressor.indexer.gate_proj.weight",
        Bf16,
    ),
    (
        "attn.indexer.compressor.ape",
        "self_attn.compressor.indexer.position_bias",
        F32,
    ),
    (
        "attn.indexer.compressor.norm.weight",
        "self_attn.compressor.indexer.kv_norm.weight",
        Bf16,
    ),
    ("ffn.gate.weight", "mlp.gate.weight", Bf16),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias", F32),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid", I64),
    (
        "ffn.shared_experts.w1.weight",
        "mlp.shared_experts.gate_proj.weight",
        Fp8Block,
    ),
    (
        "ffn.shared_experts.w3.weight",
        "mlp.shared_experts.up_proj.weight",
        Fp8Block,
    ),
    (
        "ffn.shared_experts.w2.weight",
        "mlp.shared_experts.down_proj.weight",
        Fp8Block,
    ),
];

/// Tensors only the MTP block has.
const MTP_ONLY: &[(&str, &str, DtypeClass)] = &[
    ("e_proj.weight", "e_proj.weight", Fp8Block),
    ("h_proj.weight", "h_proj.weight", Fp8Block),
    ("enorm.weight", "enorm.weight", Bf16),
    ("hnorm.weight", "hnorm.weight", Bf16),
    ("norm.weight", "norm.weight", Bf16),
    ("hc_head_fn", "hc_head.hc_fn", F32),
    ("hc_head_base", "hc_head.hc_base", F32),
    ("hc_head_scale", "hc_head.hc_scale", F32),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Top,
    Layer(usize),
    Mtp(usize),
}

impl Scope {
    fn deepseek_prefix(self) -> String {
        match self {
            Scope::Top => String::new(),
            Scope::Layer(n) => format!("layers.{n}"),
            Scope::Mtp(k) => format!("mtp.{k}"),
        }
    }

    fn hf_prefix(self) -> String {
        match self {
            Scope::Top => String::new(),
            Scope::Layer(n) => format!("model.layers.{n}."),
            Scope::Mtp(k) => format!("model.mtp.{k}."),
        }
    }

    fn table(self) -> impl Iterator<Item = &'static (&'static str, &'static str, DtypeClass)> {
        let (a, b): (&[_], &[_]) = match self {
            Scope::Top => (TOP, &[]),
            Scope::Layer(_) => (BLOCK, &[]),
            Scope::Mtp(_) => (BLOCK, MTP_ONLY),
        };
        a.iter().chain(b)
    }
}

/// Splits `<head><n>.<rest>` into (n, rest).
fn split_index<'a>(name: &'a str, head: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(head)?;
    let (n, sub) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((n.parse().ok()?, sub))
}

fn parse_deepseek(name: &str) -> (Scope, &str) {
    if let Some((n, sub)) = split_index(name, "layers.") {
        (Scope::Layer(n), sub)
    } else if let Some((k, sub)) = split_index(name, "mtp.") {
        (Scope::Mtp(k), sub)
    } else {
        (Scope::Top, name)
    }
}

fn parse_hf(name: &str) -> (Scope, &str) {
    if let Some((n, sub)) = split_index(name, "model.layers.") {
        (Scope::Layer(n), sub)
    } else if let Some((k, sub)) = split_index(name, "model.mtp.") {
        (Scope::Mtp(k), sub)
    } else {
        (Scope::Top, name)
    }
}

/// Parses `ffn.experts.E.wK.weight` into (E, part).
fn parse_expert(sub: &str) -> Option<(usize, ExpertPart)> {
    let (e, rest) = split_index(sub, "ffn.experts.")?;
    let part = match rest {
        "w1.weight" => ExpertPart::W1,
        "w2.weight" => ExpertPart::W2,
        "w3.weight" => ExpertPart::W3,
        _ => return None,
    };
    Some((e, part))
}

/// The DeepSeek name of expert `expert`'s `part` in block `prefix` (`layers.N` or `mtp.K`).
pub fn expert_name(prefix: &str, expert: usize, part: ExpertPart) -> String {
    format!("{prefix}.ffn.experts.{expert}.{}.weight", part.name())
}

/// The HF name of the fused tensor `kind` of block `prefix` (`layers.N` or `mtp.K`).
pub fn fused_hf_name(prefix: &str, kind: FusedKind) -> String {
    format!("model.{prefix}.{}", kind.hf_suffix())
}

/// Where DeepSeek tensor `name` lives in the HF layout; `None` for names V4 does not have.
pub fn to_hf(name: &str) -> Option<HfLocation> {
    let (scope, sub) = parse_deepseek(name);
    if scope != Scope::Top {
        if let Some((expert, part)) = parse_expert(sub) {
            let kind = match part {
                ExpertPart::W1 | ExpertPart::W3 => FusedKind::GateUp,
                ExpertPart::W2 => FusedKind::Down,
            };
            let fused = fused_hf_name(&scope.deepseek_prefix(), kind);
            return Some(HfLocation::Expert { fused, expert, part });
        }
    }
    let (_, hf, _) = scope.table().find(|(ds, _, _)| *ds == sub)?;
    Some(HfLocation::Tensor(format!("{}{hf}", scope.hf_prefix())))
}

/// The DeepSeek tensor(s) an HF tensor holds; `None` for names V4 does not have.
pub fn from_hf(name: &str) -> Option<DeepSeekSource> {
    let (scope, sub) = parse_hf(name);
    if scope != Scope::Top {
        for kind in [FusedKind::GateUp, FusedKind::Down] {
            if sub == kind.hf_suffix() {
                let prefix = scope.deepseek_prefix();
                return Some(DeepSeekSource::FusedExperts { prefix, kind });
            }
        }
    }
    let (ds, _, _) = scope.table().find(|(_, hf, _)| *hf == sub)?;
    let prefix = scope.deepseek_prefix();
    let name = if prefix.is_empty() {
        ds.to_string()
    } else {
        format!("{prefix}.{ds}")
    };
    Some(DeepSeekSource::Tensor(name))
}

/// How the V4 release stores DeepSeek tensor `name`; `None` for names V4 does not have.
pub fn dtype_class(name: &str) -> Option<DtypeClass> {
    let (scope, sub) = parse_deepseek(name);
    if scope != Scope::Top && parse_expert(sub).is_some() {
        return Some(Fp4Expert);
    }
    scope.table().find(|(ds, _, _)| *ds == sub).map(|(_, _, c)| *c)
}

/// Release-quantised linears that msModelSlim's DeepSeek-V4 W8A8 recipe keeps in float
/// (`deepseek_v4_flash_w8a8.yaml`): the attention output projections and the MTP input projections.
const ASCEND_W8A8_FLOAT: &[&str] = &[
    "attn.wo_a.weight",
    "attn.wo_b.weight",
    "e_proj.weight",
    "h_proj.weight",
];

/// Whether msModelSlim's DeepSeek-V4 W8A8 recipe quantises DeepSeek tensor `name` to INT8: the query and
/// KV projections (`wq_a`, `wq_b`, `wkv`, the indexer's `wq_b`) and the routed and shared experts, that is
/// every FP8/FP4 tensor of the release but those in [`ASCEND_W8A8_FLOAT`].
pub fn ascend_w8a8_quantised(name: &str) -> bool {
    let (_, sub) = parse_deepseek(name);
    matches!(dtype_class(name), Some(Fp8Block | Fp4Expert)) && !ASCEND_W8A8_FLOAT.contains(&sub)
}

/// The linears that read a block's normed attention input (`attn_norm`'s output): the query and KV
/// projections, both compressors and the indexer's head weights.
const ATTN_NORM_READERS: &[&str] = &[
    "attn.wq_a.weight",
    "attn.wkv.weight",
    "attn.compressor.wkv.weight",
    "attn.compressor.wgate.weight",
    "attn.indexer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight",
    "attn.indexer.compressor.wgate.weight",
];

/// The linears that read a block's normed FFN input (`ffn_norm`'s output), besides every routed expert's
/// `w1` and `w3`: the router and the shared expert's gate and up projections.
const FFN_NORM_READERS: &[&str] = &[
    "ffn.gate.weight",
    "ffn.shared_experts.w1.weight",
    "ffn.shared_experts.w3.weight",
];

/// SmoothQuant folding: the RMSNorm weight (`layers.N.attn_norm.weight`, `layers.N.ffn_norm.weight`, or
/// the MTP block's) whose output DeepSeek tensor `name` reads, if `name` is one of its readers. Dividing
/// that norm's weight by per-channel factors `s` and multiplying every reader's input columns by `s`
/// leaves the model's function unchanged.
pub fn smoothing_norm(name: &str) -> Option<String> {
    let (scope, sub) = parse_deepseek(name);
    if scope == Scope::Top {
        return None;
    }
    let expert_gate_up = matches!(parse_expert(sub), Some((_, ExpertPart::W1 | ExpertPart::W3)));
    let norm = if ATTN_NORM_READERS.contains(&sub) {
        "attn_norm"
    } else if FFN_NORM_READERS.contains(&sub) || expert_gate_up {
        "ffn_norm"
    } else {
        return None;
    };
    Some(format!("{}.{norm}.weight", scope.deepseek_prefix()))
}

/// The norm weight (`<block>.attn_norm.weight` / `<block>.ffn_norm.weight`) of the model's probe point
/// `<block>.attn.input` / `<block>.ffn.input`, which records that norm's output.
pub fn norm_of_probe(probe: &str) -> Option<String> {
    let (block, part) = probe
        .rsplit_once('.')
        .filter(|(_, last)| *last == "input")?
        .0
        .rsplit_once('.')?;
    let norm = match part {
        "attn" => "attn_norm",
        "ffn" => "ffn_norm",
        _ => return None,
    };
    Some(format!("{block}.{norm}.weight"))
}

/// Orders names with embedded numbers numerically (`layers.2` before `layers.10`), so that output
/// shards hold consecutive layers.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let nx = x.iter().take_while(|c| c.is_ascii_digit()).count();
                let ny = y.iter().take_while(|c| c.is_ascii_digit()).count();
                let (dx, dy) = (trim_zeros(&x[..nx]), trim_zeros(&y[..ny]));
                let ord = dx.len().cmp(&dy.len()).then_with(|| dx.cmp(dy)).then(nx.cmp(&ny));
                if ord != Ordering::Equal {
                    return ord;
                }
                x = &x[nx..];
                y = &y[ny..];
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(d);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|&&c| c == b'0').count();
    &d[z..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every HF name of the v4-tiny-a fixture's `hf/` file maps to the DeepSeek name its
    /// `native/` file uses (both lists transcribed from the fixture headers).
    #[test]
    fn fixture_names_map_both_ways() {
        let pairs = [
            ("model.embed_tokens.weight", "embed.weight"),
            ("lm_head.weight", "head.weight"),
            ("model.hc_head.hc_fn", "hc_head_fn"),
            ("model.layers.0.attn_hc.base", "layers.0.hc_attn_base"),
            ("model.layers.2.ffn_hc.scale", "layers.2.hc_ffn_scale"),
            ("model.layers.1.self_attn.sinks", "layers.1.attn.attn_sink"),
            (
                "model.layers.1.self_attn.q_a_norm.weight",
                "layers.1.attn.q_norm.weight",
            ),
            (
                "model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight",
                "layers.1.attn.indexer.weights_proj.weight",
            ),
            (
                "model.layers.3.self_attn.compressor.indexer.position_bias",
                "layers.3.attn.indexer.compressor.ape",
            ),
            (
                "model.layers.1.mlp.gate.e_score_correction_bias",
                "layers.1.ffn.gate.bias",
            ),
            ("model.layers.0.mlp.gate.tid2eid", "layers.0.ffn.gate.tid2eid"),
            (
                "model.layers.2.mlp.shared_experts.up_proj.weight",
                "layers.2.ffn.shared_experts.w3.weight",
            ),
            ("model.mtp.0.hc_head.hc_base", "mtp.0.hc_head_base"),
            ("model.mtp.0.self_attn.kv_proj.weight", "mtp.0.attn.wkv.weight"),
        ];
        for (hf, ds) in pairs {
            assert_eq!(from_hf(hf), Some(DeepSeekSource::Tensor(ds.into())), "{hf}");
            assert_eq!(to_hf(ds), Some(HfLocation::Tensor(hf.into())), "{ds}");
        }
    }

    #[test]
    fn experts_map_to_fused_slots() {
        assert_eq!(
            to_hf("layers.3.ffn.experts.5.w3.weight"),
            Some(HfLocation::Expert {
                fused: "model.layers.3.mlp.experts.gate_up_proj".into(),
                expert: 5,
                part: ExpertPart::W3
            })
        );
        assert_eq!(
            from_hf("model.mtp.0.mlp.experts.down_proj"),
            Some(DeepSeekSource::FusedExperts {
                prefix: "mtp.0".into(),
                kind: FusedKind::Down
            })
        );
        assert_eq!(
            expert_name("mtp.0", 7, ExpertPart::W2),
            "mtp.0.ffn.experts.7.w2.weight"
        );
    }

    #[test]
    fn dtype_plan_follows_the_release_table() {
        let cases = [
            ("layers.0.attn.wq_a.weight", Fp8Block),
            ("layers.1.attn.indexer.wq_b.weight", Fp8Block),
            ("layers.1.ffn.shared_experts.w2.weight", Fp8Block),
            ("mtp.0.e_proj.weight", Fp8Block),
            ("layers.0.ffn.experts.7.w1.weight", Fp4Expert),
            ("embed.weight", Bf16),
            ("layers.1.attn.compressor.wgate.weight", Bf16),
            ("layers.1.attn.indexer.weights_proj.weight", Bf16),
            ("mtp.0.hnorm.weight", Bf16),
            ("layers.1.hc_ffn_fn", F32),
            ("layers.2.attn.compressor.ape", F32),
            ("layers.1.ffn.gate.bias", F32),
            ("layers.0.ffn.gate.tid2eid", I64),
        ];
        for (n, c) in cases {
            assert_eq!(dtype_class(n), Some(c), "{n}");
        }
        for bad in [
            "layers.x.attn.wq_a.weight",
            "layers.0.attn.wq_c.weight",
            "model.norm.weight",
            "e_proj.weight",
        ] {
            assert_eq!(dtype_class(bad), None, "{bad}");
        }
    }

    #[test]
    fn ascend_w8a8_recipe_quantises_what_msmodelslim_does() {
        for q in [
            "layers.0.attn.wq_a.weight",
            "layers.0.attn.wq_b.weight",
            "layers.0.attn.wkv.weight",
            "layers.2.attn.indexer.wq_b.weight",
            "layers.1.ffn.experts.7.w2.weight",
            "layers.1.ffn.shared_experts.w1.weight",
            "mtp.0.attn.wq_a.weight",
        ] {
            assert!(ascend_w8a8_quantised(q), "{q}");
        }
        for f in [
            "layers.0.attn.wo_a.weight",
            "layers.0.attn.wo_b.weight",
            "layers.0.attn.compressor.wkv.weight",
            "layers.2.attn.indexer.weights_proj.weight",
            "layers.0.ffn.gate.weight",
            "mtp.0.e_proj.weight",
            "mtp.0.h_proj.weight",
            "embed.weight",
            "head.weight",
            "hc_head_fn",
        ] {
            assert!(!ascend_w8a8_quantised(f), "{f}");
        }
    }

    #[test]
    fn smoothing_folds_into_the_norm_each_linear_reads() {
        assert_eq!(
            smoothing_norm("layers.3.attn.wkv.weight").as_deref(),
            Some("layers.3.attn_norm.weight")
        );
        assert_eq!(
            smoothing_norm("layers.2.attn.indexer.compressor.wgate.weight").as_deref(),
            Some("layers.2.attn_norm.weight")
        );
        assert_eq!(
            smoothing_norm("layers.1.ffn.experts.5.w3.weight").as_deref(),
            Some("layers.1.ffn_norm.weight")
        );
        assert_eq!(
            smoothing_norm("layers.1.ffn.gate.weight").as_deref(),
            Some("layers.1.ffn_norm.weight")
        );
        assert_eq!(
            smoothing_norm("mtp.0.attn.wq_a.weight").as_deref(),
            Some("mtp.0.attn_norm.weight")
        );
        for none in [
            "layers.1.ffn.experts.5.w2.weight",
            "layers.0.attn.wq_b.weight",
            "layers.0.attn.wo_a.weight",
            "head.weight",
        ] {
            assert_eq!(smoothing_norm(none), None, "{none}");
        }
        assert_eq!(
            norm_of_probe("layers.4.ffn.input").as_deref(),
            Some("layers.4.ffn_norm.weight")
        );
        assert_eq!(
            norm_of_probe("mtp.0.attn.input").as_deref(),
            Some("mtp.0.attn_norm.weight")
        );
        assert_eq!(norm_of_probe("layers.4.attn.q"), None);
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["layers.10.a", "layers.2.b", "layers.2.a", "embed", "layers.1.z"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            ["embed", "layers.1.z", "layers.2.a", "layers.2.b", "layers.10.a"]
        );
    }
}
