//! The OOM backoff policy as pure functions: state + event -> that event's action. No model, no tensors:
//! the optimizer step in `train::step` carries the action out, and these rules are tested alone.
//!
//! - An OOM in a micro-batch halves the micro-batch (down to 1) and retries the same rows. A
//!   batch-coupled loss (MNRL, CoSENT) computed in one pass cannot be added up over smaller
//!   passes: once cut, the step switches to the cached scheme.
//! - At micro-batch 1 there is nothing left to halve: pull the next lever the user allowed in
//!   `memory.escalate` and redo the step; with none left, give up (the trainer saves and exits
//!   with code 3).
//! - An OOM in the optimizer update is retried once (the tensors already updated are skipped);
//!   a second one gives up (exit code 3).
//! - After `regrow_after` clean steps, try doubling again (up to the configured size); an OOM
//!   at a regrown size backs off and doubles the wait before the next try.

use crate::config::Lever;

/// What the policy remembers between steps; saved with the run so a resumed run starts from
/// the micro-batch known to fit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemState {
    /// Rows per forward pass now.
    pub micro: usize,
    /// The configured `train.micro_batch_size`: regrowing never goes above it.
    pub max_micro: usize,
    /// Clean steps since the last OOM or regrow.
    pub clean_steps: usize,
    /// Clean steps to wait before the next regrow (`memory.regrow_after`, doubled on failure).
    pub regrow_wait: usize,
    /// True while the current micro-batch size is a regrow not yet proven by a clean step.
    pub on_trial: bool,
    /// OOMs recovered so far.
    pub recovered: usize,
    /// How many of the `memory.escalate` levers have been pulled.
    pub escalated: usize,
}

/// How a step's gradients are computed (`train::passes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Each micro-batch's loss back-propagated on its own, the gradients added up.
    Plain,
    /// GradCache: the loss over the whole batch from embeddings computed without a graph, then
    /// its gradient pushed back through each micro-batch.
    Cached,
}

/// What the policy needs to know about the step at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// Rows in the optimizer step's batch.
    pub rows: usize,
    /// The loss couples the batch's rows (MNRL, CoSENT), so it cannot be summed over passes.
    pub coupled: bool,
    /// Gradient checkpointing is on: it back-propagates from a gradient on the embeddings,
    /// which only the cached scheme has.
    pub checkpointing: bool,
}

/// What to do about an OOM in a micro-batch's forward or backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomAction {
    /// Retry the failed micro-batch with this many rows per pass; rows done so far are kept.
    Retry { micro: usize },
    /// Start the step's gradients again with the cached scheme, this many rows per pass.
    SwitchToCached { micro: usize },
    /// Pull this lever and start the step's gradients again.
    Escalate { lever: Lever },
    /// Nothing left to try; `consider` names the config keys that would help.
    GiveUp { consider: &'static str },
}

/// What to do about an OOM in the optimizer update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateAction {
    /// Retry the rest of the update (the tensors already updated are skipped).
    Retry,
    /// Nothing left to try; `consider` names the config keys that would help.
    GiveUp { consider: &'static str },
}

/// What to do once an optimizer step has finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepAction {
    /// Go on as before.
    Continue,
    /// From the next step on, use this larger micro-batch.
    Regrow { micro: usize },
}

impl MemState {
    /// Starts at `micro` rows per pass, growing back to at most `max_micro` after
    /// `regrow_after` clean steps.
    pub fn new(micro: usize, max_micro: usize, regrow_after: usize) -> Self {
        Self {
            micro,
            max_micro,
            clean_steps: 0,
            regrow_wait: regrow_after.max(1),
            on_trial: false,
            recovered: 0,
            escalated: 0,
        }
    }

    /// The scheme for `step` at the current micro-batch: plain accumulation, unless the loss
    /// couples a batch that is cut into passes or checkpointing needs the cached scheme.
    pub fn scheme(&self, step: StepShape) -> Scheme {
        if step.checkpointing || (step.coupled && self.micro < step.rows) {
            Scheme::Cached
        } else {
            Scheme::Plain
        }
    }

    /// The optimizer update ran out of memory; `retried`: this was already its retry.
    pub fn update_oom(&mut self, retried: bool) -> UpdateAction {
        if retried {
            return UpdateAction::GiveUp {
                consider: "raising memory.limit or setting train.freeze_layers to train fewer \
                           tensors",
            };
        }
        // Nothing to shrink; the micro-batch did fit, so the regrow count stands.
        self.recovered += 1;
        UpdateAction::Retry
    }

