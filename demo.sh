#!/usr/bin/env bash
# Builds cms-mirror and mirrors the bundled example site (examples/site) from a
# mirror-source process to a mirror-target process on loopback, with embedded SQLite.
# The mirrored copy is left in demo-out/mirror; logs and databases in demo-out/.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)
out="$here/demo-out"

echo "==> building (cargo build --bins)"
cargo build --workspace --bins --quiet
bin="$here/target/debug"

rm -rf "$out"
mkdir -p "$out"
# git keeps no empty directories: the example site's empty upload dir is made here.
mkdir -p examples/site/uploads/incoming

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Starts a service on port 0 and waits for the address it prints (in $addr). Not in
# a subshell: the trap must see every pid to stop the services when the demo ends.
start() {
  local name=$1; shift
  "$@" >"$out/$name.out" 2>"$out/$name.log" &
  pids+=($!)
  for _ in $(seq 1 100); do
    addr=$(sed -n 's/.*listening on //p' "$out/$name.out" | head -n1)
    [ -n "$addr" ] && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$out/$name.log" >&2; return 1; }
    sleep 0.1
  done
  echo "$name did not start" >&2; return 1
}

start target "$bin/mirror-target" --listen 127.0.0.1:0 \
  --site "main=$out/mirror" --data-dir "$out/target-data"
target_addr=$addr
echo "==> mirror-target listening on $target_addr (site main = demo-out/mirror)"

cat >"$out/mirror.toml" <<TOML
[[channel]]
name = "site"
source = "$here/examples/site"
exclude = ["*~", "*.tmp"]
exclude_presets = ["vcs", "secrets"]   # .git, .env, keys, ... never reach a web root
last = ["sitemap.xml", "**/sitemap.json"]
delete = true
max_delete = "50%"
package_bytes = 1048576

  [[channel.target]]
  name = "web1"
  url = "http://$target_addr"
  site = "main"
TOML

start source "$bin/mirror-source" --listen 127.0.0.1:0 \
  --config "$out/mirror.toml" --data-dir "$out/source-data"
source_addr=$addr
echo "==> mirror-source listening on $source_addr"

ctl() { "$bin/mirrorctl" --source "http://$source_addr" "$@"; }
echo "==> mirrorctl start site --wait"
ctl start site --wait
echo "==> a second run: only what changed is sent (nothing)"
ctl start site --wait | sed -n '1,4p'
echo
echo "==> mirrorctl jobs"
ctl jobs
echo
# .cms-mirror-trace is the target's note of its last job (for mirror checkers).
same() { diff -r --no-dereference --exclude=.cms-mirror-trace examples/site "$out/mirror"; }
if same >/dev/null; then
  echo "==> demo-out/mirror is identical to examples/site (diff -r, the target's trace file aside)"
  sed 's/^/    /' "$out/mirror/.cms-mirror-trace"
else
  echo "==> demo-out/mirror differs from examples/site:" >&2
  same >&2 || true
  exit 1
fi
