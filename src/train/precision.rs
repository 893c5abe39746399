//! Mixed precision: activations are f16 or bf16 in the forward and backward passes while the
//! master weights, gradients and AdamW state stay f32. On CPU the fused kernels read the f32
//! weights directly and compute in f32, storing only their outputs in the half type; the
//! composed ops of other devices cast each weight to the activation type, so the gradient still
//! lands on the f32 master copy. Layer norm, softmax, pooling and the loss compute in f32
//! whatever the setting. f16's narrow range needs dynamic loss scaling; bf16 does not.

use candle_core::DType;

use crate::config::Precision;
use crate::error::Result;
use crate::train::optim::{Grad, Grads};

pub fn dtype(p: Precision) -> DType {
    match p {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    }
}

/// Dynamic loss scaling: start at 2^16, halve and skip the step when a gradient overflows,
/// double after `growth_interval` clean steps. A fixed scale of 1 when disabled.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    enabled: bool,
    clean_steps: usize,
    growth_interval: usize,
}

impl LossScaler {
    pub fn new(p: Precision) -> Self {
        let enabled = p == Precision::F16;
        Self {
            scale: if enabled { 65536.0 } else { 1.0 },
            enabled,
            clean_steps: 0,
            growth_interval: 2000,
        }
    }

    /// Divides the gradients by the scale (their finiteness is judged afterwards, from the
    /// global norm that clipping computes: `step.rs`).
    pub fn unscale(&self, grads: &mut Grads) -> Result<()> {
        if self.enabled {
            for g in grads.values_mut() {
                match g {
                    Grad::Dense(t) => *t = (&*t / self.scale)?,
                    // What the tensor division computes (candle's affine: x · (1/s) + 0).
                    Grad::Rows(r) => {
                        let mul = (1.0 / self.scale) as f32;
                        r.values_mut().iter_mut().for_each(|x| *x = *x * mul + 0.0);
                    }
                }
            }
        }
        Ok(())
    }

    /// A step whose gradients were all finite: after `growth_interval` of them, double.
    pub fn clean_step(&mut self) {
        if !self.enabled {
            return;
        }
        self.clean_steps += 1;
        if self.clean_steps >= self.growth_interval {
            self.scale *= 2.0;
            self.clean_steps = 0;
        }
    }

    /// A step with a NaN or infinity: halve the scale (not below 1). Returns whether the scale
    /// could still be lowered, i.e. whether the overflow may be the scale's doing.
    pub fn overflowed(&mut self) -> bool {
        if !self.enabled {
            return false;
        }
        let lowered = self.scale > 1.0;
        self.scale = (self.scale / 2.0).max(1.0);
        self.clean_steps = 0;
        lowered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn an_overflow_halves_the_scale_down_to_one_and_unscaling_divides() {
        let mut s = LossScaler::new(Precision::F16);
        assert!(s.overflowed());
        assert_eq!(s.scale, 32768.0);
        // The word table's summed rows are divided as the dense tensor is, bit for bit.
        let odd = [65536.0f32, 0.0, 1.0e-30, 3.3333333, -7.1e12];
        let mut rows = crate::train::summed_rows::SummedRows::new(9, 5);
        rows.add_tokens(&[4], &odd).unwrap();
        let mut grads = Grads::from([
            ("r".into(), Grad::Rows(rows)),
            ("w".into(), Tensor::new(&odd, &Device::Cpu).unwrap().into()),
        ]);
        s.unscale(&mut grads).unwrap();
        let dense = |g: &Grad| g.dense(&Device::Cpu).unwrap().flatten_all().unwrap();
        let w = dense(&grads["w"]).to_vec1::<f32>().unwrap();
        assert_eq!(&w[..2], &[2.0, 0.0]);
        let r = dense(&grads["r"])
            .narrow(0, 20, 5)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            r.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            w.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        while s.scale > 1.0 {
            assert!(s.overflowed());
        }
        assert!(!s.overflowed(), "at 1 the scale cannot help any more");
        assert_eq!(s.scale, 1.0);
    }

    #[test]
    fn the_scale_doubles_after_the_growth_interval_of_clean_steps() {
        let mut s = LossScaler::new(Precision::F16);
        for _ in 0..1999 {
            s.clean_step();
        }
        assert_eq!(s.scale, 65536.0);
        s.clean_step();
        assert_eq!(s.scale, 131072.0);
    }

    #[test]
    fn bf16_and_f32_do_not_scale() {
        let mut s = LossScaler::new(Precision::Bf16);
        let mut grads = Grads::from([(
            "w".into(),
            Tensor::new(&[3.0f32], &Device::Cpu).unwrap().into(),
        )]);
        s.unscale(&mut grads).unwrap();
        s.clean_step();
        assert!(
            !s.overflowed(),
            "nothing to lower: the guard counts the step"
        );
        assert_eq!(s.scale, 1.0);
        let w = grads["w"].dense(&Device::Cpu).unwrap();
        assert_eq!(w.to_vec1::<f32>().unwrap(), vec![3.0]);
    }
}
