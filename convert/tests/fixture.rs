//! Conversions of the v4-tiny-a fixture (same weights in HF f32 and in DeepSeek's release layout).

mod common;

use common::*;
use std::collections::{BTreeMap, HashMap};
use v4_convert::codec::{self, fp8, mxfp4, nvfp4, ScaleSearch};
use v4_convert::layout::{self, DeepSeekSource, Layout};
use v4_convert::{convert, Calibration, Checkpoint, ConvertOptions, ConvertReport, Target};

fn opts(
    input: std::path::PathBuf,
    output: std::path::PathBuf,
    target: Target,
    layout: Layout,
) -> ConvertOptions {
    let mut o = ConvertOptions::new(input, output, target);
    o.layout = layout;
    o.progress = false;
    o
}

fn run(o: &ConvertOptions) -> ConvertReport {
    let r = convert(o).unwrap_or_else(|e| panic!("conversion failed: {e}"));
    assert!(r.complete);
    r
}

/// Asserts two tensor maps are identical: names, dtypes, shapes, bytes.
fn assert_same_tensors(
    got: &BTreeMap<String, (String, Vec<usize>, Vec<u8>)>,
    want: &BTreeMap<String, (String, Vec<usize>, Vec<u8>)>,
) {
    let gk: Vec<_> = got.keys().collect();
    let wk: Vec<_> = want.keys().collect();
    assert_eq!(gk, wk, "tensor names");
    for (name, (wd, ws, wb)) in want {
        let (gd, gs, gb) = &got[name];
        assert_eq!((gd, gs), (wd, ws), "{name}: dtype/shape");
        if let Some(i) = gb.iter().zip(wb).position(|(a, b)| a != b) {
            panic!(
                "{name}: first differing byte {i}: {:#04x} vs {:#04x}",
                gb[i], wb[i]
            );
        }
        assert_eq!(gb.len(), wb.len(), "{name}: length");
    }
}

