#!/usr/bin/env bash
# Rebuilds a shipped checkpoint: pretrained/build.sh NAME [OUT_DIR]
# NAME is TASK (a DiffusionPolicy) or TASK-flow (a FlowPolicy, simpo_robot.policies.flow), e.g. fetch_push-flow.
# collect scripted demonstrations -> pretrain a small policy -> evaluate 200 episodes -> model card.
# The settings per task below are the ones the shipped checkpoints were built with (see each README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME="${1:?usage: pretrained/build.sh TASK|TASK-flow [OUT_DIR]}"
TASK="${NAME%-flow}"
POLICY_TYPE=diffusion
[ "$TASK" != "$NAME" ] && POLICY_TYPE=flow
OUT="${2:-pretrained/$NAME}"
WORK="${WORK:-outputs/build/$NAME}"
export MUJOCO_GL="${MUJOCO_GL:-egl}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
case "$NAME" in
  # imperfect by design: 100 noisy demonstrations, 6000 steps (~10 min on one CPU core), far from converged
  fetch_reach)      EPISODES=20;  NOISE=0.1; STEPS=1000; ACTION_STEPS=2 ;;
  fetch_push)       EPISODES=100; NOISE=0.1; STEPS=6000; ACTION_STEPS=2 ;;
  fetch_pick_place) EPISODES=100; NOISE=0.1; STEPS=6000; ACTION_STEPS=2 ;;
  # the same demonstrations and budget as fetch_push, trained as a rectified flow (10 Euler steps)
  fetch_push-flow)  EPISODES=100; NOISE=0.1; STEPS=6000; ACTION_STEPS=2 ;;
  *) echo "no build recipe for $NAME" >&2; exit 2 ;;
esac
PY=.venv/bin/python
COMMANDS="$PY -m simpo_robot collect --task $TASK --episodes $EPISODES --noise $NOISE --seed 0 --out $WORK/data --overwrite true
$PY -m simpo_robot pretrain --task $TASK --dataset $WORK/data --out $OUT --policy_type $POLICY_TYPE --steps $STEPS --n_action_steps $ACTION_STEPS --seed 0 --overwrite true
$PY -m simpo_robot eval --policy $OUT --task $TASK --episodes 200 --seed 1000 --out $WORK/eval"
while IFS= read -r cmd; do echo "+ $cmd"; eval "$cmd"; done <<< "$COMMANDS"
$PY - "$OUT" "$WORK/eval/eval_info.json" "$COMMANDS" "$NAME" <<'PYEOF'
import sys
from simpo_robot.pretrain import write_model_card
commands = f"# MUJOCO_GL=egl OMP_NUM_THREADS=1, from the repository root (or: pretrained/build.sh {sys.argv[4]})\n" + sys.argv[3]
print(write_model_card(sys.argv[1], sys.argv[2], commands))
PYEOF
rm -f "$OUT/train_info.json.bak"
ls -la "$OUT"
