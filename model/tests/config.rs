//! Configuration parsing against the real V4-Flash configs, parameter counts against DeepSeek's published
//! sizes, and clear errors for bad values.

use serde_json::Value;
use std::path::PathBuf;
use v4_model::{AttentionKind, RoutingKind, V4Config};

fn fixture(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(path);
    std::fs::read_to_string(p).expect("fixture")
}

fn flash_hf() -> V4Config {
    V4Config::from_json_str(&fixture("deepseek-v4-flash/config.json")).unwrap()
}

#[test]
fn both_flash_config_forms_parse_to_the_same_config() {
    let hf = flash_hf();
    let inference = V4Config::from_json_str(&fixture("deepseek-v4-flash/inference_config.json")).unwrap();
    assert_eq!(hf, inference);
    assert_eq!(hf.num_layers(), 43);
    assert_eq!(hf.rope_head_dim, 64);
    assert_eq!(
        &hf.attention[..4],
        &[
            AttentionKind::Sliding,
            AttentionKind::Sliding,
            AttentionKind::Csa { rate: 4 },
            AttentionKind::Hca { rate: 128 }
        ]
    );
    assert_eq!(hf.attention[42], AttentionKind::Csa { rate: 4 });
    assert_eq!(hf.routing.iter().filter(|r| **r == RoutingKind::Hash).count(), 3);
    let yarn = hf.yarn.unwrap();
    assert_eq!((yarn.factor, yarn.original_max_position), (16.0, 65536));
}

#[test]
fn flash_parameter_counts_match_deepseeks_published_sizes() {
    let p = flash_hf().param_counts();
    let total = p.total as f64;
    assert!((total / 284e9 - 1.0).abs() < 0.005, "total {total}");
    let active = p.active as f64;
    assert!((active / 13.8e9 - 1.0).abs() < 0.02, "active {active}");
}

#[test]
fn pro_sizes_give_about_1_57_trillion_parameters() {
    let mut v: Value = serde_json::from_str(&fixture("deepseek-v4-flash/config.json")).unwrap();
    let mut ratios = vec![128, 128];
    for _ in 0..29 {
        ratios.extend([4, 128]);
    }
    ratios.push(4);
    for (key, value) in [
        ("hidden_size", serde_json::json!(7168)),
        ("num_hidden_layers", serde_json::json!(61)),
        ("num_attention_heads", serde_json::json!(128)),
        ("q_lora_rank", serde_json::json!(1536)),
        ("o_groups", serde_json::json!(16)),
        ("index_topk", serde_json::json!(1024)),
        ("n_routed_experts", serde_json::json!(384)),
        ("moe_intermediate_size", serde_json::json!(3072)),
        ("routed_scaling_factor", serde_json::json!(2.5)),
        ("compress_ratios", serde_json::json!(ratios)),
    ] {
        v[key] = value;
    }
    let pro = V4Config::from_json_str(&v.to_string()).unwrap();
    let p = pro.param_counts();
    assert!((p.total as f64 / 1.57e12 - 1.0).abs() < 0.01, "total {}", p.total);
    assert!(
        (p.active as f64 / 49.8e9 - 1.0).abs() < 0.03,
        "active {}",
        p.active
    );
}

fn flash_with(key: &str, value: Value) -> Result<V4Config, v4_model::ConfigError> {
    let mut v: Value = serde_json::from_str(&fixture("deepseek-v4-flash/config.json")).unwrap();
    v[key] = value;
    V4Config::from_json_str(&v.to_string())
}

#[test]
fn bad_values_name_the_key() {
    let e = flash_with("scoring_func", "relu".into()).unwrap_err();
    assert_eq!(e.key, "scoring_func");
    assert!(e.to_string().contains("relu"), "{e}");

    let e = flash_with("compress_ratios", serde_json::json!([0, 3])).unwrap_err();
    assert_eq!(e.key, "compress_ratios");

    let e = flash_with("o_groups", 7.into()).unwrap_err();
    assert_eq!(e.key, "o_groups");

    let e = flash_with("num_key_value_heads", 8.into()).unwrap_err();
    assert_eq!(e.key, "num_key_value_heads");

    let e = flash_with("hidden_size", "big".into()).unwrap_err();
    assert_eq!(e.key, "hidden_size");

    let e = flash_with(
        "rope_scaling",
        serde_json::json!({"type": "dynamic", "factor": 2}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("dynamic"), "{e}");

    let mut v: Value = serde_json::from_str(&fixture("deepseek-v4-flash/config.json")).unwrap();
    v["layer_types"] = Value::from(vec!["sliding_attention"; 42]);
    let e = V4Config::from_json_str(&v.to_string()).unwrap_err();
    assert_eq!(e.key, "layer_types");
}

#[test]
fn unknown_keys_of_deepseeks_inference_config_are_rejected() {
    let mut v: Value = serde_json::from_str(&fixture("deepseek-v4-flash/inference_config.json")).unwrap();
    v["n_heads_typo"] = 3.into();
    let e = V4Config::from_json_str(&v.to_string()).unwrap_err();
    assert_eq!(e.key, "n_heads_typo");
}
