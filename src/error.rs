//! The library's error type. Each variant carries what the user needs to fix the problem
//! (file and line, config key, tensor name and shapes); `main` prints the chain once and maps
//! the variant to a documented exit code (see [`Error::exit_code`]).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A configuration key has a bad value, or is unknown.
    #[error("config key `{key}`: {msg}")]
    Config { key: String, msg: String },

    /// A config file is not valid TOML. `line` and `column` are 1-based.
    #[error("{file}, line {line}, column {column}: not valid TOML: {msg}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        msg: String,
    },

    /// A data file has a bad row or header. `line` is 1-based; 0 means "the whole file".
    #[error("{}: {msg}", location(file, *line))]
    Data {
        file: PathBuf,
        line: usize,
        msg: String,
    },

    /// A model folder is missing a file, has an unknown type or a tensor of the wrong shape.
    #[error("model {}: {msg}", path.display())]
    Model { path: PathBuf, msg: String },

    /// The command line asked for something impossible (unknown device, bad combination).
    #[error("{0}")]
    Usage(String),

    /// No micro-batch fits in memory, even after every allowed lever was applied.
    #[error("out of memory: {0}")]
    OutOfMemory(String),

    /// A checkpoint folder cannot be trusted or used (damaged, incomplete, another model,
    /// another format, another config).
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// A sweep file, sweep folder or trial index that cannot be used.
    #[error("sweep {}: {msg}", path.display())]
    Sweep { path: PathBuf, msg: String },

    /// `train.max_nonfinite_steps` steps in a row had a NaN or infinite loss or gradient:
    /// the run stopped without saving (the newest checkpoint and `final/` are as they were).
    #[error("training diverged: {0}")]
    Diverged(String),

    /// Ctrl-C (SIGINT) or SIGTERM: a checkpoint was saved, `--resume` continues.
    #[error("interrupted by {}: a checkpoint was saved; run the same command with --resume to continue", signal_name(*signal))]
    Interrupted { signal: i32 },

    /// A broken internal invariant: a bug in st-tune, not bad input.
    #[error("internal error (please report it): {0}")]
    Internal(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn config(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            msg: msg.into(),
        }
    }

    pub fn data(file: impl Into<PathBuf>, line: usize, msg: impl Into<String>) -> Self {
        Error::Data {
            file: file.into(),
            line,
            msg: msg.into(),
        }
    }

    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn sweep(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Sweep {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// Exit codes, documented in README.md:
    /// 1 other failure (and internal errors), 2 bad input (config, data, model, checkpoint,
    /// usage, a missing file), 3 out of memory with nothing left to try, 4 diverged (non-finite
    /// steps in a row, nothing saved), 128 + the signal when
    /// interrupted (130 Ctrl-C, 143 SIGTERM) after saving a checkpoint.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config { .. }
            | Error::Syntax { .. }
            | Error::Data { .. }
            | Error::Model { .. }
            | Error::Checkpoint { .. }
            | Error::Sweep { .. }
            | Error::Usage(_)
            | Error::Tokenizer(_) => 2,
            Error::OutOfMemory(_) => 3,
            Error::Diverged(_) => 4,
            Error::Interrupted { signal } => 128 + signal,
            // A file the user named that does not exist is bad input too.
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => 2,
            Error::Io { .. } | Error::Candle(_) | Error::Internal(_) => 1,
        }
    }
}

/// `file:line`, or just `file` when the error concerns the whole file (line 0).
fn location(file: &std::path::Path, line: usize) -> String {
    match line {
        0 => file.display().to_string(),
        n => format!("{}:{n}", file.display()),
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        2 => "Ctrl-C (SIGINT)".into(),
        15 => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}
