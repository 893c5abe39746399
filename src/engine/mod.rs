//! The device primitives the encoder is written over, and their implementations, chosen at run
//! time ([`Engine`]):
//! - [`cpu`]: st-tune's CPU kernels (AVX-512, AVX-512 BF16, AMX; the gemm crate and scalar loops
//!   as fallback), over slices read in place;
//! - [`portable`]: candle tensor ops only, so cuBLAS and candle's own kernels on a GPU; on CPU it
//!   is the check of the kernels, and `ST_TUNE_ENGINE=portable` trains through it;
//! - `cuda` (only with `--features cuda`): st-tune's own kernels for the few parts the portable
//!   form would run slowly on a GPU (dropout masks, the layer-norm backward, AdamW), which the
//!   portable engine and the optimizer call on a CUDA device. Never run on a GPU yet.
//!
//! A layer's forward and backward pass (`model::layer_op`) call these and nothing else, so
//! every device keeps the same activations and computes the same function. Activations are
//! stored in the engine's type (f32, or bf16/f16 with mixed precision) and the arithmetic of
//! everything but the matrix products is f32; gradients are f32.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod launches;
pub mod mask;
pub mod portable;
pub mod rotary;

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use mask::{AttentionMasks, HiddenMask};
use rotary::Rotary;

/// softmax(scale · q kᵀ + bias) ⊙ mask · v per row and head, rows packed as (offset, len).
#[derive(Debug, Clone)]
pub struct Attention {
    pub heads: usize,
    pub scale: f32,
    pub rows: Vec<(usize, usize)>,
    pub masks: Option<AttentionMasks>,
    /// Sliding-window (local) attention: query i sees only keys j with |i − j| ≤ window
    /// (ModernBERT's local layers); None sees the whole row.
    pub window: Option<usize>,
}

impl Attention {
    /// The keys query `i` of a row of `len` tokens sees, as a range.
    pub fn keys(&self, i: usize, len: usize) -> std::ops::Range<usize> {
        match self.window {
            Some(w) => i.saturating_sub(w)..(i + w + 1).min(len),
            None => 0..len,
        }
    }
}

/// The gradients of a linear layer: (d input, d weight, d bias).
pub type LinearGrads = (Tensor, Tensor, Tensor);

/// The gradients of a layer norm over a residual sum: (d sum, d weight, d bias).
pub type NormGrads = (Tensor, Tensor, Tensor);

