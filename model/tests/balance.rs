//! The sequence-wise balance term (DeepSeek-V3 §2.1.2, kept by V4) recomputed from the router's own
//! probe points: `sum_b sum_i f_bi P_bi` with `f_bi = E / (K S) * count_bi` and `P_bi` the mean over the
//! sequence of the normalized scores.

use burn_ndarray::NdArray;
use std::path::PathBuf;
use v4_checkpoint::read_config;
use v4_model::config::RoutingKind;
use v4_model::{ModelCache, Pass, Recorder, Tokens, V4Model};

type B = NdArray<f32>;

#[test]
fn balance_term_equals_its_definition_on_the_router_outputs() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v4-tiny-a/hf");
    let config = read_config(&dir).unwrap();
    let mut model =
        V4Model::<B>::load(&config, &*v4_checkpoint::open(&dir).unwrap(), &Default::default()).unwrap();
    let top_k: Vec<usize> = (0..model.layers.len())
        .filter(|&i| model.layers[i].ffn.routing == RoutingKind::TopK)
        .collect();
    assert!(!top_k.is_empty());
    for &i in &top_k {
        model.layers[i].ffn.sequence_balance = true;
    }
    let (batch, seq) = (2, 24);
    let ids: Vec<i64> = (0..batch * seq).map(|t| (t * 37 % 1000) as i64).collect();
    let tokens = Tokens::new(&ids, batch, seq, config.vocab_size).unwrap();
    let mut recorder = Recorder::new(|n: &str| n.contains(".ffn.router."));
    let mut cache = ModelCache::new(model.layers.len());
    let out = model
        .forward_with(&tokens, &mut cache, Pass::new().probe(&mut recorder))
        .unwrap();
    let got = out.balance.expect("top-k layers compute the term").into_scalar();

    let find = |name: String| {
        let (_, data) = recorder.records.iter().find(|(n, _)| *n == name).unwrap();
        data.clone()
    };
    let (e, k) = (config.n_routed_experts, config.experts_per_token);
    let mut want = 0.0f64;
    for &i in &top_k {
        let scores = find(format!("layers.{i}.ffn.router.scores"))
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap();
        let chosen = find(format!("layers.{i}.ffn.router.indices"))
            .into_vec::<i64>()
            .unwrap();
        for b in 0..batch {
            for expert in 0..e {
                let tokens = b * seq..(b + 1) * seq;
                let count = tokens
                    .clone()
                    .flat_map(|t| &chosen[t * k..(t + 1) * k])
                    .filter(|&&c| c as usize == expert)
                    .count();
                let f = e as f64 / (k * seq) as f64 * count as f64;
                let p: f64 = tokens
                    .map(|t| {
                        let row = &scores[t * e..(t + 1) * e];
                        row[expert] as f64 / row.iter().map(|&s| s as f64).sum::<f64>()
                    })
                    .sum::<f64>()
                    / seq as f64;
                want += f * p;
            }
        }
    }
    // Perfect balance gives 1 per layer and sequence.
    assert!(want > 0.5 * (top_k.len() * batch) as f64, "{want}");
    assert!(
        ((got as f64) - want).abs() <= 1e-5 * want,
        "model {got}, definition {want}"
    );
}
