"""Success by phase for fine-tuning runs with actor bursts (the fourth and fifth rounds' tables). Prints a table.

    .venv/bin/python benchmarks/phases.py outputs/phase/kl005_b250_p30k_reset outputs/round5/*

A phase ends at each actor burst: where a run's metrics.jsonl shows a new `charts/actor_updates` (runs from
before that metric: a new `simpo/q_std`, the particles' Q spread, measured at actor updates only). Each phase's success is the mean of the training
episodes' 100-episode success windows (`charts/rollout_success`), read every 5000 env steps from 5000 env
steps after the phase starts (so that the windows hardly overlap and hold no episode of the phase before).
"""

import argparse
import json
from pathlib import Path

WINDOW_GAP = 5000


def phases(run: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "charts/rollout_success" in r]
    spreads: list[float] = []
    phase_rows: list[list[dict]] = [[]]
    burst_key = "charts/actor_updates" if any("charts/actor_updates" in r for r in rows) else "simpo/q_std"
    last_burst = None
    for row in rows:
        burst = row.get(burst_key)
        if burst is not None and burst != last_burst:
            last_burst = burst
            spreads.append(row["simpo/q_std"])
            phase_rows.append([])
        phase_rows[-1].append(row)
    success = []
    for group in phase_rows:
        if not group:
            continue
        picked, last = [], None
        for row in group:
            if row["env_steps"] >= group[0]["env_steps"] + WINDOW_GAP and (last is None or row["env_steps"] - last >= WINDOW_GAP):
                picked.append(row["charts/rollout_success"])
                last = row["env_steps"]
        if picked:
            success.append(f"{100 * sum(picked) / len(picked):.0f}")
    summary = run / "summary.json"
    after = json.loads(summary.read_text())["pc_success_after"] if summary.is_file() else None
    return {"success by phase (%)": " -> ".join(success),
            "particle Q spread after each burst": " ".join(f"{q:.2f}" for q in spreads),
            "208-episode success at the end (%)": f"{after:.1f}" if after is not None else "(not finished)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="fine-tuning run folders (--out of simpo-robot finetune)")
    args = parser.parse_args()
    rows = {str(run): phases(run) for run in args.runs if (run / "metrics.jsonl").is_file()}
    columns = list(next(iter(rows.values())))
    print("| run | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| `{name}` | " + " | ".join(row[c] for c in columns) + " |")


if __name__ == "__main__":
    main()
