//! `V4Config`: the hyper-parameters of a DeepSeek-V4 model.
//!
//! Two real forms of the configuration exist and both parse to the same struct:
//! - HF transformers' `config.json` (`hidden_size`, `layer_types`, `rope_parameters`, ... and the legacy keys
//!   the V4 release ships: `compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling`);
//! - DeepSeek's `inference/config.json` (`dim`, `n_layers`, `compress_ratios`, `rope_factor`, ...).
//!
//! Every value is validated with an error that names the key, the value and why it is rejected.

use serde_json::{Map, Value};
use std::fmt;

/// The attention variant of one layer (V4 §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Sliding-window attention only (plain RoPE).
    Sliding,
    /// Compressed sparse attention: overlapping compression at `rate` (4) plus the lightning indexer's top-k.
    Csa { rate: usize },
    /// Heavily compressed attention: non-overlapping compression at `rate` (128), all entries visible.
    Hca { rate: usize },
}

impl AttentionKind {
    /// The compression rate `m` of the layer (0 for sliding-only layers).
    pub fn rate(self) -> usize {
        match self {
            AttentionKind::Sliding => 0,
            AttentionKind::Csa { rate } | AttentionKind::Hca { rate } => rate,
        }
    }

    /// HF's name for the layer type.
    pub fn hf_name(self) -> &'static str {
        match self {
            AttentionKind::Sliding => "sliding_attention",
            AttentionKind::Csa { .. } => "compressed_sparse_attention",
            AttentionKind::Hca { .. } => "heavily_compressed_attention",
        }
    }
}

/// How a layer's MoE chooses its experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingKind {
    /// Fixed token-id -> experts table (`tid2eid`); the gate only weights.
    Hash,
    /// Top-k of `score + bias`.
    TopK,
}

/// The router's score function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFunc {
    /// `sqrt(softplus(logit))`, V4's choice.
    SqrtSoftplus,
    Sigmoid,
    Softmax,
}

/// YaRN context extension, applied to the compressed layers' RoPE only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Multiplier on cos/sin; V4 uses 1.0 (no mscale).
    pub attention_factor: f64,
}

/// The hyper-parameters of a DeepSeek-V4 model.
#[derive(Debug, Clone, PartialEq)]
pub struct V4Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Attention variant of each main layer (its length is the number of layers).
    pub attention: Vec<AttentionKind>,
    /// Routing of each main layer.
    pub routing: Vec<RoutingKind>,
    pub num_heads: usize,
    pub head_dim: usize,
    /// Channels of each head that carry RoPE (the LAST `rope_head_dim` of the head).
    pub rope_head_dim: usize,
    pub q_lora_rank: usize,
    pub o_groups: usize,
    pub o_lora_rank: usize,
    pub sliding_window: usize,
    pub n_routed_experts: usize,
    pub experts_per_token: usize,
    pub moe_intermediate_size: usize,
    pub score_func: ScoreFunc,
    pub route_scale: f64,
    pub swiglu_limit: f64,
    pub index_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub compress_rope_theta: f64,
    pub yarn: Option<Yarn>,
    pub max_position_embeddings: usize,
    /// Attention variant of each multi-token-prediction layer (its length is the number of MTP layers;
    /// V4 has one, sliding-window). MTP layers route by top-k: they follow the hash layers.
    pub mtp_attention: Vec<AttentionKind>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Typed access to a JSON object with errors that name the key.
struct Keys<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Keys<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => match v.as_f64() {
                    Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as usize)),
                    _ => Err(err(key, format!("expected a non-negative integer, found {v}"))),
                },
            },
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ConfigError> {
        self.usize_opt(key)?.ok_or_else(|| err(key, "missing (required)"))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize, ConfigError> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| err(key, format!("expected a number, found {v}"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    fn str_opt(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| err(key, format!("expected a string, found {v}"))),
        }
    }

    fn token_id(&self, key: &str) -> Result<Option<u32>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            // Some configs list several EOS ids; the first is the one generation stops on by default.
            Some(Value::Array(ids)) => match ids.first() {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as u32))
                    .ok_or_else(|| err(key, format!("expected token ids, found {v}"))),
            },
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as u32))
                .ok_or_else(|| err(key, format!("expected a token id, found {v}"))),
        }
    }
}