// Independent decoders, written from the format definitions (not the crate's codec).
fn e4m3(c: u8) -> f32 {
    let s = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (((c >> 3) & 15) as i32, (c & 7) as f32);
    if e == 0 {
        s * m / 8.0 * 2f32.powi(-6)
    } else {
        s * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

fn e8m0(b: u8) -> f32 {
    2f64.powi(b as i32 - 127) as f32
}

const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Dequantises a native tensor from raw bytes: FP8 * E8M0 (128x128), FP4 * 2^(e-127) (per 32),
/// BF16 / F32 widened.
fn native_f32(raw: &BTreeMap<String, (String, Vec<usize>, Vec<u8>)>, name: &str) -> Vec<f32> {
    let (dtype, shape, b) = &raw[name];
    match dtype.as_str() {
        "F32" => f32s(b),
        "BF16" => b
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        "F8_E4M3" => {
            let (_, sshape, s) = &raw[&name.replace(".weight", ".scale")];
            let cols = shape[1];
            b.iter()
                .enumerate()
                .map(|(i, &c)| e4m3(c) * e8m0(s[(i / cols / 128) * sshape[1] + (i % cols) / 128]))
                .collect()
        }
        "I8" => {
            let (_, sshape, s) = &raw[&name.replace(".weight", ".scale")];
            let cols = 2 * shape[1];
            (0..shape[0] * cols)
                .map(|i| {
                    let nib = (b[i / 2] >> (4 * (i % 2))) & 15;
                    FP4[nib as usize] * e8m0(s[(i / cols) * sshape[1] + (i % cols) / 32])
                })
                .collect()
        }
        d => panic!("{name}: unexpected dtype {d}"),
    }
}

/// The acceptance test: HF f32 -> DeepSeek layout at fp4-mx (RCEIL, no calibration) reproduces
/// `native/model.safetensors` byte for byte, and `native/config.json`.
#[test]
fn hf_to_deepseek_fp4mx_reproduces_native_byte_for_byte() {
    let s = Scratch::new("hf2native");
    let r = run(&opts(
        fixture("hf"),
        s.join("out"),
        Target::Fp4Mx,
        Layout::DeepSeek,
    ));
    assert_same_tensors(&raw_tensors(&s.join("out")), &raw_tensors(&fixture("native")));
    // An independent parser agrees with ours on the written file.
    assert_same_tensors(
        &raw_tensors_safetensors_crate(&s.join("out/model.safetensors")),
        &raw_tensors(&s.join("out")),
    );
    let cfg = |p: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    assert_eq!(cfg(s.join("out/config.json")), cfg(fixture("native/config.json")));
    assert_eq!(
        ls(&s.join("out")),
        ["config.json", "model.safetensors", "model.safetensors.index.json"]
    );
    // One report row per output weight; experts quantised (not copied) with a plausible error.
    let native = raw_tensors(&fixture("native"));
    assert_eq!(
        r.tensors.len(),
        native.keys().filter(|n| !n.ends_with(".scale")).count()
    );
    for t in r.tensors.iter().filter(|t| t.name.contains(".experts.")) {
        assert_eq!(
            (t.scheme.as_str(), t.copied),
            ("mxfp4-rceil", false),
            "{}",
            t.name
        );
        let st = t.stats.as_ref().expect("stats");
        assert!(
            st.rel_l2 > 0.01 && st.rel_l2 < 0.2,
            "{}: rel L2 {}",
            t.name,
            st.rel_l2
        );
    }
    let back: ConvertReport = serde_json::from_str(&r.to_json()).expect("report JSON parses");
    assert_eq!(
        (back.tensors.len(), &back.target, back.complete),
        (r.tensors.len(), &r.target, true)
    );
    for (a, b) in back.tensors.iter().zip(&r.tensors) {
        assert_eq!(
            (&a.name, &a.shape, &a.input, &a.output, &a.scheme),
            (&b.name, &b.shape, &b.input, &b.output, &b.scheme)
        );
        let (x, y) = (a.stats.as_ref().unwrap().rel_l2, b.stats.as_ref().unwrap().rel_l2);
        assert!((x - y).abs() <= 1e-12 * y.max(1.0), "{}: {x} vs {y}", a.name);
    }
    let summary = r.summary();
    println!("{summary}");
    assert!(
        summary.contains("  96 x F32 -> I8(E2M1x2)+F8_E8M0/32 [mxfp4-rceil]"),
        "{summary}"
    );
    assert!(
        summary.contains("  34 x F32 -> F8_E4M3+F8_E8M0/128x128 [fp8-e8m0-128x128]"),
        "{summary}"
    );
}

/// Native -> HF f32 gives exactly the dequantised values (decoded here from the raw bytes with
/// the format definitions), under exactly the HF fixture's names and shapes; `Checkpoint` (the
/// loader API) reads the same values.
#[test]
fn native_to_hf_f32_reproduces_dequantized_values() {
    let s = Scratch::new("native2hf");
    run(&opts(fixture("native"), s.join("out"), Target::F32, Layout::Hf));
    let got = raw_tensors(&s.join("out"));
    let hf = raw_tensors(&fixture("hf"));
    let native = raw_tensors(&fixture("native"));
    let ck = Checkpoint::open(&fixture("native")).expect("open native");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        hf.keys().collect::<Vec<_>>(),
        "same names as the HF fixture"
    );
    assert_eq!(ck.hf_tensor_names().len(), hf.len());
    for (name, (dtype, shape, bytes)) in &got {
        assert_eq!(shape, &hf[name].1, "{name}: shape");
        assert_eq!(ck.hf_shape(name).as_ref(), Some(shape), "{name}: hf_shape");
        if dtype == "I64" {
            assert_eq!(bytes, &hf[name].2, "{name}: tid2eid unchanged");
            let ints = ck.read_hf_i64(name).unwrap();
            assert_eq!(
                ints.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
                *bytes
            );
            continue;
        }
        assert_eq!(dtype, "F32", "{name}");
        let want: Vec<f32> = match layout::from_hf(name).expect("a V4 name") {
            DeepSeekSource::Tensor(ds) => native_f32(&native, &ds),
            DeepSeekSource::FusedExperts { prefix, kind } => {
                let members: Vec<String> = (0..shape[0])
                    .flat_map(|e| kind.parts().iter().map(move |&p| (e, p)))
                    .map(|(e, p)| layout::expert_name(&prefix, e, p))
                    .collect();
                members.iter().flat_map(|m| native_f32(&native, m)).collect()
            }
        };
        let got_v = f32s(bytes);
        assert_eq!(got_v.len(), want.len(), "{name}");
        for (i, (a, b)) in got_v.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: {a} vs {b}");
        }
        assert_eq!(
            ck.read_hf_f32(name).unwrap(),
            got_v,
            "{name}: Checkpoint::read_hf_f32"
        );
        // And the dequantised weights are close to the original f32 ones (quantisation error only).
        let orig = f32s(&hf[name].2);
        let (num, den) = orig.iter().zip(&got_v).fold((0f64, 0f64), |(n, d), (o, q)| {
            (n + ((o - q) as f64).powi(2), d + (*o as f64).powi(2))
        });
        assert!(
            (num / den.max(1e-30)).sqrt() < 0.15,
            "{name}: rel error {}",
            (num / den).sqrt()
        );
    }
}

