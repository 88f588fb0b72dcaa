//! The model's parameters under their HF checkpoint names, and the layout change between the model's
//! (transposed) storage and the checkpoint's.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};
use std::collections::HashMap;
use v4_model::compressor::Compressor;
use v4_model::config::RoutingKind;
use v4_model::hyper_connection::HyperConnection;
use v4_model::norm::{Linear, RmsNorm};
use v4_model::V4Model;

/// How a stored parameter maps to its checkpoint tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Same shape and order.
    Plain,
    /// Stored `[a, b]`, checkpoint `[b, a]`.
    Transposed,
    /// Stored `[n, a, b]`, checkpoint `[n, b, a]` (`flat`: written as `[n * b, a]`).
    BlocksTransposed { flat: bool },
}

/// One trainable parameter.
#[derive(Debug, Clone)]
pub struct NamedParam {
    pub name: String,
    pub id: ParamId,
    pub layout: Layout,
}

struct Walk(Vec<NamedParam>);

impl Walk {
    fn add<B: Backend, const D: usize>(&mut self, name: String, p: &Param<Tensor<B, D>>, layout: Layout) {
        self.0.push(NamedParam {
            name,
            id: p.id,
            layout,
        });
    }
    fn linear<B: Backend>(&mut self, name: String, l: &Linear<B>) {
        self.add(name, &l.weight_t, Layout::Transposed);
    }
    fn norm<B: Backend>(&mut self, name: String, n: &RmsNorm<B>) {
        self.add(name, &n.weight, Layout::Plain);
    }
    fn hc<B: Backend>(&mut self, p: &str, h: &HyperConnection<B>) {
        self.add(format!("{p}.fn"), &h.fn_t, Layout::Transposed);
        self.add(format!("{p}.base"), &h.base, Layout::Plain);
        self.add(format!("{p}.scale"), &h.scale, Layout::Plain);
    }
    fn compressor<B: Backend>(&mut self, p: &str, c: &Compressor<B>) {
        self.linear(format!("{p}.kv_proj.weight"), &c.wkv);
        self.linear(format!("{p}.gate_proj.weight"), &c.wgate);
        self.add(format!("{p}.position_bias"), &c.ape, Layout::Plain);
        self.norm(format!("{p}.kv_norm.weight"), &c.norm);
    }
}

/// Every trainable parameter of `model` with its HF name (the inverse of `V4Model::build`).
pub fn named_params<B: Backend>(model: &V4Model<B>) -> Vec<NamedParam> {
    let mut w = Walk(Vec::new());
    w.add("model.embed_tokens.weight".into(), &model.embed, Layout::Plain);
    for (i, block) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        w.hc(&format!("{p}.attn_hc"), &block.attn_hc);
        w.norm(format!("{p}.input_layernorm.weight"), &block.attn_norm);
        let a = &block.attn;
        let ap = format!("{p}.self_attn");
        w.linear(format!("{ap}.q_a_proj.weight"), &a.wq_a);
        w.norm(format!("{ap}.q_a_norm.weight"), &a.q_norm);
        w.linear(format!("{ap}.q_b_proj.weight"), &a.wq_b);
        w.linear(format!("{ap}.kv_proj.weight"), &a.wkv);
        w.norm(format!("{ap}.kv_norm.weight"), &a.kv_norm);
        w.add(
            format!("{ap}.o_a_proj.weight"),
            &a.wo_a,
            Layout::BlocksTransposed { flat: true },
        );
        w.linear(format!("{ap}.o_b_proj.weight"), &a.wo_b);
        w.add(format!("{ap}.sinks"), &a.sinks, Layout::Plain);
        if let Some(c) = &a.compressor {
            w.compressor(&format!("{ap}.compressor"), c);
        }
        if let Some(ix) = &a.indexer {
            let ip = format!("{ap}.compressor.indexer");
            w.linear(format!("{ip}.q_b_proj.weight"), &ix.wq_b);
            w.linear(format!("{ip}.scorer.weights_proj.weight"), &ix.weights_proj);
            w.compressor(&ip, &ix.compressor);
        }
        w.hc(&format!("{p}.ffn_hc"), &block.ffn_hc);
        w.norm(format!("{p}.post_attention_layernorm.weight"), &block.ffn_norm);
        let m = &block.ffn;
        let mp = format!("{p}.mlp");
        w.linear(format!("{mp}.gate.weight"), &m.gate);
        let blocks = Layout::BlocksTransposed { flat: false };
        w.add(format!("{mp}.experts.gate_up_proj"), &m.experts.w13_t, blocks);
        w.add(format!("{mp}.experts.down_proj"), &m.experts.w2_t, blocks);
        w.linear(format!("{mp}.shared_experts.gate_proj.weight"), &m.shared.w1);
        w.linear(format!("{mp}.shared_experts.down_proj.weight"), &m.shared.w2);
        w.linear(format!("{mp}.shared_experts.up_proj.weight"), &m.shared.w3);
    }
    w.add(
        "model.hc_head.hc_fn".into(),
        &model.hc_head.fn_t,
        Layout::Transposed,
    );
    w.add("model.hc_head.hc_base".into(), &model.hc_head.base, Layout::Plain);
    w.add(
        "model.hc_head.hc_scale".into(),
        &model.hc_head.scale,
        Layout::Plain,
    );
    w.norm("model.norm.weight".into(), &model.norm);
    w.linear("lm_head.weight".into(), &model.head);
    w.0
}

