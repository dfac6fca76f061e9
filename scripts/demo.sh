#!/usr/bin/env bash
# Installs everything into .venv and runs the main job on the shipped defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL="${MUJOCO_GL:-egl}"
mkdir -p outputs
.venv/bin/simpo-robot toy --json outputs/toy.json --plot outputs/toy.png
