"""What SiMPO's actor update does when the critic cannot tell particles apart (uniform weights).

    .venv/bin/python benchmarks/self_fit_probe.py                  # 300 updates per variant, 50 episodes each
    .venv/bin/python benchmarks/self_fit_probe.py --updates 20 --episodes 10

Collects states by rolling out the shipped pretrained/fetch_push, then runs actor updates with all weights
equal (no critic): the paper's loss re-fits the model to pi_old's samples, the default (`self_fit pi_old`)
matches pi_old's output instead. Prints success after the updates and the gripper action's mean, and writes
the BENCHMARKS.md section "self_fit_probe".
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import invocation, machine, today, write_section  # noqa: E402

VARIANTS = {  # name: (particle steps, clip particles, self_fit)
    "paper loss, 5 DDIM steps, clipped": (5, True, "samples"),
    "paper loss, 10 DDIM steps, unclipped": (10, False, "samples"),
    "pi_old-matched (default), 5 DDIM steps, unclipped": (5, False, "pi_old"),
}


def run(name: str, args) -> dict:
    from simpo_robot.evaluate import evaluate_policy
    from simpo_robot.policy_io import load_policy
    from simpo_robot.rl.actor import make_actor
    from simpo_robot.rl.trainer import Rollout
    from simpo_robot.tasks import load_task

    steps, clip, self_fit = VARIANTS[name]
    loaded = load_policy("pretrained/fetch_push")
    spec, actor = load_task("fetch_push"), make_actor(loaded.policy)

    class Acting:
        def act(self, cond, generator):
            return actor.sample(actor.unet, cond, generator=generator), {}

    g = torch.Generator().manual_seed(0)
    rollout = Rollout(spec, actor, loaded.preprocessor, loaded.postprocessor, 16, 0, 0.99, torch.device("cpu"))
    states, env_states = [], []
    for _ in range(50):
        batch, _ = rollout.step_chunk(Acting(), g)
        states.append(batch.transition.state[batch.live])
        env_states.append(batch.transition.env_state[batch.live])
    rollout.close()
    states, env_states = torch.cat(states), torch.cat(env_states)
    probe = torch.arange(0, len(states), max(1, len(states) // 64))

    def gripper_mean() -> float:
        with torch.no_grad():
            x = actor.sample(actor.unet, actor.global_cond(states[probe], env_states[probe]),
                             generator=torch.Generator().manual_seed(5))
        return actor.executed(x)[..., -1].mean().item()

    before = gripper_mean()
    objective, pi_old = actor.objective(5.0), copy.deepcopy(actor.unet).requires_grad_(False)
    opt = torch.optim.Adam(objective.parameters(), lr=3e-5)
    start = time.perf_counter()
    for update in range(args.updates):
        if update % 50 == 0:
            pi_old.load_state_dict(actor.unet.state_dict())
        idx = torch.randint(0, len(states), (32,), generator=g)
        with torch.no_grad():
            cond = actor.global_cond(states[idx], env_states[idx]).repeat_interleave(16, 0)
            particles = actor.sample(pi_old, cond, steps, clip=clip, generator=g)
        loss = objective(particles, cond, torch.ones(len(particles)), g, pi_old if self_fit == "pi_old" else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    result = evaluate_policy(loaded, spec, args.episodes, 1000)
    return {"variant": name, "success": 100 * result.success_rate, "gripper_before": before,
            "gripper_after": gripper_mean(), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run(name, args) for name in VARIANTS]
    lines = ["| variant | success after (%) | gripper action mean before -> after | update time (s) |",
             "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['success']:.0f} | {r['gripper_before']:.3f} -> {r['gripper_after']:.3f} | "
              f"{r['seconds']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    write_section("self_fit_probe", (
        "## SiMPO's actor update with uniform weights (`benchmarks/self_fit_probe.py`)\n\n"
        f"Command: `{invocation()}`\nMachine: {machine()}\nDate: {today()}\n\n"
        f"{args.updates} actor updates (32 states x 16 particles, Adam lr 3e-5, pi_old refreshed every 50) "
        "with every weight equal, from the shipped `pretrained/fetch_push`; success over episodes 1000+i "
        f"({args.episodes} episodes). The pretrained policy itself: 42% on 50 of these episodes.\n\n"
        f"{table}\n"))


if __name__ == "__main__":
    main()
