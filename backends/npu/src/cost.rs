//! Per-op cost model: an ESTIMATE from the chip sheet, never a measurement or a claim.
//!
//! - cube ops: output tiled in `BASE_M x BASE_N` L0C tiles, K in `BASE_K` Mmad steps; per Mmad
//!   `mmad_overhead + MACs / rate` cycles (rate = fp16 MAC/cycle divided for f32/HF32 operands);
//!   per tile MTE2 (A and B panels GM -> L1) and FIX (C tile out) in bytes / MTE bytes per cycle;
//!   double buffering overlaps them (tile time = max of the pipes); op time = ceil(tiles / cube cores)
//!   x tile time, floored by total bytes / HBM bandwidth, plus launch overhead;
//! - vector ops: bytes moved / (128 or 64 B/cycle) spread over the vector cores, floored by HBM;
//! - AI CPU: elements / AI CPU rate; host fallback: D2H + H2D of inputs and output over PCIe.
//!
//! The bound is the largest term (cube, vector, memory, launch, ai_cpu, host).

use crate::numerics::NpuDType;
use crate::policy::{ChipSheet, PrecisionPolicy};
use crate::support::{Engine, OpClass};
use burn_backend::{DType, Shape};

pub const BASE_M: usize = 128;
pub const BASE_N: usize = 256;
pub const BASE_K: usize = 64;

/// What limits an op's estimated time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bound {
    Cube,
    Vector,
    Memory,
    Launch,
    AiCpu,
    Host,
    None,
}

impl Bound {
    pub fn name(self) -> &'static str {
        match self {
            Bound::Cube => "cube",
            Bound::Vector => "vector",
            Bound::Memory => "memory",
            Bound::Launch => "launch",
            Bound::AiCpu => "ai_cpu",
            Bound::Host => "host",
            Bound::None => "-",
        }
    }
}

/// One op's estimate.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    pub time_us: f64,
    pub flops: f64,
    pub bytes: f64,
    pub cube_cycles: f64,
    pub vector_cycles: f64,
    pub mte_cycles: f64,
    pub bound: Option<Bound>,
}

fn dtype_bytes(d: DType) -> f64 {
    d.size() as f64
}

fn numel(s: &Shape) -> f64 {
    s.num_elements() as f64
}

/// Matmul dimensions (batch, m, k, n) from two operand shapes (batch dims broadcast).
pub fn matmul_dims(a: &Shape, b: &Shape) -> (usize, usize, usize, usize) {
    let (ra, rb) = (a.num_dims(), b.num_dims());
    let m = if ra >= 2 { a[ra - 2] } else { 1 };
    let k = a[ra - 1];
    let n = b[rb - 1];
    let r = ra.max(rb);
    let mut batch = 1;
    for i in 0..r.saturating_sub(2) {
        let da = if i + ra >= r { a[i + ra - r] } else { 1 };
        let db = if i + rb >= r { b[i + rb - r] } else { 1 };
        batch *= da.max(db);
    }
    (batch, m, k, n)
}

/// Estimate a cube matmul of `batch x [m, k] @ [k, n]` with operands in `input` and output in `output`.
pub fn cube_matmul(
    chip: &ChipSheet,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    input: NpuDType,
    output: NpuDType,
) -> Cost {
    let rate = chip.cube_macs_per_cycle
        / match input {
            NpuDType::F32 => chip.cube_f32_divisor,
            NpuDType::Hf32 => chip.cube_hf32_divisor,
            _ => 1.0,
        };
    cube_tiles(
        chip,
        [batch, m, k, n],
        rate,
        [input.size_bytes() as f64; 2],
        output.size_bytes() as f64,
    )
}

/// Estimate `[m, k] @ [k, n]` with 8-bit activations (INT8, or MXFP8) against quantised weights of
/// `weight_bytes` bytes per element with their scales (about 1 for INT8/MXFP8, 0.5 for INT4/MXFP4), at the
/// sheet's 8-bit rate (W4A8 runs the INT8 activations as two nibble passes), output in `output`.
pub fn cube_matmul_8bit(
    chip: &ChipSheet,
    [m, k, n]: [usize; 3],
    weight_bytes: f64,
    output: NpuDType,
) -> Cost {
    let rate = chip.cube_macs_per_cycle * chip.cube_8bit_multiplier;
    cube_tiles(
        chip,
        [1, m, k, n],
        rate,
        [1.0, weight_bytes],
        output.size_bytes() as f64,
    )
}

