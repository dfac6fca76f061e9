"""Headline benchmark: fine-tuning the shipped checkpoints with SiMPO weightings and DPPO.

    .venv/bin/python benchmarks/finetune.py                       # the full grid (hours on 2 CPU cores)
    .venv/bin/python benchmarks/finetune.py --tasks fetch_push --algos simpo-linear --seeds 0 --env-steps 20000
    .venv/bin/python benchmarks/finetune.py --tasks fetch_push --policy-types flow --algos simpo-linear simpo-exp
    .venv/bin/python benchmarks/finetune.py --tasks fetch_push --algos simpo-linear --seeds 0 --env-steps 300000 --extend
    .venv/bin/python benchmarks/finetune.py --tasks fetch_push --measure-deterministic   # for runs recorded without it
    .venv/bin/python benchmarks/finetune.py --tasks fetch_push --algos dppo --seeds 1 --torch-threads 2   # alone on the machine

Each run is `simpo-robot finetune` in its own process (its peak RSS, children included, is sampled with
psutil), from pretrained/<task> (diffusion) or pretrained/<task>-flow (flow; SiMPO only), with the success curve every --eval-every env steps. The raw simulator's
env steps per second on the same vectorised envs are measured in the same invocation, so the ratio of
fine-tuning to simulator throughput compares like with like. Results merge into
benchmarks/results/finetune.json (a rerun of a (task, algo, weighting, bound, seed) replaces it); the table
and a plot go to BENCHMARKS.md (section "finetune"). Runs also record success with the sampler started from x_T = 0
(finetune's --deterministic-eval); --measure-deterministic adds it to recorded runs that lack it, with
`simpo-robot eval --noise_scale 0` on the base checkpoint and on the run's final/ (the same episodes).
After each SiMPO run, benchmarks/best_of.py plays its final policy by its critic (the best of --best-of chunks by Q,
as the reference recipe evaluates; not counted in the run's wall time); the table shows it where measured.

A run that was stopped (killed, or its session ended) goes on from its last resumable checkpoint (taken every 10k
env steps) when the same command is run again. Its wall time is each invocation's time up to the last checkpoint it
wrote, plus the finishing invocation's; its peak RSS is the largest of them (outputs/benchmarks/RUN.progress.json
keeps both in between).
"""

import argparse
import functools
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import invocation, machine, machines, today, write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ALGOS = {
    # name: (algo, weighting, negative bound)
    "simpo-linear": ("simpo", "linear", -0.5),
    "simpo-square": ("simpo", "square", 0.0),
    "simpo-exp": ("simpo", "exp", 0.0),
    "dppo": ("dppo", None, None),
}
# N of best-of-N by the critic, as the reference recipe evaluates: --best-of's default and always the table's column,
# whatever the last invocation's --best-of (an invocation with --best-of 0 used to empty the column).
TABLE_BEST_OF = 10


