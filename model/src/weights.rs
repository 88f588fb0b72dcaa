//! Where weights come from: the [`WeightSource`] trait (HF tensor names in, host tensors out), the errors
//! of loading, and a seeded random source for benchmarks and tests.
//!
//! The model reads no files: the `v4-checkpoint` crate opens a checkpoint directory (either layout) as a
//! source. The model only ever asks for HF names.

use crate::config::ConfigError;
use std::fmt;
use std::ops::Range;
use v4_formats::PackedMatrix;

/// A tensor on the host, as read from a source.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    /// Rows `rows` of the first dimension (`[n, ...]` -> `[rows.len(), ...]`).
    pub fn rows(self, rows: Range<usize>) -> HostTensor {
        let per = self.shape[1..].iter().product::<usize>();
        let mut shape = self.shape;
        shape[0] = rows.len();
        let (a, b) = (rows.start * per, rows.end * per);
        let data = match self.data {
            HostData::F32(v) => HostData::F32(v[a..b].to_vec()),
            HostData::I64(v) => HostData::I64(v[a..b].to_vec()),
        };
        HostTensor { shape, data }
    }
}

/// Element data of a [`HostTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// Why a model could not be loaded; every variant names the source and the tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadError {
    /// The configuration is invalid.
    Config { path: String, error: ConfigError },
    /// A file could not be read or parsed.
    File { path: String, message: String },
    /// A tensor the model needs is absent.
    Missing { source: String, name: String },
    /// A tensor has another shape than the configuration implies.
    Shape {
        source: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// Tensors that the model does not use (usually a config / checkpoint mismatch).
    Unexpected { source: String, names: Vec<String> },
    /// A tensor stored in a dtype this reader does not decode.
    Dtype {
        source: String,
        name: String,
        dtype: String,
        hint: String,
    },
    /// A tensor whose values are invalid (NaN, ids out of range, ...).
    Value {
        source: String,
        name: String,
        message: String,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Config { path, error } => write!(f, "{path}: {error}"),
            LoadError::File { path, message } => write!(f, "{path}: {message}"),
            LoadError::Missing { source, name } => write!(f, "{source}: missing tensor `{name}`"),
            LoadError::Shape {
                source,
                name,
                expected,
                found,
            } => write!(
                f,
                "{source}: tensor `{name}` has shape {found:?}, the config implies {expected:?}"
            ),
            LoadError::Unexpected { source, names } => {
                let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
                let more = names.len().saturating_sub(shown.len());
                write!(
                    f,
                    "{source}: {} unexpected tensor(s): {}",
                    names.len(),
                    shown.join(", ")
                )?;
                if more > 0 {
                    write!(f, " and {more} more")?;
                }
                Ok(())
            }
            LoadError::Dtype {
                source,
                name,
                dtype,
                hint,
            } => {
                write!(f, "{source}: tensor `{name}` has dtype {dtype}; {hint}")
            }
            LoadError::Value {
                source,
                name,
                message,
            } => {
                write!(f, "{source}: tensor `{name}`: {message}")
            }
        }
    }
}

impl std::error::Error for LoadError {}

/// How a generated source fills a tensor (a file source ignores it): the role of the tensor, said by
/// the module that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// A projection: uniform with the variance of a fan-in scaled init (fan-in = the last dimension).
    FanIn,
    /// A norm's weight: near 1.
    Ones,
    /// An mHC scale: near 1, wider.
    Scale,
    /// Biases, sinks, position biases: small around 0.
    Small,
    /// A hash-routing table `[vocab, K]`: K distinct expert ids per row.
    ExpertIds,
}

/// What the model asks a source for: the shape the config implies, and the tensor's role.
#[derive(Debug, Clone, Copy)]
pub struct TensorSpec<'a> {
    pub shape: &'a [usize],
    pub init: Init,
}

/// A provider of weights under HF tensor names.
pub trait WeightSource {
    /// Where the weights come from (a path), for error messages.
    fn describe(&self) -> String;
    /// Reads tensor `name` decoded to f32 / i64; `spec` says what the model needs (generated sources
    /// use it).
    fn read(&self, name: &str, spec: &TensorSpec<'_>) -> Result<HostTensor, LoadError>;
    /// Tensor `name` in its stored precision, without decoding: one matrix for a `[out, in]` `shape`, or
    /// `shape[0]` for stacked experts `[n, out, in]`. `None` when the source has no stored form to
    /// offer (generated weights), and the model reads f32 instead.
    fn read_packed(&self, _name: &str, _shape: &[usize]) -> Result<Option<Vec<PackedMatrix>>, LoadError> {
        Ok(None)
    }
    /// Rows `rows` of the first dimension of tensor `name` (whole shape `spec.shape`), decoded: the
    /// experts one rank of an expert-parallel run holds. Sources that can read a part alone override it.
    fn read_rows(
        &self,
        name: &str,
        spec: &TensorSpec<'_>,
        rows: Range<usize>,
    ) -> Result<HostTensor, LoadError> {
        rows_of_whole(self, name, spec, rows)
    }
    /// The stored matrices `rows` of stacked experts `name` (whole shape `[n, out, in]`), as
    /// [`read_packed`](Self::read_packed) gives them.
    fn read_packed_rows(
        &self,
        name: &str,
        shape: &[usize],
        rows: Range<usize>,
    ) -> Result<Option<Vec<PackedMatrix>>, LoadError> {
        let Some(mut matrices) = self.read_packed(name, shape)? else {
            return Ok(None);
        };
        check_rows(self, name, &[matrices.len()], &rows)?;
        matrices.truncate(rows.end);
        Ok(Some(matrices.split_off(rows.start)))
    }
    /// Every tensor name the source holds (so that unused tensors can be reported); empty if generated.
    fn names(&self) -> Vec<String>;
}

/// Fails unless `rows` lies within the first dimension of `shape` (tensor `name` of `source`).
pub fn check_rows<S: WeightSource + ?Sized>(
    source: &S,
    name: &str,
    shape: &[usize],
    rows: &Range<usize>,
) -> Result<(), LoadError> {
    match shape.first() {
        Some(&n) if rows.end <= n => Ok(()),
        _ => Err(LoadError::Shape {
            source: source.describe(),
            name: name.to_string(),
            expected: vec![rows.end],
            found: shape.to_vec(),
        }),
    }
}

/// Rows `rows` of tensor `name` of `source`, read whole and cut (for sources that cannot read a part).
pub fn rows_of_whole<S: WeightSource + ?Sized>(
    source: &S,
    name: &str,
    spec: &TensorSpec<'_>,
    rows: Range<usize>,
) -> Result<HostTensor, LoadError> {
    let whole = source.read(name, spec)?;
    check_rows(source, name, &whole.shape, &rows)?;
    Ok(whole.rows(rows))
}

/// Seeded pseudo-random weights with realistic magnitudes, by each tensor's [`Init`]: projections scaled
/// by fan-in, norm weights near 1, mHC scales near 1, small biases and sinks, valid hash tables.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    pub seed: u64,
    /// Number of experts, for the hash tables.
    pub experts: usize,
}

