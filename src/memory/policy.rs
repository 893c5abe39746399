//! The OOM backoff policy as a pure function: (state, event) -> action. No model, no tensors:
//! the step runner in `train::step` carries the action out, and these rules are tested alone.
//!
//! - An OOM halves the micro-batch (down to 1) and retries the same rows.
//! - At micro-batch 1 there is nothing left to halve: pull the next lever the user allowed in
//!   `memory.escalate` (see [`MemState::escalate`]); with none left, give up (the trainer saves
//!   and exits with code 3).
//! - After `regrow_after` clean steps, try doubling again (up to the configured size); an OOM
//!   at a regrown size backs off and doubles the wait before the next try.

use std::path::Path;

use crate::config::Lever;
use crate::error::{Error, Result};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A micro-batch or the optimizer update ran out of memory.
    Oom,
    /// An optimizer step finished.
    StepDone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Go on as before.
    Continue,
    /// Retry the failed work with this many rows per forward pass.
    Retry { micro: usize },
    /// From the next step on, use this larger micro-batch.
    Regrow { micro: usize },
    /// Nothing left to try.
    GiveUp,
}

impl MemState {
    pub fn new(micro: usize, regrow_after: usize) -> Self {
        Self {
            micro,
            max_micro: micro,
            clean_steps: 0,
            regrow_wait: regrow_after.max(1),
            on_trial: false,
            recovered: 0,
            escalated: 0,
        }
    }

    /// The next lever to pull once micro-batch 1 does not fit, in the user's order; None when
    /// every allowed lever is already pulled.
    pub fn escalate(&mut self, allowed: &[Lever]) -> Option<Lever> {
        let lever = *allowed.get(self.escalated)?;
        self.escalated += 1;
        self.recovered += 1;
        Some(lever)
    }

    pub fn decide(&mut self, event: Event) -> Action {
        match event {
            Event::Oom => {
                self.clean_steps = 0;
                if self.on_trial {
                    // The regrow did not fit: wait twice as long before the next try.
                    self.regrow_wait = self.regrow_wait.saturating_mul(2);
                    self.on_trial = false;
                }
                if self.micro <= 1 {
                    return Action::GiveUp;
                }
                self.micro = self.micro.div_ceil(2);
                self.recovered += 1;
                Action::Retry { micro: self.micro }
            }
            Event::StepDone => {
                self.on_trial = false;
                self.clean_steps += 1;
                if self.micro < self.max_micro && self.clean_steps >= self.regrow_wait {
                    self.clean_steps = 0;
                    self.micro = (self.micro * 2).min(self.max_micro);
                    self.on_trial = true;
                    return Action::Regrow { micro: self.micro };
                }
                Action::Continue
            }
        }
    }
}

/// What a run leaves behind for the next run in the same output folder (`run_state.json`):
/// the micro-batch known to fit, so a repeated run does not hit the same OOMs again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunState {
    pub micro: usize,
    pub max_micro: usize,
}

impl RunState {
    const FILE: &'static str = "run_state.json";

    /// The state a previous run left in `dir`, checked: None if there is none.
    pub fn read(dir: &Path) -> Result<Option<RunState>> {
        let path = dir.join(Self::FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let bad = |msg: String| {
            Error::data(
                &path,
                0,
                format!("{msg}; delete the file to start from the configured micro-batch"),
            )
        };
        let s: RunState =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a run state ({e})")))?;
        if s.micro == 0 || s.max_micro == 0 || s.micro > s.max_micro {
            return Err(bad(format!(
                "micro {} and max_micro {} must satisfy 1 <= micro <= max_micro",
                s.micro, s.max_micro
            )));
        }
        Ok(Some(s))
    }

    /// Written atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string(self).expect("plain struct");
        crate::atomic::write_file(&dir.join(Self::FILE), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oom_halves_the_micro_batch_down_to_one_then_gives_up() {
        let mut s = MemState::new(8, 100);
        assert_eq!(s.decide(Event::Oom), Action::Retry { micro: 4 });
        assert_eq!(s.decide(Event::Oom), Action::Retry { micro: 2 });
        assert_eq!(s.decide(Event::Oom), Action::Retry { micro: 1 });
        assert_eq!(s.decide(Event::Oom), Action::GiveUp);
        assert_eq!(s.recovered, 3);
    }

    #[test]
    fn levers_are_pulled_in_the_given_order_and_only_once() {
        let mut s = MemState::new(1, 100);
        let allowed = [Lever::GradientCheckpointing, Lever::MaxSeqLength];
        assert_eq!(s.decide(Event::Oom), Action::GiveUp);
        assert_eq!(s.escalate(&allowed), Some(Lever::GradientCheckpointing));
        assert_eq!(s.escalate(&allowed), Some(Lever::MaxSeqLength));
        assert_eq!(s.escalate(&allowed), None);
        assert_eq!(s.escalate(&[]), None);
    }

    #[test]
    fn odd_micro_batches_round_up_when_halved() {
        let mut s = MemState::new(5, 100);
        assert_eq!(s.decide(Event::Oom), Action::Retry { micro: 3 });
    }

    #[test]
    fn clean_steps_regrow_up_to_the_configured_size() {
        let mut s = MemState::new(8, 2);
        s.decide(Event::Oom); // 4
        s.decide(Event::Oom); // 2
        assert_eq!(s.decide(Event::StepDone), Action::Continue);
        assert_eq!(s.decide(Event::StepDone), Action::Regrow { micro: 4 });
        assert_eq!(s.decide(Event::StepDone), Action::Continue);
        assert_eq!(s.decide(Event::StepDone), Action::Regrow { micro: 8 });
        for _ in 0..10 {
            assert_eq!(s.decide(Event::StepDone), Action::Continue);
        }
        assert_eq!(s.micro, 8);
    }

    #[test]
    fn a_failed_regrow_backs_off_and_doubles_the_wait() {
        let mut s = MemState::new(8, 2);
        s.decide(Event::Oom); // 4
        s.decide(Event::StepDone);
        assert_eq!(s.decide(Event::StepDone), Action::Regrow { micro: 8 });
        assert_eq!(s.decide(Event::Oom), Action::Retry { micro: 4 });
        assert_eq!(s.regrow_wait, 4);
        for _ in 0..3 {
            assert_eq!(s.decide(Event::StepDone), Action::Continue);
        }
        assert_eq!(s.decide(Event::StepDone), Action::Regrow { micro: 8 });
    }

    #[test]
    fn a_run_state_with_micro_zero_is_refused_naming_the_file() {
        let dir = tempfile::TempDir::new().unwrap();
        assert_eq!(RunState::read(dir.path()).unwrap(), None);
        std::fs::write(
            dir.path().join("run_state.json"),
            r#"{"micro":0,"max_micro":8}"#,
        )
        .unwrap();
        let e = RunState::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("run_state.json") && e.contains("micro 0"), "{e}");
        RunState {
            micro: 2,
            max_micro: 8,
        }
        .write(dir.path())
        .unwrap();
        assert_eq!(
            RunState::read(dir.path()).unwrap(),
            Some(RunState {
                micro: 2,
                max_micro: 8
            })
        );
    }
}
