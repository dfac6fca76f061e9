#!/usr/bin/env bash
# Installs everything into .venv and runs the main job on the shipped defaults: the toy benchmark, then
# an evaluation of the shipped fetch_push checkpoint (outputs/ holds the results).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL="${MUJOCO_GL:-egl}"
mkdir -p outputs
.venv/bin/simpo-robot toy --json outputs/toy.json --plot outputs/toy.png
.venv/bin/simpo-robot eval --policy pretrained/fetch_push --task fetch_push --episodes 50 --out outputs/eval/fetch_push
