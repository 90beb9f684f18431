#!/usr/bin/env bash
# Install what the browser test (tests/test_browser.py) needs: Debian's chromium and the
# `playwright` Python package.  Playwright's own browser download is never used (it cannot be
# reached from CI): the test launches /usr/bin/chromium through `executable_path`.
# Usage: scripts/install_browser.sh [VENV]        (default .venv)
set -euo pipefail
venv=${1:-.venv}
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  echo "install_browser: installing Debian's chromium with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! "$venv/bin/python" -c 'import playwright' >/dev/null 2>&1; then
  echo "install_browser: installing the playwright Python package" >&2
  # Never run `playwright install`: the browser comes from Debian.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$venv/bin/python" -m pip install -q "playwright>=1.45"
fi
/usr/bin/chromium --version >&2
