#!/usr/bin/env bash
# Benchmarks cms-mirror against rsync (client -> daemon on loopback) on the datasets of
# ../shared/bench: full mirror, no-change re-run, re-run after the edit.
#   bench/run.sh [--rounds N] [--datasets small,large,mixed] [--dir DIR]
# Memory on a huge tree: bench/run.sh --memory 1000000
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --quiet
exec python3 bench/run.py "$@"
