#!/usr/bin/env bash
# cms-mirror against rsync -z over the WAN test bed (scripts/wan/; needs root): the
# mixed dataset's full mirror and 1% edit, and a 100-byte insert into each large file,
# at 100 Mbit/s and at 20 Mbit/s + 80 ms one way.
#   bench/wan.sh [--profiles 100mbit,20mbit+80ms] [--cases full,edit,insert] [--rounds N]
#                [--basis cold|warm] [--tools "cms-mirror,rsync -z,rsync -z --fsync"]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --quiet
exec python3 bench/wan.py "$@"
