//! msModelSlim's "AscendV1" checkpoint files, as vllm-ascend's `--quantization ascend` reads them
//! (`shared/reference/ascend-quant-formats.md`): `quant_model_weights*.safetensors` under DeepSeek's
//! release names, and `quant_model_description.json`, which gives every tensor its quantisation type.

use serde_json::{json, Map, Value};

/// The description file vllm-ascend reads.
pub const DESCRIPTION_FILE: &str = "quant_model_description.json";

/// A quantisation type of the description, for one linear (all its tensors) or the whole model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    /// Kept in floating point.
    Float,
    /// INT8 weights, one scale per output channel; activations quantised per token at run time.
    W8a8Dynamic,
    /// INT4 weights, one scale per output channel, packed two rows per byte; INT8 activations per token.
    W4a8Dynamic,
    /// MXFP8 weights (E4M3 + E8M0 per 32) on Ascend 950's MX cube.
    W8a8Mxfp8,
}

impl QuantType {
    /// The description's spelling.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Float => "FLOAT",
            QuantType::W8a8Dynamic => "W8A8_DYNAMIC",
            QuantType::W4a8Dynamic => "W4A8_DYNAMIC",
            QuantType::W8a8Mxfp8 => "W8A8_MXFP8",
        }
    }

    /// Elements per weight scale along a row: 0 for per-channel, 32 for MX.
    fn group_size(self) -> usize {
        match self {
            QuantType::W8a8Mxfp8 => 32,
            _ => 0,
        }
    }
}

/// Output shard `i` of `n`: `quant_model_weights.safetensors`, or
/// `quant_model_weights-0000i-of-0000N.safetensors` when sharded.
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "quant_model_weights.safetensors".into()
    } else {
        format!("quant_model_weights-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// The description of a checkpoint quantised as `model` whose stored tensors are `tensors` (name and the
/// type of the linear it belongs to). `hc_head_fn` is always present: vllm-ascend maps DeepSeek's names to
/// its own only when that key is there.
pub fn description<'a>(model: QuantType, tensors: impl Iterator<Item = (&'a str, QuantType)>) -> Value {
    let mut d = Map::new();
    d.insert("version".into(), "1.0.0".into());
    d.insert("model_quant_type".into(), model.name().into());
    d.insert("metadata".into(), json!({}));
    d.insert("group_size".into(), model.group_size().into());
    d.insert("optional".into(), json!({}));
    d.insert("hc_head_fn".into(), QuantType::Float.name().into());
    for (name, t) in tensors {
        d.insert(name.into(), t.name().into());
    }
    Value::Object(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_names_every_tensor_and_hc_head_fn() {
        let d = description(
            QuantType::W8a8Dynamic,
            [
                ("layers.0.attn.wq_a.weight", QuantType::W8a8Dynamic),
                ("layers.0.attn.wq_a.weight_scale", QuantType::W8a8Dynamic),
                ("layers.0.attn.wo_a.weight", QuantType::Float),
            ]
            .into_iter(),
        );
        assert_eq!(d["model_quant_type"], "W8A8_DYNAMIC");
        assert_eq!(d["version"], "1.0.0");
        assert_eq!(d["group_size"], 0);
        assert_eq!(d["hc_head_fn"], "FLOAT");
        assert_eq!(d["layers.0.attn.wq_a.weight_scale"], "W8A8_DYNAMIC");
        assert_eq!(d["layers.0.attn.wo_a.weight"], "FLOAT");
        assert_eq!(d.as_object().map(|o| o.len()), Some(9));
    }

    #[test]
    fn shards_follow_msmodelslim_names() {
        assert_eq!(shard_name(0, 1), "quant_model_weights.safetensors");
        assert_eq!(shard_name(1, 3), "quant_model_weights-00002-of-00003.safetensors");
    }
}
