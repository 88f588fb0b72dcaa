//! Every pinned vector of `tests/fixtures/formats/test_vectors.json` (ml_dtypes 0.6, torch 2.15,
//! torchao 0.18, ModelOpt 0.47), and of `tests/fixtures/formats/ascend_vectors.json` (torch 2.15, written by
//! `scripts/gen-ascend-vectors.py`).

use serde_json::Value;
use v4_convert::codec::{self, fp8, mxfp4, nvfp4, E4m3Overflow, ScaleSearch};

fn vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/formats/test_vectors.json"
    );
    serde_json::from_slice(&std::fs::read(path).expect("test vectors present")).expect("valid JSON")
}

fn hex(v: &Value) -> u32 {
    let s = v.as_str().expect("hex string");
    u32::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex")
}

fn hex_list(v: &Value) -> Vec<u32> {
    v.as_array().expect("list").iter().map(hex).collect()
}

fn nibbles(s: &str) -> Vec<u8> {
    s.chars()
        .map(|c| c.to_digit(16).expect("hex digit") as u8)
        .collect()
}

fn bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex byte"))
        .collect()
}

#[test]
fn f32_to_e2m1_rne_and_modelopt_sign_rule() {
    let v = vectors();
    let cases = v["f32_to_e2m1"].as_array().unwrap();
    assert_eq!(cases.len(), 24);
    for c in cases {
        let x = f32::from_bits(hex(&c["f32_bits"]));
        let want = hex(&c["e2m1"]) as u8;
        assert_eq!(codec::f32_to_e2m1(x), want, "RNE {x}");
        assert_eq!(
            codec::f32_to_e2m1_modelopt(x),
            hex(&c["e2m1_modelopt_sign_rule"]) as u8,
            "ModelOpt {x}"
        );
        let dec = codec::e2m1_to_f32(want);
        let want_dec = c["decoded"].as_f64().unwrap() as f32;
        assert_eq!(dec.to_bits(), want_dec.to_bits(), "decode of {want:#x}");
    }
}

#[test]
fn f32_to_e4m3fn_saturating_and_not() {
    let v = vectors();
    let cases = v["f32_to_e4m3fn"].as_array().unwrap();
    assert_eq!(cases.len(), 22);
    for c in cases {
        let x = f32::from_bits(hex(&c["f32_bits"]));
        let sat = hex(&c["e4m3fn_saturating(torch>=2.13)"]) as u8;
        let nonsat = hex(&c["e4m3fn_nonsat(ml_dtypes)"]) as u8;
        assert_eq!(
            codec::f32_to_e4m3(x, E4m3Overflow::Saturate),
            sat,
            "saturating {x}"
        );
        assert_eq!(codec::f32_to_e4m3(x, E4m3Overflow::Nan), nonsat, "ml_dtypes {x}");
    }
}

#[test]
fn f32_to_e5m2() {
    let v = vectors();
    let cases = v["f32_to_e5m2"].as_array().unwrap();
    assert_eq!(cases.len(), 8);
    for c in cases {
        let x = f32::from_bits(hex(&c["f32_bits"]));
        let want = hex(&c["e5m2(ml_dtypes)"]) as u8;
        assert_eq!(want, hex(&c["e5m2(torch)"]) as u8, "the two references agree");
        assert_eq!(codec::f32_to_e5m2(x), want, "{x}");
    }
}

#[test]
fn amax_to_e8m0_floor_and_rceil() {
    let v = vectors();
    let cases = v["amax_to_e8m0"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let amax = f32::from_bits(hex(&c["amax_bits"]));
        let floor = hex(&c["e8m0_ocp_floor"]) as u8;
        let rceil = hex(&c["e8m0_rceil_amax_div_6"]) as u8;
        // The OCP MX block rule is floor(log2 amax) - 2.
        assert_eq!(
            mxfp4::block_scale(amax, mxfp4::MxRule::Floor),
            floor,
            "floor {amax}"
        );
        assert_eq!(codec::e8m0_floor(amax).saturating_sub(2), floor, "floor {amax}");
        // RCEIL is ceil(log2(amax / 6)); the MX block rule also floors amax at 6 * 2^-126, which only
        // changes subnormal amax (the last vector), so compare the raw exponent there.
        assert_eq!(codec::e8m0_ceil(amax / 6.0), rceil, "rceil {amax}");
        if amax >= 6.0 * f32::MIN_POSITIVE {
            assert_eq!(
                mxfp4::block_scale(amax, mxfp4::MxRule::Rceil),
                rceil,
                "rceil block {amax}"
            );
        }
    }
}

