//! Building the model from a [`WeightSource`]: every module loads its own tensors through a scoped
//! [`Weights`] (`w.pp("self_attn").linear("q_a_proj", ..)`, as candle's `VarBuilder`), so each
//! checkpoint name is written once, in the module that owns the tensor.
//!
//! The loader checks every tensor's shape and finiteness, reports tensors nobody used, and records
//! which parameter came from which name ([`NamedParam`]): training writes its checkpoints from that
//! record, and calibration finds the experts by it.
//!
//! Where a weight lives is [`Residency`]: trainable f32 on the device (training, `--dequantize`), or
//! the large matrices in their checkpoint precision on the host ([`PackedWeight`]), computed on by a
//! host kernel or dequantised one at a time at the point of use.

use crate::norm::RmsNorm;
use crate::weights::{HostData, Init, LoadError, TensorSpec, WeightSource};
use burn::module::{Param, ParamId};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use v4_formats::{PackedMatmul, PackedMatrix};

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

/// A parameter of the model under its checkpoint (HF) name.
#[derive(Debug, Clone)]
pub struct NamedParam {
    pub name: String,
    pub id: ParamId,
    pub layout: Layout,
    /// The rows of the checkpoint tensor's first dimension the parameter holds, of how many (one
    /// rank's experts under expert parallelism); `None`: all of it.
    pub part: Option<(Range<usize>, usize)>,
}

/// Which routed experts of each MoE layer a load keeps: rank `rank` of `ranks` holds experts
/// `[rank E / ranks, (rank + 1) E / ranks)` (expert parallelism); rank 0 of 1 holds them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertShard {
    pub rank: usize,
    pub ranks: usize,
}

impl Default for ExpertShard {
    fn default() -> Self {
        Self { rank: 0, ranks: 1 }
    }
}

impl ExpertShard {
    /// The experts held of `experts` (the ranks divide them: checked by the config).
    pub fn range(&self, experts: usize) -> Range<usize> {
        let per = experts / self.ranks;
        self.rank * per..(self.rank + 1) * per
    }
}

/// Where the large matrices (projections, experts, head, embedding) live.
#[derive(Clone, Default)]
pub enum Residency {
    /// Everything as trainable f32 tensors on the device (training; `--dequantize`).
    #[default]
    Dequantize,
    /// In their checkpoint precision on the host. With a kernel, `x W^T` runs on the stored bytes
    /// (backends whose tensors live on the host); without one, each weight is dequantised at its point
    /// of use and dropped (every backend).
    Packed(Option<Arc<dyn PackedMatmul>>),
}

impl fmt::Debug for Residency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Residency::Dequantize => write!(f, "Dequantize"),
            Residency::Packed(Some(k)) => write!(f, "Packed({k:?})"),
            Residency::Packed(None) => write!(f, "Packed(dequantize at use)"),
        }
    }
}

/// A matrix kept in its checkpoint precision, with the kernel that multiplies by it.
#[derive(Clone, Debug)]
pub struct PackedWeight {
    /// `[out, in]`, the checkpoint's orientation.
    pub matrix: Arc<PackedMatrix>,
    /// `None`: dequantise at the point of use.
    pub kernel: Option<Arc<dyn PackedMatmul>>,
}

struct State {
    used: HashSet<String>,
    params: Vec<NamedParam>,
    /// Bytes of weights held in stored precision, and as f32 tensors.
    packed_bytes: usize,
    dense_bytes: usize,
}

/// The shared state of one load.
pub(crate) struct Loader<'a, B: Backend> {
    source: &'a dyn WeightSource,
    device: &'a B::Device,
    residency: Residency,
    experts: ExpertShard,
    state: RefCell<State>,
}