/// SplitMix64: a tiny, high-quality, seedable generator. Its state advances by a constant per draw,
/// so the generator can start at any draw in O(1) ([`SplitMix::at`]).
struct SplitMix(u64);

const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix {
    /// The generator seeded with `seed`, after `draws` draws.
    fn at(seed: u64, draws: usize) -> Self {
        SplitMix(seed.wrapping_add((draws as u64).wrapping_mul(SPLITMIX_GAMMA)))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(SPLITMIX_GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl RandomWeights {
    /// Elements `[start, start + out.len())` (row-major) of the floating-point tensor `name` that
    /// [`WeightSource::read`] gives whole: a writer can stream a tensor larger than memory in chunks.
    ///
    /// # Panics
    /// For [`Init::ExpertIds`], whose rows are drawn by rejection and so cannot start mid-tensor.
    pub fn fill(&self, name: &str, spec: &TensorSpec<'_>, start: usize, out: &mut [f32]) {
        let (center, spread) = match spec.init {
            Init::Ones => (1.0, 0.1),
            Init::Scale => (1.0, 0.2),
            Init::Small => (0.0, 0.1),
            Init::FanIn => {
                let fan_in = *spec.shape.last().unwrap_or(&1) as f32;
                (0.0, (3.0 / fan_in).sqrt())
            }
            Init::ExpertIds => panic!("`{name}`: hash tables are generated whole"),
        };
        let mut rng = SplitMix::at(self.seed ^ name_hash(name), start);
        for v in out {
            *v = center + spread * rng.uniform();
        }
    }

    /// A hash-routing table `[vocab, K]`: K distinct expert ids per row.
    fn expert_ids(&self, name: &str, shape: &[usize]) -> Vec<i64> {
        let mut rng = SplitMix::at(self.seed ^ name_hash(name), 0);
        let k = shape[1];
        let mut ids = Vec::with_capacity(shape[0] * k);
        for _ in 0..shape[0] {
            let mut row: Vec<i64> = Vec::with_capacity(k);
            while row.len() < k {
                let e = (rng.next() % self.experts as u64) as i64;
                if !row.contains(&e) {
                    row.push(e);
                }
            }
            ids.extend(row);
        }
        ids
    }
}

impl WeightSource for RandomWeights {
    fn describe(&self) -> String {
        format!("random weights (seed {})", self.seed)
    }

    fn read(&self, name: &str, spec: &TensorSpec<'_>) -> Result<HostTensor, LoadError> {
        let data = if spec.init == Init::ExpertIds {
            HostData::I64(self.expert_ids(name, spec.shape))
        } else {
            let mut values = vec![0.0; spec.shape.iter().product()];
            self.fill(name, spec, 0, &mut values);
            HostData::F32(values)
        };
        Ok(HostTensor {
            shape: spec.shape.to_vec(),
            data,
        })
    }

    fn read_rows(
        &self,
        name: &str,
        spec: &TensorSpec<'_>,
        rows: Range<usize>,
    ) -> Result<HostTensor, LoadError> {
        check_rows(self, name, spec.shape, &rows)?;
        let per: usize = spec.shape[1..].iter().product();
        let mut values = vec![0.0; rows.len() * per];
        self.fill(name, spec, rows.start * per, &mut values);
        let mut shape = spec.shape.to_vec();
        shape[0] = rows.len();
        Ok(HostTensor {
            shape,
            data: HostData::F32(values),
        })
    }

    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_filled_in_chunks_equals_the_tensor_read_whole() {
        let random = RandomWeights { seed: 3, experts: 8 };
        let shape = [3, 5, 7];
        for init in [Init::FanIn, Init::Ones, Init::Scale, Init::Small] {
            let spec = TensorSpec { shape: &shape, init };
            let HostData::F32(whole) = random.read("w", &spec).unwrap().data else {
                panic!("floating-point tensor read as integers");
            };
            assert_eq!(whole.len(), 105);
            let mut chunked = vec![0.0; whole.len()];
            for (i, chunk) in chunked.chunks_mut(11).enumerate() {
                random.fill("w", &spec, i * 11, chunk);
            }
            assert_eq!(chunked, whole, "{init:?}");
        }
    }
}
