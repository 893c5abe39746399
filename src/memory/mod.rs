//! Memory: the budget a run may use, recognising OOM, and the backoff policy that decides what
//! to do about one. The trainer's step runner carries the decisions out (`train::step`).

pub mod alloc;
pub mod oom;
pub mod plan;
pub mod policy;

use crate::config::parse_memory_limit;
use crate::error::Result;

/// `memory.limit` resolved to bytes. On CPU the counting allocator measures use, and going
/// over the limit raises the same OOM error a CUDA allocation failure does.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    pub limit: Option<u64>,
}

impl MemoryBudget {
    /// `spec` as in `memory.limit`; a percentage is of the machine's total memory on CPU.
    pub fn new(spec: Option<&str>) -> Result<Self> {
        let limit = match spec {
            None => None,
            Some(s) => Some(parse_memory_limit(s)?.bytes_of(meminfo("MemTotal:").unwrap_or(0))),
        };
        Ok(Self { limit })
    }

    /// Bytes in use now.
    pub fn in_use(&self) -> u64 {
        alloc::current() as u64
    }

    /// Starts a measuring window (e.g. one micro-batch's forward pass).
    pub fn mark(&self) {
        alloc::reset_peak();
    }

    /// Fails with an OOM if use went over the limit at any point since `mark()`.
    pub fn check(&self, what: &str) -> Result<()> {
        if let Some(limit) = self.limit {
            let peak = alloc::peak() as u64;
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
