//! The memory estimate made before a load, against the bytes the load then holds.

use burn_ndarray::{NdArray, NdArrayDevice};
use std::ops::Range;
use std::path::{Path, PathBuf};
use v4_checkpoint::read_config;
use v4_model::{ExpertShard, LoadPlan, Residency, V4Model};

fn fixture(layout: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/v4-tiny-a")
        .join(layout)
}

/// (stored, f32) bytes the model holds after loading `dir` as `plan` says.
fn held(dir: &Path, plan: LoadPlan) -> (u64, u64) {
    let config = read_config(dir).unwrap();
    let source = v4_checkpoint::open(dir).unwrap();
    let device = NdArrayDevice::Cpu;
    let model = V4Model::<NdArray<f32>>::load_plan(&config, source.as_ref(), &device, plan).unwrap();
    (model.resident.packed as u64, model.resident.dense as u64)
}

fn plan(dequantize: bool, layers: Option<Range<usize>>, experts: ExpertShard) -> LoadPlan {
    let residency = match dequantize {
        true => Residency::Dequantize,
        false => Residency::Packed(None),
    };
    LoadPlan {
        residency,
        layers,
        experts,
    }
}

#[test]
fn the_estimate_equals_the_bytes_a_load_holds() {
    let whole = ExpertShard::default();
    let half = ExpertShard { rank: 1, ranks: 2 };
    for layout in ["native", "hf"] {
        let dir = fixture(layout);
        for (dequantize, layers, experts) in [
            (false, None, whole),
            (true, None, whole),
            (false, Some(1..3), whole),
            (true, Some(2..4), whole),
            (false, None, half),
            (true, Some(1..3), half),
        ] {
            let plan = plan(dequantize, layers.clone(), experts);
            let estimate = v4_checkpoint::estimate(&dir, &plan).unwrap();
            let (packed, dense) = held(&dir, plan);
            let case = format!("{layout}, dequantize {dequantize}, layers {layers:?}, experts {experts:?}");
            assert_eq!((estimate.packed, estimate.dense), (packed, dense), "{case}");
        }
    }
    // The release layout keeps something packed, and a range or a share of the experts holds less (else
    // the comparisons above say little).
    let estimate =
        |layers, experts| v4_checkpoint::estimate(&fixture("native"), &plan(false, layers, experts)).unwrap();
    let all = estimate(None, whole);
    let range = estimate(Some(1..3), whole);
    let shard = estimate(None, half);
    assert!(all.packed > 0);
    assert!(range.packed < all.packed && range.dense < all.dense);
    assert!(shard.packed < all.packed);
}