/// Re-encoding a checkpoint in its own layout and precision copies it: native -> DeepSeek fp4-mx
/// and HF f32 -> HF f32 are identities.
#[test]
fn same_layout_same_precision_is_identity() {
    let s = Scratch::new("identity");
    let r = run(&opts(
        fixture("native"),
        s.join("a"),
        Target::Fp4Mx,
        Layout::DeepSeek,
    ));
    assert_same_tensors(&raw_tensors(&s.join("a")), &raw_tensors(&fixture("native")));
    assert!(r
        .tensors
        .iter()
        .filter(|t| t.input.contains("E8M0"))
        .all(|t| t.copied));
    run(&opts(fixture("hf"), s.join("b"), Target::F32, Layout::Hf));
    assert_same_tensors(&raw_tensors(&s.join("b")), &raw_tensors(&fixture("hf")));
}

/// Quantised HF layout (fused experts with `_scale` / `_scale_inv` / `_scale_2` tensors) reads
/// back to the same values as the DeepSeek layout it was made from.
#[test]
fn quantised_hf_layout_round_trips_through_the_reader() {
    let s = Scratch::new("hfquant");
    let native = Checkpoint::open(&fixture("native")).unwrap();
    for (i, target) in [Target::Fp4Mx, Target::Fp8, Target::Fp4Nv]
        .into_iter()
        .enumerate()
    {
        let hf_out = s.join(&format!("hf{i}"));
        let ds_out = s.join(&format!("ds{i}"));
        run(&opts(fixture("hf"), hf_out.clone(), target, Layout::Hf));
        run(&opts(fixture("hf"), ds_out.clone(), target, Layout::DeepSeek));
        let a = Checkpoint::open(&hf_out).unwrap();
        let b = Checkpoint::open(&ds_out).unwrap();
        assert_eq!(a.layout(), Layout::Hf);
        assert_eq!(a.hf_tensor_names(), native.hf_tensor_names());
        for name in native.hf_tensor_names() {
            if name.ends_with("tid2eid") {
                assert_eq!(a.read_hf_i64(&name).unwrap(), native.read_hf_i64(&name).unwrap());
                continue;
            }
            let va = a.read_hf_f32(&name).unwrap();
            assert_eq!(
                va,
                b.read_hf_f32(&name).unwrap(),
                "{target:?} {name}: HF vs DeepSeek layout"
            );
            if target == Target::Fp4Mx {
                assert_eq!(
                    va,
                    native.read_hf_f32(&name).unwrap(),
                    "{name}: HF fp4-mx vs release"
                );
            }
        }
    }
}