def raw_sim_steps_per_s(task: str, num_envs: int, steps: int = 400) -> float:
    """Env steps per second of the vectorised envs alone, random actions, no policy."""
    from simpo_robot.tasks import load_task, make_vec_env

    spec = load_task(task)
    envs = make_vec_env(spec, num_envs)
    envs.reset(seed=list(range(num_envs)))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        envs.step(rng.uniform(-1, 1, size=envs.action_space.shape).astype(np.float32))
    elapsed = time.perf_counter() - start
    envs.close()
    return (steps // num_envs) * num_envs / elapsed


POLICY_SUFFIX = {"diffusion": "", "flow": "-flow"}


def variant_name(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9_]+", value):
        raise argparse.ArgumentTypeError(f"{value!r}: letters, digits and _ only (it names the run's folder)")
    return value


def run_dir(task: str, policy_type: str, name: str, seed: int, variant: str = "") -> Path:
    return ROOT / "outputs" / "benchmarks" / f"{task + POLICY_SUFFIX[policy_type]}-{name}-s{seed}{'-' + variant if variant else ''}"


def run_one(task: str, policy_type: str, name: str, seed: int, args) -> dict:
    algo, weighting, bound = ALGOS[name]
    policy = task + POLICY_SUFFIX[policy_type]
    out = run_dir(task, policy_type, name, seed, args.variant)
    cmd = [sys.executable, "-m", "simpo_robot", "finetune", "--policy", str(ROOT / "pretrained" / policy),
           "--task", task, "--algo", algo, "--env-steps", str(args.env_steps), "--seed", str(seed),
           "--num-envs", str(args.num_envs), "--eval-every", str(args.eval_every),
           "--eval-episodes", str(args.eval_episodes), "--final-eval-episodes", str(args.final_eval_episodes),
           "--torch-threads", str(args.torch_threads), "--out", str(out)]
    if weighting is not None:
        cmd += ["--weighting", weighting, "--negative-bound", str(bound)]
    previous = args.previous.get((task, policy_type, algo, weighting, bound, seed, args.variant)) if args.extend else None
    if args.extend and previous is None:
        raise SystemExit(f"--extend: no earlier run of {policy} {name} seed {seed} in finetune.json to extend")
    cmd += shlex.split(previous["finetune_args"] if previous else args.finetune_args)
    stopped = None if previous else stopped_run(out, cmd)
    if stopped:
        print(f"{out.name}: resuming the stopped run from its last checkpoint", flush=True)
    # An extended or stopped run goes on from its last checkpoint with the flags it was started with.
    resume = ["--resume", str(out)] if previous or stopped else ["--overwrite", "true"]
    progress = progress_path(out)
    if not stopped:
        progress.unlink(missing_ok=True)  # a stale record of an earlier run
    # Training time before this invocation (the run's summary accumulates it across resumptions).
    trained_before = json.loads((out / "summary.json").read_text())["wall_s"] if previous else 0.0
    wall_before, peak_before = (stopped["wall_s"], stopped["peak_rss_mb"]) if stopped else (0.0, 0.0)
    # A stopped run resumed with another thread count: from which count, and at which checkpoint.
    changed = stopped.get("threads_changed") if stopped else None
    if stopped and not changed and threads_of(stopped["cmd"]) != args.torch_threads:
        changed = {"from": threads_of(stopped["cmd"]), "at_env_steps": checkpoint_env_steps(out)}
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f"{out.name}.log"  # a file, not a pipe: a long run's log would fill a pipe and block
    checkpoint = out / "checkpoints" / "last" / "trainer_rank0.pt"
    seen = mtime(checkpoint)
    with open(log_path, "a") as log_file:
        proc = psutil.Popen(cmd + resume, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
        peak = 0
        while proc.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            if (written := mtime(checkpoint)) is not None and written != seen:  # a new resumable checkpoint
                seen = written
                write_atomically(progress, {"cmd": cmd, "wall_s": wall_before + time.perf_counter() - start,
                                            "peak_rss_mb": max(peak_before, peak / 2**20),
                                            **({"threads_changed": changed} if changed else {})})
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd + resume)} failed (log: {log_path}):\n{log_path.read_text()[-3000:]}")
    progress.unlink(missing_ok=True)
    summary = json.loads((out / "summary.json").read_text())
    # An extended run: the first invocation's wall time (start-up and evaluations included) plus the
    # training time added since (process start-up and evaluations of the continuation are not counted).
    wall = (previous["wall_s"] + summary["wall_s"] - trained_before if previous
            else wall_before + time.perf_counter() - start)
    return {
        "task": task, "policy_type": policy_type, "algo": algo, "weighting": weighting, "negative_bound": bound, "seed": seed,
        "env_steps": summary["env_steps"], "pc_success_before": summary["pc_success_before"],
        "pc_success_after": summary["pc_success_after"], "curve": summary["curve"],
        "wall_s": wall,
        "peak_rss_mb": max(peak / 2**20, peak_before, previous["peak_rss_mb"] if previous else 0.0),
        "env_steps_per_s": summary["env_steps_per_s"], "num_envs": args.num_envs,
        "final_eval_episodes": args.final_eval_episodes,
        "finetune_args": previous["finetune_args"] if previous else args.finetune_args,
        **({"variant": args.variant} if args.variant else {}),
        "torch_threads": args.torch_threads,
        **({"threads_changed": changed} if changed else {}),
        "machine": machine(),  # wall times and success rates are the machine's (the CPU changes float rounding)
        **{k: summary[k] for k in ("pc_success_deterministic_before", "pc_success_deterministic_after") if k in summary},
        # a run resumed only for its end (e.g. the final burst) keeps the simulator speed measured beside its training
        **({"raw_sim_steps_per_s": previous["raw_sim_steps_per_s"]}
           if previous and "raw_sim_steps_per_s" in previous and summary["env_steps"] == previous["env_steps"] else {}),
        **({"note": previous["note"]} if previous and "note" in previous else {}),  # how the run came to be
    }


