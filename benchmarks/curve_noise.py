"""Do fine-tuning runs really fall back late, or is it the noise of their mid-run evaluations?

    .venv/bin/python benchmarks/curve_noise.py

Reads the finished 300k-env-step runs of benchmarks/results/finetune.json (no new runs; seconds on a CPU). Each
run's curve has 9 mid-run evaluations of `eval_episodes` (100) episodes and a final one of `final_eval_episodes`
(208); the mid-run episodes are the first 100 of the final's. Two questions:

1. Is a run's peak above its final success more than noise? The peak of 9 noisy evaluations is biased upward:
   if the policy's true success were flat at the final's rate, how often would the peak exceed the final by at
   least the observed gap? (Monte Carlo with binomial evaluations, drawn independently. A flat curve is the
   least favourable case for a curve that never declines, and independent draws overstate the noise of
   overlapping episode sets, so the probability is an upper bound: small means a real decline.)
2. Does a method decline late on average? For each run, the mean of its mid-run evaluations from 200k env
   steps on minus its final success (0 in expectation for a curve that is flat over the last third), averaged
   over the method's runs, with its standard error (binomial, evaluations independent).

Writes benchmarks/results/curve_noise.json and the BENCHMARKS.md section "curve_noise".
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import invocation, today, write_section  # noqa: E402

LATE_FROM = 200_000
"""Mid-run evaluations at or after this many env steps form a run's late mean (the last third of a 300k run)."""


def method(run: dict) -> str:
    name = run["algo"] if run["algo"] == "dppo" else f"simpo {run['weighting']}"
    return name + (f" [{run['variant']}]" if run.get("variant") else "")


def flat_peak_gaps(p: float, n_mid: int, n_evals: int, n_final: int, draws: int,
                   rng: np.random.Generator) -> np.ndarray:
    """(draws,) peak of n_evals Binomial(n_mid, p)/n_mid minus Binomial(n_final, p)/n_final, in percent: what a
    policy whose true success stays at p shows between its best mid-run evaluation and its final one."""
    mids = rng.binomial(n_mid, p, size=(draws, n_evals)).max(axis=1) / n_mid
    final = rng.binomial(n_final, p, size=draws) / n_final
    return 100 * (mids - final)


def binomial_se(pc: float, n: int) -> float:
    """Standard error (percent) of a success rate of pc percent over n episodes."""
    return 100 * math.sqrt(pc / 100 * (1 - pc / 100) / n)