fn parse_score_func(key: &str, name: &str) -> Result<ScoreFunc, ConfigError> {
    match name {
        "sqrtsoftplus" => Ok(ScoreFunc::SqrtSoftplus),
        "sigmoid" => Ok(ScoreFunc::Sigmoid),
        "softmax" => Ok(ScoreFunc::Softmax),
        other => Err(err(
            key,
            format!("unknown score function `{other}` (expected sqrtsoftplus, sigmoid or softmax)"),
        )),
    }
}

/// Maps DeepSeek's per-layer `compress_ratios` (0 / 4 / 128...) to attention kinds: 4 is CSA (overlapping
/// windows plus the indexer), any other non-zero rate is HCA.
fn kinds_from_ratios(key: &str, ratios: &[Value]) -> Result<Vec<AttentionKind>, ConfigError> {
    ratios
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_u64() {
            Some(0) => Ok(AttentionKind::Sliding),
            Some(4) => Ok(AttentionKind::Csa { rate: 4 }),
            Some(r) if r > 4 => Ok(AttentionKind::Hca { rate: r as usize }),
            _ => Err(err(
                key,
                format!("entry {i} is {v}: expected 0 (sliding), 4 (CSA) or a rate > 4 (HCA)"),
            )),
        })
        .collect()
}

/// The attention of the `count` MTP layers: the entries after the `num_layers` main layers in a list that
/// covers them (DeepSeek's `compress_ratios`), sliding-window where the list stops at the main layers.
fn mtp_attention(all: &[AttentionKind], num_layers: usize, count: usize) -> Vec<AttentionKind> {
    (0..count)
        .map(|k| all.get(num_layers + k).copied().unwrap_or(AttentionKind::Sliding))
        .collect()
}

