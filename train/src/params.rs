//! The model's parameters under their HF checkpoint names, and the layout change between the model's
//! (transposed) storage and the checkpoint's.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};
use std::collections::HashMap;
use v4_model::config::RoutingKind;
use v4_model::V4Model;
pub use v4_model::{Layout, NamedParam};

/// Every trainable parameter of `model` with its HF name, as its modules loaded them.
pub fn named_params<B: Backend>(model: &V4Model<B>) -> Vec<NamedParam> {
    model.params.clone()
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
                data: v4_model::loader::transpose_blocks(&t.data, 1, a, b),
            }
        }
        Layout::BlocksTransposed { flat } => {
            let (n, a, b) = (t.shape[0], t.shape[1], t.shape[2]);
            HostF32 {
                shape: if flat { vec![n * b, a] } else { vec![n, b, a] },
                data: v4_model::loader::transpose_blocks(&t.data, n, a, b),
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
    for block in model.blocks() {
        let m = &block.ffn;
        match m.routing {
            RoutingKind::TopK => biases.push((
                m.state_name.clone(),
                HostF32 {
                    shape: vec![m.bias.len()],
                    data: m.bias.clone(),
                },
            )),
            RoutingKind::Hash => tables.push((
                m.state_name.clone(),
                vec![m.tid2eid.len() / m.top_k, m.top_k],
                m.tid2eid.iter().map(|&e| e as i64).collect(),
            )),
        }
    }
    (biases, tables)
}