def progress_path(out: Path) -> Path:
    return out.parent / f"{out.name}.progress.json"


def stopped_run(out: Path, cmd: list[str]) -> dict | None:
    """What this benchmark recorded of a run in `out` that stopped before it finished (its wall time and peak
    RSS up to its last checkpoint), if that run was started by the same command; else None."""
    path = progress_path(out)
    # (.previous alone: a save was killed between its renames; finetune --resume restores it)
    resumable = any((out / "checkpoints" / name).is_dir() for name in ("last", ".previous"))
    if (out / "summary.json").exists() or not resumable or not path.exists():
        return None
    progress = json.loads(path.read_text())
    # (the thread count may change on resumption, as finetune --resume allows: the run is the same)
    return progress if without_threads(progress["cmd"]) == without_threads(cmd) else None


def without_threads(cmd: list[str]) -> list[str]:
    i = cmd.index("--torch-threads")
    return cmd[:i] + cmd[i + 2:]


def threads_of(cmd: list[str]) -> int:
    return int(cmd[cmd.index("--torch-threads") + 1])


def checkpoint_env_steps(out: Path) -> int:
    """Env steps of the run's last resumable checkpoint (.previous, where a save was killed between its renames)."""
    import torch

    path = next(p for name in ("last", ".previous") if (p := out / "checkpoints" / name / "trainer_rank0.pt").is_file())
    state = torch.load(path, weights_only=False, mmap=True)
    return state["counters"]["env_steps"]


def mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def write_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


