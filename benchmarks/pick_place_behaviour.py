"""What does a fetch_pick_place policy do, beyond its success rate? Prints a table.

    .venv/bin/python benchmarks/pick_place_behaviour.py pretrained/fetch_pick_place outputs/round5/pick_place_E/final
    .venv/bin/python benchmarks/pick_place_behaviour.py --eval-info outputs/round5/pick_place_E/eval_info.json

For each policy folder: 50 episodes on evaluation seeds 1000 + i, and per policy the success, how often the
block rises more than 3 cm above its start (a lift), and the mean final distance of the block to the goal.
For each `eval_info.json` (from `simpo-robot eval` or a fine-tuning run): its success split by goal, in the
air (more than 1 cm above the block's start) or on the table, with each episode's goal rebuilt from its seed.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from simpo_robot.evaluate import evaluate_policy
from simpo_robot.policy_io import load_policy
from simpo_robot.tasks import load_task, make_env

LIFT_M = 0.03
AIR_M = 0.01


def behaviour(policy: str, episodes: int, seed: int) -> dict[str, float]:
    """One evaluation of `policy` (the episodes in one batch), watching the block along the way."""
    spec = load_task("fetch_pick_place")
    seen: dict[str, np.ndarray] = {}

    def watch(first: int, obs: dict[str, np.ndarray]) -> None:
        block = obs["observation.environment_state"]
        if "start_z" not in seen:  # right after the reset
            seen["start_z"], seen["lift"] = block[:, 2].copy(), np.zeros(len(block))
        seen["lift"] = np.maximum(seen["lift"], block[:, 2] - seen["start_z"])
        seen["last"] = block

    result = evaluate_policy(load_policy(policy), spec, episodes, seed, batch_size=episodes, on_step=watch)
    block = seen["last"]
    final = np.linalg.norm(block[:, 0:3] - block[:, -3:], axis=1)
    return {"success %": 100 * result.success_rate, "lifted %": 100 * (seen["lift"] > LIFT_M).mean(),
            "final goal distance (m)": float(final.mean())}


def goal_split(eval_info: Path) -> dict[str, float]:
    episodes = json.loads(eval_info.read_text())["per_episode"]
    env = make_env(load_task("fetch_pick_place"))
    air, table = [], []
    for episode in episodes:
        obs, _ = env.reset(seed=episode["seed"])
        block = obs["observation.environment_state"]
        (air if block[-1] - block[2] > AIR_M else table).append(episode["success"])
    env.close()
    return {"air goals %": 100 * float(np.mean(air)), "air episodes": len(air),
            "table goals %": 100 * float(np.mean(table)), "table episodes": len(table)}


def _table(rows: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(rows.values())))
    lines = ["| what | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    def cell(column: str, value: float | int) -> str:
        return f"{value:.3f}" if "(m)" in column else f"{value:.1f}" if isinstance(value, float) else str(value)

    lines += [f"| `{name}` | " + " | ".join(cell(c, row[c]) for c in columns) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policies", nargs="*", help="policy folders (LeRobot layout)")
    parser.add_argument("--eval-info", nargs="*", default=[], type=Path, help="eval_info.json files to split by goal")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.policies:
        print(_table({p: behaviour(p, args.episodes, args.seed) for p in args.policies}))
    if args.eval_info:
        print(_table({str(f): goal_split(f) for f in args.eval_info}))


if __name__ == "__main__":
    main()
