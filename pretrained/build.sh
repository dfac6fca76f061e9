#!/usr/bin/env bash
# Rebuilds a shipped checkpoint: pretrained/build.sh TASK [OUT_DIR]
# collect scripted demonstrations -> pretrain a small DiffusionPolicy -> evaluate 200 episodes -> model card.
# The settings per task below are the ones the shipped checkpoints were built with (see each README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
TASK="${1:?usage: pretrained/build.sh TASK [OUT_DIR]}"
OUT="${2:-pretrained/$TASK}"
WORK="${WORK:-outputs/build/$TASK}"
export MUJOCO_GL="${MUJOCO_GL:-egl}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
case "$TASK" in
  # imperfect by design: 100 noisy demonstrations, 6000 steps (~10 min on one CPU core), far from converged
  fetch_reach)      EPISODES=20;  NOISE=0.1; STEPS=1000; ACTION_STEPS=2 ;;
  fetch_push)       EPISODES=100; NOISE=0.1; STEPS=6000; ACTION_STEPS=2 ;;
  fetch_pick_place) EPISODES=100; NOISE=0.1; STEPS=6000; ACTION_STEPS=2 ;;
  *) echo "no build recipe for task $TASK" >&2; exit 2 ;;
esac
PY=.venv/bin/python
COMMANDS="$PY -m simpo_robot collect --task $TASK --episodes $EPISODES --noise $NOISE --seed 0 --out $WORK/data --overwrite true
$PY -m simpo_robot pretrain --task $TASK --dataset $WORK/data --out $OUT --steps $STEPS --n_action_steps $ACTION_STEPS --seed 0 --overwrite true
$PY -m simpo_robot eval --policy $OUT --task $TASK --episodes 200 --seed 1000 --out $WORK/eval"
while IFS= read -r cmd; do echo "+ $cmd"; eval "$cmd"; done <<< "$COMMANDS"
$PY - "$OUT" "$WORK/eval/eval_info.json" "$COMMANDS" <<'PYEOF'
import sys
from simpo_robot.pretrain import write_model_card
commands = "# MUJOCO_GL=egl OMP_NUM_THREADS=1, from the repository root (or: pretrained/build.sh TASK)\n" + sys.argv[3]
print(write_model_card(sys.argv[1], sys.argv[2], commands))
PYEOF
rm -f "$OUT/train_info.json.bak"
ls -la "$OUT"
