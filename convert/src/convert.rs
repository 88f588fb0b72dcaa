//! Streaming conversion of a whole checkpoint.
//!
//! [`convert`] reads the input (either layout, any supported storage) tensor by tensor through
//! memory maps, re-encodes each tensor as the release's dtype plan says for the target, and writes
//! safetensors shards plus `model.safetensors.index.json`, an updated `config.json` and copies of
//! the other files (tokenizer, ...).
//!
//! - **Memory**: one batch of tensors (at most [`BATCH_BYTES`] of f32, or one tensor if larger) is
//!   encoded at a time; inputs are memory-mapped. Work inside a batch runs on rayon's pool.
//! - **Atomic output**: everything is written into the sibling `<output>.tmp-v4convert` and renamed
//!   onto `<output>` at the end. Errors remove the temporary directory.
//! - **Resumable**: each finished shard is fsynced and recorded (size, CRC-32) in the temporary
//!   directory's `manifest.json`, together with a fingerprint of the inputs and options. A re-run
//!   after an interruption keeps the shards whose size and checksum still match.
//! - **Refusals**: the output may not be, contain or lie inside the input, and may not be a
//!   non-empty directory; NaN/Inf inputs fail naming the tensor.

use crate::ascend::{self, QuantType};
use crate::checkpoint::{Checkpoint, Entry, Source};
use crate::codec::{self, fp8, int4, int8, mxfp4, mxfp8, nvfp4, ErrStats, ScaleSearch};
use crate::error::ConvertError;
use crate::layout::{self, DtypeClass, Layout};
use crate::report::{ConvertReport, ErrorStats, TensorReport};
use crate::st::{self, Dtype, PlannedTensor, ShardFile};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;
use v4_formats::atomic;

/// Largest f32 working set of one batch of tensors.
pub const BATCH_BYTES: u64 = 256 << 20;
/// Default shard size (bytes of tensor data per output file).
pub const DEFAULT_SHARD_SIZE: u64 = 5_000_000_000;
/// Rows per parallel work item for row-wise encodings (MXFP4, NVFP4, BF16, F32).
const BAND_ROWS: usize = 16;
const MANIFEST: &str = "manifest.json";
const TOOL: &str = "v4-convert manifest v1";

/// The precision to convert to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// Every float tensor in BF16 (accelerators without FP8, e.g. Ascend 910B).
    #[serde(rename = "bf16")]
    Bf16,
    /// FP8 E4M3 + E8M0 128x128 for the release's FP8 tensors *and* the routed experts; BF16/F32
    /// elsewhere (Hopper).
    #[serde(rename = "fp8")]
    Fp8,
    /// The V4 release: FP8 as above, routed experts MXFP4 (E8M0 RCEIL per 32).
    #[serde(rename = "fp4-mx")]
    Fp4Mx,
    /// FP8 as above, routed experts NVFP4 (ModelOpt 0.47 rules).
    #[serde(rename = "fp4-nv")]
    Fp4Nv,
    /// Every float tensor in F32.
    #[serde(rename = "f32")]
    F32,
    /// Ascend 910B/910C: msModelSlim's DeepSeek-V4 W8A8_DYNAMIC recipe in its AscendV1 files. INT8 with one
    /// scale per output channel for the query/KV projections and the routed and shared experts
    /// ([`layout::ascend_w8a8_quantised`]); BF16 for the other release FP8/BF16 tensors, F32 kept.
    #[serde(rename = "w8a8")]
    W8a8,
    /// Ascend 910B/910C, msModelSlim's DeepSeek-V4-Pro recipe: the routed experts as INT4 with one scale per
    /// output channel (`W4A8_DYNAMIC`, packed two rows per byte, with vllm-ascend's `scale_bias`), everything
    /// else as [`Target::W8a8`].
    #[serde(rename = "w4a8")]
    W4a8,
    /// Ascend 950: every release FP8/FP4 tensor as MXFP8 (E4M3 + E8M0 per 32, OCP rule; lossless from
    /// MXFP4) in AscendV1 files (`W8A8_MXFP8`); BF16 and F32 elsewhere as in the release.
    #[serde(rename = "mxfp8")]
    Mxfp8,
}

impl Target {
    /// The CLI spelling (`bf16`, `fp8`, `fp4-mx`, `fp4-nv`, `f32`).
    pub fn name(self) -> &'static str {
        match self {
            Target::Bf16 => "bf16",
            Target::Fp8 => "fp8",
            Target::Fp4Mx => "fp4-mx",
            Target::Fp4Nv => "fp4-nv",
            Target::F32 => "f32",
            Target::W8a8 => "w8a8",
            Target::W4a8 => "w4a8",
            Target::Mxfp8 => "mxfp8",
        }
    }

    /// The AscendV1 model type of an Ascend target; `None` for the others.
    fn ascend(self) -> Option<QuantType> {
        match self {
            Target::W8a8 => Some(QuantType::W8a8Dynamic),
            Target::W4a8 => Some(QuantType::W4a8Dynamic),
            Target::Mxfp8 => Some(QuantType::W8a8Mxfp8),
            _ => None,
        }
    }
}

impl FromStr for Target {
    type Err = ConvertError;

    fn from_str(s: &str) -> Result<Target, ConvertError> {
        [
            Target::Bf16,
            Target::Fp8,
            Target::Fp4Mx,
            Target::Fp4Nv,
            Target::F32,
            Target::W8a8,
            Target::W4a8,
            Target::Mxfp8,
        ]
        .into_iter()
        .find(|t| t.name() == s)
        .ok_or_else(|| ConvertError::Options {
            reason: format!("unknown target `{s}` (bf16, fp8, fp4-mx, fp4-nv, f32, w8a8, w4a8, mxfp8)"),
        })
    }
}

impl FromStr for Layout {
    type Err = ConvertError;

    fn from_str(s: &str) -> Result<Layout, ConvertError> {
        match s {
            "deepseek" | "native" => Ok(Layout::DeepSeek),
            "hf" => Ok(Layout::Hf),
            _ => Err(ConvertError::Options {
                reason: format!("unknown layout `{s}` (deepseek, hf)"),
            }),
        }
    }
}

/// How FP4 block scales are chosen.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Calibration {
    /// Round to nearest with the scheme's exact scale rule (reproduces the release bit for bit).
    #[default]
    Rtn,
    /// Weight-only per-block scale search minimising squared error (MXFP4: exponents e-1, e, e+1;
    /// NVFP4: a sweep of E4M3 block scales including "four over six").
    WeightSearch {
        /// Optional per-input-channel importance (`E[x_j²]` measured through the model), keyed by
        /// HF tensor name (`model.layers.3.mlp.experts.gate_up_proj`, ...). A vector has `in`
        /// entries (shared by all experts of a fused tensor) or `E * in` (one row per expert).
        channel_importance: Option<HashMap<String, Vec<f32>>>,
    },
}

