//! Where weights come from: the [`WeightSource`] trait (HF tensor names in, host tensors out), the errors
//! of loading, and a seeded random source for benchmarks and tests.
//!
//! Sources that read files live beside it ([`crate::checkpoint`] for HF-layout safetensors); the converter
//! crate provides one for DeepSeek's release layout. The model only ever asks for HF names.

use crate::config::ConfigError;
use std::fmt;
use v4_formats::PackedMatrix;

/// A tensor on the host, as read from a source.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
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
    /// Every tensor name the source holds (so that unused tensors can be reported); empty if generated.
    fn names(&self) -> Vec<String>;
}

/// Seeded pseudo-random weights with realistic magnitudes, by each tensor's [`Init`]: projections scaled
/// by fan-in, norm weights near 1, mHC scales near 1, small biases and sinks, valid hash tables.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    pub seed: u64,
    /// Number of experts, for the hash tables.
    pub experts: usize,
}

/// SplitMix64: a tiny, high-quality, seedable generator.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
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

impl WeightSource for RandomWeights {
    fn describe(&self) -> String {
        format!("random weights (seed {})", self.seed)
    }

    fn read(&self, name: &str, spec: &TensorSpec<'_>) -> Result<HostTensor, LoadError> {
        let mut rng = SplitMix(self.seed ^ name_hash(name));
        let expected = spec.shape;
        let len: usize = expected.iter().product();
        let uniform = |center: f32, spread: f32, rng: &mut SplitMix| {
            HostData::F32((0..len).map(|_| center + spread * rng.uniform()).collect())
        };
        let data = match spec.init {
            Init::ExpertIds => {
                let k = expected[1];
                let mut ids = Vec::with_capacity(len);
                for _ in 0..expected[0] {
                    let mut row: Vec<i64> = Vec::with_capacity(k);
                    while row.len() < k {
                        let e = (rng.next() % self.experts as u64) as i64;
                        if !row.contains(&e) {
                            row.push(e);
                        }
                    }
                    ids.extend(row);
                }
                HostData::I64(ids)
            }
            Init::Ones => uniform(1.0, 0.1, &mut rng),
            Init::Scale => uniform(1.0, 0.2, &mut rng),
            Init::Small => uniform(0.0, 0.1, &mut rng),
            Init::FanIn => {
                let fan_in = *expected.last().unwrap_or(&1) as f32;
                uniform(0.0, (3.0 / fan_in).sqrt(), &mut rng)
            }
        };
        Ok(HostTensor {
            shape: expected.to_vec(),
            data,
        })
    }

    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}
