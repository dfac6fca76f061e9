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
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, today, write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def pieces(task: str) -> dict:
    """name -> a function that runs that piece once, on the shipped checkpoint of `task`."""
    from simpo_robot.policy_io import load_policy
    from simpo_robot.rl.actor import make_actor
    from simpo_robot.rl.critic import TwinCritic, ema_update, td_target
    from simpo_robot.rl.simpo import SimpoConfig

    loaded = load_policy(ROOT / "pretrained" / task)
    actor, cfg, simpo = make_actor(loaded.policy), loaded.policy.config, SimpoConfig()
    generator = torch.Generator().manual_seed(0)

    def cond(batch: int) -> torch.Tensor:
        return actor.global_cond(torch.randn(batch, actor.n_obs_steps, cfg.robot_state_feature.shape[0], generator=generator),
                                 torch.randn(batch, actor.n_obs_steps, cfg.env_state_feature.shape[0], generator=generator))

    act_cond, particle_cond = cond(16), cond(simpo.actor_batch_size * simpo.particles)
    obs_dim = (cfg.robot_state_feature.shape[0] + cfg.env_state_feature.shape[0]) * actor.n_obs_steps
    chunk_dim = actor.n_action_steps * actor.action_dim
    critic = TwinCritic(obs_dim, chunk_dim, simpo.critic_hidden)
    target = copy.deepcopy(critic)
    optimizer = torch.optim.Adam(critic.parameters(), simpo.critic_lr)
    b = simpo.batch_size
    obs, chunk, next_obs, next_chunk = (torch.randn(b, d, generator=generator)
                                        for d in (obs_dim, chunk_dim, obs_dim, chunk_dim))
    reward, discount = torch.randn(b, generator=generator), torch.full((b,), 0.99**2)

    def critic_update() -> None:
        with torch.no_grad():
            y = td_target(reward, discount, target(next_obs, next_chunk)).float()
        q = critic(obs, chunk)
        loss = torch.nn.functional.mse_loss(q.q1.float(), y) + torch.nn.functional.mse_loss(q.q2.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_update(target, critic, simpo.tau)

    return {
        "acting: 1 chunk, 16 envs, own sampler": lambda: actor.sample(actor.unet, act_cond, generator=generator),
        f"particles: {len(particle_cond)} chunks, {simpo.particle_steps} DDIM steps":
            lambda: actor.sample(actor.unet, particle_cond, simpo.particle_steps, clip=False, generator=generator),
        f"critic update: twin {'x'.join(map(str, simpo.critic_hidden))}, {b} transitions": critic_update,
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
                grad = torch.enable_grad() if name.startswith("critic") else torch.no_grad()
                with grad, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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
    command = " ".join([".venv/bin/python benchmarks/update_costs.py", *sys.argv[1:]])
    write_section("update_costs", (
        "## What the pieces of a fine-tuning step cost (`benchmarks/update_costs.py`)\n\n"
        f"Command: `{command}`\nMachine: {machine()}\nDate: {today()}\n\n"
        f"Task `{args.task}` (its shipped checkpoint). The best of {args.repeats} timings of {args.calls} calls each, all variants "
        "round-robin in one process. bf16 is CPU autocast, which finetune does not use.\n\n" + table))


if __name__ == "__main__":
    main()