/// Everything [`convert`] needs.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// Checkpoint directory (either layout, single file or sharded).
    pub input: PathBuf,
    /// Directory to create. Must not exist or be empty.
    pub output: PathBuf,
    pub target: Target,
    /// Naming of the output.
    pub layout: Layout,
    pub calibration: Calibration,
    /// Bytes of tensor data per output shard (a tensor larger than this gets a shard of its own).
    pub shard_size: u64,
    /// Worker threads; `None` uses rayon's global pool.
    pub threads: Option<usize>,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// Write at most this many shards in this run, then stop leaving a resumable temporary
    /// directory (time-sliced conversions on preemptible machines).
    pub stop_after_shards: Option<usize>,
    /// SmoothQuant factors, keyed by DeepSeek norm weight name (`layers.N.attn_norm.weight`): the norm's
    /// weight is divided by them and the input columns of every linear reading its output
    /// ([`layout::smoothing_norm`]) multiplied, before encoding. Powers of two keep the fold exact in any
    /// float format, so only the quantised linears see a difference.
    pub smoothing: Option<HashMap<String, Vec<f32>>>,
}

impl ConvertOptions {
    /// Defaults: DeepSeek layout, round to nearest, 5 GB shards, all threads, progress bar.
    pub fn new(input: impl Into<PathBuf>, output: impl Into<PathBuf>, target: Target) -> ConvertOptions {
        ConvertOptions {
            input: input.into(),
            output: output.into(),
            target,
            layout: Layout::DeepSeek,
            calibration: Calibration::Rtn,
            shard_size: DEFAULT_SHARD_SIZE,
            threads: None,
            progress: true,
            stop_after_shards: None,
            smoothing: None,
        }
    }
}

/// How one logical tensor is encoded in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    F32,
    Bf16,
    I64,
    /// E4M3 + E8M0 (DeepSeek layout) or F32 `_scale_inv` (HF layout), 128x128 tiles.
    Fp8,
    /// Packed E2M1 (I8) + E8M0 per 32, RCEIL.
    Mx,
    /// Packed E2M1 (U8) + E4M3 per 16 + F32 tensor scale.
    Nv,
    /// I8 + F32 `weight_scale` `[out, 1]` + zero F32 `weight_offset` `[out, 1]` (AscendV1 W8A8_DYNAMIC).
    Int8,
    /// INT4 two rows per byte (I8 `[out/2, in]`) + F32 `weight_scale` and zero `weight_offset` `[out, 1]` +
    /// F32 `scale_bias` (`[out, 16]` for `w2`, else `[out, 1]`) (AscendV1 W4A8_DYNAMIC, per channel).
    Int4,
    /// E4M3 + U8 (E8M0) `weight_scale` `[out, ceil(in/32)]` (AscendV1 W8A8_MXFP8).
    Mx8,
}

/// How DeepSeek tensor `name`, stored by the release as `class`, is written for `target`.
fn encoding(name: &str, class: DtypeClass, target: Target) -> Encoding {
    let release_quantised = matches!(class, DtypeClass::Fp8Block | DtypeClass::Fp4Expert);
    match (class, target) {
        (DtypeClass::I64, _) => Encoding::I64,
        (DtypeClass::Fp4Expert, Target::W4a8) => Encoding::Int4,
        (_, Target::W8a8 | Target::W4a8) if layout::ascend_w8a8_quantised(name) => Encoding::Int8,
        (_, Target::Mxfp8) if release_quantised => Encoding::Mx8,
        (DtypeClass::F32, Target::W8a8 | Target::W4a8 | Target::Mxfp8) => Encoding::F32,
        (_, Target::W8a8 | Target::W4a8 | Target::Mxfp8) => Encoding::Bf16,
        (_, Target::F32) => Encoding::F32,
        (_, Target::Bf16) | (DtypeClass::Bf16, _) => Encoding::Bf16,
        (DtypeClass::F32, _) => Encoding::F32,
        (DtypeClass::Fp8Block, _) | (DtypeClass::Fp4Expert, Target::Fp8) => Encoding::Fp8,
        (DtypeClass::Fp4Expert, Target::Fp4Mx) => Encoding::Mx,
        (DtypeClass::Fp4Expert, Target::Fp4Nv) => Encoding::Nv,
    }
}

/// Fills its buffer with a tensor's rows from the given first row on (dequantised, smoothing folded in).
type RowDecoder<'a> = dyn Fn(usize, &mut [f32]) -> Result<(), ConvertError> + Sync + 'a;

/// Quantises a `rows x cols` tensor with one f32 scale per row (INT8, INT4), in parallel bands of
/// [`BAND_ROWS`] rows that `decode` fills: `quantize(values, codes, scales)` returns its band's (Σx², Σ(x-q)²,
/// max|x-q|). Returns the codes, the scales and the merged error statistics.
fn per_row_scaled<C: Copy + Default + Send>(
    rows: usize,
    cols: usize,
    decode: &RowDecoder<'_>,
    quantize: impl Fn(&[f32], &mut [C], &mut [f32]) -> (f64, f64, f32) + Sync,
) -> Result<(Vec<C>, Vec<f32>, ErrStats), ConvertError> {
    let mut codes = vec![C::default(); rows * cols];
    let mut scales = vec![0f32; rows];
    let stats = codes
        .par_chunks_mut((BAND_ROWS * cols).max(1))
        .zip(scales.par_chunks_mut(BAND_ROWS))
        .enumerate()
        .map_init(Vec::new, |buf: &mut Vec<f32>, (bi, (c, s))| {
            buf.resize(c.len(), 0.0);
            decode(bi * BAND_ROWS, buf)?;
            let (sum_sq, sse, max_abs) = quantize(buf, c, s);
            Ok(ErrStats {
                sum_sq,
                sse,
                sse_rtn: sse,
                max_abs,
            })
        })
        .try_reduce(ErrStats::default, |a, b| Ok(a.merge(b)))?;
    Ok((codes, scales, stats))
}

/// Column chunks of a W4A8 expert's `scale_bias`: msModelSlim writes 16 for `w2` (tensor parallelism up to 16
/// splits its inputs) and one for `w1`/`w3`.
fn int4_bias_chunks(name: &str) -> usize {
    if name.ends_with("w2.weight") {
        16
    } else {
        1
    }
}

impl Encoding {
    fn scheme(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::Bf16 => "bf16-rne",
            Encoding::I64 => "i64",
            Encoding::Fp8 => "fp8-e8m0-128x128",
            Encoding::Mx => "mxfp4-rceil",
            Encoding::Nv => "nvfp4-modelopt",
            Encoding::Int8 => "int8-per-channel",
            Encoding::Int4 => "int4-per-channel",
            Encoding::Mx8 => "mxfp8-ocp",
        }
    }

    fn calibrated(self) -> bool {
        matches!(self, Encoding::Mx | Encoding::Nv)
    }
}

/// One output tensor of a group: a component (codes, scale, tensor scale) of its members.
#[derive(Clone, Debug)]
struct OutSpec {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl OutSpec {
    fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.bits()).div_ceil(8) as u64
    }
}

