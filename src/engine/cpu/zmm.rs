//! AVX-512 register loads and stores for the GEMM kernels' inner loops, written as `asm!`:
//! in the dev profile (debug assertions on) the pointer checks of `add` and of the load
//! intrinsics leave the loop, which then keeps its accumulators in memory (a third to half
//! slower). Each macro is an expression to use inside an `unsafe` block of a function with
//! AVX-512F enabled; the pointer must cover what is read or written.

/// The 16 f32 at `$p` (`*const f32`, any alignment), as an `__m512`.
macro_rules! load {
    ($p:expr) => {{
        let v: ::std::arch::x86_64::__m512;
        ::std::arch::asm!(
            "vmovups {v}, zmmword ptr [{p}]",
            v = out(zmm_reg) v,
            p = in(reg) $p,
            options(pure, readonly, nostack, preserves_flags)
        );
        v
    }};
}

/// The f32 at `$p` in all 16 lanes, as an `__m512`.
macro_rules! broadcast {
    ($p:expr) => {{
        let v: ::std::arch::x86_64::__m512;
        ::std::arch::asm!(
            "vbroadcastss {v}, dword ptr [{p}]",
            v = out(zmm_reg) v,
            p = in(reg) $p,
            options(pure, readonly, nostack, preserves_flags)
        );
        v
    }};
}

/// Stores the `__m512` `$v` as 16 f32 at `$p` (`*mut f32`, any alignment).
macro_rules! store {
    ($p:expr, $v:expr) => {
        ::std::arch::asm!(
            "vmovups zmmword ptr [{p}], {v}",
            v = in(zmm_reg) $v,
            p = in(reg) $p,
            options(nostack, preserves_flags)
        )
    };
}

pub(crate) use {broadcast, load, store};
