//! The vector instruction set v4's CPU kernels use, chosen once per process at run time.
//!
//! The same binary runs on any x86-64 machine: every kernel has a portable path, an AVX2 + FMA path
//! and (for GEMM and the elementwise maps) an AVX-512 path, and [`Isa::active`] picks the best one the
//! CPU has. `V4_CPU_ISA=avx512|avx2|scalar` caps the choice, so one machine can measure and test
//! every path (a request above what the CPU has falls back to the best it runs).

use std::sync::OnceLock;

/// A kernel path, ordered from the portable one up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, vectorised only as far as the compiler's baseline target allows.
    Scalar,
    /// AVX2 + FMA (x86-64-v3): 8 f32 lanes.
    Avx2,
    /// AVX-512F on top of AVX2 + FMA (x86-64-v4): 16 f32 lanes.
    Avx512,
}

impl Isa {
    /// The name `V4_CPU_ISA` takes and reports print: `"avx512"`, `"avx2"` or `"scalar"`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn parse(name: &str) -> Option<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .find(|isa| isa.name() == name)
    }

    /// The best path this CPU runs.
    pub fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            return Isa::Avx2;
        }
        Isa::Scalar
    }

    /// The path of this process: the best the CPU runs, capped by `V4_CPU_ISA` when it names one.
    pub fn active() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::best();
            match std::env::var("V4_CPU_ISA").ok().as_deref().map(Isa::parse) {
                Some(Some(cap)) => cap.min(best),
                Some(None) => {
                    eprintln!(
                        "warning: V4_CPU_ISA is not one of avx512, avx2, scalar; using {}",
                        best.name()
                    );
                    best
                }
                None => best,
            }
        })
    }
}

/// The kernel path in use, e.g. for benchmark reports: `"avx512"`, `"avx2"` or `"scalar"`.
pub fn isa() -> &'static str {
    Isa::active().name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order_from_portable_up() {
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("sse"), None);
        assert!(Isa::Scalar < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
    }

    #[test]
    fn the_active_path_never_exceeds_the_cpu() {
        assert!(Isa::active() <= Isa::best());
    }
}
