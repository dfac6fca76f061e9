#!/usr/bin/env bash
# Installs everything into .venv and runs the main job on the shipped defaults: the toy benchmark, an
# evaluation of the shipped fetch_push checkpoint, then a brief SiMPO fine-tune of it that prints success
# before and after (outputs/ holds the results).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL="${MUJOCO_GL:-egl}"
mkdir -p outputs
.venv/bin/simpo-robot toy --json outputs/toy.json --plot outputs/toy.png
.venv/bin/simpo-robot eval --policy pretrained/fetch_push --task fetch_push --episodes 50 --out outputs/eval/fetch_push
# brief: 6000 env steps (critic from 2000; phases of 1600 env steps, each ending in 25 actor updates, from 3000
# on), 50 evaluation episodes before and after. The defaults' phases are 30k env steps long.
.venv/bin/simpo-robot finetune --policy pretrained/fetch_push --task fetch_push --algo simpo --weighting linear \
    --negative-bound -0.5 --env-steps 6000 --simpo.actor-starts 3000 --simpo.actor-burst 25 --simpo.actor-every 8 \
    --simpo.buffer-size 800 --eval-every 0 --final-eval-episodes 50 --seed 0 --out outputs/finetune/fetch_push \
    --overwrite
