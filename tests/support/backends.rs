//! Shared by the test crates of `model/` and `infer/` (included with `#[path]`): runs each generic test on
//! every CPU backend the CLI offers.

/// Instantiates each generic test `fn name<B: Backend>()` of the including file as a `#[test]` on plain
/// burn-ndarray (`ndarray::name`) and on the `cpu` backend that `generate`, `bench-infer` and `train` use
/// (`cpu::name`: v4's GEMM, elementwise kernels and packed weights).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod ndarray {
            $(#[test] fn $name() { super::$name::<burn_ndarray::NdArray<f32>>() })*
        }
        mod cpu {
            $(#[test] fn $name() { super::$name::<v4_cpu::Cpu>() })*
        }
    };
}
