#!/usr/bin/env bash
# Runs the fuzz targets (proptest) long: package decoding and decompression
# (src/package.rs) and path validation (src/pathsafe.rs). CASES sets the number of
# inputs per target (default 100000); a failure prints the minimal input and proptest
# keeps it in proptest-regressions/ so the normal test run replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PROPTEST_CASES="${CASES:-100000}"
echo "fuzzing with $PROPTEST_CASES cases per target"
cargo test --release -p cms-mirror --lib fuzz_ -- --nocapture