/// What a finished load reports besides the model.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub params: Vec<NamedParam>,
    pub packed_bytes: usize,
    pub dense_bytes: usize,
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(
        source: &'a dyn WeightSource,
        device: &'a B::Device,
        residency: Residency,
        experts: ExpertShard,
    ) -> Self {
        Self {
            source,
            device,
            residency,
            experts,
            state: RefCell::new(State {
                used: HashSet::new(),
                params: Vec::new(),
                packed_bytes: 0,
                dense_bytes: 0,
            }),
        }
    }

    /// The root scope (no prefix).
    pub fn root(&self) -> Weights<'_, 'a, B> {
        Weights {
            loader: self,
            prefix: String::new(),
        }
    }

    /// Fails on tensors of the source that no module read (other than those `ignored` accepts).
    pub fn finish(self, ignored: impl Fn(&str) -> bool) -> Result<Loaded, LoadError> {
        let state = self.state.into_inner();
        let unexpected: Vec<String> = self
            .source
            .names()
            .into_iter()
            .filter(|n| !state.used.contains(n) && !ignored(n))
            .collect();
        if !unexpected.is_empty() {
            return Err(LoadError::Unexpected {
                source: self.source.describe(),
                names: unexpected,
            });
        }
        Ok(Loaded {
            params: state.params,
            packed_bytes: state.packed_bytes,
            dense_bytes: state.dense_bytes,
        })
    }
}

/// A scope of a load: the tensors under one name prefix.
pub struct Weights<'l, 'a, B: Backend> {
    loader: &'l Loader<'a, B>,
    prefix: String,
}

