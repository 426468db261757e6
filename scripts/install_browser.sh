#!/usr/bin/env bash
# Installs what the browser test of tests/test_demo.py needs: Debian's chromium and chromium-driver
# (a packaged browser: nothing downloads a browser build of its own) and selenium from PyPI.
#
#     bash scripts/install_browser.sh
#
# Safe to run again: what is already there is left alone. It always exits 0: when something cannot be
# installed it says so, and the browser test then skips, naming this script.
set -u

have_browser() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

if have_browser; then
    echo "install_browser: chromium and chromedriver are already installed"
elif ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; install chromium and its chromedriver yourself"
elif [ "$(id -u)" != "0" ]; then
    echo "install_browser: apt-get needs root; run: sudo apt-get install -y chromium chromium-driver"
else
    # Only a quiet update: its output is long, and a failure shows in the install that follows.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1
    if ! apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; then
        echo "install_browser: apt-get could not install chromium chromium-driver"
    fi
    have_browser && echo "install_browser: installed $(chromium --version 2>/dev/null)"
fi

python=${PYTHON:-python}
if "$python" -c "import selenium" >/dev/null 2>&1; then
    echo "install_browser: selenium is already installed"
elif "$python" -m pip install -q "selenium>=4.11,<5"; then
    echo "install_browser: installed selenium"
else
    echo "install_browser: pip could not install selenium"
fi
exit 0
