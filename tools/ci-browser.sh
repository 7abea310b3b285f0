#!/usr/bin/env bash
# Install what tests/trace/test_viewer_browser.py needs: Debian's chromium package.
#
# Idempotent: does nothing when /usr/bin/chromium exists. Uses apt only (the
# distribution's browser; nothing is downloaded by a test tool). After it has
# run, CI sets KBUS_REQUIRE_BROWSER=1 so that a missing browser fails the
# browser test instead of skipping it.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "ci-browser: chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci-browser: apt-get not found; install Chromium at /usr/bin/chromium by other means" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "ci-browser: not root and no sudo; cannot install chromium" >&2
        exit 1
    fi
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# Recommends bring the fonts the viewer's text is drawn with.
$SUDO apt-get install -y -q chromium

if [ ! -x /usr/bin/chromium ]; then
    echo "ci-browser: chromium was installed but /usr/bin/chromium is missing" >&2
    exit 1
fi
echo "ci-browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
