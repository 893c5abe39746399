//! Sets `ST_TUNE_VERSION_LINE` for `st-tune --version`: st-tune's version, the candle version
//! this build links (from Cargo.lock) and whether it was built with the `cuda` feature. With
//! `cuda`, also compiles st-tune's own kernels (src/engine/cuda/kernels.cu) to PTX with nvcc, as
//! candle's kernels are (`nvcc` on the PATH or in `$CUDA_HOME/bin`; `CUDA_COMPUTE_CAP`, default 90).

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-changed=build.rs");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let candle = locked_version(&lock, "candle-core").unwrap_or_else(|| "unknown".into());
    let cuda = if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels();
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

/// src/engine/cuda/kernels.cu -> $OUT_DIR/st_tune_kernels.ptx. `--fmad=false`: AdamW must do
/// the IEEE operations of its CPU twin, with no fused multiply-adds.
fn compile_kernels() {
    let src = "src/engine/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("st_tune_kernels.ptx");
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|h| std::path::PathBuf::from(h).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "--fmad=false", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on {src}");
}
