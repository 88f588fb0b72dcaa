//! Throughput of FP8 -> MXFP4 (RCEIL) conversion on a synthetic ~1 GiB FP8 checkpoint.
//!
//! Writes a release-layout checkpoint of routed-expert weights (F8_E4M3 `[2048, 4096]` /
//! `[4096, 2048]` + E8M0 128x128 scales, 4 shards + index) into a temporary directory, then
//! measures, on the same files:
//! - a plain copy (read every shard, write it, fsync): the I/O floor of any converter;
//! - `convert` to fp4-mx with 2 threads and with 1 thread (dequantise, re-quantise per 32,
//!   error statistics, shard CRC, fsync).
//!
//! Both run on the temporary directory's disk and, where it exists, on `/dev/shm` (RAM), which
//! shows the converter's compute without the disk. Throughput is GB/s of FP8 input (codes +
//! scales). Run with
//! `cargo run --release -p v4-convert --example bench_fp8_to_fp4`.
//!
//! `... --example bench_fp8_to_fp4 -- --generate DIR` only writes the checkpoint to `DIR`, for timing
//! other converters on the same bytes (`scripts/bench-convert-torch.py`, `v4 convert`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use v4_convert::st::{layout_shard, PlannedTensor};
use v4_convert::{convert, ConvertOptions, Target};

const EXPERTS: usize = 43; // 129 weights of 8 MiB: 1.01 GiB of codes
const INTER: usize = 2048;
const HIDDEN: usize = 4096;
const SHARDS: usize = 4;

/// xorshift64*: fast deterministic bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// FP8 codes without the NaN codes 0x7F / 0xFF.
fn fp8_codes(n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend(
            rng.next()
                .to_le_bytes()
                .map(|c| if c & 0x7F == 0x7F { c ^ 1 } else { c }),
        );
    }
    v.truncate(n);
    v
}

/// Writes the synthetic checkpoint; returns the bytes of FP8 input (codes + scales).
fn generate(dir: &Path) -> std::io::Result<u64> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut tensors: Vec<(String, Vec<usize>)> = Vec::new();
    for e in 0..EXPERTS {
        for (w, shape) in [
            ("w1", [INTER, HIDDEN]),
            ("w2", [HIDDEN, INTER]),
            ("w3", [INTER, HIDDEN]),
        ] {
            tensors.push((format!("layers.0.ffn.experts.{e}.{w}.weight"), shape.to_vec()));
        }
    }
    let per_shard = tensors.len().div_ceil(SHARDS);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (si, chunk) in tensors.chunks(per_shard).enumerate() {
        let name = format!("model-{:05}-of-{SHARDS:05}.safetensors", si + 1);
        let mut planned = Vec::new();
        for (t, shape) in chunk {
            let scale_shape = vec![shape[0].div_ceil(128), shape[1].div_ceil(128)];
            let scale = t.replace(".weight", ".scale");
            planned.push(PlannedTensor {
                name: t.clone(),
                dtype: "F8_E4M3".into(),
                shape: shape.clone(),
                len: (shape[0] * shape[1]) as u64,
            });
            planned.push(PlannedTensor {
                name: scale,
                dtype: "F8_E8M0".into(),
                len: (scale_shape[0] * scale_shape[1]) as u64,
                shape: scale_shape,
            });
        }
        let (header, _) = layout_shard(&mut planned);
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(&name))?);
        f.write_all(&header)?;
        for p in &planned {
            let bytes = if p.dtype == "F8_E4M3" {
                fp8_codes(p.len as usize, &mut rng)
            } else {
                (0..p.len).map(|_| 112 + (rng.next() % 8) as u8).collect()
            };
            f.write_all(&bytes)?;
            total += p.len;
            weight_map.insert(p.name.clone(), name.clone().into());
        }
        f.into_inner()?.sync_all()?;
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    Ok(total)
}

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`, 100 ticks/s), to
/// report throughput per busy core even when other processes share the machine.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Reads and writes every shard (fsync), like a converter that does nothing.
fn plain_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let p = e?.path();
        let bytes = std::fs::read(&p)?;
        let mut f = std::fs::File::create(to.join(p.file_name().unwrap_or_default()))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    Ok(())
}

/// Generates the checkpoint under `base` and times copy and conversions there.
fn bench_in(base: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root: PathBuf = base.join(format!("v4-convert-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let input = root.join("fp8");
    let t = Instant::now();
    let bytes = generate(&input)?;
    let gb = bytes as f64 / 1e9;
    println!(
        "[{}] synthetic FP8 checkpoint: {} tensors, {gb:.3} GB ({:.2} GiB) of codes + scales, written in {:.1} s",
        base.display(),
        3 * EXPERTS,
        bytes as f64 / (1u64 << 30) as f64,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    plain_copy(&input, &root.join("copy"))?;
    let copy_s = t.elapsed().as_secs_f64();
    println!(
        "  plain copy (read + write + fsync):         {copy_s:6.2} s  {:5.2} GB/s",
        gb / copy_s
    );
    std::fs::remove_dir_all(root.join("copy"))?;

    for threads in [2, 1] {
        let out = root.join(format!("fp4-{threads}"));
        let mut o = ConvertOptions::new(&input, &out, Target::Fp4Mx);
        o.threads = Some(threads);
        o.progress = false;
        let (t, cpu0) = (Instant::now(), cpu_seconds());
        let r = convert(&o)?;
        let s = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
        println!(
            "  convert FP8 -> MXFP4 RCEIL, {threads} thread(s):  {s:6.2} s  {:5.2} GB/s  ({:.2} GB/s per thread; {}output {:.3} GB)",
            gb / s,
            gb / s / threads as f64,
            cpu.map_or(String::new(), |c| format!("{c:.2} CPU-s = {:.2} GB per CPU-second; ", gb / c)),
            r.bytes_out as f64 / 1e9
        );
        std::fs::remove_dir_all(&out)?;
    }
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

/// Runs on the temporary directory's disk, then in RAM (`/dev/shm`, where it exists) to show the
/// converter's own cost without the disk.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, dir] = &args[..] {
        if flag == "--generate" {
            let bytes = generate(Path::new(dir))?;
            println!("{dir}: {bytes} bytes of FP8 codes + scales");
            return Ok(());
        }
    }
    if !args.is_empty() {
        return Err("usage: bench_fp8_to_fp4 [--generate DIR]".into());
    }
    bench_in(&std::env::temp_dir())?;
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        bench_in(shm)?;
    }
    Ok(())
}
