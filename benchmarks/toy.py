"""Toy benchmark: SiMPO weightings on the 2-D multimodal reward of `simpo-robot toy`, default settings.

    .venv/bin/python benchmarks/toy.py

Runs `simpo-robot toy` with its defaults, writes benchmarks/results/toy.json and toy.png, prints the
table, and records it with the command, machine and date in BENCHMARKS.md (section "toy").
"""

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, today, write_section  # noqa: E402

from simpo_robot.logging_utils import setup_logging  # noqa: E402
from simpo_robot.toy import BAD_THRESHOLD, EARLY_UPDATE, ToyConfig, first_update_below, mass_at, run_toy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f} ± {math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)):.3f}"


def main() -> None:
    setup_logging()
    RESULTS.mkdir(exist_ok=True)
    cfg = ToyConfig(json=str(RESULTS / "toy.json"), plot=str(RESULTS / "toy.png"))
    start = time.perf_counter()
    results = run_toy(cfg)
    wall = time.perf_counter() - start
    pretrained = json.loads((RESULTS / "toy.json").read_text())["pretrained"]
    rows = [f"| pretrained | | {pretrained['reward']:.3f} | {pretrained['best_mode_mass']:.3f} | "
            f"{pretrained['bad_region_mass']:.3f} | | | |"]
    for name, bound in cfg.parsed_variants():
        runs = [r for r in results if r.weighting == name and r.negative_bound == bound]
        reached = [u for u in (first_update_below(r.curve, BAD_THRESHOLD) for r in runs) if u is not None]
        speed = f"{sum(reached) / len(reached):.0f} ({len(reached)}/{len(runs)})" if reached else "never"
        rows.append(f"| {name} | {bound:g} | {mean_std([r.final_reward for r in runs])} | "
                    f"{mean_std([r.best_mode_mass for r in runs])} | {mean_std([r.bad_region_mass for r in runs])} | "
                    f"{mean_std([mass_at(r.curve, EARLY_UPDATE) for r in runs])} | {speed} | "
                    f"{mean_std([r.negative_mass for r in runs])} |")
    body = f"""## Toy: SiMPO weightings on a 2-D multimodal reward (`benchmarks/toy.py`)

Command: `.venv/bin/python benchmarks/toy.py` (= `simpo-robot toy --json benchmarks/results/toy.json --plot benchmarks/results/toy.png`, defaults)
Machine: {machine()}
Date: {today()}; wall time {wall:.0f} s for {len(results)} runs ({cfg.seeds} seeds x {len(cfg.variants)} weightings, {cfg.updates} updates each, one shared pretrained start).

Landscape on [-1, 1]^2: narrow best mode (height 1), wide deceptive mode (height 0.5), bad region y < -0.2
(reward -1, 40% of the square). Q = true reward; N = {cfg.particles} particles from pi_old (refreshed every
{cfg.refresh_every} updates, exploration noise {cfg.particle_noise}); learned temperature with target KL {cfg.target_kl}.
Mean ± std over seeds of the final reward, the mass within 0.2 of the best mode, the bad-region mass, the
bad-region mass after {EARLY_UPDATE} updates, and the first update (evaluated every {cfg.eval_every}) at which the
bad-region mass is below {BAD_THRESHOLD:.0%} (mean over the runs that got there); last, the negative mass of the
normalised weights, sum_i max(-w_i, 0), averaged over updates (how much repulsion the weighting used).

| weighting | b | final reward | best-mode mass | bad-region mass | bad mass @ {EARLY_UPDATE} | updates to bad < {BAD_THRESHOLD:.0%} | negative weight mass |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n\n![samples before/after](benchmarks/results/toy.png)\n"
    write_section("toy", body)


if __name__ == "__main__":
    main()
