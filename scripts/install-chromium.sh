#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver for the dashboard's browser test
# (tests/e2e/dashboard.rs). Does nothing when both are present. Needs root (CI runs as
# root); non-interactive.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-chromium: run as root, or: sudo apt-get install chromium chromium-driver" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-chromium: apt-get install chromium chromium-driver" >&2
apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || {
  apt-get update -q >/dev/null 2>&1
  apt-get install -y -q chromium chromium-driver >/dev/null
}
/usr/bin/chromium --version >&2
