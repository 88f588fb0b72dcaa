//! The per-device registry (configuration, op statistics, memory accounting) and the report.
//!
//! Thread-safe: a global `RwLock<HashMap>` of device states; each state keeps its configuration
//! behind an `RwLock`, its statistics behind a `Mutex` and its memory counters in atomics (so a
//! tensor freed on any thread returns its bytes without taking a lock).

use crate::cost::{Bound, Cost};
use crate::policy::NpuConfig;
use crate::support::{support_table, Engine, OpClass};
use burn_backend::{DType, Shape};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

/// Registry key: burn's device id (type id, index).
pub type DeviceKey = (u16, u16);

/// Convert a burn device to its key.
pub fn device_key<D: burn_backend::backend::DeviceOps>(device: &D) -> DeviceKey {
    let id = device.to_id();
    (id.type_id, id.index_id)
}

/// Aggregated statistics of one (op, engine) pair.
#[derive(Clone, Debug, Default)]
pub struct OpStat {
    pub calls: u64,
    pub time_us: f64,
    pub flops: f64,
    pub bytes: f64,
    pub cube_cycles: f64,
    pub vector_cycles: f64,
    pub mte_cycles: f64,
    /// Calls per bound.
    pub bounds: BTreeMap<Bound, u64>,
}

/// One fallback site: op, engine, input shapes/dtypes and the scope (layer) it came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FallbackKey {
    pub op: String,
    pub engine: Engine,
    pub shapes: String,
    pub scope: String,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub ops: HashMap<(&'static str, Engine), OpStat>,
    pub fallbacks: HashMap<FallbackKey, u64>,
    pub errors: Vec<String>,
    pub allocations: u64,
}

pub(crate) struct DeviceState {
    pub key: DeviceKey,
    pub config: RwLock<NpuConfig>,
    pub stats: Mutex<Stats>,
    pub mem_used: AtomicU64,
    pub mem_peak: AtomicU64,
}

static REGISTRY: LazyLock<RwLock<HashMap<DeviceKey, Arc<DeviceState>>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

pub(crate) fn state(key: DeviceKey) -> Arc<DeviceState> {
    if let Some(s) = REGISTRY.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return s.clone();
    }
    let mut map = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    map.entry(key)
        .or_insert_with(|| {
            Arc::new(DeviceState {
                key,
                config: RwLock::new(NpuConfig::default()),
                stats: Mutex::new(Stats::default()),
                mem_used: AtomicU64::new(0),
                mem_peak: AtomicU64::new(0),
            })
        })
        .clone()
}

impl DeviceState {
    pub fn config(&self) -> std::sync::RwLockReadGuard<'_, NpuConfig> {
        self.config.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record an error (surfaced by the report) and return the message.
    pub fn error(&self, msg: String) -> String {
        self.stats().errors.push(msg.clone());
        msg
    }
}

/// A device allocation of a float tensor; returns its bytes when the last handle drops.
pub struct MemBlock {
    bytes: u64,
    state: Arc<DeviceState>,
}

impl std::fmt::Debug for MemBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemBlock({} B)", self.bytes)
    }
}

