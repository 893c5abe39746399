//! Sets `ST_TUNE_VERSION_LINE` for `st-tune --version`: st-tune's version, the candle version
//! this build links (from Cargo.lock) and whether it was built with the `cuda` feature.

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-changed=build.rs");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let candle = locked_version(&lock, "candle-core").unwrap_or_else(|| "unknown".into());
    let cuda = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        "yes"
    } else {
        "no"
    };
    println!(
        "cargo:rustc-env=ST_TUNE_VERSION_LINE={} (candle {candle}, CUDA: {cuda})",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default()
    );
}

/// The version of package `name` in a Cargo.lock (`name = "..."` then `version = "..."`).
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let wanted = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == wanted {
            let version = lines.next()?.trim().strip_prefix("version = \"")?;
            return Some(version.trim_end_matches('"').to_string());
        }
    }
    None
}