/// Logical tensors that are written together: one tensor, or all experts of a fused HF tensor.
#[derive(Clone, Debug)]
struct Group {
    /// DeepSeek names, in storage order.
    members: Vec<String>,
    encoding: Encoding,
    /// HF name (channel-importance key).
    hf_name: String,
    outputs: Vec<OutSpec>,
    /// Logical shape of the primary output.
    shape: Vec<usize>,
    /// Stored input bytes.
    input_bytes: u64,
    /// f32 working set.
    work_bytes: u64,
}

/// Output components of one member: bytes per component, error statistics, whether copied.
struct Encoded {
    comps: Vec<Vec<u8>>,
    stats: ErrStats,
    copied: bool,
}

/// One output file.
struct ShardPlan {
    name: String,
    groups: Vec<usize>,
    header: Vec<u8>,
    /// Output tensor name -> absolute offset.
    offsets: HashMap<String, u64>,
    size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ShardRecord {
    size: u64,
    crc32: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    tool: String,
    fingerprint: String,
    done: BTreeMap<String, ShardRecord>,
}

/// Converts a checkpoint directory; see the module documentation. Returns the report also when
/// stopping early on purpose (`stop_after_shards`, then `complete == false`).
pub fn convert(opts: &ConvertOptions) -> Result<ConvertReport, ConvertError> {
    let out = check_paths(&opts.input, &opts.output)?;
    let ck = Checkpoint::open(&opts.input)?;
    if opts.shard_size == 0 {
        return Err(ConvertError::Options {
            reason: "shard size must be positive".into(),
        });
    }
    if opts.target.ascend().is_some() && opts.layout != Layout::DeepSeek {
        return Err(ConvertError::Options {
            reason: format!(
                "target {} writes msModelSlim's AscendV1 files, which use DeepSeek's release names: drop --layout hf",
                opts.target.name()
            ),
        });
    }
    let groups = plan_groups(&ck, opts)?;
    check_importance(&ck, &opts.calibration)?;
    check_smoothing(&ck, opts.smoothing.as_ref())?;
    let names = match opts.target.ascend() {
        Some(_) => ascend::shard_name,
        None => shard_name,
    };
    let shards = plan_shards(&groups, opts.shard_size, names);
    let run = || {
        Run {
            ck: &ck,
            opts,
            groups: &groups,
            shards: &shards,
            out: out.clone(),
        }
        .go()
    };
    match opts.threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| ConvertError::Options {
                reason: format!("cannot start {n} threads: {e}"),
            })?
            .install(run),
        None => run(),
    }
}

/// Validates input/output paths; returns the absolute output path.
fn check_paths(input: &Path, output: &Path) -> Result<PathBuf, ConvertError> {
    let inp = fs::canonicalize(input).map_err(|e| ConvertError::io(input, e))?;
    let name = output.file_name().ok_or_else(|| ConvertError::Options {
        reason: format!("output {} has no directory name", output.display()),
    })?;
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = fs::canonicalize(parent).map_err(|e| ConvertError::io(parent, e))?;
    let out = parent.join(name);
    let resolved = fs::canonicalize(&out).unwrap_or_else(|_| out.clone());
    if resolved.starts_with(&inp) || inp.starts_with(&resolved) {
        return Err(ConvertError::OutputIsInput {
            input: inp,
            output: out,
        });
    }
    if out.exists() {
        let empty = out.is_dir()
            && fs::read_dir(&out)
                .map_err(|e| ConvertError::io(&out, e))?
                .next()
                .is_none();
        if !empty {
            return Err(ConvertError::OutputExists { output: out });
        }
    }
    Ok(out)
}

/// The output tensors of `members` (all with the same logical shape) under `enc`.
fn out_specs(
    ck: &Checkpoint,
    members: &[String],
    hf: Option<(&str, usize)>,
    enc: Encoding,
) -> Result<Vec<OutSpec>, ConvertError> {
    let e = ck.entry(&members[0])?;
    let (r, c) = (e.rows, e.cols);
    let need = |ok: bool, why: &str| {
        if ok {
            Ok(())
        } else {
            Err(ConvertError::Unsupported {
                tensor: members[0].clone(),
                reason: format!("{why} (shape {:?})", e.shape),
            })
        }
    };
    if matches!(
        enc,
        Encoding::Fp8 | Encoding::Mx | Encoding::Nv | Encoding::Int8 | Encoding::Int4 | Encoding::Mx8
    ) {
        need(e.shape.len() == 2, "block quantisation needs a matrix")?;
    }
    if enc == Encoding::Int4 {
        need(r % 2 == 0, "INT4 packs row pairs: needs an even number of rows")?;
        need(
            c % int4_bias_chunks(&members[0]) == 0,
            "W4A8's scale_bias splits w2's inputs in 16 chunks: needs in % 16 == 0",
        )?;
    }
    if enc == Encoding::Mx {
        need(c % mxfp4::MX_BLOCK == 0, "MXFP4 needs in % 32 == 0")?;
    }
    if enc == Encoding::Nv {
        need(c % nvfp4::NV_BLOCK == 0, "NVFP4 needs in % 16 == 0")?;
    }
    let g = |n: usize| fp8::grid(n, fp8::FP8_BLOCK);
    // (suffix kind, dtype, per-member shape)
    let comps: Vec<(&str, Dtype, Vec<usize>)> = match enc {
        Encoding::F32 => vec![("", Dtype::F32, e.shape.clone())],
        Encoding::Bf16 => vec![("", Dtype::BF16, e.shape.clone())],
        Encoding::I64 => vec![("", Dtype::I64, e.shape.clone())],
        Encoding::Fp8 if hf.is_some() => vec![
            ("", Dtype::F8E4M3, vec![r, c]),
            ("_scale_inv", Dtype::F32, vec![g(r), g(c)]),
        ],
        Encoding::Fp8 => vec![
            ("", Dtype::F8E4M3, vec![r, c]),
            (".scale", Dtype::F8E8M0, vec![g(r), g(c)]),
        ],
        Encoding::Mx if hf.is_some() => vec![
            ("", Dtype::I8, vec![r, c / 2]),
            ("_scale", Dtype::F8E8M0, vec![r, c / 32]),
        ],
        Encoding::Mx => vec![
            ("", Dtype::I8, vec![r, c / 2]),
            (".scale", Dtype::F8E8M0, vec![r, c / 32]),
        ],
        Encoding::Nv => vec![
            ("", Dtype::U8, vec![r, c / 2]),
            ("_scale", Dtype::F8E4M3, vec![r, c / 16]),
            ("_scale_2", Dtype::F32, vec![]),
        ],
        Encoding::Int8 => vec![
            ("", Dtype::I8, vec![r, c]),
            ("_scale", Dtype::F32, vec![r, 1]),
            ("_offset", Dtype::F32, vec![r, 1]),
        ],
        Encoding::Int4 => vec![
            ("", Dtype::I8, vec![r / 2, c]),
            ("_scale", Dtype::F32, vec![r, 1]),
            ("_offset", Dtype::F32, vec![r, 1]),
            (".scale_bias", Dtype::F32, vec![r, int4_bias_chunks(&members[0])]),
        ],
        Encoding::Mx8 => vec![
            ("", Dtype::F8E4M3, vec![r, c]),
            ("_scale", Dtype::U8, vec![r, mxfp8::scales_per_row(c)]),
        ],
    };
    let specs = comps
        .into_iter()
        .map(|(suffix, dtype, shape)| {
            let (name, shape) = match hf {
                None => {
                    let name = match suffix {
                        ".scale" | ".scale_bias" => format!(
                            "{}{suffix}",
                            members[0].strip_suffix(".weight").unwrap_or(&members[0])
                        ),
                        _ => format!("{}{suffix}", members[0]),
                    };
                    (name, shape)
                }
                Some((base, 0)) => (format!("{base}{suffix}"), shape),
                Some((base, experts)) => {
                    // Fused: per expert, the parts' components stacked along their first axis.
                    let parts = members.len() / experts;
                    let fused = match shape.split_first() {
                        None if parts == 1 => vec![experts],
                        None => vec![experts, parts],
                        Some((first, rest)) => [vec![experts, parts * first], rest.to_vec()].concat(),
                    };
                    (format!("{base}{suffix}"), fused)
                }
            };
            OutSpec { name, dtype, shape }
        })
        .collect();
    Ok(specs)
}