impl<'l, 'a, B: Backend> Weights<'l, 'a, B> {
    /// The sub-scope `name` (`model.layers.3` -> `model.layers.3.self_attn`).
    pub fn pp(&self, name: impl fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            loader: self.loader,
            prefix,
        }
    }

    /// The full checkpoint name of `name` in this scope.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn device(&self) -> &B::Device {
        self.loader.device
    }

    /// The routed experts this load keeps of a layer's `experts`.
    pub fn expert_range(&self, experts: usize) -> Range<usize> {
        self.loader.experts.range(experts)
    }

    fn describe(&self) -> String {
        self.loader.source.describe()
    }

    /// Reads `name` with one of `shapes` (the first is the one the config implies; the others hold the
    /// same elements in the same order).
    fn read(&self, name: &str, shapes: &[&[usize]], init: Init) -> Result<HostData, LoadError> {
        let full = self.name(name);
        let spec = TensorSpec {
            shape: shapes[0],
            init,
        };
        let tensor = self.loader.source.read(&full, &spec)?;
        if !shapes.contains(&tensor.shape.as_slice()) {
            return Err(LoadError::Shape {
                source: self.describe(),
                name: full,
                expected: shapes[0].to_vec(),
                found: tensor.shape,
            });
        }
        self.loader.state.borrow_mut().used.insert(full);
        Ok(tensor.data)
    }

    /// `name` as finite f32 values on the host.
    pub fn host_f32(&self, name: &str, shape: &[usize], init: Init) -> Result<Vec<f32>, LoadError> {
        let data = self.read(name, &[shape], init)?;
        self.finite(name, data)
    }

    fn finite(&self, name: &str, data: HostData) -> Result<Vec<f32>, LoadError> {
        match data {
            HostData::F32(v) => match v.iter().find(|x| !x.is_finite()) {
                Some(bad) => Err(self.value_error(name, format!("contains the non-finite value {bad}"))),
                None => {
                    self.loader.state.borrow_mut().dense_bytes += v.len() * 4;
                    Ok(v)
                }
            },
            HostData::I64(_) => Err(LoadError::Dtype {
                source: self.describe(),
                name: self.name(name),
                dtype: "an integer type".into(),
                hint: "expected floating-point weights".into(),
            }),
        }
    }

    /// `name` as integers on the host (counted as held in 4 bytes each: the model keeps ids as u32).
    /// Every read value counts as held: f32 in [`Weights::finite`], ids here.
    pub fn host_i64(&self, name: &str, shape: &[usize], init: Init) -> Result<Vec<i64>, LoadError> {
        match self.read(name, &[shape], init)? {
            HostData::I64(v) => {
                self.loader.state.borrow_mut().dense_bytes += v.len() * 4;
                Ok(v)
            }
            HostData::F32(_) => Err(LoadError::Dtype {
                source: self.describe(),
                name: self.name(name),
                dtype: "a floating-point type".into(),
                hint: "expected integer ids".into(),
            }),
        }
    }

    /// An error about the values of tensor `name`.
    pub fn value_error(&self, name: &str, message: String) -> LoadError {
        LoadError::Value {
            source: self.describe(),
            name: self.name(name),
            message,
        }
    }

    /// Records a new trainable parameter.
    fn param<const D: usize>(
        &self,
        name: &str,
        data: Vec<f32>,
        shape: [usize; D],
        layout: Layout,
        part: Option<(Range<usize>, usize)>,
    ) -> Param<Tensor<B, D>> {
        let mut state = self.loader.state.borrow_mut();
        let param = Param::from_tensor(Tensor::from_data(
            TensorData::new(data, shape),
            self.loader.device,
        ));
        state.params.push(NamedParam {
            name: self.name(name),
            id: param.id,
            layout,
            part,
        });
        param
    }

    /// A parameter stored as the checkpoint has it.
    pub fn plain<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
        init: Init,
    ) -> Result<Param<Tensor<B, D>>, LoadError> {
        let data = self.host_f32(name, &shape, init)?;
        Ok(self.param(name, data, shape, Layout::Plain, None))
    }

    /// A `[rows, cols]` checkpoint matrix kept transposed: `[cols, rows]`, contiguous.
    pub fn transposed(
        &self,
        name: &str,
        shape: [usize; 2],
        init: Init,
    ) -> Result<Param<Tensor<B, 2>>, LoadError> {
        let [rows, cols] = shape;
        let data = transpose_blocks(&self.host_f32(name, &shape, init)?, 1, rows, cols);
        Ok(self.param(name, data, [cols, rows], Layout::Transposed, None))
    }

    /// A `[n, rows, cols]` checkpoint tensor (when `flat`, `[n * rows, cols]` as HF writes it), each block
    /// transposed: `[n, cols, rows]`, contiguous.
    pub fn blocks_transposed(
        &self,
        name: &str,
        shape: [usize; 3],
        flat: bool,
        init: Init,
    ) -> Result<Param<Tensor<B, 3>>, LoadError> {
        let [n, rows, cols] = shape;
        let flat_shape = [n * rows, cols];
        // HF writes the grouped projection flat: ask for that form first.
        let shapes: &[&[usize]] = if flat { &[&flat_shape, &shape] } else { &[&shape] };
        let data = self.read(name, shapes, init)?;
        let data = transpose_blocks(&self.finite(name, data)?, n, rows, cols);
        Ok(self.param(
            name,
            data,
            [n, cols, rows],
            Layout::BlocksTransposed { flat },
            None,
        ))
    }

    /// The experts `held` of stacked experts `name` (`[n, rows, cols]`), each transposed:
    /// `[held.len(), cols, rows]`. Only their rows of the checkpoint are read.
    pub fn experts_transposed(
        &self,
        name: &str,
        shape: [usize; 3],
        held: Range<usize>,
        init: Init,
    ) -> Result<Param<Tensor<B, 3>>, LoadError> {
        let [n, rows, cols] = shape;
        let full = self.name(name);
        let spec = TensorSpec { shape: &shape, init };
        let tensor = self.loader.source.read_rows(&full, &spec, held.clone())?;
        let expected = [held.len(), rows, cols];
        if tensor.shape != expected {
            return Err(LoadError::Shape {
                source: self.describe(),
                name: full,
                expected: shape.to_vec(),
                found: tensor.shape,
            });
        }
        self.loader.state.borrow_mut().used.insert(full);
        let data = transpose_blocks(&self.finite(name, tensor.data)?, held.len(), rows, cols);
        let layout = Layout::BlocksTransposed { flat: false };
        let part = (held.len() < n).then(|| (held.clone(), n));
        Ok(self.param(name, data, [held.len(), cols, rows], layout, part))
    }

    /// An RMSNorm's weight `name.weight`.
    pub fn norm(&self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm<B>, LoadError> {
        let weight = self.plain(&format!("{name}.weight"), [dim], Init::Ones)?;
        Ok(RmsNorm { weight, eps })
    }

    /// With [`Residency::Packed`], the matrices of tensor `name` (`shape`: `[out, in]`, or `[n, out, in]`
    /// for `n` stacked experts) in their stored precision; `None` when the weights are dequantised
    /// or the source only has f32 (random weights).
    pub fn packed(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<PackedWeight>>, LoadError> {
        Ok(self
            .read_packed(name, shape, None)?
            .map(|m| self.keep_packed(name, m)))
    }

    /// [`packed`](Self::packed) for the experts `held` of stacked experts `name` (`[n, out, in]`); the
    /// other experts' bytes are not read.
    pub fn packed_experts(
        &self,
        name: &str,
        shape: [usize; 3],
        held: Range<usize>,
    ) -> Result<Option<Vec<PackedWeight>>, LoadError> {
        Ok(self
            .read_packed(name, &shape, Some(held))?
            .map(|m| self.keep_packed(name, m)))
    }

    /// With [`Residency::Packed`], the `[rows, cols]` matrix `name` in its stored precision, cut into
    /// `bands` equal row bands (a grouped projection's groups); `None` as for [`Weights::packed`], and
    /// when a cut would split a scale tile (the caller then reads f32).
    pub fn packed_bands(
        &self,
        name: &str,
        shape: [usize; 2],
        bands: usize,
    ) -> Result<Option<Vec<PackedWeight>>, LoadError> {
        let Some(mut matrices) = self.read_packed(name, &shape, None)? else {
            return Ok(None);
        };
        let split = matrices.pop().and_then(|m| m.split_rows(bands));
        Ok(split.map(|m| self.keep_packed(name, m)))
    }

    /// The stored matrices of `name` (of stacked experts: those `held`), checked against `shape`.
    fn read_packed(
        &self,
        name: &str,
        shape: &[usize],
        held: Option<Range<usize>>,
    ) -> Result<Option<Vec<PackedMatrix>>, LoadError> {
        if !matches!(self.loader.residency, Residency::Packed(_)) {
            return Ok(None);
        }
        let full = self.name(name);
        let count = match (&held, shape.len()) {
            (Some(held), _) => held.len(),
            (None, 3) => shape[0],
            (None, _) => 1,
        };
        let matrices = match held {
            Some(held) => self.loader.source.read_packed_rows(&full, shape, held)?,
            None => self.loader.source.read_packed(&full, shape)?,
        };
        let Some(matrices) = matrices else {
            return Ok(None);
        };
        let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        if matrices.len() != count || matrices.iter().any(|m| m.rows != rows || m.cols != cols) {
            let found = matrices
                .first()
                .map_or(vec![], |m| vec![matrices.len(), m.rows, m.cols]);
            return Err(LoadError::Shape {
                source: self.describe(),
                name: full,
                expected: shape.to_vec(),
                found,
            });
        }
        Ok(Some(matrices))
    }

    /// Records `matrices` as the stored form of `name` and pairs each with the load's kernel.
    fn keep_packed(&self, name: &str, matrices: Vec<PackedMatrix>) -> Vec<PackedWeight> {
        let Residency::Packed(kernel) = &self.loader.residency else {
            unreachable!("read_packed returns matrices only for a packed load");
        };
        let mut state = self.loader.state.borrow_mut();
        state.packed_bytes += matrices.iter().map(PackedMatrix::stored_bytes).sum::<usize>();
        state.used.insert(self.name(name));
        matrices
            .into_iter()
            .map(|m| PackedWeight {
                matrix: Arc::new(m),
                kernel: kernel.clone(),
            })
            .collect()
    }
}

/// Transposes each of the `n` row-major `[rows, cols]` blocks of `data` (checkpoint order <-> the
/// transposed order the model keeps its projections in).
pub fn transpose_blocks(data: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for (src, dst) in data
        .chunks_exact(rows * cols)
        .zip(out.chunks_exact_mut(rows * cols))
        .take(n)
    {
        for r in 0..rows {
            for c in 0..cols {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }
    out
}