/// A host copy of a tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostF32 {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

struct Collect(HashMap<ParamId, HostF32>);

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 parameter");
        self.0.insert(param.id, HostF32 { shape, data });
    }
}

/// Every float parameter of `module`, on the host, by id.
pub fn host_params<B: Backend, M: Module<B>>(module: &M) -> HashMap<ParamId, HostF32> {
    let mut c = Collect(HashMap::new());
    module.visit(&mut c);
    c.0
}

/// A stored parameter converted to its checkpoint shape and element order.
pub fn to_checkpoint(t: &HostF32, layout: Layout) -> HostF32 {
    match layout {
        Layout::Plain => t.clone(),
        Layout::Transposed => {
            let (a, b) = (t.shape[0], t.shape[1]);
            HostF32 {
                shape: vec![b, a],
                data: v4_model::model::transpose_blocks(&t.data, 1, a, b),
            }
        }
        Layout::BlocksTransposed { flat } => {
            let (n, a, b) = (t.shape[0], t.shape[1], t.shape[2]);
            HostF32 {
                shape: if flat { vec![n * b, a] } else { vec![n, b, a] },
                data: v4_model::model::transpose_blocks(&t.data, n, a, b),
            }
        }
    }
}

/// An integer checkpoint tensor: name, shape, values.
pub type HostI64 = (String, Vec<usize>, Vec<i64>);

/// The non-trainable routing state of the model as checkpoint tensors: `e_score_correction_bias` of
/// top-k layers (f32) and `tid2eid` of hash layers (i64, `[vocab, K]`).
pub fn routing_state<B: Backend>(model: &V4Model<B>) -> (Vec<(String, HostF32)>, Vec<HostI64>) {
    let (mut biases, mut tables) = (Vec::new(), Vec::new());
    for (i, block) in model.layers.iter().enumerate() {
        let m = &block.ffn;
        let p = format!("model.layers.{i}.mlp.gate");
        match m.routing {
            RoutingKind::TopK => biases.push((
                format!("{p}.e_score_correction_bias"),
                HostF32 {
                    shape: vec![m.bias.len()],
                    data: m.bias.clone(),
                },
            )),
            RoutingKind::Hash => tables.push((
                format!("{p}.tid2eid"),
                vec![m.tid2eid.len() / m.top_k, m.top_k],
                m.tid2eid.iter().map(|&e| e as i64).collect(),
            )),
        }
    }
    (biases, tables)
}
