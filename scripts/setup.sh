#!/usr/bin/env bash
# Creates .venv with a Python 3.12+ it finds (PATH first, then pyenv) and installs simpo-robot with its
# dev tools into it. Safe to run again: an existing, working .venv is reused and only brought up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    for cand in python3.12 python3.13 python3; do
        if command -v "$cand" >/dev/null 2>&1 && \
           "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
            command -v "$cand"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]' | sort -rV); do
            local p; p="$(pyenv root)/versions/$v/bin/python3"
            [ -x "$p" ] && { echo "$p"; return 0; }
        done
    fi
    return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then
    if ! PY="$(find_python)"; then
        echo "simpo-robot needs Python >= 3.12 (lerobot 0.6 requires it) and none was found on PATH or in pyenv." >&2
        echo "Install one, e.g. 'pyenv install 3.12' or your system's python3.12 and python3.12-venv packages, then run this again." >&2
        exit 1
    fi
    echo "Creating .venv with $PY"
    rm -rf .venv
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
