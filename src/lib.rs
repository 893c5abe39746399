//! st-tune: fine-tune sentence-transformer embedding models with candle, on CPU and CUDA,
//! with an out-of-memory handler that keeps the run going.
//!
//! The folders are the architecture: `model` (encoders, pooling, loading and saving),
//! `data` (readers, tokenization, batching), `losses`, `train` (the loop, optimizer,
//! evaluation, checkpoints), `memory` (budget, OOM recognition and the backoff policy), `sweep`
//! (hyperparameter search over trials run as processes) and `cli`.

pub mod atomic;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod engine;
pub mod error;
pub mod lock;
pub mod losses;
pub mod memory;
pub mod model;
pub mod plot;
pub mod sweep;
pub mod train;

#[cfg(test)]
pub mod testing;

pub use error::{Error, Result};