/// fp8 and fp4-nv keep the release's plan for non-expert tensors (bytes equal to native/) and
/// encode experts as the codec does (FP8 128x128 E8M0; NVFP4 U8 + E4M3/16 + F32).
#[test]
fn fp8_and_nvfp4_targets_follow_the_plan() {
    let s = Scratch::new("fp8nv");
    let hf = Checkpoint::open(&fixture("hf")).unwrap();
    let native = raw_tensors(&fixture("native"));
    for target in [Target::Fp8, Target::Fp4Nv] {
        let out = s.join(target.name());
        run(&opts(fixture("hf"), out.clone(), target, Layout::DeepSeek));
        let got = raw_tensors(&out);
        for (name, t) in &native {
            if !name.contains(".experts.") {
                assert_eq!(&got[name], t, "{target:?}: {name} as in the release");
            }
        }
        for name in hf.tensor_names().iter().filter(|n| n.contains(".experts.")) {
            let shape = hf.shape(name).unwrap();
            let (r, c) = (shape[0], shape[1]);
            let x = hf.read_f32(name).unwrap();
            if target == Target::Fp8 {
                let (q, _) = fp8::quantize(&x, r, c, 128);
                assert_eq!(
                    got[name],
                    ("F8_E4M3".into(), vec![r, c], q.codes.clone()),
                    "{name}"
                );
                let sname = name.replace(".weight", ".scale");
                assert_eq!(
                    got[&sname],
                    ("F8_E8M0".into(), vec![r.div_ceil(128), c.div_ceil(128)], q.scales),
                    "{sname}"
                );
            } else {
                let (q, _) = nvfp4::quantize(&x, r, c, ScaleSearch::Off);
                assert_eq!(got[name], ("U8".into(), vec![r, c / 2], q.packed), "{name}");
                assert_eq!(
                    got[&format!("{name}_scale")],
                    ("F8_E4M3".into(), vec![r, c / 16], q.scales)
                );
                let s2 = &got[&format!("{name}_scale_2")];
                assert_eq!((s2.1.len(), f32s(&s2.2)), (0, vec![q.scale2]), "{name}_scale_2");
            }
        }
        let qc =
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(out.join("config.json")).unwrap())
                .unwrap();
        let want = if target == Target::Fp8 {
            serde_json::Value::Null
        } else {
            "nvfp4".into()
        };
        assert_eq!(qc["quantization_config"]["expert_dtype"], want);
        assert_eq!(qc["quantization_config"]["quant_method"], "fp8");
    }
}