fn plan_groups(ck: &Checkpoint, opts: &ConvertOptions) -> Result<Vec<Group>, ConvertError> {
    let units: Vec<(Vec<String>, String, usize)> = match opts.layout {
        Layout::DeepSeek => ck
            .tensor_names()
            .into_iter()
            .map(|n| {
                let hf = match layout::to_hf(&n) {
                    Some(layout::HfLocation::Tensor(h)) => h,
                    Some(layout::HfLocation::Expert { fused, .. }) => fused,
                    None => n.clone(),
                };
                (vec![n], hf, 0)
            })
            .collect(),
        Layout::Hf => ck
            .hf_tensor_names()
            .into_iter()
            .map(|h| {
                let members = ck.hf_members(&h).unwrap_or_default();
                let experts = match layout::from_hf(&h) {
                    Some(layout::DeepSeekSource::FusedExperts { .. }) => ck.hf_shape(&h).map_or(0, |s| s[0]),
                    _ => 0,
                };
                (members, h, experts)
            })
            .collect(),
    };
    units
        .into_iter()
        .map(|(members, hf_name, experts)| {
            let e = ck.entry(&members[0])?;
            let enc = encoding(&members[0], e.class, opts.target);
            let hf = (opts.layout == Layout::Hf).then_some((hf_name.as_str(), experts));
            let outputs = out_specs(ck, &members, hf, enc)?;
            let shape = match opts.layout {
                Layout::Hf => ck.hf_shape(&hf_name).unwrap_or_default(),
                Layout::DeepSeek => e.shape.clone(),
            };
            let mut input_bytes = 0;
            let mut work_bytes = 0;
            for m in &members {
                let me = ck.entry(m)?;
                input_bytes += me.source.stored_bytes();
                work_bytes += 4 * (me.rows * me.cols) as u64;
            }
            Ok(Group {
                members,
                encoding: enc,
                hf_name,
                outputs,
                shape,
                input_bytes,
                work_bytes,
            })
        })
        .collect()
}

fn check_importance(ck: &Checkpoint, cal: &Calibration) -> Result<(), ConvertError> {
    let Calibration::WeightSearch {
        channel_importance: Some(map),
    } = cal
    else {
        return Ok(());
    };
    for (key, v) in map {
        let shape = ck.hf_shape(key).ok_or_else(|| ConvertError::Options {
            reason: format!(
                "channel importance for `{key}`, which is not a tensor of this checkpoint (use HF names)"
            ),
        })?;
        let cols = shape.last().copied().unwrap_or(1);
        let experts = match layout::from_hf(key) {
            Some(layout::DeepSeekSource::FusedExperts { .. }) => shape[0],
            _ => 1,
        };
        if v.len() != cols && v.len() != experts * cols {
            return Err(ConvertError::Options {
                reason: format!(
                    "channel importance for `{key}` has {} entries, expected {cols} or {}",
                    v.len(),
                    experts * cols
                ),
            });
        }
        if v.iter().any(|w| !w.is_finite() || *w < 0.0) {
            return Err(ConvertError::Options {
                reason: format!("channel importance for `{key}` must be finite and non-negative"),
            });
        }
    }
    Ok(())
}

fn check_smoothing(
    ck: &Checkpoint,
    smoothing: Option<&HashMap<String, Vec<f32>>>,
) -> Result<(), ConvertError> {
    for (norm, s) in smoothing.into_iter().flatten() {
        let bad = |reason: String| ConvertError::Options {
            reason: format!("smoothing factors for `{norm}`: {reason}"),
        };
        let shape = ck
            .shape(norm)
            .ok_or_else(|| bad("not a tensor of this checkpoint (use DeepSeek names)".into()))?;
        if shape != [s.len()] {
            return Err(bad(format!("{} factors for a norm of shape {shape:?}", s.len())));
        }
        if s.iter().any(|v| !v.is_finite() || *v <= 0.0) {
            return Err(bad("factors must be finite and positive".into()));
        }
    }
    Ok(())
}

fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

fn plan_shards(groups: &[Group], shard_size: u64, shard_name: fn(usize, usize) -> String) -> Vec<ShardPlan> {
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by(|&a, &b| layout::natural_cmp(&groups[a].outputs[0].name, &groups[b].outputs[0].name));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut cur = 0u64;
    for gi in order {
        let size: u64 = groups[gi].outputs.iter().map(OutSpec::bytes).sum();
        match bins.last_mut() {
            Some(bin) if cur + size <= shard_size => bin.push(gi),
            _ => {
                bins.push(vec![gi]);
                cur = 0;
            }
        }
        cur += size;
    }
    let n = bins.len();
    bins.into_iter()
        .enumerate()
        .map(|(i, gs)| {
            let mut planned: Vec<PlannedTensor> = gs
                .iter()
                .flat_map(|&g| groups[g].outputs.iter())
                .map(|o| PlannedTensor {
                    name: o.name.clone(),
                    dtype: o.dtype.name().into(),
                    shape: o.shape.clone(),
                    len: o.bytes(),
                })
                .collect();
            let (header, offs) = st::layout_shard(&mut planned);
            let size = header.len() as u64 + planned.iter().map(|t| t.len).sum::<u64>();
            let offsets = planned.into_iter().zip(offs).map(|(t, o)| (t.name, o)).collect();
            ShardPlan {
                name: shard_name(i, n),
                groups: gs,
                header,
                offsets,
                size,
            }
        })
        .collect()
}

/// Removes the temporary directory on drop unless told to keep it.
struct TmpGuard {
    path: PathBuf,
    keep: bool,
}

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

struct Run<'a> {
    ck: &'a Checkpoint,
    opts: &'a ConvertOptions,
    groups: &'a [Group],
    shards: &'a [ShardPlan],
    out: PathBuf,
}

