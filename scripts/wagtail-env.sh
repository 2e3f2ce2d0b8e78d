#!/usr/bin/env bash
# Makes the Python environment of the test CMS (tests/wagtail: Wagtail at the versions
# pinned in its requirements.txt) and prints its python's path. Does nothing but print
# when the environment already matches requirements.txt. Non-interactive; needs Python
# 3.11+ and PyPI. The page tests call it themselves; .ci/run calls it first.
#
#   WAGTAIL_VENV   where the environment goes (default: target/wagtail-venv)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${WAGTAIL_VENV:-$root/target/wagtail-venv}"
req="$root/tests/wagtail/requirements.txt"
stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp"; then
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$(dirname "$venv")"
# One maker at a time (tests start in parallel); the others find its environment.
exec 9>"$venv.lock"
flock 9
if [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp"; then
  echo "$venv/bin/python"
  exit 0
fi
python=""
for p in python3.11 python3.12 python3.13 python3; do
  if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    python="$p"
    break
  fi
done
if [ -z "$python" ]; then
  echo "wagtail-env: no Python 3.11 or later found" >&2
  exit 1
fi
# Made beside and moved into place, so a test never finds half an environment.
tmp="$venv.tmp.$$"
rm -rf "$tmp"
"$python" -m venv "$tmp"
"$tmp/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
cp "$req" "$tmp/.requirements"
rm -rf "$venv"
mv "$tmp" "$venv"
# A venv's scripts name the directory it was made in: make it again in place.
"$python" -m venv --upgrade "$venv" >/dev/null
echo "$venv/bin/python"
