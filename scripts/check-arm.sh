#!/usr/bin/env bash
# Keeps the 64-bit Arm build compiling: `cargo check` of the library, binary, tests and benches
# for aarch64-unknown-linux-gnu, so x86-only code stays behind cfg(target_arch = "x86_64").
#   scripts/check-arm.sh            # the check (build scripts compile C: needs the cross gcc)
#   ARM_TEST=1 scripts/check-arm.sh [TEST ARGS]   # also builds the tests and runs them under
#                                                 # qemu-user (slow: pass a filter, e.g. --lib)
# Needs: rustup's standard library for the target (added here if missing; a download), and on
# Debian `apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross` (+ `qemu-user` for
# ARM_TEST). Debian's own libstd-rust-dev:arm64 does not fit: it is rustc 1.63's, not this one's.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
target=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
export CC_aarch64_unknown_linux_gnu=${CC_aarch64_unknown_linux_gnu:-aarch64-linux-gnu-gcc}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-aarch64-linux-gnu-gcc}
cargo check --locked --target "$target" --all-targets
if [[ ${ARM_TEST:-} == 1 ]]; then
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
  cargo test --locked --target "$target" "$@"
fi
