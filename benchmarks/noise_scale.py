"""Success against the scale of the sampler's initial noise, and how much of the failure is the noise.

Each policy is evaluated in-process (`simpo-robot eval`'s rollout, episode i seeded 1000 + i, one CPU thread) with
its initial noise x_T scaled by each of --scales (`simpo-robot eval --noise_scale`): 1 is the policy as trained,
0 starts every chunk from x_T = 0, which makes DDIM and flow sampling deterministic. With --draws R the first
--draw-episodes episodes are also replayed at scale 1 with R noise seeds; for each episode (initial state) that
counts the draws that succeed, so a policy that fails because of its noise (sometimes 0 < k < R) is told apart
from one that cannot solve the state (k = 0 every time).

    .venv/bin/python benchmarks/noise_scale.py
    .venv/bin/python benchmarks/noise_scale.py --policies pretrained/fetch_push:fetch_push --scales 1 0 --draws 0
    .venv/bin/python benchmarks/noise_scale.py --policies outputs/benchmarks/fetch_push-simpo-linear-s0/final:fetch_push

Results go to benchmarks/results/noise_scale.json and the BENCHMARKS.md section "noise_scale".
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_POLICIES = ["pretrained/fetch_push:fetch_push", "pretrained/fetch_push-flow:fetch_push",
                    "pretrained/fetch_pick_place:fetch_pick_place"]
log = logging.getLogger("noise_scale")


@dataclass
class ScaleRow:
    policy: str
    task: str
    noise_scale: float
    episodes: int
    pc_success: float
    ci95: tuple[float, float]


@dataclass
class DrawsRow:
    policy: str
    task: str
    episodes: int
    draws: int
    successes_per_state: list[int]
    """successes_per_state[k]: episodes (initial states) that succeeded in exactly k of the draws."""

    @property
    def pc_mean(self) -> float:
        return 100 * sum(k * n for k, n in enumerate(self.successes_per_state)) / (self.episodes * self.draws)


def policy_and_task(text: str) -> tuple[str, str]:
    if text.count(":") != 1:
        raise argparse.ArgumentTypeError(f"expected POLICY:TASK, got {text!r}")
    policy, task = text.split(":")
    return policy, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", type=policy_and_task, default=[policy_and_task(p) for p in DEFAULT_POLICIES],
                        help="POLICY:TASK pairs (a local folder or Hub repo id, and a task name)")
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.5, 0.0])
    parser.add_argument("--episodes", type=int, default=208)
    parser.add_argument("--draws", type=int, default=5, help="noise draws per initial state at scale 1 (0: skip)")
    parser.add_argument("--draw-episodes", type=int, default=104, help="initial states replayed with --draws")
    parser.add_argument("--no-write", action="store_true", help="do not update the JSON and BENCHMARKS.md")
    args = parser.parse_args()
    if min(args.scales) < 0 or args.episodes < 1 or args.draws < 0 or args.draw_episodes < 1:
        parser.error("scales must be >= 0, --episodes and --draw-episodes >= 1, --draws >= 0")

    import torch
    from report import machine, today, write_section

    from simpo_robot.evaluate import evaluate_policy
    from simpo_robot.logging_utils import console, setup_logging
    from simpo_robot.policy_io import load_policy
    from simpo_robot.tasks import load_task

    setup_logging()
    torch.set_num_threads(1)
    start = time.perf_counter()
    scale_rows: list[ScaleRow] = []
    draw_rows: list[DrawsRow] = []
    for policy, task in args.policies:
        spec, loaded = load_task(task), load_policy(policy)
        for scale in args.scales:
            result = evaluate_policy(loaded, spec, args.episodes, seed=1000, noise_scale=scale)
            lo, hi = result.ci95
            scale_rows.append(ScaleRow(policy, task, scale, args.episodes, 100 * result.success_rate, (100 * lo, 100 * hi)))
            log.info("%s noise scale %g: %.1f%%", policy, scale, 100 * result.success_rate)
        if args.draws:
            per_draw = np.array([[e.success for e in evaluate_policy(loaded, spec, args.draw_episodes, seed=1000,
                                                                      noise_seed=1000 + 7919 * d).per_episode]
                                 for d in range(args.draws)])  # (draws, episodes); draw 0 is the usual noise
            counts = np.bincount(per_draw.sum(0), minlength=args.draws + 1).tolist()
            draw_rows.append(DrawsRow(policy, task, args.draw_episodes, args.draws, counts))
            log.info("%s: states solved in k of %d draws: %s", policy, args.draws, counts)
    wall = time.perf_counter() - start

    scales_sorted = sorted(set(args.scales), reverse=True)
    lines = ["| policy | task | " + " | ".join(f"noise scale {s:g}" for s in scales_sorted) + " |",
             "|---|---|" + "---|" * len(scales_sorted)]
    for policy, task in args.policies:
        cells = []
        for s in scales_sorted:
            row = next(r for r in scale_rows if r.policy == policy and r.noise_scale == s)
            cells.append(f"{row.pc_success:.1f}% [{row.ci95[0]:.0f}, {row.ci95[1]:.0f}]")
        lines.append(f"| `{policy}` | {task} | " + " | ".join(cells) + " |")
    if draw_rows:
        r = args.draws
        lines += ["", f"| policy | states (episodes) | solved in k of {r} noise draws, k = 0 ... {r} | never | sometimes | "
                  "always | mean success |", "|---|---|---|---|---|---|---|"]
        for d in draw_rows:
            c = d.successes_per_state
            lines.append(f"| `{d.policy}` | {d.episodes} | {' / '.join(map(str, c))} | {100 * c[0] / d.episodes:.0f}% | "
                         f"{100 * sum(c[1:-1]) / d.episodes:.0f}% | {100 * c[-1] / d.episodes:.0f}% | {d.pc_mean:.1f}% |")
    console.print("\n".join(lines), markup=False, highlight=False)
    if args.no_write:
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "noise_scale.json").write_text(json.dumps(
        {"scales": [asdict(r) for r in scale_rows], "draws": [asdict(r) for r in draw_rows]}, indent=2))
    pairs = " ".join(f"{p}:{t}" for p, t in args.policies)
    command = (f".venv/bin/python benchmarks/noise_scale.py --policies {pairs} --scales {' '.join(f'{s:g}' for s in args.scales)} "
               f"--episodes {args.episodes} --draws {args.draws} --draw-episodes {args.draw_episodes}")
    body = "\n".join([
        "## Success against the sampler's initial noise (`benchmarks/noise_scale.py`)", "",
        f"Command: `{command}`",
        f"Machine: {machine()}",
        f"Date: {today()}; wall time {wall:.0f} s.", "",
        "Each policy's evaluation (`simpo-robot eval --noise_scale S`: episode i seeded 1000 + i, one CPU thread) with "
        "its initial noise x_T scaled by S. S = 1 is the policy as trained (every other number in this file); S = 0 "
        "starts every chunk from x_T = 0, which makes DDIM and flow sampling deterministic. Success with its 95% "
        f"Wilson interval over {args.episodes} episodes.", "",
        *lines[: len(args.policies) + 2], "",
        *(["The second table replays the first episodes at scale 1 with other noise seeds (`evaluate_policy(..., "
           "noise_seed=...)`; draw 0 is the usual one) and counts, per initial state, the draws that succeed. "
           "\"Sometimes\" states are failures of the noise, not of what the policy can do.", "",
           *lines[len(args.policies) + 3:]] if draw_rows else []),
    ])
    write_section("noise_scale", body)
    log.info("updated BENCHMARKS.md (section noise_scale) and %s", RESULTS / "noise_scale.json")


if __name__ == "__main__":
    main()