impl Drop for MemBlock {
    fn drop(&mut self) {
        self.state.mem_used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl MemBlock {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Allocate `numel` elements of `dtype` for `op`; panics with an OOM message naming the allocation
/// when the configured HBM would be exceeded.
pub(crate) fn allocate(state: &Arc<DeviceState>, op: &str, shape: &Shape, dtype: DType) -> Arc<MemBlock> {
    let (hbm, align) = {
        let c = state.config();
        (c.chip.hbm_bytes, c.chip.alloc_align.max(1))
    };
    let raw = (shape.num_elements() * dtype.size()) as u64;
    let bytes = raw.div_ceil(align) * align;
    let used = state.mem_used.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if used > hbm {
        state.mem_used.fetch_sub(bytes, Ordering::Relaxed);
        let msg = format!(
            "NPU out of memory on device {:?}: allocating {bytes} B for the output of `{op}` (shape {:?}, {dtype:?}); \
             {} B in use of {hbm} B HBM",
            state.key,
            shape.as_slice(),
            used - bytes
        );
        panic!("{}", state.error(msg));
    }
    state.mem_peak.fetch_max(used, Ordering::Relaxed);
    state.stats().allocations += 1;
    Arc::new(MemBlock {
        bytes,
        state: state.clone(),
    })
}

thread_local! {
    static SCOPE: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with `name` pushed on this thread's scope stack: fallbacks recorded inside are attributed
/// to the joined scope (e.g. `layers.3.attn`).
pub fn with_scope<R>(name: &str, f: impl FnOnce() -> R) -> R {
    SCOPE.with(|s| s.borrow_mut().push(name.to_string()));
    struct Pop;
    impl Drop for Pop {
        fn drop(&mut self) {
            SCOPE.with(|s| {
                s.borrow_mut().pop();
            });
        }
    }
    let _pop = Pop;
    f()
}

fn current_scope() -> String {
    SCOPE.with(|s| s.borrow().join("."))
}

/// Record one resolved call.
pub(crate) fn record(
    state: &DeviceState,
    op: &'static str,
    engine: Engine,
    _class: OpClass,
    ins: &[(Shape, DType)],
    cost: &Cost,
) {
    let fallback = engine.is_fallback().then(|| FallbackKey {
        op: op.to_string(),
        engine,
        shapes: ins
            .iter()
            .map(|(s, d)| format!("{:?}:{:?}", s.as_slice(), d))
            .collect::<Vec<_>>()
            .join(", "),
        scope: current_scope(),
    });
    let mut st = state.stats();
    let e = st.ops.entry((op, engine)).or_default();
    e.calls += 1;
    e.time_us += cost.time_us;
    e.flops += cost.flops;
    e.bytes += cost.bytes;
    e.cube_cycles += cost.cube_cycles;
    e.vector_cycles += cost.vector_cycles;
    e.mte_cycles += cost.mte_cycles;
    if let Some(b) = cost.bound {
        *e.bounds.entry(b).or_default() += 1;
    }
    if let Some(k) = fallback {
        *st.fallbacks.entry(k).or_default() += 1;
    }
}

/// One row of the report.
#[derive(Clone, Debug)]
pub struct OpRow {
    pub op: String,
    pub engine: Engine,
    pub stat: OpStat,
}

impl OpRow {
    /// The bound most calls of this op had.
    pub fn main_bound(&self) -> Bound {
        self.stat
            .bounds
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(b, _)| *b)
            .unwrap_or(Bound::None)
    }
}

/// A snapshot of one device's statistics, with the configuration it ran under.
#[derive(Clone, Debug)]
pub struct NpuReport {
    pub device: DeviceKey,
    pub config: NpuConfig,
    /// Per (op, engine), sorted by estimated time, descending.
    pub ops: Vec<OpRow>,
    /// Fallback sites and their call counts.
    pub fallbacks: Vec<(FallbackKey, u64)>,
    /// Errors raised (unsupported dtype / shape, OOM).
    pub errors: Vec<String>,
    pub mem_used: u64,
    pub mem_peak: u64,
    pub allocations: u64,
}

impl NpuReport {
    pub fn total_calls(&self) -> u64 {
        self.ops.iter().map(|r| r.stat.calls).sum()
    }

    /// Kernel launches (calls that are not views or transfers).
    pub fn kernel_calls(&self) -> u64 {
        self.ops
            .iter()
            .filter(|r| !matches!(r.engine, Engine::View | Engine::Transfer))
            .map(|r| r.stat.calls)
            .sum()
    }

    pub fn estimated_time_us(&self) -> f64 {
        self.ops.iter().map(|r| r.stat.time_us).sum()
    }

    /// Number of calls that fell back (AI CPU or host).
    pub fn fallback_calls(&self) -> u64 {
        self.fallbacks.iter().map(|(_, c)| c).sum()
    }

    /// Calls of `op` on `engine`.
    pub fn calls(&self, op: &str, engine: Engine) -> u64 {
        self.ops
            .iter()
            .filter(|r| r.op == op && r.engine == engine)
            .map(|r| r.stat.calls)
            .sum()
    }

    /// Calls per engine.
    pub fn calls_by_engine(&self) -> BTreeMap<Engine, u64> {
        let mut m = BTreeMap::new();
        for r in &self.ops {
            *m.entry(r.engine).or_default() += r.stat.calls;
        }
        m
    }

    /// The human-readable report.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "== NPU emulator report (device {:?}) ==\npolicy: {}\nchip:   {}\n",
            self.device,
            self.config.policy.describe(),
            self.config.chip.describe()
        ));
        let by_engine = self
            .calls_by_engine()
            .into_iter()
            .map(|(e, c)| format!("{} {c}", e.name()))
            .collect::<Vec<_>>()
            .join(", ");
        let total = self.estimated_time_us();
        s.push_str(&format!(
            "calls: {} ({by_engine}); estimated device time {:.1} us (ESTIMATE from the sheet above, not a measurement)\n",
            self.total_calls(),
            total
        ));
        s.push_str(&format!(
            "memory: {} B in use, peak {} B of {} B HBM, {} float allocations\n",
            self.mem_used, self.mem_peak, self.config.chip.hbm_bytes, self.allocations
        ));
        s.push_str(
            "op                               engine         calls   est. us   share  GFLOP     MB   bound\n",
        );
        for r in &self.ops {
            if matches!(r.engine, Engine::View) && r.stat.time_us == 0.0 && r.stat.calls == 0 {
                continue;
            }
            s.push_str(&format!(
                "{:<32} {:<13} {:>7} {:>9.1} {:>6.1}% {:>6.2} {:>7.1}   {}\n",
                r.op,
                r.engine.name(),
                r.stat.calls,
                r.stat.time_us,
                if total > 0.0 {
                    100.0 * r.stat.time_us / total
                } else {
                    0.0
                },
                r.stat.flops / 1e9,
                r.stat.bytes / 1e6,
                r.main_bound().name()
            ));
        }
        s.push_str(&format!(
            "fallbacks: {} calls at {} sites\n",
            self.fallback_calls(),
            self.fallbacks.len()
        ));
        for (k, c) in &self.fallbacks {
            s.push_str(&format!(
                "  [{}] {} x{c} inputs ({}){}\n",
                k.engine.name(),
                k.op,
                k.shapes,
                if k.scope.is_empty() {
                    String::new()
                } else {
                    format!(" in {}", k.scope)
                }
            ));
        }
        if !self.errors.is_empty() {
            s.push_str(&format!("errors: {}\n", self.errors.len()));
            for e in &self.errors {
                s.push_str(&format!("  {e}\n"));
            }
        }
        s
    }

