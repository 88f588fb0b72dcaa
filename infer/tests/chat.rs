//! A multi-turn chat session continues its cache; each turn's reply equals a from-scratch generation over
//! the same tokens.

#[path = "../../tests/support/tiny_a.rs"]
mod common;

use burn_ndarray::NdArray;
use v4_infer::{encode_chat, ChatSession, Flow, GenerateParams, Generator, Message, Role, V4Tokenizer};
use v4_model::{RandomWeights, V4Config, V4Model};

/// A small random model with V4's vocabulary.
fn model() -> V4Model<NdArray<f32>> {
    let text =
        std::fs::read_to_string(common::root().join("tests/fixtures/v4-tiny-a/hf/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["vocab_size"] = serde_json::json!(129_280);
    json["hidden_size"] = serde_json::json!(64);
    json["q_lora_rank"] = serde_json::json!(32);
    json["moe_intermediate_size"] = serde_json::json!(32);
    let config = V4Config::from_json_str(&json.to_string()).unwrap();
    let source = RandomWeights {
        seed: 3,
        experts: config.n_routed_experts,
    };
    V4Model::load(&config, &source, &Default::default()).unwrap()
}

#[test]
fn second_turn_reuses_the_cache_and_equals_a_fresh_run() {
    let tok = V4Tokenizer::from_file(&common::root().join(v4_infer::TOKENIZER_FIXTURE)).unwrap();
    let model = model();
    let gen = Generator::new(&model);
    let params = GenerateParams {
        max_tokens: 6,
        stop_ids: vec![1],
        ..GenerateParams::default()
    };
    let mut session = ChatSession::new(&tok, Some("Be brief."), false);
    let (first, _, stats1) = session.turn(&gen, "Hello!", &params, |_| Flow::Continue).unwrap();
    assert_eq!(stats1.reused_tokens, 0);
    let prompt1 = encode_chat(
        &tok,
        &[
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Hello!"),
        ],
        false,
    )
    .unwrap();
    assert_eq!(stats1.prompt_tokens, prompt1.len());
    let (fresh1, _) = gen.generate(&prompt1, &params, |_| Flow::Continue).unwrap();
    assert_eq!(first.ids, fresh1.ids);
    session.add_reply(&tok.decode(&first.ids, true).unwrap());

    let (second, _, stats2) = session
        .turn(&gen, "And 你好?", &params, |_| Flow::Continue)
        .unwrap();
    assert_eq!(stats2.reused_tokens, prompt1.len() + first.ids.len() - 1);
    // The same conversation as tokens: turn 1 as generated, EOS, the new user turn, the generation prompt.
    let mut prompt2 = prompt1.clone();
    prompt2.extend(&first.ids);
    if first.ids.last() != Some(&1) {
        prompt2.push(1);
    }
    prompt2.push(128803);
    prompt2.extend(tok.encode("And 你好?").unwrap());
    prompt2.extend([128804, 128822]);
    assert_eq!(stats2.prompt_tokens, prompt2.len());
    let (fresh2, _) = gen.generate(&prompt2, &params, |_| Flow::Continue).unwrap();
    assert_eq!(second.ids, fresh2.ids);
    assert_eq!(session.messages.len(), 4); // system, user, assistant, user
}
