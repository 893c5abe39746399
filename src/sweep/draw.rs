//! The seeded draws both samplers (`trials.rs`, `tpe.rs`) share, and the rounding of what
//! they draw.

/// Six significant digits: the value a user reads in the report is the value the trial used.
pub fn round(x: f64) -> f64 {
    format!("{x:.5e}").parse().expect("formatted float parses")
}

/// SplitMix64: tiny, and the same sequence on every platform and version (rand's StdRng
/// promises neither).
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}
