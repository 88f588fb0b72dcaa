//! Named probe points: a caller can read any intermediate tensor of the forward pass without a fork of
//! the model code. Names follow the module tree (`layers.3.attn.compressor.entries`,
//! `layers.3.ffn.router.indices`, ...); the full list is in the crate documentation.

use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Receives the tensors of the probe points it asks for.
pub trait Probe {
    /// Whether the point `name` should be recorded; asked before any copy to the host.
    fn wants(&self, name: &str) -> bool;
    /// The value at point `name` (a host copy).
    fn record(&mut self, name: &str, value: TensorData);
}

/// Records nothing: the forward pass at full speed.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProbe;

impl Probe for NoProbe {
    fn wants(&self, _name: &str) -> bool {
        false
    }

    fn record(&mut self, _name: &str, _value: TensorData) {}
}

/// Keeps every probe point whose name passes `filter`, in the order the forward pass reached them.
pub struct Recorder<F: Fn(&str) -> bool> {
    filter: F,
    pub records: Vec<(String, TensorData)>,
}

impl<F: Fn(&str) -> bool> Recorder<F> {
    pub fn new(filter: F) -> Self {
        Self {
            filter,
            records: Vec::new(),
        }
    }
}

impl<F: Fn(&str) -> bool> Probe for Recorder<F> {
    fn wants(&self, name: &str) -> bool {
        (self.filter)(name)
    }

    fn record(&mut self, name: &str, value: TensorData) {
        self.records.push((name.to_string(), value));
    }
}

/// Hands `tensor` to the probe if it wants the point `name`.
pub fn tap<B: Backend, const D: usize>(probe: &mut dyn Probe, name: &str, tensor: &Tensor<B, D>) {
    if probe.wants(name) {
        probe.record(name, tensor.to_data());
    }
}