/// The cube's tile model: `rate` MACs per cycle, left and right operands of `[x_b, w_b]` bytes per element,
/// output of `out_b` bytes.
fn cube_tiles(
    chip: &ChipSheet,
    [batch, m, k, n]: [usize; 4],
    rate: f64,
    [x_b, w_b]: [f64; 2],
    out_b: f64,
) -> Cost {
    let tiles_m = m.div_ceil(BASE_M);
    let tiles_n = n.div_ceil(BASE_N);
    let tiles = (batch * tiles_m * tiles_n) as f64;
    let tm = m.min(BASE_M) as f64;
    let tn = n.min(BASE_N) as f64;
    // Fractal padding: 16 in every dimension.
    let pad = |x: f64| (x / 16.0).ceil() * 16.0;
    let k_steps = k.div_ceil(BASE_K) as f64;
    let tk = (k.min(BASE_K)) as f64;
    let cube = k_steps * (chip.mmad_overhead_cycles + pad(tm) * pad(tn) * pad(tk) / rate);
    let mte2 = (tm * x_b + tn * w_b) * k as f64 / chip.mte_bytes_per_cycle;
    let fix = tm * tn * out_b / chip.mte_bytes_per_cycle;
    let tile_cycles = cube.max(mte2).max(fix);
    let waves = (tiles / chip.cube_cores as f64).ceil();
    let compute_us = waves * tile_cycles / (chip.clock_ghz * 1e3);
    let bytes = batch as f64 * ((m * k) as f64 * x_b + (k * n) as f64 * w_b + (m * n) as f64 * out_b);
    let hbm_us = bytes / (chip.hbm_gbps * 1e3);
    let (core_us, bound) = if hbm_us > compute_us || mte2.max(fix) > cube {
        (compute_us.max(hbm_us), Bound::Memory)
    } else {
        (compute_us, Bound::Cube)
    };
    let bound = if chip.launch_us > core_us {
        Bound::Launch
    } else {
        bound
    };
    Cost {
        time_us: core_us + chip.launch_us,
        flops: 2.0 * (batch * m * n * k) as f64,
        bytes,
        cube_cycles: waves * cube,
        vector_cycles: 0.0,
        mte_cycles: waves * (mte2 + fix),
        bound: Some(bound),
    }
}

/// Estimate any op from its engine, class and shapes.
pub fn estimate(
    chip: &ChipSheet,
    policy: &PrecisionPolicy,
    op: &str,
    engine: Engine,
    class: OpClass,
    ins: &[(Shape, DType)],
    out: Option<&(Shape, DType)>,
) -> Cost {
    let in_bytes: f64 = ins.iter().map(|(s, d)| numel(s) * dtype_bytes(*d)).sum();
    let out_bytes = out.map(|(s, d)| numel(s) * dtype_bytes(*d)).unwrap_or(0.0);
    let elems = out
        .map(|(s, _)| numel(s))
        .unwrap_or(0.0)
        .max(ins.iter().map(|(s, _)| numel(s)).fold(0.0, f64::max));
    let bytes = in_bytes + out_bytes;
    match engine {
        Engine::View | Engine::Unsupported => Cost {
            bound: Some(Bound::None),
            ..Cost::default()
        },
        Engine::Transfer => {
            let moved = if op.ends_with("into_data") || op.ends_with("from_data") {
                bytes
            } else {
                0.0
            };
            Cost {
                time_us: moved / (chip.pcie_gbps * 1e3),
                bytes: moved,
                bound: Some(Bound::Host),
                ..Cost::default()
            }
        }
        Engine::HostFallback => Cost {
            time_us: bytes / (chip.pcie_gbps * 1e3) + chip.launch_us,
            bytes,
            bound: Some(Bound::Host),
            ..Cost::default()
        },
        Engine::AiCpu => Cost {
            time_us: elems / chip.aicpu_elems_per_us + chip.launch_us,
            bytes,
            flops: elems,
            bound: Some(Bound::AiCpu),
            ..Cost::default()
        },
        Engine::Cube => {
            if ins.len() >= 2 && op.contains("matmul") {
                let (b, m, k, n) = matmul_dims(&ins[0].0, &ins[1].0);
                cube_matmul(
                    chip,
                    b,
                    m,
                    k,
                    n,
                    policy.cube_input_dtype(),
                    policy.cube_output_dtype(),
                )
            } else {
                // Convolutions: approximate MACs as output elements x (weight elements / out channels).
                let w = ins.get(1).map(|(s, _)| numel(s)).unwrap_or(1.0);
                let oc = ins.get(1).map(|(s, _)| s[0] as f64).unwrap_or(1.0).max(1.0);
                let macs = out.map(|(s, _)| numel(s)).unwrap_or(0.0) * w / oc;
                let rate = chip.cube_macs_per_cycle * chip.cube_cores as f64 / chip.cube_f32_divisor;
                let cube_us = macs / rate / (chip.clock_ghz * 1e3);
                let hbm_us = bytes / (chip.hbm_gbps * 1e3);
                Cost {
                    time_us: cube_us.max(hbm_us) + chip.launch_us,
                    flops: 2.0 * macs,
                    bytes,
                    cube_cycles: macs / rate,
                    bound: Some(if hbm_us > cube_us {
                        Bound::Memory
                    } else {
                        Bound::Cube
                    }),
                    ..Cost::default()
                }
            }
        }
        Engine::Vector => {
            let per_cycle = match class {
                OpClass::VectorT => chip.vector_complex_bytes_per_cycle,
                _ => chip.vector_bytes_per_cycle,
            };
            let cycles = (bytes / per_cycle / chip.vector_cores as f64).ceil();
            let vec_us = cycles / (chip.clock_ghz * 1e3);
            let hbm_us = bytes / (chip.hbm_gbps * 1e3);
            let core = vec_us.max(hbm_us);
            let bound = if chip.launch_us > core {
                Bound::Launch
            } else if hbm_us > vec_us {
                Bound::Memory
            } else {
                Bound::Vector
            };
            Cost {
                time_us: core + chip.launch_us,
                flops: elems,
                bytes,
                vector_cycles: cycles,
                mte_cycles: (bytes / chip.mte_bytes_per_cycle / chip.vector_cores as f64).ceil(),
                bound: Some(bound),
                ..Cost::default()
            }
        }
    }
}