impl Run<'_> {
    fn go(&self) -> Result<ConvertReport, ConvertError> {
        let t0 = Instant::now();
        let tmp = tmp_dir(&self.out);
        let fingerprint = self.fingerprint();
        let mut manifest = self.prepare_tmp(&tmp, &fingerprint)?;
        let mut guard = TmpGuard {
            path: tmp.clone(),
            keep: false,
        };
        let mut report = self.empty_report();
        let calibrating = matches!(self.opts.calibration, Calibration::WeightSearch { .. });
        if calibrating && !matches!(self.opts.target, Target::Fp4Mx | Target::Fp4Nv) {
            report.notes.push(format!(
                "weight search only chooses FP4 block scales; target {} has none",
                self.opts.target.name()
            ));
        }
        let pb = self.progress_bar();
        for shard in self.shards {
            if let Some(rec) = manifest.done.get(&shard.name) {
                if verify(&tmp.join(&shard.name), rec) {
                    report.shards_resumed += 1;
                    pb.inc(shard.groups.iter().map(|&g| self.groups[g].input_bytes).sum());
                    report.tensors.extend(
                        shard
                            .groups
                            .iter()
                            .map(|&g| self.tensor_report(g, &shard.name, None)),
                    );
                    continue;
                }
                manifest.done.remove(&shard.name);
            }
            if self
                .opts
                .stop_after_shards
                .is_some_and(|n| report.shards_written >= n)
            {
                guard.keep = true;
                pb.finish_and_clear();
                report.seconds = t0.elapsed().as_secs_f64();
                report
                    .tensors
                    .sort_by(|a, b| layout::natural_cmp(&a.name, &b.name));
                return Ok(report);
            }
            let (rec, tensors) = self.write_shard(&tmp, shard, &pb)?;
            report.shards_written += 1;
            report.bytes_out += rec.size;
            report.bytes_in += shard
                .groups
                .iter()
                .map(|&g| self.groups[g].input_bytes)
                .sum::<u64>();
            report.tensors.extend(tensors);
            manifest.done.insert(shard.name.clone(), rec);
            save_manifest(&tmp, &manifest)?;
        }
        pb.finish_and_clear();
        self.finish(&tmp, &mut report)?;
        fs::remove_file(tmp.join(MANIFEST)).map_err(|e| ConvertError::io(tmp.join(MANIFEST), e))?;
        if self.out.exists() {
            fs::remove_dir(&self.out).map_err(|e| ConvertError::io(&self.out, e))?;
        }
        fs::rename(&tmp, &self.out).map_err(|e| ConvertError::io(&self.out, e))?;
        guard.keep = true;
        report.complete = true;
        report.seconds = t0.elapsed().as_secs_f64();
        report
            .tensors
            .sort_by(|a, b| layout::natural_cmp(&a.name, &b.name));
        Ok(report)
    }

    fn empty_report(&self) -> ConvertReport {
        let calibration = match &self.opts.calibration {
            Calibration::Rtn => "rtn".to_string(),
            Calibration::WeightSearch {
                channel_importance: None,
            } => "weight-search".into(),
            Calibration::WeightSearch {
                channel_importance: Some(m),
            } => {
                format!("weight-search ({} importance vectors)", m.len())
            }
        };
        let calibration = match &self.opts.smoothing {
            Some(m) => format!("{calibration} + SmoothQuant factors of {} norms", m.len()),
            None => calibration,
        };
        let name = |l: Layout| if l == Layout::Hf { "hf" } else { "deepseek" }.to_string();
        ConvertReport {
            input: self.opts.input.clone(),
            output: self.out.clone(),
            input_layout: name(self.ck.layout()),
            output_layout: name(self.opts.layout),
            target: self.opts.target.name().into(),
            calibration,
            complete: false,
            shards_total: self.shards.len(),
            shards_written: 0,
            shards_resumed: 0,
            bytes_in: 0,
            bytes_out: 0,
            seconds: 0.0,
            tensors: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn progress_bar(&self) -> ProgressBar {
        if !self.opts.progress {
            return ProgressBar::hidden();
        }
        let total = self.groups.iter().map(|g| g.input_bytes).sum();
        let pb = ProgressBar::new(total);
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        ) {
            pb.set_style(style);
        }
        pb
    }

    /// CRC-32 over everything that determines the output bytes.
    fn fingerprint(&self) -> String {
        let mut h = crc32fast::Hasher::new();
        h.update(TOOL.as_bytes());
        h.update(self.opts.target.name().as_bytes());
        h.update(&[self.opts.layout as u8]);
        h.update(&self.opts.shard_size.to_le_bytes());
        if let Calibration::WeightSearch { channel_importance } = &self.opts.calibration {
            h.update(b"search");
            let mut keys: Vec<_> = channel_importance.iter().flatten().collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in keys {
                h.update(k.as_bytes());
                v.iter().for_each(|w| h.update(&w.to_le_bytes()));
            }
        }
        let mut smoothing: Vec<_> = self.opts.smoothing.iter().flatten().collect();
        smoothing.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in smoothing {
            h.update(k.as_bytes());
            v.iter().for_each(|w| h.update(&w.to_le_bytes()));
        }
        for f in self.ck.files() {
            h.update(
                f.path
                    .file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            h.update(&(f.bytes().len() as u64).to_le_bytes());
            h.update(f.header_bytes());
        }
        for s in self.shards {
            h.update(s.name.as_bytes());
            h.update(&s.header);
        }
        format!("{:08x}", h.finalize())
    }

    /// Creates the temporary directory, or reopens one left by an interrupted run with the same
    /// fingerprint (a different fingerprint starts over).
    fn prepare_tmp(&self, tmp: &Path, fingerprint: &str) -> Result<Manifest, ConvertError> {
        if tmp.exists() {
            let m: Option<Manifest> = fs::read(tmp.join(MANIFEST))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match m {
                Some(m) if m.tool == TOOL && m.fingerprint == fingerprint => return Ok(m),
                Some(m) if m.tool == TOOL => fs::remove_dir_all(tmp).map_err(|e| ConvertError::io(tmp, e))?,
                _ => {
                    return Err(ConvertError::OutputExists {
                        output: tmp.to_path_buf(),
                    })
                }
            }
        }
        fs::create_dir(tmp).map_err(|e| ConvertError::io(tmp, e))?;
        let m = Manifest {
            tool: TOOL.into(),
            fingerprint: fingerprint.into(),
            done: BTreeMap::new(),
        };
        save_manifest(tmp, &m)?;
        Ok(m)
    }

    fn tensor_report(&self, gi: usize, shard: &str, result: Option<(ErrStats, bool)>) -> TensorReport {
        let g = &self.groups[gi];
        let input = self
            .ck
            .entry(&g.members[0])
            .map(|e| e.source.describe())
            .unwrap_or_default();
        let output = g
            .outputs
            .iter()
            .enumerate()
            .map(|(k, o)| match (k, g.encoding) {
                (0, Encoding::Mx | Encoding::Nv) => format!("{}(E2M1x2)", o.dtype),
                (1, Encoding::Mx) => format!("{}/32", o.dtype),
                (1, Encoding::Nv) => format!("{}/16", o.dtype),
                (1, Encoding::Fp8) => format!("{}/128x128", o.dtype),
                _ => o.dtype.to_string(),
            })
            .collect::<Vec<_>>()
            .join("+");
        let search =
            matches!(self.opts.calibration, Calibration::WeightSearch { .. }) && g.encoding.calibrated();
        let copied = result.is_some_and(|r| r.1);
        let scheme = match (copied, search) {
            (false, true) => format!("{}+search", g.encoding.scheme()),
            _ => g.encoding.scheme().to_string(),
        };
        let stats = result.map(|(s, copied)| ErrorStats {
            max_abs_err: s.max_abs,
            rel_l2: s.rel_l2(),
            rel_l2_rtn: (search && !copied).then(|| s.rel_l2_rtn()),
        });
        TensorReport {
            name: g.outputs[0].name.clone(),
            shard: shard.to_string(),
            shape: g.shape.clone(),
            input,
            output,
            scheme,
            copied,
            stats,
        }
    }

    fn write_shard(
        &self,
        tmp: &Path,
        shard: &ShardPlan,
        pb: &ProgressBar,
    ) -> Result<(ShardRecord, Vec<TensorReport>), ConvertError> {
        let final_path = tmp.join(&shard.name);
        let path = tmp.join(format!("{}.partial", shard.name));
        let ioerr = |e| ConvertError::io(&path, e);
        let mut file = File::create(&path).map_err(ioerr)?;
        file.set_len(shard.size).map_err(ioerr)?;
        file.write_all(&shard.header).map_err(ioerr)?;
        let mut reports = Vec::with_capacity(shard.groups.len());
        for batch in batches(self.groups, &shard.groups) {
            let encoded: Vec<Vec<Encoded>> = batch
                .par_iter()
                .map(|&gi| self.encode_group(&self.groups[gi]))
                .collect::<Result<_, _>>()?;
            for (&gi, members) in batch.iter().zip(encoded) {
                let g = &self.groups[gi];
                for (k, spec) in g.outputs.iter().enumerate() {
                    let off = shard.offsets[&spec.name];
                    file.seek(SeekFrom::Start(off)).map_err(ioerr)?;
                    for m in &members {
                        file.write_all(&m.comps[k]).map_err(ioerr)?;
                    }
                }
                let stats = members.iter().fold(ErrStats::default(), |a, m| a.merge(m.stats));
                let copied = members.iter().all(|m| m.copied);
                reports.push(self.tensor_report(gi, &shard.name, Some((stats, copied))));
                pb.inc(g.input_bytes);
            }
        }
        file.sync_all().map_err(ioerr)?;
        drop(file);
        let rec = ShardRecord {
            size: shard.size,
            crc32: file_crc(&path)?,
        };
        fs::rename(&path, &final_path).map_err(|e| ConvertError::io(&final_path, e))?;
        Ok((rec, reports))
    }

    fn encode_group(&self, g: &Group) -> Result<Vec<Encoded>, ConvertError> {
        let importance = match &self.opts.calibration {
            Calibration::WeightSearch { channel_importance } => {
                Some(channel_importance.as_ref().and_then(|m| m.get(&g.hf_name)))
            }
            Calibration::Rtn => None,
        };
        g.members
            .par_iter()
            .map(|m| {
                let e = self.ck.entry(m)?;
                let search = match importance {
                    None => ScaleSearch::Off,
                    Some(None) => ScaleSearch::MinSquaredError { importance: None },
                    Some(Some(w)) => {
                        let expert = match layout::to_hf(m) {
                            Some(layout::HfLocation::Expert { expert, .. }) => expert,
                            _ => 0,
                        };
                        let w = if w.len() == e.cols {
                            &w[..]
                        } else {
                            &w[expert * e.cols..(expert + 1) * e.cols]
                        };
                        ScaleSearch::MinSquaredError { importance: Some(w) }
                    }
                };
                self.encode(m, e, g.encoding, search)
            })
            .collect()
    }

    /// Encodes one logical tensor.
    fn encode(
        &self,
        name: &str,
        e: &Entry,
        enc: Encoding,
        search: ScaleSearch<'_>,
    ) -> Result<Encoded, ConvertError> {
        let hf = self.opts.layout == Layout::Hf;
        let smoothed = self.smoothing_of(name).is_some();
        if !smoothed {
            if let Some(copied) = self.copy_if_same(e, enc, hf)? {
                return Ok(copied);
            }
        }
        let decode = |r0: usize, buf: &mut [f32]| self.decode(name, e, r0, buf);
        let (rows, cols) = (e.rows, e.cols);
        let ck = self.ck;
        let mut stats = ErrStats::default();
        let comps = match enc {
            Encoding::I64 => {
                let v = ck.read_ints(name, e)?;
                vec![v.iter().flat_map(|x| x.to_le_bytes()).collect()]
            }
            Encoding::F32 | Encoding::Bf16 => {
                let size = if enc == Encoding::F32 { 4 } else { 2 };
                let mut out = vec![0u8; rows * cols * size];
                stats = out
                    .par_chunks_mut((BAND_ROWS * cols * size).max(1))
                    .enumerate()
                    .map_init(Vec::new, |buf: &mut Vec<f32>, (bi, o)| {
                        buf.resize(o.len() / size, 0.0);
                        decode(bi * BAND_ROWS, buf)?;
                        if enc == Encoding::F32 {
                            for (c, v) in o.chunks_exact_mut(4).zip(buf.iter()) {
                                c.copy_from_slice(&v.to_le_bytes());
                            }
                            Ok(ErrStats::of_map(buf, |v| v))
                        } else {
                            for (c, v) in o.chunks_exact_mut(2).zip(buf.iter()) {
                                c.copy_from_slice(&codec::f32_to_bf16(*v).to_le_bytes());
                            }
                            Ok(ErrStats::of_map(buf, |v| {
                                codec::bf16_to_f32(codec::f32_to_bf16(v))
                            }))
                        }
                    })
                    .try_reduce(ErrStats::default, |a, b| Ok(a.merge(b)))?;
                vec![out]
            }
            Encoding::Fp8 => {
                const B: usize = fp8::FP8_BLOCK;
                let gc = fp8::grid(cols, B);
                let mut codes = vec![0u8; rows * cols];
                let mut scales = vec![0u8; fp8::grid(rows, B) * gc];
                stats = codes
                    .par_chunks_mut((B * cols).max(1))
                    .zip(scales.par_chunks_mut(gc.max(1)))
                    .enumerate()
                    .map_init(Vec::new, |buf: &mut Vec<f32>, (bi, (c, s))| {
                        buf.resize(c.len(), 0.0);
                        decode(bi * B, buf)?;
                        Ok(fp8::quantize_band(buf, cols, B, c, s))
                    })
                    .try_reduce(ErrStats::default, |a, b| Ok(a.merge(b)))?;
                vec![codes, fp8_scale_bytes(scales, hf)]
            }
            Encoding::Mx => {
                let mut packed = vec![0u8; rows * cols / 2];
                let mut scales = vec![0u8; rows * cols / mxfp4::MX_BLOCK];
                stats = packed
                    .par_chunks_mut((BAND_ROWS * cols / 2).max(1))
                    .zip(scales.par_chunks_mut((BAND_ROWS * cols / mxfp4::MX_BLOCK).max(1)))
                    .enumerate()
                    .map_init(Vec::new, |buf: &mut Vec<f32>, (bi, (p, s))| {
                        buf.resize(p.len() * 2, 0.0);
                        decode(bi * BAND_ROWS, buf)?;
                        Ok(mxfp4::quantize_rows(
                            buf,
                            cols,
                            mxfp4::MxRule::Rceil,
                            search,
                            p,
                            s,
                        ))
                    })
                    .try_reduce(ErrStats::default, |a, b| Ok(a.merge(b)))?;
                vec![packed, scales]
            }
            Encoding::Nv => {
                let nb = rows.div_ceil(BAND_ROWS);
                let amax = (0..nb)
                    .into_par_iter()
                    .map_init(Vec::new, |buf: &mut Vec<f32>, bi| {
                        let n = (rows - bi * BAND_ROWS).min(BAND_ROWS);
                        buf.resize(n * cols, 0.0);
                        decode(bi * BAND_ROWS, buf)?;
                        Ok(buf.iter().fold(0f32, |m, v| m.max(v.abs())))
                    })
                    .try_reduce(|| 0f32, |a, b| Ok(a.max(b)))?;
                let sf2 = nvfp4::tensor_scale(amax);
                let mut packed = vec![0u8; rows * cols / 2];
                let mut scales = vec![0u8; rows * cols / nvfp4::NV_BLOCK];
                stats = packed
                    .par_chunks_mut((BAND_ROWS * cols / 2).max(1))
                    .zip(scales.par_chunks_mut((BAND_ROWS * cols / nvfp4::NV_BLOCK).max(1)))
                    .enumerate()
                    .map_init(Vec::new, |buf: &mut Vec<f32>, (bi, (p, s))| {
                        buf.resize(p.len() * 2, 0.0);
                        decode(bi * BAND_ROWS, buf)?;
                        Ok(nvfp4::quantize_rows(buf, cols, sf2, search, p, s))
                    })
                    .try_reduce(ErrStats::default, |a, b| Ok(a.merge(b)))?;
                vec![packed, scales, sf2.to_le_bytes().to_vec()]
            }
            Encoding::Int8 => {
                let per_channel = |x: &[f32], c: &mut [u8], s: &mut [f32]| int8::quantize_rows(x, cols, c, s);
                let (codes, scales, band_stats) = per_row_scaled(rows, cols, &decode, per_channel)?;
                stats = band_stats;
                let scales = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
                vec![codes, scales, vec![0u8; rows * 4]]
            }
            Encoding::Int4 => {
                let per_channel =
                    |x: &[f32], c: &mut [i8], s: &mut [f32]| int4::quantize_rows(x, cols, cols, c, s);
                let (codes, scales, band_stats) = per_row_scaled(rows, cols, &decode, per_channel)?;
                stats = band_stats;
                let bias = int4::scale_bias(&codes, &scales, cols, int4_bias_chunks(name));
                let le = |v: &[f32]| v.iter().flat_map(|s| s.to_le_bytes()).collect();
                vec![
                    int4::pack_row_pairs(&codes, cols),
                    le(&scales),
                    vec![0u8; rows * 4],
                    le(&bias),
                ]
            }
            Encoding::Mx8 => {
                let per_row = mxfp8::scales_per_row(cols);
                let mut codes = vec![0u8; rows * cols];
                let mut scales = vec![0u8; rows * per_row];
                stats = codes
                    .par_chunks_mut((BAND_ROWS * cols).max(1))
                    .zip(scales.par_chunks_mut(BAND_ROWS * per_row))
                    .enumerate()
                    .map_init(Vec::new, |buf: &mut Vec<f32>, (bi, (c, s))| {
                        buf.resize(c.len(), 0.0);
                        decode(bi * BAND_ROWS, buf)?;
                        Ok(mxfp8::quantize_rows(buf, cols, c, s))
                    })
                    .try_reduce(ErrStats::default, |a, b| Ok(a.merge(b)))?;
                vec![codes, scales]
            }
        };
        Ok(Encoded {
            comps,
            stats,
            copied: false,
        })
    }

    /// The SmoothQuant factors that apply to DeepSeek tensor `name`, and whether it is the norm (divided by
    /// them) rather than a reader of its output (whose input columns are multiplied).
    fn smoothing_of(&self, name: &str) -> Option<(&[f32], bool)> {
        let smoothing = self.opts.smoothing.as_ref()?;
        if let Some(s) = smoothing.get(name) {
            return Some((s, true));
        }
        layout::smoothing_norm(name)
            .and_then(|norm| smoothing.get(&norm))
            .map(|s| (&s[..], false))
    }

    /// Decodes rows `[r0, ..)` of `e` (DeepSeek tensor `name`) into `out`, with SmoothQuant folded in.
    fn decode(&self, name: &str, e: &Entry, r0: usize, out: &mut [f32]) -> Result<(), ConvertError> {
        self.ck.decode_rows(e, r0, out)?;
        let Some((s, norm)) = self.smoothing_of(name) else {
            return Ok(());
        };
        if s.len() != e.cols {
            return Err(ConvertError::Unsupported {
                tensor: name.into(),
                reason: format!(
                    "{} input columns, but its norm has {} smoothing factors",
                    e.cols,
                    s.len()
                ),
            });
        }
        for row in out.chunks_exact_mut(e.cols) {
            for (v, f) in row.iter_mut().zip(s) {
                *v = if norm { *v / f } else { *v * f };
            }
        }
        Ok(())
    }

    /// Copies stored bytes when the input already has the output's encoding (checking them for
    /// NaN codes): FP8 E8M0 128x128 (or F32 scales into the HF layout), MXFP4 per 32, NVFP4 per 16.
    fn copy_if_same(&self, e: &Entry, enc: Encoding, hf: bool) -> Result<Option<Encoded>, ConvertError> {
        let ck = self.ck;
        let comps = match (&e.source, enc) {
            (Source::Fp8 { codes, scales, block }, Encoding::Fp8)
                if *block == fp8::FP8_BLOCK && (scales.dtype == Dtype::F8E8M0 || hf) =>
            {
                let (c, s) = (ck.view_bytes(codes), ck.view_bytes(scales));
                let s = if scales.dtype == Dtype::F8E8M0 {
                    check_codes(ck, codes, c, |b| b & 0x7F == 0x7F)?;
                    check_codes(ck, scales, s, |b| b == 0xFF)?;
                    fp8_scale_bytes(s.to_vec(), hf)
                } else {
                    check_codes(ck, codes, c, |b| b & 0x7F == 0x7F)?;
                    let bad = s
                        .chunks_exact(4)
                        .position(|x| !f32::from_le_bytes([x[0], x[1], x[2], x[3]]).is_finite());
                    if let Some(i) = bad {
                        return Err(non_finite(ck, scales, i));
                    }
                    s.to_vec()
                };
                vec![c.to_vec(), s]
            }
            (Source::Mx { codes, scales, block }, Encoding::Mx) if *block == mxfp4::MX_BLOCK => {
                let s = ck.view_bytes(scales);
                check_codes(ck, scales, s, |b| b == 0xFF)?;
                vec![ck.view_bytes(codes).to_vec(), s.to_vec()]
            }
            (
                Source::Nv {
                    codes,
                    scales,
                    scale2,
                    block,
                },
                Encoding::Nv,
            ) if *block == nvfp4::NV_BLOCK => {
                let s = ck.view_bytes(scales);
                check_codes(ck, scales, s, |b| b & 0x7F == 0x7F)?;
                let s2 = ck.scale2(scale2)?;
                vec![
                    ck.view_bytes(codes).to_vec(),
                    s.to_vec(),
                    s2.to_le_bytes().to_vec(),
                ]
            }
            _ => return Ok(None),
        };
        // Copies are exact: zero error.
        Ok(Some(Encoded {
            comps,
            stats: ErrStats::default(),
            copied: true,
        }))
    }

    /// `quant_model_description.json` for an Ascend target: each output tensor typed by its group.
    fn ascend_description(&self, model: QuantType) -> Value {
        let tensors = self.groups.iter().flat_map(|g| {
            let t = match g.encoding {
                Encoding::Int8 => QuantType::W8a8Dynamic,
                Encoding::Int4 => QuantType::W4a8Dynamic,
                Encoding::Mx8 => QuantType::W8a8Mxfp8,
                _ => QuantType::Float,
            };
            g.outputs.iter().map(move |o| (o.name.as_str(), t))
        });
        ascend::description(model, tensors)
    }

    /// Writes index, config and the other files of the input into `tmp`.
    fn finish(&self, tmp: &Path, report: &mut ConvertReport) -> Result<(), ConvertError> {
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for s in self.shards {
            for &g in &s.groups {
                for o in &self.groups[g].outputs {
                    weight_map.insert(o.name.clone(), s.name.clone());
                    total += o.bytes();
                }
            }
        }
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let index_file = match self.opts.target.ascend() {
            Some(model) => {
                write_json(
                    &tmp.join(ascend::DESCRIPTION_FILE),
                    &self.ascend_description(model),
                )?;
                st::ASCEND_INDEX_FILE
            }
            None => st::INDEX_FILE,
        };
        write_json(&tmp.join(index_file), &index)?;
        match self.ck.config() {
            Some(cfg) => {
                let path = self.opts.input.join("config.json");
                write_json(
                    &tmp.join("config.json"),
                    &update_config(cfg, self.opts.target, self.opts.layout, &path)?,
                )?;
            }
            None => report
                .notes
                .push("the input has no config.json; none written".into()),
        }
        let rd = fs::read_dir(&self.opts.input).map_err(|e| ConvertError::io(&self.opts.input, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| ConvertError::io(&self.opts.input, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let written = [
                st::INDEX_FILE,
                st::ASCEND_INDEX_FILE,
                ascend::DESCRIPTION_FILE,
                "config.json",
            ];
            if name.ends_with(".safetensors") || written.contains(&name.as_str()) {
                continue;
            }
            if path.is_file() {
                fs::copy(&path, tmp.join(&name)).map_err(|e| ConvertError::io(&path, e))?;
            } else {
                report
                    .notes
                    .push(format!("not copied (not a regular file): {}", path.display()));
            }
        }
        Ok(())
    }
}

/// Groups of a shard in batches whose f32 working set stays under [`BATCH_BYTES`].
fn batches(groups: &[Group], ids: &[usize]) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur = 0u64;
    for &g in ids {
        let w = groups[g].work_bytes;
        match out.last_mut() {
            Some(b) if cur + w <= BATCH_BYTES => b.push(g),
            _ => {
                out.push(vec![g]);
                cur = 0;
            }
        }
        cur += w;
    }
    out
}

/// E8M0 scale bytes as stored: unchanged (DeepSeek layout) or as F32 `_scale_inv` (HF layout).
fn fp8_scale_bytes(scales: Vec<u8>, hf: bool) -> Vec<u8> {
    if hf {
        scales
            .iter()
            .flat_map(|&b| codec::e8m0_to_f32(b).to_le_bytes())
            .collect()
    } else {
        scales
    }
}

fn non_finite(ck: &Checkpoint, v: &crate::checkpoint::View, i: usize) -> ConvertError {
    ConvertError::NonFinite {
        file: ck.files()[v.file].path.clone(),
        tensor: v.tensor.clone(),
        index: v.elem_base + i,
    }
}

fn check_codes(
    ck: &Checkpoint,
    v: &crate::checkpoint::View,
    bytes: &[u8],
    is_nan: impl Fn(u8) -> bool,
) -> Result<(), ConvertError> {
    match bytes.iter().position(|&b| is_nan(b)) {
        Some(i) => Err(non_finite(ck, v, i)),
        None => Ok(()),
    }
}

/// `config.json` for the output: `quantization_config` (and `torch_dtype`) reflect the target.
fn update_config(cfg: &Value, target: Target, layout: Layout, path: &Path) -> Result<Value, ConvertError> {
    let mut c = cfg.as_object().cloned().ok_or_else(|| ConvertError::Json {
        file: path.to_path_buf(),
        reason: "config.json is not a JSON object".into(),
    })?;
    c.remove("quantization_config");
    c.remove("expert_dtype");
    let dtype = if target == Target::F32 {
        "float32"
    } else {
        "bfloat16"
    };
    c.insert("torch_dtype".into(), dtype.into());
    if c.get("dtype").is_some_and(Value::is_string) {
        c.insert("dtype".into(), dtype.into());
    }
    if matches!(target, Target::Fp8 | Target::Fp4Mx | Target::Fp4Nv) {
        let mut q = json!({
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [fp8::FP8_BLOCK, fp8::FP8_BLOCK],
        });
        if layout == Layout::DeepSeek {
            q["scale_fmt"] = "ue8m0".into();
        }
        match target {
            Target::Fp4Mx => q["expert_dtype"] = "fp4".into(),
            Target::Fp4Nv => q["expert_dtype"] = "nvfp4".into(),
            _ => {}
        }
        c.insert("quantization_config".into(), q);
    }
    Ok(Value::Object(c))
}

fn write_json(path: &Path, v: &Value) -> Result<(), ConvertError> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    fs::write(path, text + "\n").map_err(|e| ConvertError::io(path, e))
}

fn tmp_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{name}.tmp-v4convert"))
}

fn save_manifest(tmp: &Path, m: &Manifest) -> Result<(), ConvertError> {
    let text = serde_json::to_vec_pretty(m).unwrap_or_default();
    atomic::write_bytes(&tmp.join(MANIFEST), &text).map_err(|e| ConvertError::io(&e.path, e.source))
}

fn file_crc(path: &Path) -> Result<u32, ConvertError> {
    let f = ShardFile::open(path)?;
    Ok(crc32fast::hash(f.bytes()))
}

/// A shard from an earlier run is kept when its size and CRC-32 match the manifest.
fn verify(path: &Path, rec: &ShardRecord) -> bool {
    fs::metadata(path).is_ok_and(|m| m.len() == rec.size) && file_crc(path).is_ok_and(|c| c == rec.crc32)
}