/// --to bf16 dequantises everything float to BF16 with `bf16_rne(f32(fp8) * f32(scale))` (the
/// half crate's RNE serves as the independent reference), and keeps tid2eid I64.
#[test]
fn native_to_bf16_is_rne_of_the_dequantised_values() {
    let s = Scratch::new("bf16");
    run(&opts(
        fixture("native"),
        s.join("out"),
        Target::Bf16,
        Layout::DeepSeek,
    ));
    let got = raw_tensors(&s.join("out"));
    let native = raw_tensors(&fixture("native"));
    let logical: Vec<&String> = native.keys().filter(|n| !n.ends_with(".scale")).collect();
    assert_eq!(got.keys().collect::<Vec<_>>(), logical);
    for name in logical {
        let (dtype, _, bytes) = &got[name];
        if name.ends_with("tid2eid") {
            assert_eq!((dtype.as_str(), bytes), ("I64", &native[name].2));
            continue;
        }
        assert_eq!(dtype, "BF16", "{name}");
        let want: Vec<u8> = native_f32(&native, name)
            .into_iter()
            .flat_map(|v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        assert_eq!(bytes, &want, "{name}");
    }
}

/// Weight-only scale search lowers every expert tensor's error against round to nearest; with
/// channel importance it lowers the importance-weighted error.
#[test]
fn calibration_lowers_error_against_rtn() {
    let s = Scratch::new("calib");
    for target in [Target::Fp4Mx, Target::Fp4Nv] {
        let mut o = opts(fixture("hf"), s.join(target.name()), target, Layout::DeepSeek);
        o.calibration = Calibration::WeightSearch {
            channel_importance: None,
        };
        let r = run(&o);
        println!("{}", r.summary());
        let experts: Vec<_> = r
            .tensors
            .iter()
            .filter(|t| t.name.contains(".experts.") && !t.name.ends_with("scale"))
            .collect();
        assert_eq!(experts.len(), 96);
        let (mut sum, mut sum_rtn) = (0.0, 0.0);
        for t in &experts {
            let st = t.stats.as_ref().unwrap();
            let rtn = st.rel_l2_rtn.expect("RTN error reported");
            assert!(st.rel_l2 < rtn, "{}: {} !< {}", t.name, st.rel_l2, rtn);
            sum += st.rel_l2;
            sum_rtn += rtn;
        }
        println!(
            "{target:?}: mean rel L2 over {} expert tensors: RTN {:.5}, weight search {:.5} ({:+.1}%)",
            experts.len(),
            sum_rtn / 96.0,
            sum / 96.0,
            100.0 * (sum / sum_rtn - 1.0)
        );
        // Check the reported error against the written bytes for one tensor.
        let name = "layers.2.ffn.experts.3.w2.weight";
        let x = Checkpoint::open(&fixture("hf")).unwrap().read_f32(name).unwrap();
        let q = Checkpoint::open(&s.join(target.name()))
            .unwrap()
            .read_f32(name)
            .unwrap();
        let (n, d) = x.iter().zip(&q).fold((0f64, 0f64), |(n, d), (a, b)| {
            (n + ((a - b) as f64).powi(2), d + (*a as f64).powi(2))
        });
        let reported = experts
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .stats
            .as_ref()
            .unwrap()
            .rel_l2;
        assert!(
            ((n / d).sqrt() - reported).abs() < 1e-6 * reported.max(1.0),
            "{reported} vs {}",
            (n / d).sqrt()
        );
    }

    // Importance: channel j of layer 1's fused gate_up input weighted (j % 7 + 1)^2.
    let key = "model.layers.1.mlp.experts.gate_up_proj";
    let w: Vec<f32> = (0..256).map(|j| ((j % 7 + 1) * (j % 7 + 1)) as f32).collect();
    let mut o = opts(fixture("hf"), s.join("imp"), Target::Fp4Mx, Layout::Hf);
    o.calibration = Calibration::WeightSearch {
        channel_importance: Some(HashMap::from([(key.to_string(), w.clone())])),
    };
    run(&o);
    let x = Checkpoint::open(&fixture("hf"))
        .unwrap()
        .read_hf_f32(key)
        .unwrap();
    let cal = Checkpoint::open(&s.join("imp"))
        .unwrap()
        .read_hf_f32(key)
        .unwrap();
    let rtn = Checkpoint::open(&fixture("native"))
        .unwrap()
        .read_hf_f32(key)
        .unwrap();
    let werr = |q: &[f32]| {
        x.iter()
            .zip(q)
            .enumerate()
            .map(|(i, (a, b))| w[i % 256] as f64 * ((a - b) as f64).powi(2))
            .sum::<f64>()
    };
    // The same search without importances (the FP4-MX run above): it must lose on the weighted error,
    // or the importances were ignored.
    let unweighted = Checkpoint::open(&s.join(Target::Fp4Mx.name()))
        .unwrap()
        .read_hf_f32(key)
        .unwrap();
    assert_eq!(
        (x.len(), cal.len(), rtn.len()),
        (unweighted.len(), x.len(), x.len())
    );
    let (e_cal, e_rtn, e_plain) = (werr(&cal), werr(&rtn), werr(&unweighted));
    println!(
        "importance-weighted squared error of {key}: RTN {e_rtn:.4e}, unweighted search {e_plain:.4e}, \
         weighted search {e_cal:.4e}"
    );
    assert!(
        e_cal < e_plain && e_plain < e_rtn,
        "{e_cal} !< {e_plain} !< {e_rtn}"
    );
}

/// The lossless directions: V4 FP4 experts re-encode exactly as FP8 with 32x32 tiles; FP8
/// weights survive FP8 -> BF16 -> FP8 on DeepSeek's grid (codes and scales unchanged).
#[test]
fn lossless_round_trips_on_release_weights() {
    let raw = raw_tensors(&fixture("native"));
    let mut n_fp4 = 0;
    let mut n_fp8 = 0;
    for (name, (dtype, shape, bytes)) in &raw {
        let scale = name.replace(".weight", ".scale");
        match dtype.as_str() {
            "I8" => {
                let (r, c) = (shape[0], 2 * shape[1]);
                let s = &raw[&scale].2;
                let q = fp8::from_mxfp4_blocks32(bytes, s, r, c).expect("exact in FP8");
                let a = fp8::dequantize(&q.codes, fp8::Fp8Scales::E8m0(&q.scales), r, c, 32);
                let b = mxfp4::dequantize(bytes, s, r, c, 32);
                assert_eq!(a, b, "{name}");
                assert_eq!(a, native_f32(&raw, name), "{name} vs independent decode");
                n_fp4 += 1;
            }
            "F8_E4M3" => {
                let (r, c) = (shape[0], shape[1]);
                let s = &raw[&scale].2;
                let x = fp8::dequantize(bytes, fp8::Fp8Scales::E8m0(s), r, c, 128);
                let via_bf16: Vec<f32> = x
                    .iter()
                    .map(|&v| codec::bf16_to_f32(codec::f32_to_bf16(v)))
                    .collect();
                assert_eq!(via_bf16, x, "{name}: BF16 holds FP8 x E8M0 exactly");
                assert_eq!(
                    &fp8::quantize_with_scales(&via_bf16, r, c, 128, s),
                    bytes,
                    "{name}: codes"
                );
                let (q, st) = fp8::quantize(&via_bf16, r, c, 128);
                assert_eq!(&q.scales, s, "{name}: re-derived scales");
                assert_eq!(&q.codes, bytes, "{name}: re-derived codes");
                assert_eq!(st.sse, 0.0);
                n_fp8 += 1;
            }
            _ => {}
        }
    }
    assert_eq!((n_fp4, n_fp8), (96, 34));
}

/// Sharded output (with an index) is valid input, and converting it back to one shard gives the
/// same tensors; other files (tokenizer.json) are copied.
#[test]
fn sharded_output_and_extra_files() {
    let s = Scratch::new("sharded");
    let input = s.join("in");
    std::fs::create_dir(&input).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("hf").join(f), input.join(f)).unwrap();
    }
    std::fs::write(input.join("tokenizer.json"), b"{\"fake\": true}").unwrap();
    let mut o = opts(input, s.join("sharded"), Target::Fp4Mx, Layout::DeepSeek);
    o.shard_size = 1_000_000;
    o.threads = Some(2);
    let r = run(&o);
    assert!(r.shards_total >= 5, "{} shards", r.shards_total);
    let files = ls(&s.join("sharded"));
    assert!(files.contains(&format!("model-00001-of-{:05}.safetensors", r.shards_total)));
    assert_eq!(
        std::fs::read(s.join("sharded/tokenizer.json")).unwrap(),
        b"{\"fake\": true}"
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.join("sharded/model.safetensors.index.json")).unwrap())
            .unwrap();
    let native = raw_tensors(&fixture("native"));
    assert_eq!(index["weight_map"].as_object().unwrap().len(), native.len());
    let total: usize = native.values().map(|t| t.2.len()).sum();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_same_tensors(&raw_tensors(&s.join("sharded")), &native);
    run(&opts(
        s.join("sharded"),
        s.join("single"),
        Target::Fp4Mx,
        Layout::DeepSeek,
    ));
    assert_same_tensors(&raw_tensors(&s.join("single")), &native);
    assert!(ls(&s.join("single")).contains(&"tokenizer.json".to_string()));
}
