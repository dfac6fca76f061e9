#!/usr/bin/env bash
# Installs everything into .venv and runs the default (fast) test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL="${MUJOCO_GL:-egl}"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing." >&2; exit 1; fi
exit "$rc"
