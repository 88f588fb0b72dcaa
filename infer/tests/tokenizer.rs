//! The real DeepSeek-V4 tokenizer (tests/fixtures/tokenizer/deepseek-v4), its chat format and streaming.

#[path = "../../tests/support/tiny_a.rs"]
mod common;

use v4_infer::{encode_chat, Message, Role, StopStrings, TextStream, V4Tokenizer};

fn tokenizer() -> V4Tokenizer {
    V4Tokenizer::from_file(&common::root().join(v4_infer::TOKENIZER_FIXTURE)).unwrap()
}

const TEXT: &str = "Hello, DeepSeek V4 on Ascend! 你好世界";
const IDS: [u32; 14] = [
    19923, 14, 22651, 4374, 1465, 721, 22, 377, 48548, 523, 3, 223, 30594, 3427,
];

#[test]
fn encodes_the_published_vector_and_decodes_back() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 129_280);
    assert_eq!(tok.encode(TEXT).unwrap(), IDS);
    assert_eq!(tok.decode(&IDS, true).unwrap(), TEXT);
}

#[test]
fn special_tokens_are_single_ids() {
    let tok = tokenizer();
    assert_eq!(tok.token_id("<｜begin▁of▁sentence｜>"), Some(0));
    assert_eq!(tok.token_id("<｜end▁of▁sentence｜>"), Some(1));
    assert_eq!(tok.token_id("<｜User｜>"), Some(128803));
    assert_eq!(tok.token_id("<｜Assistant｜>"), Some(128804));
    assert_eq!(tok.token_id("<think>"), Some(128821));
    assert_eq!(tok.token_id("</think>"), Some(128822));
    let ids = tok.encode("<｜User｜>hi<｜Assistant｜></think>").unwrap();
    assert_eq!(ids[0], 128803);
    assert_eq!(&ids[ids.len() - 2..], &[128804, 128822]);
    // Skipping special tokens drops BOS/EOS but keeps the (non-special) chat markers.
    assert_eq!(tok.decode(&[0, 19923, 1], true).unwrap(), "Hello");
}

#[test]
fn chat_prompt_has_bos_system_turns_and_generation_prompt() {
    let tok = tokenizer();
    let messages = vec![
        Message::new(Role::System, "Be brief."),
        Message::new(Role::User, TEXT),
    ];
    let ids = encode_chat(&tok, &messages, false).unwrap();
    let system = tok.encode("Be brief.").unwrap();
    let mut expected = vec![0];
    expected.extend(&system);
    expected.push(128803);
    expected.extend(IDS);
    expected.extend([128804, 128822]);
    assert_eq!(ids, expected);
    let thinking = encode_chat(&tok, &messages, true).unwrap();
    assert_eq!(thinking.last(), Some(&128821));
}

#[test]
fn unknown_special_tokens_are_rejected_in_chat() {
    let tok = tokenizer();
    let messages = vec![Message::new(Role::User, "hi <｜Usr｜> there")];
    let err = encode_chat(&tok, &messages, false).unwrap_err();
    assert!(
        err.to_string().contains("unknown special token `<｜Usr｜>`"),
        "{err}"
    );
    let ascii = vec![Message::new(Role::User, "<|im_start|>user")];
    assert!(encode_chat(&tok, &ascii, false).is_err());
    // Known ones and ordinary text with bars are fine.
    let ok = vec![Message::new(Role::User, "a <|EOT|> b, x <| y |> z, <think>")];
    assert!(encode_chat(&tok, &ok, false).is_ok());
}

#[test]
fn streaming_holds_back_split_characters() {
    let tok = tokenizer();
    // "世界" may span several byte-level tokens; each streamed piece must be valid text and the pieces
    // must add up to the decoded text.
    let text = "naïve café 你好世界 🙂 done";
    let ids = tok.encode(text).unwrap();
    let mut stream = TextStream::new(&tok);
    let mut out = String::new();
    for &id in &ids {
        let piece = stream.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "piece {piece:?}");
        out.push_str(&piece);
    }
    out.push_str(&stream.finish().unwrap());
    assert_eq!(out, text);
    let mut stops = StopStrings::new(&["世界".to_string()]);
    let mut shown = String::new();
    let mut stream = TextStream::new(&tok);
    for &id in &ids {
        let (piece, stop) = stops.push(&stream.push(id).unwrap());
        shown.push_str(&piece);
        if stop {
            break;
        }
    }
    assert_eq!(shown, "naïve café 你好");
}

#[test]
fn model_dirs_without_a_tokenizer_have_none() {
    let dir = common::root().join("tests/fixtures/v4-tiny-a/hf");
    assert!(V4Tokenizer::from_model_dir(&dir).unwrap().is_none());
}
