//! Where a step's OOMs come from, together: the memory budget, which detects them, and the
//! injector, which makes them where the tests ask. Every memory-hungry part of a step runs
//! through [`Guard::run`] (or, piece by piece, [`Guard::check`]), so both are consulted the
//! same way everywhere.

use crate::error::Result;
use crate::memory::oom::{Injector, Phase};
use crate::memory::MemoryBudget;

#[derive(Clone, Copy)]
pub struct Guard<'a> {
    pub budget: &'a MemoryBudget,
    pub injector: &'a Injector,
}

/// Whether an attempt measures its peak from its own start or from an earlier mark.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// From this attempt's start.
    New,
    /// From the last mark: the plain scheme measures a micro-batch's backward pass with its
    /// forward pass, whose activations it frees.
    Continue,
}

impl Guard<'_> {
    /// Runs `f` as step `step`'s `phase`: an injected OOM fails it before it starts, and it
    /// fails after if memory use went over the limit (`what` names the part in the error).
    pub fn run<T>(
        &self,
        step: u64,
        phase: Phase,
        what: &str,
        window: Window,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if window == Window::New {
            self.budget.mark();
        }
        self.injector.check(step, phase)?;
        let out = f()?;
        self.budget.check(what)?;
        Ok(out)
    }

    /// The same two checks with nothing run between them, for a loop that calls it between
    /// its own pieces (the optimizer update, tensor by tensor).
    pub fn check(&self, step: u64, phase: Phase, what: &str) -> Result<()> {
        self.injector.check(step, phase)?;
        self.budget.check(what)
    }
}
