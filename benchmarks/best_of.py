"""Fine-tuned SiMPO agents acting by their critic: the policy alone against the best of N chunks by Q.

    .venv/bin/python benchmarks/best_of.py outputs/benchmarks/fetch_push-simpo-linear-s0 --n 10

The reference SiMPO recipe evaluates with the best of 10 actions by Q. For each finished `finetune --algo simpo`
run this plays the run's final policy on the final evaluation's episodes (seeds 1000+i) through
`simpo-robot eval`, once alone and once with `--best_of N`, using the critic saved in the run's final/ folder.
Runs that finished before `finetune` saved its critic get it written there first, from their last resumable
checkpoint (the same state: the last checkpoint is taken at the end of the run). Writes
benchmarks/results/best_of.json and the BENCHMARKS.md section "best_of".
"""

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import invocation, machine, machines, today, write_section  # noqa: E402


def ensure_critic(run: Path) -> None:
    """Write final/critic.* from the run's last checkpoint if the run predates them (checked: same env steps)."""
    from accelerate.utils import extract_model_from_parallel

    from simpo_robot.rl.critic import CRITIC_CONFIG, save_critic
    from simpo_robot.rl.trainer import critic_trained_on, load_run

    final = run / "final"
    if (final / CRITIC_CONFIG).is_file():
        return
    saved = load_run(run)
    info = json.loads((final / "training_info.json").read_text())
    if saved.cfg.algo != "simpo" or info["env_steps"] != saved.summary.get("env_steps"):
        raise SystemExit(f"{run}: not a finished SiMPO run whose last checkpoint is its final policy")
    save_critic(final, saved.agent.acting_critic(extract_model_from_parallel),
                critic_trained_on(saved.cfg, saved.spec, info["env_steps"]))


def repo_relative(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (rows then read the same on any checkout)."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def success(run: Path, task: str, episodes: int, best_of: int) -> tuple[float, float]:
    """(success %, seconds) of `simpo-robot eval` on the run's final policy."""
    from simpo_robot.evaluate import EvalConfig, run_eval

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_eval(EvalConfig(policy=str(run / "final"), task=task, episodes=episodes, seed=1000,
                                     best_of=best_of, out=Path(tmp)))
        return 100 * result.success_rate, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="finished `finetune --algo simpo` output folders")
    parser.add_argument("--n", type=int, nargs="+", default=[10], help="chunks per decision (one row each)")
    parser.add_argument("--episodes", type=int, default=208, help="the benchmark's final evaluation episodes")
    parser.add_argument("--report-only", action="store_true", help="rewrite the BENCHMARKS.md section from the JSON")
    args = parser.parse_args()
    path = RESULTS / "best_of.json"
    results = {(r["run"], r["n"]): r for r in json.loads(path.read_text())["runs"]} if path.exists() else {}
    if not args.report_only:
        if not args.runs:
            parser.error("pass at least one run folder (or --report-only)")
        for run in args.runs:
            if not (run / "final" / "training_info.json").is_file():
                parser.error(f"{run} is not a finished fine-tuning run (no final/training_info.json)")
        for run in args.runs:
            ensure_critic(run)
            info = json.loads((run / "final" / "training_info.json").read_text())
            alone, alone_s = success(run, info["task"], args.episodes, 1)
            name = repo_relative(run)
            for n in args.n:
                best, best_s = success(run, info["task"], args.episodes, n)
                row = {"run": name, "task": info["task"], "algo": f"{info['algorithm']} {info['weighting'] or ''}".strip(),
                       "base_model": repo_relative(Path(info["base_model"])),
                       "actor_updates": json.loads((run / "summary.json").read_text()).get("actor_updates"),
                       "env_steps": info["env_steps"], "training_env_kwargs": json.loads(
                           (run / "final" / "critic.json").read_text())["trained_on"]["env_kwargs"],
                       "episodes": args.episodes, "n": n, "alone": alone, "best_of_n": best,
                       "alone_s": alone_s, "best_of_n_s": best_s, "machine": machine()}
                print(f"{name}: alone {alone:.1f}% ({alone_s:.0f} s), best of {n} by Q {best:.1f}% ({best_s:.0f} s)",
                      flush=True)
                results[name, n] = row
                RESULTS.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"runs": list(results.values())}, indent=2))
    report(list(results.values()))


# The grid harness's own runs (benchmarks/finetune.py, diffusion policy, no variant): the runs the README's
# "best of 10 after the final burst" claim is over.
GRID_RUN = re.compile(r"^outputs/benchmarks/[a-z_]+-(simpo-[a-z]+|dppo)-s\d+$")


def grid_gains(rows: list[dict]) -> dict[tuple[str, int, int], list[float]]:
    """Best of N minus the policy alone (points), per (task, N, actor updates), over the grid harness's runs."""
    gains: dict[tuple[str, int, int], list[float]] = {}
    for r in sorted(rows, key=lambda r: r["run"]):
        if GRID_RUN.match(r["run"]):
            gains.setdefault((r["task"], r["n"], r["actor_updates"]), []).append(r["best_of_n"] - r["alone"])
    return gains


def report(rows: list[dict]) -> None:
    lines = ["| run | task | started from | algorithm | actor updates | training reward | env steps | episodes | N "
             "| policy alone (%) | best of N by Q (%) | eval time, alone / best of N (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["run"], r["n"])):
        lines.append(f"| `{r['run']}` | {r['task']} | `{r['base_model']}` | {r['algo']} | {r['actor_updates']} "
                     f"| {r['training_env_kwargs'].get('reward_type', '-')} "
                     f"| {r['env_steps']} | {r['episodes']} | {r['n']} | {r['alone']:.1f} | {r['best_of_n']:.1f} "
                     f"| {r['alone_s']:.0f} / {r['best_of_n_s']:.0f} |")
    summary = [f"- {task}, N = {n}, {updates} actor updates: {len(g)} of the grid's runs, {', '.join(f'{x:+.1f}' for x in sorted(g, reverse=True))}; "
               f"mean {statistics.mean(g):+.1f}" for (task, n, updates), g in sorted(grid_gains(rows).items())]
    table = "\n".join(lines) + "\n\nBest of N minus the policy alone over the grid harness's runs "
    table += "(`outputs/benchmarks/TASK-ALGO-sSEED`, points; at 300k env steps 2500 actor updates is a run with the "
    table += "final burst, 2250 one without):\n\n" + "\n".join(summary)
    print(table)
    write_section("best_of", (
        "## Acting by the critic: the best of N chunks by Q (`benchmarks/best_of.py`)\n\n"
        f"Command (the last invocation; the table keeps every run): `{invocation()}`\n"
        f"Machine: {machines(rows, '2 CPU cores, Intel Xeon, 2026-11-25')}\nDate: {today()}\n\n"
        "Each finished SiMPO run's final policy plays the final evaluation's episodes (seeds 1000+i) through "
        "`simpo-robot eval`, alone and with `--best_of N` (N chunks per decision, the highest by the run's critic, "
        "min of the twins, is executed). The reference SiMPO recipe evaluates with N = 10. A run with 0 actor updates "
        "is a critic-only run (`--simpo.actor-starts 100000000`) that fits a critic to the policy it started from. "
        "Times are with other jobs on the machine.\n\n" + table + "\n"))


if __name__ == "__main__":
    main()
