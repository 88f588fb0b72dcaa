//! `v4 info MODEL_DIR`

use crate::io::{read_config_file, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use v4_checkpoint::read_config;
use v4_model::{AttentionKind, RoutingKind};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json + safetensors), or a config file alone.
    model: PathBuf,
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000_000 => format!("{:.3}T", n as f64 / 1e12),
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n => format!("{n}"),
    }
}

pub fn run(args: Args) -> Result<()> {
    let (config, dir) = if args.model.is_file() {
        (read_config_file(&args.model)?, None)
    } else {
        (read_config(&args.model)?, Some(&args.model))
    };
    let c = &config;
    println!("DeepSeek-V4 model: {}", args.model.display());
    println!(
        "  hidden {} | layers {} | heads {} x {} (rope {}) | q_lora {} | o_groups {} x {}",
        c.hidden_size,
        c.num_layers(),
        c.num_heads,
        c.head_dim,
        c.rope_head_dim,
        c.q_lora_rank,
        c.o_groups,
        c.o_lora_rank
    );
    println!(
        "  experts {} (top-{}, inter {}, route scale {}, swiglu limit {}) + 1 shared | score {:?}",
        c.n_routed_experts,
        c.experts_per_token,
        c.moe_intermediate_size,
        c.route_scale,
        c.swiglu_limit,
        c.score_func
    );
    println!(
        "  window {} | indexer {} x {} top-{} | mHC x{} ({} Sinkhorn iters) | vocab {} | MTP layers {}",
        c.sliding_window,
        c.index_heads,
        c.index_head_dim,
        c.index_topk,
        c.hc_mult,
        c.hc_sinkhorn_iters,
        c.vocab_size,
        c.num_mtp_layers()
    );
    match c.yarn {
        Some(y) => println!(
            "  rope theta {} (sliding) / {} (compressed, YaRN x{} over {} positions)",
            c.rope_theta, c.compress_rope_theta, y.factor, y.original_max_position
        ),
        None => println!(
            "  rope theta {} (sliding) / {} (compressed)",
            c.rope_theta, c.compress_rope_theta
        ),
    }
    println!("layer schedule (attention / routing):");
    let schedule: Vec<String> = c
        .attention
        .iter()
        .zip(&c.routing)
        .map(|(a, r)| {
            let a = match a {
                AttentionKind::Sliding => "SWA".to_string(),
                AttentionKind::Csa { rate } => format!("CSA{rate}"),
                AttentionKind::Hca { rate } => format!("HCA{rate}"),
            };
            let r = if *r == RoutingKind::Hash { "hash" } else { "topk" };
            format!("{a}/{r}")
        })
        .collect();
    for (i, row) in schedule.chunks(8).enumerate() {
        println!("  {:>3}: {}", i * 8, row.join("  "));
    }
    let p = c.param_counts();
    println!(
        "parameters: {} total, {} active per token{}",
        human(p.total),
        human(p.active),
        if p.mtp > 0 {
            format!(" (+{} in MTP layers)", human(p.mtp))
        } else {
            String::new()
        }
    );
    if let Some(dir) = dir.filter(|d| !has_weights(d)) {
        println!(
            "weights: none ({} holds a config and no .safetensors files)",
            dir.display()
        );
    } else if let Some(dir) = dir {
        let checkpoint = v4_convert::Checkpoint::open(dir)?;
        let mut by_dtype: BTreeMap<String, (usize, u64)> = BTreeMap::new();
        let names = checkpoint.hf_tensor_names();
        for name in &names {
            if let (Some(storage), Some(shape)) = (checkpoint.hf_storage(name), checkpoint.hf_shape(name)) {
                let entry = by_dtype.entry(storage).or_default();
                entry.0 += 1;
                entry.1 += shape.iter().product::<usize>() as u64;
            }
        }
        println!("tensors: {} in {}", names.len(), dir.display());
        for (dtype, (count, elements)) in by_dtype {
            println!("  {dtype:>24}: {count:>6} tensors, {} elements", human(elements));
        }
    }
    Ok(())
}

/// Whether `dir` holds any `.safetensors` file (a config alone describes a model without weights).
fn has_weights(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
    })
}
