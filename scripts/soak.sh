#!/usr/bin/env bash
# Crash soak: rounds of source edits, each mirrored by a job during which the source, the
# target or both are killed (SIGKILL) at random moments and started again; after each
# round the trees must be identical and both databases intact. Bounded in time.
#   scripts/soak.sh [--minutes 10] [--files 3000] [--seed 1]
# SOAK_BIN=DIR runs the binaries in DIR instead of a fresh release build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SOAK_BIN:-}" ]; then
  cargo build --release --workspace --bins --quiet
fi
exec python3 scripts/soak.py "$@"
