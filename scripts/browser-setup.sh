#!/usr/bin/env bash
# The browser the dashboard tests drive: Debian's chromium (Playwright downloads nothing).
# Installs it when it is missing and this runs as root; otherwise says what is needed.
set -euo pipefail
CHROMIUM="${CLAWGATE_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the dashboard tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
  echo "no browser at $CHROMIUM: install the chromium and chromium-driver packages" \
       "(tests/test_dashboard.py will fail without it)" >&2
fi
