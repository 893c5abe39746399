//! Memory: the budget a run may use, recognising OOM, and the backoff policy that decides what
//! to do about one. The trainer's step runner carries the decisions out (`train::step`).

pub mod alloc;
pub mod alternatives;
pub mod guard;
pub mod oom;
pub mod plan;
pub mod policy;

use candle_core::Device;

use crate::config::MemoryLimit;
use crate::error::Result;

/// `memory.limit` resolved to bytes. On CPU the counting allocator measures use, and going
/// over the limit raises the same OOM error a CUDA allocation failure does. On CUDA the
/// driver's free memory does (it knows no peak, so use is read when a phase ends), besides
/// real allocation failures.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    pub limit: Option<u64>,
    /// CUDA only: the device and the bytes in use on it before the run (other processes, the
    /// context), so that `in_use` counts this run's share.
    cuda: Option<(Device, u64)>,
}

impl MemoryBudget {
    /// `spec` as in `memory.limit`; a percentage is of the total memory of the machine (CPU)
    /// or of the device (CUDA). Without a spec: no limit on CPU, the free device memory on
    /// CUDA.
    pub fn new(spec: Option<&MemoryLimit>, device: &Device) -> Result<Self> {
        if let Some((free, total)) = device_memory(device) {
            let limit = match spec {
                Some(s) => s.bytes_of(total),
                None => free,
            };
            return Ok(Self {
                limit: Some(limit),
                cuda: Some((device.clone(), total - free)),
            });
        }
        let limit = spec.map(|s| s.bytes_of(meminfo("MemTotal:").unwrap_or(0)));
        Ok(Self { limit, cuda: None })
    }

    /// No limit, use counted by the allocator (benchmarks).
    pub fn unlimited() -> Self {
        Self {
            limit: None,
            cuda: None,
        }
    }

    /// Bytes in use now by this run.
    pub fn in_use(&self) -> u64 {
        match &self.cuda {
            Some((device, before)) => device_memory(device)
                .map_or(0, |(free, total)| (total - free).saturating_sub(*before)),
            None => alloc::current() as u64,
        }
    }

    /// Starts a measuring window (e.g. one micro-batch's forward pass).
    pub fn mark(&self) {
        alloc::reset_peak();
    }

    /// Fails with an OOM if use went over the limit: at any point since `mark()` on CPU, now
    /// on CUDA.
    pub fn check(&self, what: &str) -> Result<()> {
        if let Some(limit) = self.limit {
            let peak = match self.cuda {
                Some(_) => self.in_use(),
                None => alloc::peak() as u64,
            };
            if peak > limit {
                return Err(oom::oom_error(format!(
                    "{what} needed {} with a limit of {}",
                    human_bytes(peak),
                    human_bytes(limit)
                )));
            }
        }
        Ok(())
    }
}

/// (free, total) bytes of a CUDA device, from the driver; None on CPU.
#[cfg(feature = "cuda")]
pub fn device_memory(device: &Device) -> Option<(u64, u64)> {
    let Device::Cuda(d) = device else {
        return None;
    };
    let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
    Some((free as u64, total as u64))
}

/// (free, total) bytes of a CUDA device; this build has no CUDA.
#[cfg(not(feature = "cuda"))]
pub fn device_memory(_device: &Device) -> Option<(u64, u64)> {
    None
}

/// MemAvailable from /proc/meminfo: what a CPU run may take without a `memory.limit`
/// (u64::MAX where it cannot be read).
pub fn available_memory() -> u64 {
    meminfo("MemAvailable:").unwrap_or(u64::MAX)
}

fn meminfo(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}