@functools.cache  # the base checkpoint is shared by the runs of one task
def deterministic_success(policy: Path, task: str, episodes: int, num_inference_steps: int | None) -> float:
    """Success (%) of `simpo-robot eval --noise_scale 0` on the fine-tuning runs' evaluation episodes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "simpo_robot", "eval", "--policy", str(policy), "--task", task,
               "--episodes", str(episodes), "--seed", "1000", "--noise_scale", "0", "--out", tmp]
        cmd += ["--num_inference_steps", str(num_inference_steps)] if num_inference_steps else []
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return json.loads((Path(tmp) / "eval_info.json").read_text())["aggregated"]["pc_success"]


def measure_deterministic(run: dict) -> dict:
    """The recorded run with its deterministic success before and after (from its final/ folder)."""
    kind = run.get("policy_type", "diffusion")
    final = recorded_dir(run) / "final"
    info_file = final / "training_info.json"
    if not info_file.is_file() or json.loads(info_file.read_text())["env_steps"] != run["env_steps"]:
        raise SystemExit(f"{final} is not the recorded run's ({run['env_steps']} env steps); rerun it instead")
    # the base checkpoint with the sampler the run acted with (finetune --num-inference-steps is saved in final/)
    steps = json.loads((final / "config.json").read_text()).get("num_inference_steps")
    base = ROOT / "pretrained" / (run["task"] + POLICY_SUFFIX[kind])
    episodes = run["final_eval_episodes"]
    return run | {"pc_success_deterministic_before": deterministic_success(base, run["task"], episodes, steps),
                  "pc_success_deterministic_after": deterministic_success(final, run["task"], episodes, steps)}


def key(run: dict) -> tuple:
    return (run["task"], run.get("policy_type", "diffusion"), run["algo"], run["weighting"], run["negative_bound"],
            run["seed"], run.get("variant", ""))


def load_runs(path: Path) -> dict[tuple, dict]:
    return {key(r): r for r in json.loads(path.read_text())["runs"]} if path.exists() else {}


def save_run(path: Path, run: dict) -> dict[tuple, dict]:
    """Record `run` (replacing its earlier version), merged with what other invocations wrote meanwhile (several
    may run side by side); returns every recorded run."""
    runs = load_runs(path) | {key(run): run}
    path.write_text(json.dumps({"runs": list(runs.values())}, indent=2))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["fetch_push", "fetch_pick_place"])
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    parser.add_argument("--policy-types", nargs="+", default=["diffusion"], choices=list(POLICY_SUFFIX))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--env-steps", type=int, default=300_000)
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=25_000)
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--final-eval-episodes", type=int, default=100)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads of each run (finetune --torch-threads): 1 when two runs share the 2 cores, "
                             "2 for a run that has them alone")
    parser.add_argument("--report-only", action="store_true", help="rewrite the BENCHMARKS.md section from the JSON")
    parser.add_argument("--finetune-args", default="", help="more flags for every run, e.g. '--simpo.actor-starts 20000'")
    parser.add_argument("--variant", default="", type=variant_name,
                        help="a name for runs whose --finetune-args change the method: they get their own folder "
                             "(RUN-VARIANT) and their own records, beside the grid's runs of the same algorithm and seed")
    parser.add_argument("--measure-deterministic", action="store_true",
                        help="measure the deterministic success (x_T = 0) of the selected recorded runs that lack it")
    parser.add_argument("--best-of", type=int, default=TABLE_BEST_OF,
                        help="after each SiMPO run, also evaluate it acting by its critic (best of N chunks; 0: skip)")
    parser.add_argument("--extend", action="store_true",
                        help="continue the recorded runs from their last checkpoints up to --env-steps (--resume); "
                             "wall time adds up, the curve goes on")
    args = parser.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "finetune.json"
    runs = load_runs(path)
    args.previous = runs
    if args.report_only:
        report(list(runs.values()), args)
        return
    if args.measure_deterministic:
        selected = {ALGOS[n] for n in args.algos}
        for k, run in list(runs.items()):
            if (run["task"] in args.tasks and run.get("policy_type", "diffusion") in args.policy_types
                    and run["seed"] in args.seeds and (run["algo"], run["weighting"], run["negative_bound"]) in selected
                    and run["env_steps"] >= args.env_steps and "pc_success_deterministic_after" not in run):
                run = measure_deterministic(run)
                print(f"{k}: deterministic {run['pc_success_deterministic_before']:.1f}% -> "
                      f"{run['pc_success_deterministic_after']:.1f}%", flush=True)
                runs = save_run(path, run)
        report(list(runs.values()), args)
        return
    raw = {task: raw_sim_steps_per_s(task, args.num_envs) for task in args.tasks}
    grid = [(task, kind, name) for task in args.tasks for kind in args.policy_types for name in args.algos
            if (ROOT / "pretrained" / (task + POLICY_SUFFIX[kind])).is_dir() and (kind == "diffusion" or name != "dppo")]
    for task, kind, name in grid:
        for seed in args.seeds:
            run = {"raw_sim_steps_per_s": raw[task]} | run_one(task, kind, name, seed, args)
            runs = save_run(path, run)
            if run["algo"] == "simpo" and args.best_of > 1:
                # from the repository root with the run folder relative to it, so that best_of.py's recorded
                # command reads as one would type it on any checkout
                subprocess.run([sys.executable, "benchmarks/best_of.py",
                                str(run_dir(task, kind, name, seed, args.variant).relative_to(ROOT)),
                                "--n", str(args.best_of), "--episodes", str(args.final_eval_episodes)],
                               check=True, cwd=ROOT)
            print(f"{task} {kind} {name} seed {seed}: {run['pc_success_before']:.0f}% -> {run['pc_success_after']:.0f}% "
                  f"in {run['env_steps']} env steps, {run['wall_s']:.0f} s, {run['peak_rss_mb']:.0f} MB", flush=True)
    report(list(runs.values()), args)


def wall_minutes(rs: list[dict]) -> str:
    """Mean wall time (min) of the runs that shared the cores (one torch thread each), and each run that had
    the machine to itself (--torch-threads > 1) on its own."""
    shared = [r["wall_s"] / 60 for r in rs if r.get("torch_threads", 1) == 1 and "threads_changed" not in r]
    alone = [f"{r['wall_s'] / 60:.1f} ({r['torch_threads']} threads, seed {r['seed']})"
             for r in rs if r.get("torch_threads", 1) > 1 and "threads_changed" not in r]
    alone += [f"{r['wall_s'] / 60:.1f} ({c['from']} thread(s) beside another run, then {r['torch_threads']} from "
              f"{c['at_env_steps']} env steps, seed {r['seed']})" for r in rs if (c := r.get("threads_changed"))]
    return ", ".join(([f"{np.mean(shared):.1f}"] if shared else []) + alone)


def recorded_dir(run: dict) -> Path:
    """The output folder of a recorded run."""
    name = next(n for n, (a, w, b) in ALGOS.items() if (a, w, b) == (run["algo"], run["weighting"], run["negative_bound"]))
    return run_dir(run["task"], run.get("policy_type", "diffusion"), name, run["seed"], run.get("variant", ""))


def run_path(run: dict) -> str:
    """The recorded run's output folder relative to the repository, as benchmarks/best_of.py names it."""
    return str(recorded_dir(run).relative_to(ROOT))


