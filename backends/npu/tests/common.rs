//! Shared helpers for the v4-npu integration tests.
#![allow(dead_code)]

use burn::tensor::{backend::Backend, Tensor, TensorData};
use std::sync::{Mutex, MutexGuard};

/// The emulator's per-device state is global and NdArray has one device: tests that install a
/// policy or read the report hold this lock.
static LOCK: Mutex<()> = Mutex::new(());

pub fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deterministic pseudo-random values in [lo, hi) (xorshift).
pub fn rand_vec(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        })
        .collect()
}

pub fn tensor<B: Backend, const D: usize>(v: Vec<f32>, shape: [usize; D], dev: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v, shape), dev)
}

pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}