    /// An optimizer step finished.
    pub fn step_done(&mut self) -> StepAction {
        self.on_trial = false;
        self.clean_steps += 1;
        if self.micro < self.max_micro && self.clean_steps >= self.regrow_wait {
            self.clean_steps = 0;
            self.micro = (self.micro * 2).min(self.max_micro);
            self.on_trial = true;
            return StepAction::Regrow { micro: self.micro };
        }
        StepAction::Continue
    }

    /// A micro-batch's forward or backward pass ran out of memory in a step of shape `step`;
    /// `escalate`: the levers `memory.escalate` allows once micro-batch 1 does not fit, in
    /// order.
    pub fn micro_batch_oom(&mut self, step: StepShape, escalate: &[Lever]) -> OomAction {
        self.clean_steps = 0;
        if self.on_trial {
            // The regrow did not fit: wait twice as long before the next try.
            self.regrow_wait = self.regrow_wait.saturating_mul(2);
            self.on_trial = false;
        }
        if self.micro > 1 {
            let was = self.scheme(step);
            self.micro = self.micro.div_ceil(2);
            self.recovered += 1;
            return match (was, self.scheme(step)) {
                (Scheme::Plain, Scheme::Cached) => OomAction::SwitchToCached { micro: self.micro },
                _ => OomAction::Retry { micro: self.micro },
            };
        }
        match escalate.get(self.escalated) {
            Some(&lever) => {
                self.escalated += 1;
                self.recovered += 1;
                OomAction::Escalate { lever }
            }
            None => OomAction::GiveUp {
                consider: "raising memory.limit, lowering model.max_seq_length, or setting \
                           train.freeze_layers",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step of 8 rows with a per-row loss (cosine).
    const PER_ROW: StepShape = StepShape {
        rows: 8,
        coupled: false,
        checkpointing: false,
    };
    /// A step of 8 rows with a batch-coupled loss (MNRL, CoSENT).
    const COUPLED: StepShape = StepShape {
        coupled: true,
        ..PER_ROW
    };

    #[test]
    fn an_oom_halves_the_micro_batch_down_to_one_then_gives_up_naming_the_keys() {
        let mut s = MemState::new(8, 8, 100);
        assert_eq!(
            s.micro_batch_oom(PER_ROW, &[]),
            OomAction::Retry { micro: 4 }
        );
        assert_eq!(
            s.micro_batch_oom(PER_ROW, &[]),
            OomAction::Retry { micro: 2 }
        );
        assert_eq!(
            s.micro_batch_oom(PER_ROW, &[]),
            OomAction::Retry { micro: 1 }
        );
        let OomAction::GiveUp { consider } = s.micro_batch_oom(PER_ROW, &[]) else {
            panic!("micro-batch 1 with no lever left gives up");
        };
        assert!(consider.contains("memory.limit") && consider.contains("model.max_seq_length"));
        assert_eq!(s.recovered, 3);
    }

    #[test]
    fn at_micro_batch_one_levers_are_pulled_in_the_given_order_and_only_once() {
        let mut s = MemState::new(1, 1, 100);
        let allowed = [Lever::GradientCheckpointing, Lever::MaxSeqLength];
        let lever = |lever| OomAction::Escalate { lever };
        assert_eq!(
            s.micro_batch_oom(PER_ROW, &allowed),
            lever(Lever::GradientCheckpointing)
        );
        assert_eq!(
            s.micro_batch_oom(PER_ROW, &allowed),
            lever(Lever::MaxSeqLength)
        );
        assert!(matches!(
            s.micro_batch_oom(PER_ROW, &allowed),
            OomAction::GiveUp { .. }
        ));
        assert_eq!((s.escalated, s.recovered, s.micro), (2, 2, 1));
    }

    #[test]
    fn a_coupled_loss_cut_by_an_oom_switches_to_the_cached_scheme() {
        let mut s = MemState::new(8, 8, 100);
        assert_eq!(
            s.scheme(COUPLED),
            Scheme::Plain,
            "the whole batch in one pass"
        );
        assert_eq!(
            s.micro_batch_oom(COUPLED, &[]),
            OomAction::SwitchToCached { micro: 4 }
        );
        assert_eq!(s.scheme(COUPLED), Scheme::Cached);
        // Already cached: a further OOM only halves.
        assert_eq!(
            s.micro_batch_oom(COUPLED, &[]),
            OomAction::Retry { micro: 2 }
        );
    }

    #[test]
    fn a_per_row_loss_or_a_batch_still_in_one_pass_keeps_the_plain_scheme() {
        let mut s = MemState::new(8, 8, 100);
        assert_eq!(
            s.micro_batch_oom(PER_ROW, &[]),
            OomAction::Retry { micro: 4 }
        );
        assert_eq!(s.scheme(PER_ROW), Scheme::Plain);
        // The last batch of an epoch, 3 rows: micro-batch 4 still holds it in one pass.
        let short = StepShape { rows: 3, ..COUPLED };
        let mut s = MemState::new(8, 8, 100);
        assert_eq!(s.micro_batch_oom(short, &[]), OomAction::Retry { micro: 4 });
        assert_eq!(
            s.micro_batch_oom(short, &[]),
            OomAction::SwitchToCached { micro: 2 }
        );
    }

    #[test]
    fn checkpointing_always_uses_the_cached_scheme() {
        let s = MemState::new(8, 8, 100);
        let step = StepShape {
            checkpointing: true,
            ..PER_ROW
        };
        assert_eq!(s.scheme(step), Scheme::Cached);
        assert_eq!(s.scheme(COUPLED), Scheme::Plain);
        assert_eq!(MemState::new(4, 8, 100).scheme(COUPLED), Scheme::Cached);
    }

    #[test]
    fn an_oom_in_the_update_is_retried_once_then_gives_up() {
        let mut s = MemState::new(4, 8, 2);
        s.step_done();
        assert_eq!(s.update_oom(false), UpdateAction::Retry);
        // No micro-batch to shrink: the micro-batch and the regrow count are left alone.
        assert_eq!((s.micro, s.clean_steps, s.recovered), (4, 1, 1));
        let UpdateAction::GiveUp { consider } = s.update_oom(true) else {
            panic!("a second OOM in the same update gives up");
        };
        assert!(consider.contains("train.freeze_layers"));
        assert_eq!(s.recovered, 1);
    }

    #[test]
    fn odd_micro_batches_round_up_when_halved() {
        let mut s = MemState::new(5, 5, 100);
        assert_eq!(
            s.micro_batch_oom(PER_ROW, &[]),
            OomAction::Retry { micro: 3 }
        );
    }

    #[test]
    fn clean_steps_regrow_up_to_the_configured_size() {
        let mut s = MemState::new(8, 8, 2);
        s.micro_batch_oom(PER_ROW, &[]); // 4
        s.micro_batch_oom(PER_ROW, &[]); // 2
        assert_eq!(s.step_done(), StepAction::Continue);
        assert_eq!(s.step_done(), StepAction::Regrow { micro: 4 });
        assert_eq!(s.step_done(), StepAction::Continue);
        assert_eq!(s.step_done(), StepAction::Regrow { micro: 8 });
        for _ in 0..10 {
            assert_eq!(s.step_done(), StepAction::Continue);
        }
        assert_eq!(s.micro, 8);
    }

    #[test]
    fn a_start_below_the_configured_size_regrows_to_it() {
        let mut s = MemState::new(2, 8, 1);
        assert_eq!(s.step_done(), StepAction::Regrow { micro: 4 });
        assert_eq!(s.step_done(), StepAction::Regrow { micro: 8 });
        assert_eq!(s.step_done(), StepAction::Continue);
    }

    #[test]
    fn a_failed_regrow_backs_off_and_doubles_the_wait() {
        let mut s = MemState::new(8, 8, 2);
        s.micro_batch_oom(PER_ROW, &[]); // 4
        s.step_done();
        assert_eq!(s.step_done(), StepAction::Regrow { micro: 8 });
        assert_eq!(
            s.micro_batch_oom(PER_ROW, &[]),
            OomAction::Retry { micro: 4 }
        );
        assert_eq!(s.regrow_wait, 4);
        for _ in 0..3 {
            assert_eq!(s.step_done(), StepAction::Continue);
        }
        assert_eq!(s.step_done(), StepAction::Regrow { micro: 8 });
    }
}