def best_of_results(n: int) -> dict[str, dict]:
    """benchmarks/best_of.py's rows for N = n, by run folder."""
    path = RESULTS / "best_of.json"
    rows = json.loads(path.read_text())["runs"] if path.exists() else []
    return {r["run"]: r for r in rows if r["n"] == n}


GRID_TASKS, GRID_SEEDS, GRID_ENV_STEPS = ("fetch_push", "fetch_pick_place"), (0, 1, 2), 300_000


def is_grid_run(run: dict) -> bool:
    """A finished run of the headline grid: diffusion policy, no variant, the grid's env steps or more."""
    return (run.get("policy_type", "diffusion") == "diffusion" and not run.get("variant")
            and run["env_steps"] >= GRID_ENV_STEPS)


def grid_coverage(runs: list[dict]) -> str:
    """Which cells of the headline grid (diffusion policies, every algorithm, seeds 0-2, 300k env steps, no
    variant) have a finished run, and the command that runs each missing one."""
    done = {(r["task"], r["algo"], r["weighting"], r["negative_bound"], r["seed"]): r.get("finetune_args", "")
            for r in runs if is_grid_run(r)}

    def flags(task: str, name: str) -> str:
        """The flags the cell's recorded seeds ran with, so that a new seed joins their row."""
        recorded = {f for (t, *method, _), f in done.items() if t == task and tuple(method) == ALGOS[name]}
        return f" with `--finetune-args {shlex.quote(recorded.pop())}`" if len(recorded) == 1 and "" not in recorded else ""

    lines = []
    for task in GRID_TASKS:
        missing = {name: [s for s in GRID_SEEDS if (task, *ALGOS[name], s) not in done] for name in ALGOS}
        have = len(ALGOS) * len(GRID_SEEDS) - sum(map(len, missing.values()))
        todo = ", ".join(f"{name} seed{'s' if len(seeds) > 1 else ''} {' '.join(map(str, seeds))}{flags(task, name)}"
                         for name, seeds in missing.items() if seeds)
        lines.append(f"- {task}: {have} of {len(ALGOS) * len(GRID_SEEDS)} cells" + (f"; missing: {todo}" if todo else ""))
    return "\n".join(lines)


SAMPLERS = {"stochastic": "pc_success", "deterministic": "pc_success_deterministic"}  # sampler: result key prefix


def grid_means(runs: list[dict]) -> dict[tuple[str, str, str], tuple[float, int]]:
    """(mean success %, runs) of the headline grid by (task, method, sampler). Method "pretrained" is the shipped
    checkpoint, over every grid run of the task (each evaluates it on the same episodes before fine-tuning). A cell
    whose runs do not all have the sampler's results is left out."""
    method = {spec: name for name, spec in ALGOS.items()}
    cells: dict[tuple[str, str, str], list[float | None]] = {}
    for r in filter(is_grid_run, runs):
        if (name := method.get((r["algo"], r["weighting"], r["negative_bound"]))) is None:
            continue
        for sampler, prefix in SAMPLERS.items():
            cells.setdefault((r["task"], name, sampler), []).append(r.get(prefix + "_after"))
            if prefix + "_before" in r:
                cells.setdefault((r["task"], "pretrained", sampler), []).append(r[prefix + "_before"])
    return {cell: (float(np.mean(values)), len(values)) for cell, values in cells.items() if None not in values}


