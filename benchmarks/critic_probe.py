"""Can a SiMPO run's critic tell the policy's good chunks from its bad ones? Act by it and see.

    .venv/bin/python benchmarks/critic_probe.py outputs/benchmarks/fetch_push-simpo-linear-s1
    .venv/bin/python benchmarks/critic_probe.py outputs/critic_probe/* --particles 16 --waves 13

For each fine-tuning run folder (its resumable checkpoint holds the critic), plays the run's task with the
run's policy three ways, on the same evaluation seeds (1000 + i): one sample per decision (the policy as
it is), and the best / the worst by the critic (min of the twins) of N samples per decision. A critic
that SiMPO can learn from makes "best of N" beat one sample; one that only tells apart a few disasters
makes "worst of N" lose without "best of N" gaining. Writes benchmarks/results/critic_probe.json and the
BENCHMARKS.md section "critic_probe".
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from simpo_robot.rl.trainer import load_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import invocation, machine, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def play_agent(spec, loaded, agent, n: int, pick: str, waves: int, num_envs: int) -> float:
    """Success rate (%) on evaluation seeds 1000+i: n samples per decision, the one kept by `pick` ("best" or
    "worst" by agent's critic, min of the twins; anything with n = 1 plays the policy as it is)."""
    from simpo_robot.rl.best_of import chunk_q
    from simpo_robot.rl.trainer import Rollout

    actor = agent.actor
    rollout = Rollout(spec, actor, loaded.preprocessor, loaded.postprocessor, num_envs, seed=1000, gamma=0.99,
                      device=torch.device("cpu"))

    class Picker:
        """Samples n chunks per env and keeps one by the critic (the rollout's current observation history)."""

        def act(self, cond, generator):
            e = cond.shape[0]
            chunks = actor.sample(actor.unet, cond.repeat_interleave(n, 0), generator=generator)  # (E*n, H, Da)
            if n == 1:
                return chunks, {}
            q = chunk_q(agent.critic, rollout.history.state, rollout.history.env_state, actor.executed(chunks))
            keep = q.argmax(1) if pick == "best" else q.argmin(1)
            return chunks.reshape(e, n, *chunks.shape[1:])[torch.arange(e), keep], {}

    was_training = actor.unet.training
    actor.unet.eval()
    generator, picker = torch.Generator().manual_seed(0), Picker()
    success: list[float] = []
    with torch.no_grad():
        for _ in range(waves):
            rollout.step_chunk(picker, generator)
            while not rollout.between_episodes:
                rollout.step_chunk(picker, generator)
            success += list(rollout.recent_success)[-num_envs:]
    rollout.close()
    actor.unet.train(was_training)
    return 100 * float(np.mean(success))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="fine-tuning run folders (SiMPO, with checkpoints/last)")
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--waves", type=int, default=13, help="rounds of --num-envs episodes per variant")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--report-only", action="store_true", help="rewrite the BENCHMARKS.md section from the JSON")
    args = parser.parse_args()
    path = RESULTS / "critic_probe.json"
    results = {r["run"]: r for r in json.loads(path.read_text())["runs"]} if path.exists() else {}
    if args.report_only:
        write_report(results, invocation())
        return
    if not args.runs:
        parser.error("pass at least one run folder (or --report-only)")
    for run in args.runs:
        if not (run / "summary.json").is_file():
            parser.error(f"{run} is not a finished fine-tuning run (no summary.json); pass the --out folder of a "
                         "`simpo-robot finetune --algo simpo` run")
    torch.set_num_threads(1)

    for run in args.runs:
        saved = load_run(run)
        if saved.cfg.algo != "simpo":
            parser.error(f"{run} is a {saved.cfg.algo} run; the probe needs a SiMPO run's critic")
        spec, loaded, agent = saved.spec, saved.loaded, saved.agent
        row = {"run": str(run.resolve().relative_to(ROOT)) if run.resolve().is_relative_to(ROOT) else str(run),
               "task": saved.cfg.task, "gamma": saved.cfg.gamma, "shaped_reward": saved.cfg.shaped_reward,
               "n_step": saved.cfg.simpo.n_step,
               "env_steps": saved.summary["env_steps"], "actor_updates": saved.summary.get("actor_updates"),
               "particles": args.particles, "episodes": args.waves * args.num_envs}
        for pick in ("one sample", "best", "worst"):
            start = time.perf_counter()
            n = 1 if pick == "one sample" else args.particles
            row[pick] = play_agent(spec, loaded, agent, n, pick, args.waves, args.num_envs)
            print(f"{row['run']}: {pick}: {row[pick]:.1f}% ({time.perf_counter() - start:.0f} s)", flush=True)
        results[row["run"]] = row
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"runs": list(results.values())}, indent=2))

    write_report(results, invocation())


def write_report(results: dict, command: str) -> None:
    """The BENCHMARKS.md section "critic_probe" from every probed run (`command`: the last invocation)."""
    rows = ["| run | task | reward | gamma | TD chunks (n-step) | env steps | actor updates | episodes | N | one sample (%) "
            "| best of N by Q (%) | worst of N by Q (%) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.values():  # (runs probed before n-step targets existed had 1)
        rows.append(f"| `{r['run']}` | {r['task']} | {'dense' if r['shaped_reward'] else 'sparse'} | {r['gamma']} | "
                    f"{r.get('n_step', 1)} | {r['env_steps']} | "
                    f"{r['actor_updates']} | {r['episodes']} | {r['particles']} | {r['one sample']:.1f} | "
                    f"{r['best']:.1f} | {r['worst']:.1f} |")
    table = "\n".join(rows)
    print(table)
    body = (f"## Does the critic rank the policy's chunks? (`benchmarks/critic_probe.py`)\n\n"
            f"Command (the last invocation; the table keeps every run probed): `{command}`\n"
            f"Machine: {machine()}\nDate: {today()}\n\n"
            "Each run's policy plays its task on evaluation seeds 1000+i (the episodes column: per column) taking one "
            "sample per decision, or the best / worst of N samples by the run's critic (min of the twins).\n\n"
            + table + "\n")
    write_section("critic_probe", body)


if __name__ == "__main__":
    main()
