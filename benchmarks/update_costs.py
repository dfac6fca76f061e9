"""What one piece of a SiMPO fine-tuning step costs on this CPU, with 1 and 2 torch threads, fp32 and bf16 autocast.

    .venv/bin/python benchmarks/update_costs.py
    .venv/bin/python benchmarks/update_costs.py --task fetch_push --repeats 5

The three pieces that make up a run's time (BENCHMARKS.md, "finetune", eleventh round), each timed in-process:
acting (one chunk for 16 envs with the policy's own sampler), the particles of one actor update (32 states x 16
particles, 5 DDIM steps) and one critic update (the default twin 3x512 critic on 256 transitions: target forward,
loss, Adam step, EMA). Every variant runs in every repeat, round-robin; the table keeps each variant's best.
bf16 is `torch.autocast("cpu", dtype=torch.bfloat16)` (fast where the CPU has AMX or AVX512-BF16); finetune does
not use it. Writes benchmarks/results/update_costs.json and the BENCHMARKS.md section "update_costs".
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import invocation, machine, today, write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def pieces(task: str) -> dict:
    """name -> a function that runs that piece once, on the shipped checkpoint of `task`, through SimpoAgent's own
    code (its particle sampler, critic loss and target update) with the default SimpoConfig."""
    from simpo_robot.policy_io import load_policy
    from simpo_robot.rl.actor import make_actor
    from simpo_robot.rl.critic import ema_update
    from simpo_robot.rl.simpo import SimpoAgent, SimpoConfig, SimpoTransition

    loaded = load_policy(ROOT / "pretrained" / task)
    actor, cfg = make_actor(loaded.policy), loaded.policy.config
    obs_steps, state_dim, env_dim = actor.n_obs_steps, cfg.robot_state_feature.shape[0], cfg.env_state_feature.shape[0]
    agent = SimpoAgent(SimpoConfig(), "linear", -0.5, actor, obs_steps * (state_dim + env_dim), torch.device("cpu"))
    agent.set_prepared({}, unwrap=lambda module: module)  # single process: the target critic, as the trainer makes it
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    def cond(batch: int) -> torch.Tensor:
        return actor.global_cond(randn(batch, obs_steps, state_dim), randn(batch, obs_steps, env_dim))

    n = agent.cfg.batch_size
    batch = SimpoTransition(
        state=randn(n, obs_steps, state_dim), env_state=randn(n, obs_steps, env_dim),
        chunk=randn(n, actor.horizon, actor.action_dim), reward=randn(n), discount=torch.full((n,), 0.99**2),
        next_state=randn(n, obs_steps, state_dim), next_env_state=randn(n, obs_steps, env_dim),
        next_chunk=randn(n, actor.horizon, actor.action_dim))
    act_cond, particle_cond = cond(16), cond(agent.cfg.actor_batch_size * agent.cfg.particles)

    def critic_update() -> None:
        loss = agent.critic_loss(batch, generator)
        agent.critic_opt.zero_grad()
        loss.backward()
        agent.critic_opt.step()
        ema_update(agent.critic_target, agent.critic, agent.cfg.tau)

    hidden = "x".join(map(str, agent.cfg.critic_hidden))
    return {
        "acting: 1 chunk, 16 envs, own sampler": lambda: agent.act(act_cond, generator),
        f"particles: {len(particle_cond)} chunks, {agent.cfg.particle_steps} DDIM steps":
            lambda: agent.sample_particles(agent.pi_old, particle_cond, generator),
        f"critic update: twin {hidden}, {n} transitions": critic_update,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="fetch_pick_place")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=10, help="calls per timing")
    args = parser.parse_args()

    variants = [(threads, bf16) for threads in (1, 2) for bf16 in (False, True)]
    jobs = pieces(args.task)
    best: dict[tuple, float] = {}
    for repeat in range(args.repeats + 1):  # round 0 warms up and is not kept
        for name, fn in jobs.items():
            for threads, bf16 in variants:
                torch.set_num_threads(threads)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    ms = (time.perf_counter() - start) / args.calls * 1000
                if repeat:
                    best[name, threads, bf16] = min(ms, best.get((name, threads, bf16), float("inf")))

    rows = ["| piece | 1 thread, fp32 (ms) | 2 threads, fp32 (ms) | speed-up of 2 threads | 1 thread, bf16 (ms) | speed-up of bf16, 1 thread | 2 threads, bf16 (ms) |",
            "|---|---|---|---|---|---|---|"]
    results = []
    for name in jobs:
        t = {(th, bf): best[name, th, bf] for th, bf in variants}
        results.append({"piece": name, "ms": {f"{th}t_{'bf16' if bf else 'fp32'}": v for (th, bf), v in t.items()}})
        rows.append(f"| {name} | {t[1, False]:.1f} | {t[2, False]:.1f} | {t[1, False] / t[2, False]:.2f}x | "
                    f"{t[1, True]:.1f} | {t[1, False] / t[1, True]:.2f}x | {t[2, True]:.1f} |")
    table = "\n".join(rows)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "update_costs.json").write_text(json.dumps({"task": args.task, "pieces": results}, indent=2))
    command = invocation()
    write_section("update_costs", (
        "## What the pieces of a fine-tuning step cost (`benchmarks/update_costs.py`)\n\n"
        f"Command: `{command}`\nMachine: {machine()}\nDate: {today()}\n\n"
        f"Task `{args.task}` (its shipped checkpoint). The best of {args.repeats} timings of {args.calls} calls each, all variants "
        "round-robin in one process. bf16 is CPU autocast, which finetune does not use.\n\n" + table))


if __name__ == "__main__":
    main()
