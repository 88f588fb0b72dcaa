//! Named probe points: a caller can read any intermediate tensor of the forward pass without a fork of
//! the model code. A block's points are named `<scope>.<point>` ([`Scope`]: `layers.3`, `mtp.0`; [`point`]:
//! `attn.compressor.entries`, `ffn.router.indices`, ...), the model's own without a scope ([`point::LOGITS`],
//! ...). The names are written here once: the model taps them, `v4 forward`, `trace` and `validate` match on
//! them. A name is only built when the probe records ([`Probe::records`]), so [`NoProbe`] costs nothing.

use burn::tensor::{backend::Backend, Tensor, TensorData};

/// The probe points, by name.
pub mod point {
    /// A block's input streams `[B, S, c, D]`.
    pub const INPUT: &str = "input";
    /// A block's output streams `[B, S, c, D]` (recorded by `v4 validate`'s isolated runs; a propagated
    /// run's is the next layer's input).
    pub const OUTPUT: &str = "output";
    /// The normed attention input `[B, S, D]`.
    pub const ATTN_INPUT: &str = "attn.input";
    /// Queries after RoPE `[B, S, H, d]`.
    pub const ATTN_Q: &str = "attn.q";
    /// The shared key/value after RoPE `[B, S, d]`.
    pub const ATTN_KV: &str = "attn.kv";
    /// The compressor's entries (CSA/HCA layers).
    pub const COMPRESSOR_ENTRIES: &str = "attn.compressor.entries";
    /// The indexer's scores over compressed entries (CSA layers).
    pub const INDEXER_SCORES: &str = "attn.indexer.scores";
    /// The entries the indexer picked, `[B, S, k]` (integers).
    pub const INDEXER_TOPK: &str = "attn.indexer.topk";
    /// Attention per head before the inverse RoPE `[B, S, H, d]`.
    pub const ATTN_CORE: &str = "attn.core";
    /// The attention output `[B, S, D]`.
    pub const ATTN_OUTPUT: &str = "attn.output";
    /// The normed FFN input `[B, S, D]`.
    pub const FFN_INPUT: &str = "ffn.input";
    /// The router's scores `[B*S, E]`.
    pub const ROUTER_SCORES: &str = "ffn.router.scores";
    /// Each token's experts `[B*S, k]` (integers).
    pub const ROUTER_INDICES: &str = "ffn.router.indices";
    /// Their combine weights `[B*S, k]`.
    pub const ROUTER_WEIGHTS: &str = "ffn.router.weights";
    /// The MoE output `[B, S, D]`.
    pub const FFN_OUTPUT: &str = "ffn.output";
    /// Logits: the model's `[B, S, V]`, or under an MTP scope that layer's `[B, S-1, V]`.
    pub const LOGITS: &str = "logits";
    /// The main model's final streams `[B, S, c, D]`.
    pub const FINAL_STREAMS: &str = "final.streams";
    /// The normed final hidden state `[B, S, D]`.
    pub const FINAL_HIDDEN: &str = "final.hidden";
}

/// Whose probe points: main layer `N` (`layers.N.<point>`) or MTP layer `K` (`mtp.K.<point>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Layer(usize),
    Mtp(usize),
}

impl Scope {
    /// The full name of `point` in this scope.
    pub fn name(self, point: &str) -> String {
        match self {
            Scope::Layer(n) => format!("layers.{n}.{point}"),
            Scope::Mtp(k) => format!("mtp.{k}.{point}"),
        }
    }

    /// Splits a full name into its scope and point (`layers.3.attn.q` -> `(Layer(3), "attn.q")`); `None`
    /// for the model's own points.
    pub fn parse(name: &str) -> Option<(Scope, &str)> {
        let (kind, rest) = name.split_once('.')?;
        let (index, point) = rest.split_once('.')?;
        let index = index.parse().ok()?;
        match kind {
            "layers" => Some((Scope::Layer(index), point)),
            "mtp" => Some((Scope::Mtp(index), point)),
            _ => None,
        }
    }
}

/// Receives the tensors of the probe points it asks for.
pub trait Probe {
    /// Whether this probe records anything at all; `false` lets the forward pass skip building names.
    fn records(&self) -> bool {
        true
    }
    /// Whether the point `name` should be recorded; asked before any copy to the host.
    fn wants(&self, name: &str) -> bool;
    /// The value at point `name` (a host copy).
    fn record(&mut self, name: &str, value: TensorData);
}

/// Records nothing: the forward pass at full speed.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProbe;

impl Probe for NoProbe {
    fn records(&self) -> bool {
        false
    }

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

/// Hands `tensor` to the probe if it wants the model-level point `name`.
pub fn tap<B: Backend, const D: usize>(probe: &mut dyn Probe, name: &str, tensor: &Tensor<B, D>) {
    if probe.records() && probe.wants(name) {
        probe.record(name, tensor.to_data());
    }
}

/// Hands `tensor` to the probe if it wants `point` of `scope`.
pub fn tap_in<B: Backend, const D: usize>(
    probe: &mut dyn Probe,
    scope: Scope,
    point: &str,
    tensor: &Tensor<B, D>,
) {
    if let Some(name) = wanted(probe, scope, point) {
        probe.record(&name, tensor.to_data());
    }
}

/// The full name of `point` of `scope` when the probe wants it (for points recorded from host values).
pub fn wanted(probe: &dyn Probe, scope: Scope, point: &str) -> Option<String> {
    if !probe.records() {
        return None;
    }
    let name = scope.name(point);
    probe.wants(&name).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_name_and_parse_back() {
        for (scope, point) in [
            (Scope::Layer(3), point::INDEXER_TOPK),
            (Scope::Mtp(0), point::LOGITS),
            (Scope::Layer(12), point::INPUT),
        ] {
            let name = scope.name(point);
            assert_eq!(Scope::parse(&name), Some((scope, point)), "{name}");
        }
        assert_eq!(Scope::name(Scope::Layer(3), point::ATTN_Q), "layers.3.attn.q");
        assert_eq!(Scope::parse(point::FINAL_STREAMS), None);
        assert_eq!(Scope::parse("layers.x.attn.q"), None);
    }
}
