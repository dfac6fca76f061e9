"""Given a fixed critic, does SiMPO's actor update turn it into a better policy? Actor updates only.

    .venv/bin/python benchmarks/actor_probe.py                           # KL 0.3, success at 0/50/150/300 updates
    .venv/bin/python benchmarks/actor_probe.py --target-kls 0.05 0.3 --updates 300 --eval-at 100 300

Takes a critic-only SiMPO run on the shipped pretrained/fetch_push (the critic learned from the pretrained
policy's own data; `--critic-run`, trained first with the command below if missing), freezes its critic and
replay buffer, and runs SiMPO actor updates (the run's weighting, particles, pi_old refresh, learned
temperature at --target-kls) on states from that buffer, with no new data. Success is over the same
evaluation episodes (seeds 1000+i) after each number of updates in --eval-at. This separates what the actor
update can do with a critic that ranks (see critic_probe) from what the online loop does. Writes
benchmarks/results/actor_probe.json and the BENCHMARKS.md section "actor_probe".
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from simpo_robot.rl.trainer import load_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from critic_probe import play_agent  # noqa: E402
from report import invocation, machine, today, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CRITIC_RUN = ["finetune", "--policy", "pretrained/fetch_push", "--task", "fetch_push", "--algo", "simpo",
              "--weighting", "linear", "--negative-bound", "-0.5", "--env-steps", "30000", "--seed", "0",
              "--eval-every", "0", "--final-eval-episodes", "16", "--simpo.actor-starts", "100000000",
              "--simpo.buffer-size", "100000"]  # holds all 30k env steps whatever the default


def parse_override(text: str) -> tuple[str, object]:
    """"standardise_q=false" -> ("standardise_q", False): a SimpoConfig field and a value of its type."""
    from dataclasses import fields

    from simpo_robot.rl.simpo import SimpoConfig

    name, _, value = text.partition("=")
    kind = {f.name: f.type for f in fields(SimpoConfig)}.get(name)
    if kind not in (bool, int, float) or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE with a bool, int or float field of SimpoConfig")
    if name == "target_kl":
        raise argparse.ArgumentTypeError("the target KL is --target-kls")
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{text!r}: {name} is true or false")
        return name, value.lower() == "true"
    return name, kind(value)


def probe(critic_run: Path, target_kl: float, updates: int, eval_at: list[int], waves: int,
          overrides: dict | None = None) -> list[tuple[int, float]]:
    """[(actor updates, success %)] for SiMPO actor updates against the run's frozen critic (`overrides`: SimpoConfig
    fields changed for the actor updates)."""
    saved = load_run(critic_run)
    spec, loaded, agent = saved.spec, saved.loaded, saved.agent
    agent.temperature.target_kl = target_kl
    for name, value in (overrides or {}).items():
        setattr(agent.cfg, name, value)
    generator, cpu_generator = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    curve = [(0, play_agent(spec, loaded, agent, 1, "one sample", waves, 16))]
    print(f"KL {target_kl}: 0 updates: {curve[-1][1]:.1f}%", flush=True)

    def step(loss, optimizer, module) -> bool:  # the trainer's step on one process
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        return True

    start = time.perf_counter()
    for update in range(1, updates + 1):
        agent.actor_update(step, lambda x: x, generator, cpu_generator, lambda m: m)
        if update in eval_at:
            curve.append((update, play_agent(spec, loaded, agent, 1, "one sample", waves, 16)))
            print(f"KL {target_kl}: {update} updates: {curve[-1][1]:.1f}% (temperature "
                  f"{agent.temperature.value:.3g}, {time.perf_counter() - start:.0f} s)", flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--critic-run", type=Path, default=ROOT / "outputs" / "critic_probe" / "dense99",
                        help="a critic-only SiMPO run; made with `simpo-robot " + " ".join(CRITIC_RUN) +
                             " --out DIR` if missing")
    parser.add_argument("--target-kls", nargs="+", type=float, default=[0.3])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--eval-at", nargs="+", type=int, default=[50, 150, 300])
    parser.add_argument("--waves", type=int, default=13, help="rounds of 16 episodes per evaluation")
    parser.add_argument("--override", action="append", type=parse_override, default=[], metavar="FIELD=VALUE",
                        help="change a SimpoConfig field for the actor updates, e.g. standardise_q=false (repeatable)")
    args = parser.parse_args()
    overrides = dict(args.override)
    label = " ".join(f"{k}={v}" for k, v in overrides.items())
    if args.updates < 1 or any(not 1 <= u <= args.updates for u in args.eval_at):
        parser.error("--updates must be >= 1 and every --eval-at between 1 and --updates")
    torch.set_num_threads(1)
    if not (args.critic_run / "checkpoints" / "last").is_dir():
        cmd = [sys.executable, "-m", "simpo_robot", *CRITIC_RUN, "--out", str(args.critic_run), "--overwrite", "true"]
        print("training the critic:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)

    path = RESULTS / "actor_probe.json"
    results = ({(r["critic_run"], r["target_kl"], r.get("overrides", "")): r for r in json.loads(path.read_text())["runs"]}
               if path.exists() else {})
    for kl in args.target_kls:
        curve = probe(args.critic_run, kl, args.updates, sorted(set(args.eval_at)), args.waves, overrides)
        run = str(args.critic_run.resolve().relative_to(ROOT)) if args.critic_run.resolve().is_relative_to(ROOT) \
            else str(args.critic_run)
        results[(run, kl, label)] = {"critic_run": run, "target_kl": kl, **({"overrides": label} if label else {}),
                                     "episodes": 16 * args.waves, "curve": curve}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"runs": list(results.values())}, indent=2))

    points = sorted({u for r in results.values() for u, _ in r["curve"]})
    rows = ["| critic run | target KL | changed | " + " | ".join(f"{u} updates (%)" for u in points) + " |",
            "|---|---|---|" + "---|" * len(points)]
    for r in results.values():
        success = dict(r["curve"])
        rows.append(f"| `{r['critic_run']}` | {r['target_kl']} | {r.get('overrides', '')} | " +
                    " | ".join(f"{success[u]:.1f}" if u in success else "" for u in points) + " |")
    table = "\n".join(rows)
    print(table)
    body = (f"## SiMPO's actor update against a fixed critic (`benchmarks/actor_probe.py`)\n\n"
            f"Command (the last invocation; the table keeps every probe): `{invocation()}`\n"
            f"Machine: {machine()}\nDate: {today()}\n\n"
            "The critic of a critic-only run on the pretrained policy's data is frozen; SiMPO actor updates "
            "(batch 32 states x 16 particles, pi_old refreshed every 50) run on states from its replay buffer, "
            f"with no new data. Success over {16 * args.waves} evaluation episodes (seeds 1000+i) after each "
            "number of updates.\n\n" + table + "\n")
    write_section("actor_probe", body)


if __name__ == "__main__":
    main()
