//! The CPU kernels: AVX-512 (f32, and bf16 dot products or AMX for bf16 activations) where the
//! CPU has it, the gemm crate and scalar loops elsewhere. [`features`] decides once which paths
//! run, [`matmul`] is the one matrix-product dispatch, and [`storage`] reads and writes tensor
//! storage as the f32 every kernel computes in.

pub mod attention;
pub mod bf16_gemm;
pub mod f32_gemm;
pub mod features;
pub mod fused;
pub mod gemm_crate;
pub mod matmul;
pub mod norm;
pub mod primitives;
pub mod rotary;
pub mod storage;
pub mod vmath;
pub mod wgrad;
#[cfg(target_arch = "x86_64")]
mod zmm;