#[test]
fn deepseek_v3_dequant_f32_and_bf16() {
    let v = vectors();
    let d = &v["deepseek_v3_dequant"];
    let scale_bits = hex(&d["scale_inv_f32_bits"]);
    let codes: Vec<u8> = hex_list(&d["fp8_codes"]).into_iter().map(|c| c as u8).collect();
    let want_f32 = hex_list(&d["f32_product_bits"]);
    let want_bf16 = hex_list(&d["bf16_bits"]);
    assert_eq!(codes.len(), 12);
    // One row of 12 values under one F32 `weight_scale_inv` tile.
    let scale = scale_bits.to_le_bytes();
    let got = fp8::dequantize(&codes, fp8::Fp8Scales::F32Le(&scale), 1, codes.len(), 128);
    for i in 0..codes.len() {
        assert_eq!(
            got[i].to_bits(),
            want_f32[i],
            "f32 product of code {:#04x}",
            codes[i]
        );
        assert_eq!(
            codec::f32_to_bf16(got[i]) as u32,
            want_bf16[i],
            "bf16 of code {:#04x}",
            codes[i]
        );
    }
}

#[test]
fn nvfp4_block_modelopt() {
    let v = vectors();
    let d = &v["nvfp4_block_modelopt"];
    let x: Vec<f32> = hex_list(&d["bf16_bits"])
        .into_iter()
        .map(|b| codec::bf16_to_f32(b as u16))
        .collect();
    let sf2 = f32::from_bits(hex(&d["weight_scale_2_f32_bits"]));
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(
        amax as f64,
        d["block_amax"].as_str().unwrap().parse::<f64>().unwrap()
    );
    let per_block: f64 = d["per_block_scale_f32"].as_str().unwrap().parse().unwrap();
    assert_eq!(nvfp4::block_scale_f32(amax, sf2) as f64, per_block);
    let sc = nvfp4::block_scale(amax, sf2);
    assert_eq!(sc as u32, hex(&d["weight_scale_e4m3"]));
    // Element rule: E2M1(x / (f32(block scale) * sf2)) with ModelOpt's sign rule.
    let divisor = codec::e4m3_to_f32(sc) * sf2;
    let codes: Vec<u8> = x
        .iter()
        .map(|&v| codec::f32_to_e2m1_modelopt(v / divisor))
        .collect();
    let want: Vec<u8> = d["e2m1_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| nibbles(c.as_str().unwrap())[0])
        .collect();
    assert_eq!(codes, want);
    let mut packed = vec![0u8; 8];
    codec::pack_e2m1(&codes, &mut packed);
    assert_eq!(packed, bytes(d["packed_bytes_lo_nibble_first"].as_str().unwrap()));
}

#[test]
fn nvfp4_quantize_reproduces_pinned_block_when_tensor_scale_matches() {
    // Append one element equal to the tensor amax that produced the pinned weight_scale_2 (in a
    // second block), so that the whole-tensor quantiser derives the same sf2 and must reproduce the
    // pinned block exactly.
    let v = vectors();
    let d = &v["nvfp4_block_modelopt"];
    let mut x: Vec<f32> = hex_list(&d["bf16_bits"])
        .into_iter()
        .map(|b| codec::bf16_to_f32(b as u16))
        .collect();
    let sf2 = f32::from_bits(hex(&d["weight_scale_2_f32_bits"]));
    let guess = (sf2 * 2688.0).to_bits();
    let tensor_amax = (guess - 64..guess + 64)
        .map(f32::from_bits)
        .find(|a| nvfp4::tensor_scale(*a) == sf2)
        .expect("an amax that yields the pinned weight_scale_2");
    x.extend(std::iter::once(tensor_amax).chain(std::iter::repeat_n(0.0, 15)));
    let (q, _) = nvfp4::quantize(&x, 1, 32, ScaleSearch::Off);
    assert_eq!(q.scale2, sf2);
    assert_eq!(q.scales[0] as u32, hex(&d["weight_scale_e4m3"]));
    assert_eq!(
        &q.packed[..8],
        &bytes(d["packed_bytes_lo_nibble_first"].as_str().unwrap())[..]
    );
}

#[test]
fn mxfp4_block_floor_and_rceil() {
    let v = vectors();
    let d = &v["mxfp4_block"];
    let x: Vec<f32> = hex_list(&d["bf16_bits"])
        .into_iter()
        .map(|b| codec::bf16_to_f32(b as u16))
        .collect();
    assert_eq!(x.len(), 32);
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(amax as f64, d["amax"].as_str().unwrap().parse::<f64>().unwrap());
    for (key, rule) in [("FLOOR", mxfp4::MxRule::Floor), ("RCEIL", mxfp4::MxRule::Rceil)] {
        let w = &d[key];
        let (packed, scales, _) = mxfp4::quantize(&x, 1, 32, rule, ScaleSearch::Off);
        assert_eq!(scales, [hex(&w["e8m0"]) as u8], "{key} scale");
        let mut codes = vec![0u8; 32];
        codec::unpack_e2m1(&packed, &mut codes);
        assert_eq!(codes, nibbles(w["e2m1_codes"].as_str().unwrap()), "{key} codes");
        assert_eq!(
            packed,
            bytes(w["packed_bytes_lo_nibble_first"].as_str().unwrap()),
            "{key} packed"
        );
    }
}

fn ascend_vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/formats/ascend_vectors.json"
    );
    serde_json::from_slice(&std::fs::read(path).expect("Ascend vectors present")).expect("valid JSON")
}

fn f32_list(v: &Value) -> Vec<f32> {
    hex_list(v).into_iter().map(f32::from_bits).collect()
}