def grid_comparisons(runs: list[dict]) -> str:
    """The headline grid's rows (task x sampler) side by side, with the differences the README quotes: each
    method's gain over the pretrained policy, SiMPO's best weighting against DPPO and each signed weighting
    against exp (a row's cells are means over their seeds, in points)."""
    means = grid_means(runs)
    simpo = [n for n in ALGOS if ALGOS[n][0] == "simpo"]
    signed = [n for n in simpo if n != "simpo-exp"]
    rows = ["| task | sampler | pretrained | " + " | ".join(f"{n} (seeds)" for n in ALGOS)
            + " | best SiMPO - dppo | " + " | ".join(f"{n} - simpo-exp" for n in signed) + " |",
            "|---|---|---|" + "---|" * (len(ALGOS) + 1 + len(signed))]
    gains: dict[str, list[float]] = {}
    deterministic: list[str] = []
    for task in GRID_TASKS:
        for sampler in SAMPLERS:
            at = {n: means[task, n, sampler][0] for n in ["pretrained", *ALGOS] if (task, n, sampler) in means}
            if "pretrained" not in at:
                continue
            cells = " | ".join(f"{at[n]:.1f} ({means[task, n, sampler][1]})" if n in at else "-" for n in ALGOS)
            best = max((n for n in simpo if n in at), key=at.get, default=None)
            versus = f"{at[best] - at['dppo']:+.1f} ({best})" if best and "dppo" in at else "-"
            gaps = " | ".join(f"{at[n] - at['simpo-exp']:+.1f}" if n in at and "simpo-exp" in at else "-" for n in signed)
            rows.append(f"| {task} | {sampler} | {at['pretrained']:.1f} | {cells} | {versus} | {gaps} |")
            for n in ALGOS:
                if n in at:
                    gains.setdefault(sampler, []).append(at[n] - at["pretrained"])
        deterministic += [f"{task} {n} {means[task, n, 'deterministic'][0] - means[task, n, 'stochastic'][0]:+.1f}"
                          for n in ALGOS if (task, n, "deterministic") in means and (task, n, "stochastic") in means]
    lines = [f"- gain over the pretrained policy, {sampler} sampler: {min(g):+.1f} to {max(g):+.1f} points over {len(g)} cells"
             for sampler, g in gains.items()]
    if deterministic:
        lines.append("- deterministic minus stochastic sampler after fine-tuning: " + ", ".join(deterministic))
    return "\n".join(rows) + "\n\n" + "\n".join(lines)