    /// The operator support table this run resolved against.
    pub fn support_table(&self) -> String {
        support_table()
    }
}

pub(crate) fn snapshot(key: DeviceKey) -> NpuReport {
    let st = state(key);
    let config = st.config().clone();
    let stats = st.stats();
    let mut ops: Vec<OpRow> = stats
        .ops
        .iter()
        .map(|((op, engine), stat)| OpRow {
            op: op.to_string(),
            engine: *engine,
            stat: stat.clone(),
        })
        .collect();
    ops.sort_by(|a, b| {
        b.stat
            .time_us
            .partial_cmp(&a.stat.time_us)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.op.cmp(&b.op))
    });
    let mut fallbacks: Vec<_> = stats.fallbacks.iter().map(|(k, c)| (k.clone(), *c)).collect();
    fallbacks.sort();
    NpuReport {
        device: key,
        config,
        ops,
        fallbacks,
        errors: stats.errors.clone(),
        mem_used: st.mem_used.load(Ordering::Relaxed),
        mem_peak: st.mem_peak.load(Ordering::Relaxed),
        allocations: stats.allocations,
    }
}

pub(crate) fn reset(key: DeviceKey) {
    let st = state(key);
    let mut stats = st.stats();
    *stats = Stats::default();
    st.mem_peak
        .store(st.mem_used.load(Ordering::Relaxed), Ordering::Relaxed);
}
