//! Counting a V4 configuration: its parameters (total, active per token, MTP) and the FLOPs of a forward,
//! for model summaries, MFU and the benchmarks' bounds.

use crate::config::{AttentionKind, RoutingKind, V4Config};

impl V4Config {
    /// Parameter counts of the model (embedding and head included, MTP layers separate).
    pub fn param_counts(&self) -> ParamCounts {
        let d = self.hidden_size as u64;
        let c = self.hc_mult as u64;
        let v = self.vocab_size as u64;
        let e = self.n_routed_experts as u64;
        let k = self.experts_per_token as u64;
        let i = self.moe_intermediate_size as u64;
        let expert = 3 * i * d;
        let hc_site = (2 + c) * c * c * d + (2 + c) * c + 3;
        let hc_head = c * c * d + c + 1;

        let mut total = 0u64;
        let mut routed = 0u64;
        let layer = |kind: AttentionKind, routing: RoutingKind| -> (u64, u64) {
            let mut p = 2 * d + 2 * hc_site + self.attention_params(kind);
            p += e * d + if routing == RoutingKind::TopK { e } else { 0 };
            p += expert; // shared expert
            (p + e * expert, e * expert)
        };
        for (&kind, &routing) in self.attention.iter().zip(&self.routing) {
            let (p, r) = layer(kind, routing);
            total += p;
            routed += r;
        }
        total += 2 * v * d + d + hc_head;
        let active = total - routed + routed / e * k;
        let mtp = self
            .mtp_attention
            .iter()
            .map(|&kind| layer(kind, RoutingKind::TopK).0 + 2 * d * d + 3 * d + hc_head)
            .sum();
        ParamCounts { total, active, mtp }
    }

    fn attention_params(&self, kind: AttentionKind) -> u64 {
        let d = self.hidden_size as u64;
        let h = self.num_heads as u64;
        let hd = self.head_dim as u64;
        let q = self.q_lora_rank as u64;
        let g = self.o_groups as u64;
        let r = self.o_lora_rank as u64;
        let mut p = q * d + q + h * hd * q + hd * d + hd + g * r * (h * hd / g) + d * g * r + h;
        let compressor = |width: u64, rate: u64, overlap: bool| {
            let coff = if overlap { 2 } else { 1 };
            2 * coff * width * d + rate * coff * width + width
        };
        match kind {
            AttentionKind::Sliding => {}
            AttentionKind::Hca { rate } => p += compressor(hd, rate as u64, false),
            AttentionKind::Csa { rate } => {
                let hi = self.index_heads as u64;
                let di = self.index_head_dim as u64;
                p += compressor(hd, rate as u64, true);
                p += hi * di * q + hi * d + compressor(di, rate as u64, true);
            }
        }
        p
    }
}

/// Parameter counts, in numbers of scalars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    /// All parameters of the main model (embedding and head included, MTP excluded).
    pub total: u64,
    /// Parameters a token touches: everything but the routed experts it does not select.
    pub active: u64,
    /// Parameters of the multi-token-prediction layers (sharing embedding and head).
    pub mtp: u64,
}

impl V4Config {
    /// Multiply-add FLOPs (2 per MAC) of a full-sequence forward of `seq` tokens, batch 1: every linear
    /// (router, active experts, shared expert, mHC projections, head), attention scores and values over
    /// the keys each query sees (window, indexer picks or all complete HCA entries), and indexer scoring.
    pub fn forward_flops(&self, seq: usize) -> f64 {
        let p = self.param_counts();
        let d = self.hidden_size as f64;
        let embedding = (self.vocab_size as f64) * d;
        // Every active parameter but the embedding table is one MAC per token.
        let mut flops = 2.0 * (p.active as f64 - embedding) * seq as f64;
        let (h, hd) = (self.num_heads as f64, self.head_dim as f64);
        let w = self.sliding_window;
        for kind in &self.attention {
            for t in 0..seq {
                let window = (t + 1).min(w) as f64;
                let compressed = match kind {
                    AttentionKind::Sliding => 0.0,
                    AttentionKind::Hca { rate } => ((t + 1) / rate) as f64,
                    AttentionKind::Csa { rate } => {
                        let entries = (t + 1) / rate;
                        flops += 2.0 * (self.index_heads * self.index_head_dim * entries) as f64;
                        entries.min(self.index_topk) as f64
                    }
                };
                flops += 4.0 * h * hd * (window + compressed);
            }
        }
        flops
    }
}