def report(runs: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best_of = best_of_results(TABLE_BEST_OF)
    rows = ["| task | algorithm | extra flags | seeds | env steps | success before (%) | success after (%) | "
            f"deterministic before -> after (%) | best of {TABLE_BEST_OF} by Q after (%) | wall (min) | peak RSS (MB) | "
            "env steps/s (train / raw sim) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r.get("policy_type", "diffusion"), r["algo"], r["weighting"], r["negative_bound"],
                           r["env_steps"], r.get("finetune_args", ""), r.get("variant", "")),
                          []).append(r)
    tasks = sorted({g[0] for g in groups})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.5), squeeze=False)
    colors: dict[tuple, str] = {}
    for (task, kind, algo, weighting, bound, steps, flags, variant), rs in sorted(groups.items(), key=str):
        extra = " ".join(([f"`{flags}`"] if flags else []) + ([f"[{variant}]"] if variant else []))
        label = f"simpo {weighting} (b={bound:g})" if algo == "simpo" else algo
        label += " [flow]" if kind == "flow" else ""
        before = [r["pc_success_before"] for r in rs]
        after = [r["pc_success_after"] for r in rs]
        measured = [r for r in rs if "pc_success_deterministic_after" in r]
        deterministic = (f"{np.mean([r['pc_success_deterministic_before'] for r in measured]):.1f} -> "
                         f"{np.mean([r['pc_success_deterministic_after'] for r in measured]):.1f}"
                         + (f" ({len(measured)} of {len(rs)} seeds)" if len(measured) < len(rs) else "")) if measured else "-"
        by_q = [best_of[p] for r in rs if (p := run_path(r)) in best_of and best_of[p]["env_steps"] == r["env_steps"]]
        by_q_text = (f"{np.mean([b['best_of_n'] for b in by_q]):.1f}"
                     + (f" ({len(by_q)} of {len(rs)} seeds)" if len(by_q) < len(rs) else "")) if by_q else "-"
        rows.append(
            f"| {task} | {label} | {extra} | {len(rs)} | {steps} | {np.mean(before):.1f} | "
            f"{np.mean(after):.1f} ± {np.std(after):.1f} | {deterministic} | {by_q_text} | {wall_minutes(rs)} | "
            f"{max(r['peak_rss_mb'] for r in rs):.0f} | "
            f"{np.mean([r['env_steps_per_s'] for r in rs]):.0f} / {np.mean([r['raw_sim_steps_per_s'] for r in rs]):.0f} |")
        ax = axes[0][tasks.index(task)]
        curve = np.array(rs[0]["curve"])
        # one colour per method in both panels; the headline grid's cells solid, variants and short runs dashed
        color = colors.setdefault(label.removesuffix(" [flow]"), f"C{len(colors) % 10}")
        headline = kind == "diffusion" and not variant and steps >= GRID_ENV_STEPS
        style = dict(marker="o", linewidth=2) if headline else dict(linestyle="--", linewidth=1, alpha=0.5)
        ax.plot(curve[:, 0], np.mean([np.array(r["curve"])[:, 1] for r in rs if len(r["curve"]) == len(curve)], 0),
                color=color, **style,
                label=f"{label} {extra.replace('`', '')}".strip() + f", {steps // 1000}k, {len(rs)} seed{'s' if len(rs) > 1 else ''}")
        ax.set_title(task)
        ax.set_xlabel("env steps")
        ax.set_ylabel("success (%)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25))  # below the plot, off the curves
    fig.subplots_adjust(wspace=0.25)
    fig.savefig(RESULTS / "finetune.png", dpi=100, bbox_inches="tight")
    body = (f"## Fine-tuning the shipped checkpoints (`benchmarks/finetune.py`)\n\n"
            f"Command (the last invocation; the table has every run in `benchmarks/results/finetune.json`, "
            f"each with its own flags): `{invocation()}`\nMachine: {machines(runs, '2 CPU cores: AMD EPYC on 2026-11-24, Intel Xeon from 2026-11-25 on')}\nDate: {today()}\n\n"
            "Success is over the same evaluation episodes before and after (seeds 1000+i); curves are the "
            "mean over seeds. `deterministic` is the same with every chunk sampled from x_T = 0 "
            "(`simpo-robot eval --noise_scale 0`). `best of N by Q` is the final policy acting by its critic "
            "(`simpo-robot eval --best_of N`, the same episodes; section \"best_of\"). `env steps/s` compares fine-tuning throughput (collection, updates and the "
            "periodic evaluations) with the vectorised simulator alone, measured in the same invocation.\n\n"
            + "\n".join(rows) + "\n\n![learning curves](benchmarks/results/finetune.png)\n\n"
            f"The headline grid ({GRID_ENV_STEPS} env steps, seeds {', '.join(map(str, GRID_SEEDS))}, no variant; "
            "a missing cell runs with `--tasks T --algos A --seeds S --env-steps 300000 --eval-every 30000 "
            "--eval-episodes 100 --final-eval-episodes 208`):\n" + grid_coverage(runs) + "\n\n"
            "Its rows side by side (mean success over each cell's seeds, %; differences in points):\n\n"
            + grid_comparisons(runs) + "\n")
    print(body, flush=True)
    write_section("finetune", body)


if __name__ == "__main__":
    main()
