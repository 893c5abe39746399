//! Learning rate per optimizer step: linear warmup from 0, then linear decay to 0, as
//! `transformers.get_linear_schedule_with_warmup` (what sentence-transformers uses).

#[derive(Debug, Clone, Copy)]
pub struct LinearSchedule {
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LinearSchedule {
    pub fn new(base_lr: f64, warmup_ratio: f64, total_steps: usize) -> Self {
        Self {
            base_lr,
            warmup_steps: (warmup_ratio * total_steps as f64) as usize,
            total_steps,
        }
    }

    /// The rate for 0-based optimizer step `step`.
    pub fn lr(&self, step: usize) -> f64 {
        let factor = if step < self.warmup_steps {
            step as f64 / self.warmup_steps.max(1) as f64
        } else {
            let left = self.total_steps.saturating_sub(step) as f64;
            (left / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64).max(0.0)
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_zero() {
        let s = LinearSchedule::new(1.0, 0.1, 100);
        assert_eq!(s.warmup_steps, 10);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(55) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(100), 0.0);
    }
}
