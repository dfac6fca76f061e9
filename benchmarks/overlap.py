"""What overlapping the critic updates with the next chunk's collection saves (`finetune --overlap-updates`).

    .venv/bin/python benchmarks/overlap.py
    .venv/bin/python benchmarks/overlap.py --task fetch_push --env-steps 30000 --torch-threads 1 --repeats 3

Runs `simpo-robot finetune` on the shipped checkpoint with `--overlap-updates true` and `false`, alternately, the same
seed and flags otherwise, and compares their wall time and their networks at the end (the same run with
--torch-threads 1; with more, the sequential critic updates round differently).
The runs have no actor bursts (`--simpo.actor-starts` beyond the budget) and no evaluations on the way: they time
the part of a fine-tuning run that the overlap changes, collection plus the critic updates after each chunk
(4 per chunk by default). Bursts and evaluations cost the same either way. The overlap needs a free core: run this
on an otherwise idle machine. Writes benchmarks/results/overlap.json and the BENCHMARKS.md section "overlap".
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import invocation, machine, today, write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def run(task: str, env_steps: int, threads: int, overlap: bool, out: Path) -> dict:
    """One fine-tuning run into `out`; its summary.json."""
    args = [sys.executable, "-m", "simpo_robot", "finetune", "--policy", str(ROOT / "pretrained" / task), "--task", task,
            "--algo", "simpo", "--weighting", "linear", "--negative-bound", "-0.5", "--env-steps", str(env_steps),
            "--seed", "0", "--eval-every", "0", "--final-eval-episodes", "16", "--deterministic-eval", "false",
            "--checkpoint-every", str(env_steps), "--simpo.actor-starts", "100000000", "--torch-threads", str(threads),
            "--overlap-updates", str(overlap).lower(), "--out", str(out), "--overwrite", "true"]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"finetune failed ({' '.join(args)}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def max_weight_difference(a: Path, b: Path) -> float:
    """Over every network of the two runs' last checkpoints (the policy and the critics)."""
    from safetensors.torch import load_file

    files = sorted(p.name for p in (a / "checkpoints" / "last").glob("*.safetensors"))
    diffs = [0.0]
    for name in files:
        wa, wb = load_file(a / "checkpoints" / "last" / name), load_file(b / "checkpoints" / "last" / name)
        diffs += [float((wa[k] - wb[k]).abs().max()) for k in wa]
    return max(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="fetch_pick_place")
    parser.add_argument("--env-steps", type=int, default=16_000)
    parser.add_argument("--torch-threads", type=int, default=2, help="finetune's --torch-threads (2: a run alone)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "overlap")
    args = parser.parse_args()

    walls: dict[bool, list[float]] = {True: [], False: []}
    summaries: dict[bool, dict] = {}
    for repeat in range(args.repeats):
        for overlap in (False, True) if repeat % 2 == 0 else (True, False):
            summary = run(args.task, args.env_steps, args.torch_threads, overlap, args.out / f"overlap-{overlap}")
            walls[overlap].append(summary["wall_s"])
            summaries[overlap] = summary
            print(f"repeat {repeat}, overlap {overlap}: {summary['wall_s']:.1f} s", flush=True)
    difference = max_weight_difference(args.out / "overlap-True", args.out / "overlap-False")
    chunks, updates = summaries[True]["chunks"], summaries[True]["critic_updates"]
    for key in ("chunks", "critic_updates", "env_steps"):
        if summaries[True][key] != summaries[False][key]:
            raise SystemExit(f"the two variants differ in {key}: {summaries[True][key]} against {summaries[False][key]}")

    best = {overlap: min(w) for overlap, w in walls.items()}
    rows = ["| overlap | wall, best of repeats (s) | every repeat (s) | ms per chunk | env steps/s |", "|---|---|---|---|---|"]
    for overlap in (False, True):
        rows.append(f"| {'on' if overlap else 'off'} | {best[overlap]:.1f} | {' / '.join(f'{w:.1f}' for w in walls[overlap])} | "
                    f"{1000 * best[overlap] / chunks:.1f} | {summaries[overlap]['env_steps'] / best[overlap]:.0f} |")
    table = "\n".join(rows)
    speedup = best[False] / best[True]
    saved_ms = 1000 * (best[False] - best[True]) / chunks
    print(table)
    print(f"speed-up {speedup:.2f}x, {saved_ms:.1f} ms saved per chunk; max |weight difference| {difference:g}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overlap.json").write_text(json.dumps({
        "task": args.task, "env_steps": args.env_steps, "torch_threads": args.torch_threads, "chunks": chunks,
        "critic_updates": updates, "wall_s": {"off": walls[False], "on": walls[True]}, "speedup": speedup,
        "saved_ms_per_chunk": saved_ms, "max_weight_difference": difference}, indent=2))
    command = invocation()
    write_section("overlap", (
        "## Critic updates beside the collection (`benchmarks/overlap.py`)\n\n"
        f"Command: `{command}`\nMachine: {machine()}\nDate: {today()}\n\n"
        f"`simpo-robot finetune` on `{args.task}` (shipped checkpoint, seed 0), {args.env_steps} env steps "
        f"({chunks} chunks, {updates} critic updates, no actor bursts, no evaluations on the way), "
        f"`--torch-threads {args.torch_threads}`, with `--overlap-updates` off and on, alternately, {args.repeats} "
        "times each. Wall time is the training loop's (summary.json `wall_s`).\n\n" + table + "\n\n"
        f"Speed-up of the overlap: **{speedup:.2f}x** ({saved_ms:.1f} ms saved per chunk). The largest difference "
        f"between the two runs' networks at the end (policy and critics): {difference:g} (0: the same run, as with `--torch-threads 1`; with more threads the sequential critic updates use them and round differently, so the runs drift apart)."))


if __name__ == "__main__":
    main()
