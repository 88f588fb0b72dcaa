//! The memory estimate made before a load, against the bytes the load then holds.

use burn_ndarray::{NdArray, NdArrayDevice};
use std::ops::Range;
use std::path::{Path, PathBuf};
use v4_model::{read_config, LoadPlan, Residency, V4Model};

fn fixture(layout: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/v4-tiny-a")
        .join(layout)
}

/// (stored, f32) bytes the model holds after loading main layers `layers` of `dir` with `residency`.
fn held(dir: &Path, residency: Residency, layers: Range<usize>) -> (u64, u64) {
    let config = read_config(dir).unwrap();
    let source = v4_checkpoint::open(dir).unwrap();
    let device = NdArrayDevice::Cpu;
    let plan = LoadPlan {
        residency,
        layers: Some(layers),
        ..LoadPlan::default()
    };
    let model = V4Model::<NdArray<f32>>::load_plan(&config, source.as_ref(), &device, plan).unwrap();
    (model.resident.packed as u64, model.resident.dense as u64)
}

#[test]
fn the_estimate_equals_the_bytes_a_load_holds() {
    for layout in ["native", "hf"] {
        let dir = fixture(layout);
        for (dequantize, layers) in [
            (false, None),
            (true, None),
            (false, Some(1..3)),
            (true, Some(2..4)),
        ] {
            let estimate = v4_checkpoint::estimate(&dir, dequantize, layers.clone()).unwrap();
            let residency = if dequantize {
                Residency::Dequantize
            } else {
                Residency::Packed(None)
            };
            let (packed, dense) = held(&dir, residency, layers.clone().unwrap_or(0..4));
            let case = format!("{layout}, dequantize {dequantize}, layers {layers:?}");
            assert_eq!((estimate.packed, estimate.dense), (packed, dense), "{case}");
        }
    }
    // The release layout keeps something packed, and a range holds less (else the comparisons above
    // say little).
    let whole = v4_checkpoint::estimate(&fixture("native"), false, None).unwrap();
    let range = v4_checkpoint::estimate(&fixture("native"), false, Some(1..3)).unwrap();
    assert!(whole.packed > 0);
    assert!(range.packed < whole.packed && range.dense < whole.dense);
}