impl V4Config {
    /// Parses either form of the configuration (detected by its keys).
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| err("<document>", format!("not valid JSON: {e}")))?;
        let map = value
            .as_object()
            .ok_or_else(|| err("<document>", "expected a JSON object"))?;
        if map.contains_key("dim") && map.contains_key("n_layers") {
            Self::from_inference_json(map)
        } else {
            Self::from_hf_json(map)
        }
    }

    /// Parses HF transformers' `config.json` (current and legacy keys).
    pub fn from_hf_json(map: &Map<String, Value>) -> Result<Self, ConfigError> {
        let k = Keys { map };
        if let Some(model_type) = k.str_opt("model_type")? {
            if model_type != "deepseek_v4" {
                return Err(err(
                    "model_type",
                    format!("`{model_type}` is not a DeepSeek-V4 config (expected deepseek_v4)"),
                ));
            }
        }
        let num_layers = k.usize("num_hidden_layers")?;
        let head_dim = k.usize("head_dim")?;

        let mut csa_rate = 4;
        let mut hca_rate = 128;
        if let Some(rates) = k.get("compress_rates") {
            let rates = rates
                .as_object()
                .ok_or_else(|| err("compress_rates", "expected an object"))?;
            for (name, v) in rates {
                let rate = v.as_u64().ok_or_else(|| {
                    err(
                        "compress_rates",
                        format!("`{name}` must be an integer, found {v}"),
                    )
                })? as usize;
                match name.as_str() {
                    "compressed_sparse_attention" => csa_rate = rate,
                    "heavily_compressed_attention" => hca_rate = rate,
                    other => return Err(err("compress_rates", format!("unknown layer type `{other}`"))),
                }
            }
        }
        let attention = if let Some(types) = k.get("layer_types") {
            let types = types
                .as_array()
                .ok_or_else(|| err("layer_types", "expected a list"))?;
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("sliding_attention") => Ok(AttentionKind::Sliding),
                    Some("compressed_sparse_attention") => Ok(AttentionKind::Csa { rate: csa_rate }),
                    Some("heavily_compressed_attention") => Ok(AttentionKind::Hca { rate: hca_rate }),
                    _ => Err(err(
                        "layer_types",
                        format!(
                            "entry {i} is {t}: expected sliding_attention, compressed_sparse_attention \
                             or heavily_compressed_attention"
                        ),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
        } else if let Some(ratios) = k.get("compress_ratios") {
            let ratios = ratios
                .as_array()
                .ok_or_else(|| err("compress_ratios", "expected a list"))?;
            kinds_from_ratios("compress_ratios", ratios)?
        } else {
            // HF's default schedule: two HCA layers, then CSA/HCA interleaved.
            (0..num_layers)
                .map(|i| {
                    if i < 2 || i % 2 == 0 {
                        AttentionKind::Hca { rate: hca_rate }
                    } else {
                        AttentionKind::Csa { rate: csa_rate }
                    }
                })
                .collect()
        };

        let routing = if let Some(types) = k.get("mlp_layer_types") {
            let types = types
                .as_array()
                .ok_or_else(|| err("mlp_layer_types", "expected a list"))?;
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("hash_moe") => Ok(RoutingKind::Hash),
                    Some("moe") => Ok(RoutingKind::TopK),
                    _ => Err(err(
                        "mlp_layer_types",
                        format!("entry {i} is {t}: expected hash_moe or moe"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            let n_hash = k.usize_or("num_hash_layers", 3)?;
            (0..num_layers)
                .map(|i| {
                    if i < n_hash {
                        RoutingKind::Hash
                    } else {
                        RoutingKind::TopK
                    }
                })
                .collect()
        };

        let rope_head_dim = match (
            k.f64_opt("partial_rotary_factor")?,
            k.usize_opt("qk_rope_head_dim")?,
        ) {
            (Some(f), _) => (head_dim as f64 * f).round() as usize,
            (None, Some(r)) => r,
            (None, None) => head_dim / 8,
        };

        let rope_theta = k.f64_or("rope_theta", 10000.0)?;
        let compress_rope_theta = k.f64_or("compress_rope_theta", 160000.0)?;
        let (rope_theta, compress_rope_theta, yarn) =
            Self::parse_hf_rope(&k, rope_theta, compress_rope_theta)?;

        let n_shared = k.usize_or("n_shared_experts", 1)?;
        if n_shared != 1 {
            return Err(err(
                "n_shared_experts",
                format!("{n_shared}: V4 has exactly one shared expert"),
            ));
        }
        if let Some(kv_heads) = k.usize_opt("num_key_value_heads")? {
            if kv_heads != 1 {
                return Err(err(
                    "num_key_value_heads",
                    format!("{kv_heads}: V4 attention has one shared K=V head"),
                ));
            }
        }
        let score_func = parse_score_func(
            "scoring_func",
            k.str_opt("scoring_func")?.unwrap_or("sqrtsoftplus"),
        )?;

        let config = V4Config {
            vocab_size: k.usize("vocab_size")?,
            hidden_size: k.usize("hidden_size")?,
            mtp_attention: mtp_attention(&attention, num_layers, k.usize_or("num_nextn_predict_layers", 0)?),
            attention: attention.into_iter().take(num_layers).collect(),
            routing: routing.into_iter().take(num_layers).collect(),
            num_heads: k.usize("num_attention_heads")?,
            head_dim,
            rope_head_dim,
            q_lora_rank: k.usize("q_lora_rank")?,
            o_groups: k.usize("o_groups")?,
            o_lora_rank: k.usize("o_lora_rank")?,
            sliding_window: k.usize("sliding_window")?,
            n_routed_experts: k.usize("n_routed_experts")?,
            experts_per_token: k.usize("num_experts_per_tok")?,
            moe_intermediate_size: k.usize("moe_intermediate_size")?,
            score_func,
            route_scale: k.f64_or("routed_scaling_factor", 1.0)?,
            swiglu_limit: k.f64_or("swiglu_limit", 10.0)?,
            index_heads: k.usize("index_n_heads")?,
            index_head_dim: k.usize("index_head_dim")?,
            index_topk: k.usize("index_topk")?,
            hc_mult: k.usize_or("hc_mult", 4)?,
            hc_sinkhorn_iters: k.usize_or("hc_sinkhorn_iters", 20)?,
            hc_eps: k.f64_or("hc_eps", 1e-6)?,
            rms_norm_eps: k.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            compress_rope_theta,
            yarn,
            max_position_embeddings: k.usize_or("max_position_embeddings", 1 << 20)?,
            bos_token_id: k.token_id("bos_token_id")?,
            eos_token_id: k.token_id("eos_token_id")?,
        };
        if config.attention.len() != num_layers {
            return Err(err(
                "layer_types",
                format!(
                    "{} entries for num_hidden_layers = {num_layers}",
                    config.attention.len()
                ),
            ));
        }
        if config.routing.len() != num_layers {
            return Err(err(
                "mlp_layer_types",
                format!(
                    "{} entries for num_hidden_layers = {num_layers}",
                    config.routing.len()
                ),
            ));
        }
        config.validate()?;
        Ok(config)
    }

    /// Resolves the three forms of HF rope settings: nested `rope_parameters: {main, compress}`, a flat
    /// `rope_parameters`, or the legacy `rope_scaling`. YaRN only ever applies to the compressed layers.
    fn parse_hf_rope(
        k: &Keys<'_>,
        rope_theta: f64,
        compress_rope_theta: f64,
    ) -> Result<(f64, f64, Option<Yarn>), ConfigError> {
        let (key, params) = match (k.get("rope_parameters"), k.get("rope_scaling")) {
            (Some(p), _) => ("rope_parameters", p),
            (None, Some(p)) => ("rope_scaling", p),
            (None, None) => return Ok((rope_theta, compress_rope_theta, None)),
        };
        let params = params.as_object().ok_or_else(|| err(key, "expected an object"))?;
        let (main_theta, compress) = match (params.get("main"), params.get("compress")) {
            (Some(main), Some(compress)) => {
                let main = main
                    .as_object()
                    .ok_or_else(|| err(key, "`main` must be an object"))?;
                let main_keys = Keys { map: main };
                let main_type = main_keys.str_opt("rope_type")?.unwrap_or("default");
                if main_type != "default" {
                    return Err(err(
                        key,
                        format!("main rope_type `{main_type}`: V4's sliding layers use plain RoPE"),
                    ));
                }
                let theta = main_keys.f64_or("rope_theta", rope_theta)?;
                let compress = compress
                    .as_object()
                    .ok_or_else(|| err(key, "`compress` must be an object"))?;
                (theta, compress)
            }
            // Flat form: HF keeps the main theta beside the YaRN settings.
            _ => (Keys { map: params }.f64_or("rope_theta", rope_theta)?, params),
        };
        let ck = Keys { map: compress };
        let theta = if std::ptr::eq(compress, params) {
            compress_rope_theta
        } else {
            ck.f64_or("rope_theta", compress_rope_theta)?
        };
        let rope_type = match ck.str_opt("rope_type")? {
            Some(t) => t,
            None => ck.str_opt("type")?.unwrap_or("default"),
        };
        let yarn = match rope_type {
            "default" => None,
            "yarn" => Some(Yarn {
                factor: ck
                    .f64_opt("factor")?
                    .ok_or_else(|| err(key, "yarn needs `factor`"))?,
                original_max_position: ck
                    .usize_opt("original_max_position_embeddings")?
                    .ok_or_else(|| err(key, "yarn needs `original_max_position_embeddings`"))?,
                beta_fast: ck.f64_or("beta_fast", 32.0)?,
                beta_slow: ck.f64_or("beta_slow", 1.0)?,
                attention_factor: ck.f64_or("attention_factor", 1.0)?,
            }),
            other => {
                return Err(err(
                    key,
                    format!("unsupported rope_type `{other}` (V4 uses default or yarn)"),
                ))
            }
        };
        Ok((main_theta, theta, yarn))
    }

    /// Parses DeepSeek's `inference/config.json` (the `ModelArgs` of `inference/model.py`).
    pub fn from_inference_json(map: &Map<String, Value>) -> Result<Self, ConfigError> {
        const KNOWN: &[&str] = &[
            "max_batch_size",
            "max_seq_len",
            "dtype",
            "scale_fmt",
            "expert_dtype",
            "scale_dtype",
            "vocab_size",
            "dim",
            "moe_inter_dim",
            "n_layers",
            "n_hash_layers",
            "n_mtp_layers",
            "n_heads",
            "n_routed_experts",
            "n_shared_experts",
            "n_activated_experts",
            "score_func",
            "route_scale",
            "swiglu_limit",
            "q_lora_rank",
            "head_dim",
            "rope_head_dim",
            "norm_eps",
            "o_groups",
            "o_lora_rank",
            "window_size",
            "compress_ratios",
            "compress_rope_theta",
            "original_seq_len",
            "rope_theta",
            "rope_factor",
            "beta_fast",
            "beta_slow",
            "index_n_heads",
            "index_head_dim",
            "index_topk",
            "hc_mult",
            "hc_sinkhorn_iters",
            "hc_eps",
        ];
        if let Some(unknown) = map.keys().find(|key| !KNOWN.contains(&key.as_str())) {
            return Err(err(unknown, "unknown key in DeepSeek's inference config"));
        }
        let k = Keys { map };
        let num_layers = k.usize("n_layers")?;
        let num_mtp_layers = k.usize_or("n_mtp_layers", 1)?;
        let ratios = k
            .get("compress_ratios")
            .ok_or_else(|| err("compress_ratios", "missing (required)"))?
            .as_array()
            .ok_or_else(|| err("compress_ratios", "expected a list"))?;
        if ratios.len() < num_layers {
            return Err(err(
                "compress_ratios",
                format!("{} entries for n_layers = {num_layers}", ratios.len()),
            ));
        }
        // The list also covers the MTP layers, which follow the main layers.
        let all = kinds_from_ratios("compress_ratios", ratios)?;
        let mtp_attention = mtp_attention(&all, num_layers, num_mtp_layers);
        let attention = all[..num_layers].to_vec();
        let n_hash = k.usize_or("n_hash_layers", 0)?;
        let routing = (0..num_layers)
            .map(|i| {
                if i < n_hash {
                    RoutingKind::Hash
                } else {
                    RoutingKind::TopK
                }
            })
            .collect();
        let n_shared = k.usize_or("n_shared_experts", 1)?;
        if n_shared != 1 {
            return Err(err(
                "n_shared_experts",
                format!("{n_shared}: V4 has exactly one shared expert"),
            ));
        }
        let rope_factor = k.f64_or("rope_factor", 1.0)?;
        let yarn = (rope_factor != 1.0).then(|| -> Result<Yarn, ConfigError> {
            Ok(Yarn {
                factor: rope_factor,
                original_max_position: k.usize("original_seq_len")?,
                beta_fast: k.f64_or("beta_fast", 32.0)?,
                beta_slow: k.f64_or("beta_slow", 1.0)?,
                attention_factor: 1.0,
            })
        });
        let yarn = yarn.transpose()?;
        let config = V4Config {
            vocab_size: k.usize("vocab_size")?,
            hidden_size: k.usize("dim")?,
            attention,
            routing,
            num_heads: k.usize("n_heads")?,
            head_dim: k.usize("head_dim")?,
            rope_head_dim: k.usize("rope_head_dim")?,
            q_lora_rank: k.usize("q_lora_rank")?,
            o_groups: k.usize("o_groups")?,
            o_lora_rank: k.usize("o_lora_rank")?,
            sliding_window: k.usize("window_size")?,
            n_routed_experts: k.usize("n_routed_experts")?,
            experts_per_token: k.usize("n_activated_experts")?,
            moe_intermediate_size: k.usize("moe_inter_dim")?,
            score_func: parse_score_func("score_func", k.str_opt("score_func")?.unwrap_or("sqrtsoftplus"))?,
            route_scale: k.f64_or("route_scale", 1.0)?,
            swiglu_limit: k.f64_or("swiglu_limit", 10.0)?,
            index_heads: k.usize("index_n_heads")?,
            index_head_dim: k.usize("index_head_dim")?,
            index_topk: k.usize("index_topk")?,
            hc_mult: k.usize_or("hc_mult", 4)?,
            hc_sinkhorn_iters: k.usize_or("hc_sinkhorn_iters", 20)?,
            hc_eps: k.f64_or("hc_eps", 1e-6)?,
            rms_norm_eps: k.f64_or("norm_eps", 1e-6)?,
            rope_theta: k.f64_or("rope_theta", 10000.0)?,
            compress_rope_theta: k.f64_or("compress_rope_theta", 160000.0)?,
            yarn,
            // DeepSeek's code sizes its caches from max_seq_len; the architecture's limit is 1M positions.
            max_position_embeddings: 1 << 20,
            mtp_attention,
            bos_token_id: Some(0),
            eos_token_id: Some(1),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between the hyper-parameters that the forward pass relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.attention.len()),
            ("num_attention_heads", self.num_heads),
            ("head_dim", self.head_dim),
            ("q_lora_rank", self.q_lora_rank),
            ("o_groups", self.o_groups),
            ("o_lora_rank", self.o_lora_rank),
            ("sliding_window", self.sliding_window),
            ("n_routed_experts", self.n_routed_experts),
            ("num_experts_per_tok", self.experts_per_token),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("hc_mult", self.hc_mult),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(err(key, "must be positive"));
            }
        }
        if self.rope_head_dim == 0
            || !self.rope_head_dim.is_multiple_of(2)
            || self.rope_head_dim > self.head_dim
        {
            return Err(err(
                "qk_rope_head_dim",
                format!(
                    "{}: must be even, positive and at most head_dim = {}",
                    self.rope_head_dim, self.head_dim
                ),
            ));
        }
        if !(self.num_heads * self.head_dim).is_multiple_of(self.o_groups) {
            return Err(err(
                "o_groups",
                format!(
                    "{} does not divide num_attention_heads * head_dim = {}",
                    self.o_groups,
                    self.num_heads * self.head_dim
                ),
            ));
        }
        if self.experts_per_token > self.n_routed_experts {
            return Err(err(
                "num_experts_per_tok",
                format!(
                    "{} exceeds n_routed_experts = {}",
                    self.experts_per_token, self.n_routed_experts
                ),
            ));
        }
        let has_csa = self
            .attention
            .iter()
            .chain(&self.mtp_attention)
            .any(|a| matches!(a, AttentionKind::Csa { .. }));
        if has_csa {
            for (key, value) in [
                ("index_n_heads", self.index_heads),
                ("index_head_dim", self.index_head_dim),
                ("index_topk", self.index_topk),
            ] {
                if value == 0 {
                    return Err(err(key, "must be positive for a model with CSA layers"));
                }
            }
            if self.rope_head_dim > self.index_head_dim {
                return Err(err(
                    "index_head_dim",
                    format!(
                        "{} is smaller than the rope dim {}",
                        self.index_head_dim, self.rope_head_dim
                    ),
                ));
            }
        }
        for (i, a) in self.attention.iter().chain(&self.mtp_attention).enumerate() {
            if let AttentionKind::Csa { rate } | AttentionKind::Hca { rate } = a {
                if *rate < 2 {
                    return Err(err(
                        "compress_rates",
                        format!("layer {i} compresses at rate {rate}; a rate must be at least 2"),
                    ));
                }
            }
        }
        if self.swiglu_limit.is_nan() || self.swiglu_limit <= 0.0 {
            return Err(err(
                "swiglu_limit",
                format!("{}: must be positive", self.swiglu_limit),
            ));
        }
        if let Some(y) = self.yarn {
            if y.factor.is_nan()
                || y.factor < 1.0
                || y.original_max_position == 0
                || y.beta_fast <= y.beta_slow
            {
                return Err(err(
                    "rope_scaling",
                    format!("invalid YaRN settings {y:?} (factor >= 1, beta_fast > beta_slow)"),
                ));
            }
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 || self.hc_eps.is_nan() || self.hc_eps < 0.0
        {
            return Err(err("rms_norm_eps", "epsilons must be positive"));
        }
        Ok(())
    }

    /// Number of main layers.
    pub fn num_layers(&self) -> usize {
        self.attention.len()
    }

    /// Number of multi-token-prediction layers.
    pub fn num_mtp_layers(&self) -> usize {
        self.mtp_attention.len()
    }

    /// The attention and routing of block `index`: main layers first, then the MTP layers (which never
    /// hash-route: DeepSeek's hash layers are the first `n_hash_layers` of the stack).
    pub fn block_kinds(&self, index: usize) -> (AttentionKind, RoutingKind) {
        match self.attention.get(index) {
            Some(&kind) => (kind, self.routing[index]),
            None => (self.mtp_attention[index - self.num_layers()], RoutingKind::TopK),
        }
    }
}