/// What a device must provide to run the encoder. Inputs are 2-D (tokens, width), packed
/// rows; weights are f32 and stored as PyTorch does (`[out, in]`).
pub trait Primitives {
    /// The type activations are stored in.
    fn dtype(&self) -> DType;
    /// `x Wᵀ + b`.
    fn linear(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// The gradients of `linear` from its output gradient `dy`.
    fn linear_backward(&self, dy: &Tensor, x: &Tensor, w: &Tensor) -> Result<LinearGrads>;
    /// Whether this engine adds parameter gradients into a step's sums token after token
    /// ([`Primitives::linear_backward_into`], [`Primitives::add_norm_backward_into`]): the
    /// `cpu` engine in f32. Then a step cut into micro-batches gets the uncut step's bits.
    fn sums_in_order(&self) -> bool {
        false
    }
    /// `linear_backward` that adds d weight into `dw` (its rows split over `dw`'s tensors, in
    /// order: q, k and v for a fused product) and d bias into `db`, f32 CPU tensors, summing
    /// token after token; returns d input. Only where [`Primitives::sums_in_order`].
    fn linear_backward_into(
        &self,
        _dy: &Tensor,
        _x: &Tensor,
        _w: &Tensor,
        _dw: &[&Tensor],
        _db: &[&Tensor],
    ) -> Result<Tensor> {
        Err(no_sums_in_order())
    }
    /// `add_norm_backward` that adds d weight and d bias into `dwb`, row after row; returns
    /// d sum. Only where [`Primitives::sums_in_order`].
    #[allow(clippy::too_many_arguments)]
    fn add_norm_backward_into(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _mask: Option<&HiddenMask>,
        _w: &Tensor,
        _eps: f32,
        _g: &Tensor,
        _dwb: (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        Err(no_sums_in_order())
    }
    /// `attention_backward` that adds d bias into `sums`, (buckets, heads) f32 CPU, by
    /// bucket (MPNet's relative positions): row after row, each (query, key) score gradient
    /// of the row in turn into the bucket `bucket_of` gives the pair (L × L, row-major, for
    /// the bias's L); returns d qkv. Only where [`Primitives::sums_in_order`].
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_into(
        &self,
        _qkv: &Tensor,
        _bias: &Tensor,
        _att: &Attention,
        _d: &Tensor,
        _bucket_of: &[u32],
        _sums: &Tensor,
    ) -> Result<Tensor> {
        Err(no_sums_in_order())
    }
    /// GELU (erf form).
    fn gelu(&self, x: &Tensor) -> Result<Tensor>;
    /// `d ⊙ gelu'(x)`.
    fn gelu_backward(&self, x: &Tensor, d: &Tensor) -> Result<Tensor>;
    /// `layer_norm(x + mask ⊙ y)`: a post-LN residual connection with its dropout.
    fn add_norm(
        &self,
        x: &Tensor,
        y: &Tensor,
        mask: Option<&HiddenMask>,
        norm: (&Tensor, &Tensor),
        eps: f32,
    ) -> Result<Tensor>;
    /// The gradients of `add_norm` from its output gradient `g`, recomputing the sum.
    fn add_norm_backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        mask: Option<&HiddenMask>,
        w: &Tensor,
        eps: f32,
        g: &Tensor,
    ) -> Result<NormGrads>;
    /// `g ⊙ mask`: the gradient reaching a dropped-out input.
    fn masked(&self, g: &Tensor, mask: Option<&HiddenMask>) -> Result<Tensor>;
    /// Self-attention of q|k|v, (tokens, 3·hidden) -> (tokens, hidden); `bias` (heads, L, L)
    /// is MPNet's relative-position bias.
    fn attention(&self, qkv: &Tensor, bias: Option<&Tensor>, att: &Attention) -> Result<Tensor>;
    /// (d qkv, d bias) from the output gradient; the probabilities are recomputed.
    fn attention_backward(
        &self,
        qkv: &Tensor,
        bias: Option<&Tensor>,
        att: &Attention,
        d: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)>;
    /// `a + b` (gradient sums), f32.
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// `t` stored as `dtype`.
    fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor>;
    /// `layer_norm(x)` with weight `w` and bias `b` (none: zero), no residual: a pre-LN
    /// layer's norms (ModernBERT).
    fn norm(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f32) -> Result<Tensor>;
    /// The gradients of `norm` from its output gradient `g`: (d x, d weight, d bias).
    fn norm_backward(&self, x: &Tensor, w: &Tensor, eps: f32, g: &Tensor) -> Result<NormGrads>;
    /// q and k of q|k|v, (tokens, 3·hidden), rotated by their tokens' angles; v unchanged.
    fn rotary(&self, qkv: &Tensor, rope: &Rotary) -> Result<Tensor>;
    /// The gradient of `rotary`'s input from its output gradient `d` (the inverse rotation), f32.
    fn rotary_backward(&self, d: &Tensor, rope: &Rotary) -> Result<Tensor>;
    /// GeGLU of `h` = [input | gate], (tokens, 2·I) -> (tokens, I): `gelu(input) ⊙ gate`.
    fn geglu(&self, h: &Tensor) -> Result<Tensor>;
    /// The gradient of `geglu`'s input, (tokens, 2·I) f32, from its output gradient `d`.
    fn geglu_backward(&self, h: &Tensor, d: &Tensor) -> Result<Tensor>;
}

fn no_sums_in_order() -> Error {
    Error::Internal("gradient sums in token order: only the cpu engine in f32 has them".into())
}

/// The engine `device` runs, for the run's first line and summary, e.g. `cpu (avx512+avx2)`
/// or `portable on cuda:0`.
pub fn describe(device: &Device) -> String {
    match Engine::for_device(device) {
        Engine::Cpu => format!("cpu ({})", cpu::features::describe()),
        Engine::Portable => format!("portable on {}", crate::device::name(device)),
        Engine::Composed => format!("composed on {}", crate::device::name(device)),
    }
}

/// Which implementation of the primitives runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Cpu,
    Portable,
    /// No primitives: each layer as a chain of candle ops recorded by the autograd tape, as
    /// CUDA ran it before the explicit engine. The reference `st-tune bench launches` counts
    /// against; never chosen by a device or `ST_TUNE_ENGINE`.
    Composed,
}

/// Environment variable choosing the CPU's engine: `cpu` (default) or `portable`.
pub const ENV: &str = "ST_TUNE_ENGINE";

impl Engine {
    /// The engine for `device`: CUDA runs `portable`; the CPU runs `cpu` unless
    /// `ST_TUNE_ENGINE` says otherwise (checked by [`Engine::from_env`] when a command starts).
    pub fn for_device(device: &Device) -> Engine {
        if device.is_cpu() {
            Self::from_env().unwrap_or(Engine::Cpu)
        } else {
            Engine::Portable
        }
    }

    /// The CPU engine `ST_TUNE_ENGINE` asks for (read once).
    pub fn from_env() -> Result<Engine> {
        static CHOSEN: OnceLock<std::result::Result<Engine, String>> = OnceLock::new();
        CHOSEN
            .get_or_init(|| match std::env::var(ENV).as_deref() {
                Err(_) | Ok("cpu") | Ok("") => Ok(Engine::Cpu),
                Ok("portable") => Ok(Engine::Portable),
                Ok(other) => Err(format!(
                    "{ENV}={other:?} is not an engine; use `cpu` (the default) or `portable`"
                )),
            })
            .clone()
            .map_err(Error::Usage)
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Cpu => "cpu",
            Engine::Portable => "portable",
            Engine::Composed => "composed",
        }
    }

    /// The primitives of this engine for activations stored as `dtype` (the composed layers
    /// ask for none; they get the portable ones).
    pub fn primitives(self, dtype: DType) -> Box<dyn Primitives> {
        match self {
            Engine::Cpu => Box::new(cpu::primitives::Cpu { dtype }),
            Engine::Portable | Engine::Composed => Box::new(portable::Portable { dtype }),
        }
    }
}
