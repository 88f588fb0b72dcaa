//! The analytic cache size equals what the model's cache holds, and V4-Flash's bytes per token.

#[path = "../../tests/support/tiny_a.rs"]
mod common;

use common::{fixture, SEQ};
use v4_checkpoint::read_config;
use v4_infer::{cache_footprint, scalars_per_token, Generator};

#[test]
fn analytic_footprint_equals_the_cache_at_every_position() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    let row = f.row(0);
    let (mut batch, _) = gen.prefill_batch(&[&row[..4]], None).unwrap();
    for t in 4..SEQ {
        assert_eq!(
            batch.cache_elements(),
            cache_footprint(&f.model.config, t).total(),
            "after {t} tokens"
        );
        gen.feed_batch(&mut batch, &[&row[t..t + 1]], None, false)
            .unwrap();
    }
    assert_eq!(
        batch.cache_elements(),
        cache_footprint(&f.model.config, SEQ).total()
    );
}

#[test]
fn v4_flash_grows_by_about_6_7_kib_per_token_in_bf16() {
    let dir = common::root().join("tests/fixtures/deepseek-v4-flash");
    let config = read_config(&dir).unwrap();
    // 21 CSA layers (m = 4): (512 + 128) / 4 = 160 scalars; 20 HCA layers (m = 128): 512 / 128 = 4.
    let csa = config
        .attention
        .iter()
        .filter(|k| matches!(k, v4_model::AttentionKind::Csa { .. }))
        .count();
    let hca = config
        .attention
        .iter()
        .filter(|k| matches!(k, v4_model::AttentionKind::Hca { .. }))
        .count();
    assert_eq!((csa, hca, config.num_layers()), (21, 20, 43));
    assert_eq!(scalars_per_token(&config), 21.0 * 160.0 + 20.0 * 4.0);
    // At 1M tokens the window (43 x 127 x 512) is negligible: ~3440 scalars/token, 6.7 KiB in bf16.
    let n = 1 << 20;
    let f = cache_footprint(&config, n);
    assert_eq!(f.window, 43 * 127 * 512);
    let per_token = f.total() as f64 / n as f64;
    assert!((per_token - 3440.0).abs() < 5.0, "{per_token}");
}
