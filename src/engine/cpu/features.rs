//! The one place that asks the CPU what it can do, once per process. Every kernel picks its
//! path from [`get`], so `ST_TUNE_CPU_FEATURES=none` sends all of them down their portable
//! fallback (the gemm crate, scalar loops) on any machine, and tests can exercise it;
//! `ST_TUNE_CPU_FEATURES=avx2` keeps only AVX2 and FMA, as on a CPU without AVX-512.

use std::sync::OnceLock;

/// The instruction-set extensions the kernels use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// AVX-512 F, BW and VL together: what the f32 and bf16 kernels and the packing need.
    pub avx512: bool,
    /// AVX-512 DQ (64-bit lane multiplies: the dropout-mask hash).
    pub avx512dq: bool,
    /// AVX-512 BF16 (`vdpbf16ps`, and AMX's precondition here).
    pub avx512bf16: bool,
    pub avx2: bool,
    /// Fused multiply-add (with AVX2: the 8-lane GELU, erf and exp).
    pub fma: bool,
    /// The CPU is AMD's (its bf16 dot product outruns f32 FMA; Intel's does not).
    pub amd: bool,
}

/// Environment variable: `none` turns every extension off (the portable kernels), `avx2` every
/// AVX-512 one.
pub const ENV: &str = "ST_TUNE_CPU_FEATURES";

/// This CPU's features, detected on first use.
pub fn get() -> Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        let detected = detect();
        match std::env::var(ENV).as_deref() {
            Ok("none") => Features::default(),
            // What an AVX2-only CPU (AMD Zen 2/3, Intel client) runs of st-tune's own kernels;
            // the gemm crate still picks its own path.
            Ok("avx2") => Features {
                avx2: detected.avx2,
                fma: detected.fma,
                amd: detected.amd,
                ..Features::default()
            },
            _ => detected,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    let id = std::arch::x86_64::__cpuid(0);
    let avx512f = is_x86_feature_detected!("avx512f");
    Features {
        avx512: avx512f
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl"),
        avx512dq: avx512f && is_x86_feature_detected!("avx512dq"),
        avx512bf16: avx512f && is_x86_feature_detected!("avx512bf16"),
        avx2: is_x86_feature_detected!("avx2"),
        fma: is_x86_feature_detected!("fma"),
        amd: (id.ebx, id.edx, id.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163), // "AuthenticAMD"
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features::default()
}

/// A line for logs and benchmarks: which kernels this process runs.
pub fn describe() -> String {
    let f = get();
    let on: Vec<&str> = [
        (f.avx512, "avx512"),
        (f.avx512dq, "avx512dq"),
        (f.avx512bf16, "avx512bf16"),
        (f.avx2, "avx2"),
        (f.fma, "fma"),
    ]
    .iter()
    .filter_map(|&(has, name)| has.then_some(name))
    .collect();
    if on.is_empty() {
        "portable".into()
    } else {
        on.join("+")
    }
}