fn int_list(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

#[test]
fn int8_per_channel_matches_torch() {
    let v = ascend_vectors();
    let cases = v["int8_per_channel"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for (i, c) in cases.iter().enumerate() {
        let x = f32_list(&c["x_f32_bits"]);
        let want = int_list(&c["codes"]);
        assert_eq!((x.len(), want.len()), (48, 48), "case {i}");
        let mut q = vec![0i8; x.len()];
        let scale = codec::int8::quantize_row(&x, &mut q);
        assert_eq!(scale.to_bits(), hex(&c["scale_f32_bits"]), "case {i}: scale");
        let got: Vec<i64> = q.iter().map(|&c| c as i64).collect();
        assert_eq!(got, want, "case {i}: codes");
    }
}

#[test]
fn mxfp8_ocp_matches_torch() {
    let v = ascend_vectors();
    let m = &v["mxfp8_ocp"];
    let cols = m["cols"].as_u64().unwrap() as usize;
    let rows = m["rows"].as_array().unwrap();
    assert_eq!((cols, rows.len()), (80, 3));
    for (r, row) in rows.iter().enumerate() {
        let x = f32_list(&row["x_f32_bits"]);
        let want_codes: Vec<u8> = int_list(&row["codes"]).into_iter().map(|c| c as u8).collect();
        let want_scales: Vec<u8> = int_list(&row["scales_e8m0"])
            .into_iter()
            .map(|c| c as u8)
            .collect();
        assert_eq!(
            (x.len(), want_codes.len(), want_scales.len()),
            (cols, cols, 3),
            "row {r}"
        );
        let (mut codes, mut scales) = (vec![0u8; cols], vec![0u8; 3]);
        codec::mxfp8::quantize_rows(&x, cols, &mut codes, &mut scales);
        assert_eq!(scales, want_scales, "row {r}: scales");
        assert_eq!(codes, want_codes, "row {r}: codes");
    }
}

#[test]
fn int4_grouped_packing_and_scale_bias_match_torch() {
    let v = ascend_vectors();
    let cases = v["int4_grouped"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for (i, c) in cases.iter().enumerate() {
        let dim = |k: &str| c[k].as_u64().unwrap() as usize;
        let (rows, cols, group, chunks) = (dim("rows"), dim("cols"), dim("group"), dim("chunks"));
        let x = f32_list(&c["x_f32_bits"]);
        let want_codes = int_list(&c["codes"]);
        let want_scales = hex_list(&c["scale_f32_bits"]);
        let want_packed: Vec<u8> = int_list(&c["packed"]).into_iter().map(|b| b as u8).collect();
        assert_eq!(
            (x.len(), want_codes.len(), want_scales.len(), want_packed.len()),
            (rows * cols, rows * cols, rows * cols / group, rows * cols / 2),
            "case {i}"
        );
        let (mut q, mut scales) = (vec![0i8; x.len()], vec![0f32; x.len() / group]);
        codec::int4::quantize_rows(&x, cols, group, &mut q, &mut scales);
        let got_scales: Vec<u32> = scales.iter().map(|s| s.to_bits()).collect();
        assert_eq!(got_scales, want_scales, "case {i}: scales");
        let got: Vec<i64> = q.iter().map(|&c| c as i64).collect();
        assert_eq!(got, want_codes, "case {i}: codes");
        let packed = codec::int4::pack_row_pairs(&q, cols);
        assert_eq!(packed, want_packed, "case {i}: packed along the output dimension");
        if group == cols {
            let mut back = vec![0f32; x.len()];
            codec::int4::dequantize_rows(&want_packed, &scales, cols, 0, &mut back);
            for (j, (b, &q)) in back.iter().zip(&want_codes).enumerate() {
                assert_eq!(
                    *b,
                    q as f32 * scales[j / cols],
                    "case {i}: torch's bytes decode, element {j}"
                );
            }
            // torch sums q * scale in float64; v4 sums the integer codes and scales once: the two agree
            // to a rounding of the result (relative 2^-23 of Σ|q|·scale).
            let want_bias = c["scale_bias_f64"].as_array().unwrap();
            let bias = codec::int4::scale_bias(&q, &scales, cols, chunks);
            assert_eq!(
                (bias.len(), want_bias.len()),
                (rows * chunks, rows * chunks),
                "case {i}"
            );
            for (j, (b, w)) in bias.iter().zip(want_bias).enumerate() {
                let w = w.as_f64().unwrap();
                let (r, part) = (j / chunks, j % chunks);
                let span = cols / chunks;
                let mag: f64 = q[r * cols + part * span..][..span]
                    .iter()
                    .map(|&q| 8.0 * (q as f64).abs() * scales[r] as f64)
                    .sum();
                assert!(
                    (*b as f64 - w).abs() <= mag * f32::EPSILON as f64,
                    "case {i}: scale_bias {j}: {b} against {w}"
                );
            }
        } else {
            assert!(
                c["scale_bias_f64"].is_null(),
                "case {i}: scale_bias is per channel only"
            );
        }
    }
}