def analyse(runs: list[dict], eval_episodes: int, env_steps: int, draws: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for r in runs:
        if r["env_steps"] < env_steps or r.get("policy_type", "diffusion") != "diffusion":
            continue
        mids = [(int(s), float(p)) for s, p in r["curve"][1:-1]]
        final, n_final = r["pc_success_after"], r.get("final_eval_episodes", 208)
        peak_at, peak = max(mids, key=lambda sp: sp[1])
        late = [p for s, p in mids if s >= LATE_FROM]
        late_mean = sum(late) / len(late)
        rows.append({
            "task": r["task"], "method": method(r), "seed": r["seed"], "final_burst": "final-burst false" not in
            r.get("finetune_args", "") and r["algo"] == "simpo", "mid_evals": [p for _, p in mids], "peak": peak,
            "peak_at": peak_at, "final": final, "peak_minus_final": peak - final,
            "p_flat": float(np.mean(flat_peak_gaps(final / 100, eval_episodes, len(mids), n_final, draws, rng)
                                    >= peak - final - 1e-9)),
            "late_minus_final": late_mean - final,
            "late_minus_final_se": math.sqrt(sum(binomial_se(p, eval_episodes) ** 2 for p in late) / len(late) ** 2
                                             + binomial_se(final, n_final) ** 2),
        })
    groups = {}
    for key, pick in (("dppo", lambda row: row["method"].startswith("dppo")),
                      ("simpo, no final burst", lambda row: row["method"].startswith("simpo") and not row["final_burst"]),
                      ("simpo, final burst", lambda row: row["final_burst"])):
        chosen = [row for row in rows if pick(row)]
        if chosen:
            groups[key] = {
                "runs": len(chosen),
                "mean_peak_minus_final": sum(row["peak_minus_final"] for row in chosen) / len(chosen),
                "mean_late_minus_final": sum(row["late_minus_final"] for row in chosen) / len(chosen),
                "se": math.sqrt(sum(row["late_minus_final_se"] ** 2 for row in chosen)) / len(chosen),
                "runs_p_flat_below_0.05": sum(row["p_flat"] < 0.05 for row in chosen),
            }
    # the flat-policy reference draws from its own stream, so that a new run in the JSON does not move it
    flat = (flat_peak_gaps(0.55, eval_episodes, len(rows[0]["mid_evals"]), 208, draws, np.random.default_rng([seed, 1]))
            if rows else np.zeros(1))
    return {"rows": rows, "groups": groups, "flat_expected_peak_minus_final": float(flat.mean()),
            "draws": draws, "seed": seed}


def report(result: dict) -> str:
    lines = [
        "## Do runs fall back late? The noise of mid-run evaluations (`benchmarks/curve_noise.py`)", "",
        f"Command: `{invocation()}`",
        "Machine: any (it reads `benchmarks/results/finetune.json` and draws binomial samples; no runs)",
        f"Date: {today()}", "",
        "Every finished 300k-env-step diffusion run: its 9 mid-run evaluations (100 episodes, the first 100 of the "
        "final's), their peak, and the final evaluation (208 episodes). `P(gap | flat)` is how often a policy whose "
        f"true success stays at the final's rate shows a peak at least that far above its final ({result['draws']} "
        "Monte Carlo draws, an upper bound: small means a real decline). `late - final` is the mean of the "
        "evaluations from 200k env steps on minus the final, 0 in expectation for a curve flat over the last third. "
        f"With a flat true success of 55%, the peak of 9 evaluations exceeds the final by "
        f"{result['flat_expected_peak_minus_final']:.1f} points on average.", "",
        "| task | method | seed | final burst | mid-run evaluations (%) | peak (env steps) | final (%) | peak - final "
        "| P(gap \\| flat) | late - final |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["task"], r["method"], r["seed"])):
        lines.append(
            f"| {row['task']} | {row['method']} | {row['seed']} | {'yes' if row['final_burst'] else 'no'} | "
            f"{', '.join(f'{p:.0f}' for p in row['mid_evals'])} | {row['peak']:.0f} ({row['peak_at'] // 1000}k) | "
            f"{row['final']:.1f} | {row['peak_minus_final']:+.1f} | {row['p_flat']:.2f} | "
            f"{row['late_minus_final']:+.1f} ± {row['late_minus_final_se']:.1f} |")
    lines += ["", "| runs | count | mean peak - final | mean late - final | runs with P(gap \\| flat) < 0.05 |",
              "|---|---|---|---|---|"]
    for name, g in result["groups"].items():
        lines.append(f"| {name} | {g['runs']} | {g['mean_peak_minus_final']:+.1f} | "
                     f"{g['mean_late_minus_final']:+.1f} ± {g['se']:.1f} | {g['runs_p_flat_below_0.05']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS / "finetune.json")
    parser.add_argument("--eval-episodes", type=int, default=100, help="episodes of each mid-run evaluation")
    parser.add_argument("--env-steps", type=int, default=300_000, help="runs of at least this many env steps")
    parser.add_argument("--draws", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.results.is_file():
        raise SystemExit(f"{args.results}: no such file; run benchmarks/finetune.py first")
    result = analyse(json.loads(args.results.read_text())["runs"], args.eval_episodes, args.env_steps, args.draws,
                     args.seed)
    if not result["rows"]:
        raise SystemExit(f"{args.results}: no finished run of {args.env_steps} env steps")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "curve_noise.json").write_text(json.dumps(result, indent=2))
    body = report(result)
    print(body)
    write_section("curve_noise", body)


if __name__ == "__main__":
    main()
