"""Online fine-tuning: chunk returns, critic targets, replay, the explicit-timestep sampler, and the CLI."""

import json
import math
import shutil

import pytest
import torch

from simpo_robot.cli import main
from simpo_robot.deploy.testing import save_tiny_policy
from simpo_robot.policy_io import load_policy
from simpo_robot.rl.actor import DiffusionActor, sample_chunks, step_tables
from simpo_robot.rl.chunks import chunk_return, n_step_return
from simpo_robot.rl.critic import TwinCritic, TwinQ, ema_update, td_target
from simpo_robot.rl.replay import ReplayBuffer, Transition


def test_chunk_return_hand_computed():
    rewards = torch.tensor([[-1.0, -1.0, 0.0], [-1.0, 5.0, 7.0], [0.0, 0.0, 0.0]])
    alive = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    terminated = torch.tensor([False, True, False])
    out = chunk_return(rewards, alive, terminated, gamma=0.5)
    # env 0: -1 - 0.5 + 0 = -1.5, discount 0.5^3; env 1: -1 + 0.5*5 = 1.5 (step 3 dead), terminated -> 0;
    # env 2: one step, truncated (not terminal) -> bootstrap with 0.5^1.
    torch.testing.assert_close(out.reward, torch.tensor([-1.5, 1.5, 0.0]))
    torch.testing.assert_close(out.discount, torch.tensor([0.125, 0.0, 0.5]))
    assert out.steps.tolist() == [3, 2, 1]


def test_n_step_return_hand_computed():
    reward, discount = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 0.5, 0.0, 0.5])
    two = n_step_return(reward, discount, 2)
    # t=1: 2 + 0.5*3, then the termination inside chunk 2 zeroes the bootstrap; t=3: the episode's last chunk
    torch.testing.assert_close(two.reward, torch.tensor([2.0, 3.5, 3.0, 4.0]))
    torch.testing.assert_close(two.discount, torch.tensor([0.25, 0.0, 0.0, 0.5]))
    assert two.last.tolist() == [1, 2, 3, 3]
    one = n_step_return(reward, discount, 1)
    assert one.reward.tolist() == reward.tolist() and one.discount.tolist() == discount.tolist()
    assert one.last.tolist() == [0, 1, 2, 3]
    whole = n_step_return(reward, discount, 10)  # Monte Carlo up to the termination
    assert whole.reward[0].item() == 1 + 0.5 * 2 + 0.25 * 3 and whole.discount[0].item() == 0.0
    assert whole.last.tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="n must be >= 1"):
        n_step_return(reward, discount, 0)


def test_td_target_uses_the_smaller_critic_and_the_discount():
    y = td_target(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0]),
                  TwinQ(torch.tensor([10.0, 3.0]), torch.tensor([4.0, 9.0])))
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.5 * 4.0, 2.0]))


def test_ema_update_exact():
    torch.manual_seed(0)
    source, target = TwinCritic(3, 2, (4,)), TwinCritic(3, 2, (4,))
    expected = [0.9 * t + 0.1 * s for t, s in zip(target.parameters(), source.parameters(), strict=True)]
    ema_update(target, source, tau=0.1)
    for got, want in zip(target.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=0)


def test_layer_norm_critic_ignores_the_scale_of_each_hidden_layers_input():
    torch.manual_seed(0)
    critic = TwinCritic(3, 2, (8, 8), layer_norm=True)
    obs, chunk = torch.randn(5, 3), torch.randn(5, 2)
    before = critic(obs, chunk)
    with torch.no_grad():  # LayerNorm undoes a positive rescaling of the linear layer before it
        critic.q1[0].weight.mul_(3.0), critic.q1[0].bias.mul_(3.0)
    after = critic(obs, chunk)
    torch.testing.assert_close(after.q1, before.q1, atol=2e-4, rtol=0)  # (up to LayerNorm's eps)
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in critic.modules()) == 4
    plain = TwinCritic(3, 2, (8, 8))
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in plain.modules())
    before = plain(obs, chunk).q1
    with torch.no_grad():
        plain.q1[0].weight.mul_(3.0), plain.q1[0].bias.mul_(3.0)
    assert (plain(obs, chunk).q1 - before).abs().max() > 1e-2  # without it, the rescaling shows


def make_transition(start: int, n: int) -> Transition:
    a = torch.arange(start, start + n, dtype=torch.float32)
    return Transition(a.reshape(n, 1, 1).repeat(1, 2, 3), a.reshape(n, 1, 1).repeat(1, 2, 2),
                      a.reshape(n, 1, 1).repeat(1, 4, 2), a, a / 10, a.reshape(n, 1, 1).repeat(1, 2, 3) + 1,
                      a.reshape(n, 1, 1).repeat(1, 2, 2) + 1)


def test_replay_wraps_around_and_round_trips_exactly():
    buffer = ReplayBuffer(5, make_transition(0, 1))
    buffer.add(make_transition(0, 3))
    buffer.add(make_transition(3, 4))  # 7 items into 5 slots: 5, 6 overwrite 0, 1
    assert len(buffer) == 5 and buffer.cursor == 2
    assert sorted(buffer.storage.reward.tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]
    copy = ReplayBuffer(5, make_transition(0, 1))
    copy.load_state_dict(buffer.state_dict())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for x, y in zip(buffer.sample(8, g1), copy.sample(8, g2), strict=True):
        assert torch.equal(x, y)
    sample = buffer.sample(16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample.discount, sample.reward / 10)  # fields stay aligned


@pytest.fixture(scope="module")
def tiny_push(tmp_path_factory):
    # fetch_push features: observation.state (10,), observation.environment_state (18,), action (4,)
    return save_tiny_policy(tmp_path_factory.mktemp("tiny") / "policy", env_state_dim=18,
                            noise_scheduler_type="DDIM", num_inference_steps=10)


def test_sampler_matches_lerobot_conditional_sample(tiny_push):
    policy = load_policy(tiny_push).policy
    actor = DiffusionActor(policy)
    cond = torch.randn(3, 2 * 28, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, actor.horizon, actor.action_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = policy.diffusion.conditional_sample(3, global_cond=cond, noise=noise)
    ours = sample_chunks(actor.unet, cond, step_tables(policy.config), actor.horizon, actor.action_dim, noise=noise)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_finetune_cli_end_to_end(tiny_push, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--policy", str(tiny_push), "--task", "fetch_push", "--env-steps", "400",
            "--simpo.learning-starts", "100", "--simpo.actor-starts", "100", "--num-envs", "4", "--final-eval-episodes", "2", "--eval-episodes", "2",
            "--eval-every", "200", "--simpo.batch-size", "16", "--simpo.actor-batch-size", "4", "--simpo.particles", "4",
            "--log-every", "2", "--weighting", "linear", "--negative-bound", "-0.5", "--simpo.actor-burst", "2",
            "--simpo.actor-every", "8", "--out", str(out)]
    assert main(args) == 0
    eval_info = json.loads((out / "eval_info.json").read_text())
    assert set(eval_info["aggregated"]) >= {"avg_sum_reward", "avg_max_reward", "pc_success", "eval_s", "eval_ep_s"}
    assert set(eval_info["per_episode"][0]) >= {"sum_reward", "max_reward", "success", "seed"}
    info = json.loads((out / "final" / "training_info.json").read_text())
    assert info["algorithm"] == "simpo" and info["weighting"] == "linear"
    assert info["weighting_params"]["negative_bound"] == -0.5 and info["env_steps"] >= 400
    steps = [step for step, _ in info["curve"]]  # before, one mid-run evaluation, after
    assert len(steps) == 3 and steps[0] == 0 and 200 <= steps[1] < 400 and steps[2] == info["env_steps"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fitted = [m for m in metrics if "losses/critic" in m]
    assert fitted and all(math.isfinite(m["losses/critic"]) for m in fitted)
    trained = [m for m in metrics if "losses/actor" in m]  # (the last: the final burst, actor updates only)
    assert trained and all(math.isfinite(m["losses/actor"]) for m in trained)
    summary = json.loads((out / "summary.json").read_text())
    assert trained[-1]["charts/actor_updates"] == summary["actor_updates"] > 0
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert any((out / "tensorboard").iterdir())
    reloaded = load_policy(out / "final")  # stock LeRobot layout, processors included
    assert reloaded.config.type == "diffusion"
    # the policy changed: the fine-tuned weights differ from the pretrained ones
    before = load_policy(tiny_push).policy.state_dict()
    after = reloaded.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the critic ships beside the policy, and `eval --best_of` acts by it
    card = json.loads((out / "final" / "critic.json").read_text())
    assert card["trained_on"] == {"task": "fetch_push", "gamma": 0.99, "env_steps": info["env_steps"],
                                  "env_kwargs": {"reward_type": "dense"}}
    assert main(["eval", "--policy", str(out / "final"), "--task", "fetch_push", "--episodes", "2", "--best_of", "3",
                 "--out", str(tmp_path / "best_of")]) == 0
    assert json.loads((tmp_path / "best_of" / "eval_info.json").read_text())["best_of"] == 3
    # a second run into the same folder is refused instead of overwriting it
    assert main(args) == 1


@pytest.mark.parametrize("args, message", [
    (["--weighting", "softmaxx"], "unknown weighting"),
    (["--negative-bound", "0.3"], "negative_bound"),
    (["--algo", "ppo"], "unknown algo"),
    (["--num-inference-steps", "0"], "num_inference_steps must be >= 1"),
    (["--num-inference-steps", "1", "--algo", "dppo"], "--dppo.denoising-steps"),
    (["--algo", "dppo", "--dppo.clip-coef-base", "0.1"], "dppo.clip_coef_base must be in (0, clip_coef]"),
])
def test_finetune_bad_flags(args, message, capsys):
    assert main(["finetune", *args]) == 2
    assert message in capsys.readouterr().err


def test_finetune_policy_that_does_not_fit_the_task(tiny_push, tmp_path, capsys):
    code = main(["finetune", "--policy", str(tiny_push), "--task", "fetch_reach", "--out", str(tmp_path / "x")])
    assert code == 1
    assert "observation.environment_state" in capsys.readouterr().err


def _run(tiny_push, out, env_steps, *extra):
    args = ["finetune", "--policy", str(tiny_push), "--task", "fetch_push", "--env-steps", str(env_steps),
            "--simpo.learning-starts", "50", "--simpo.actor-starts", "50", "--num-envs", "2", "--final-eval-episodes", "1", "--eval-every", "0",
            "--checkpoint-every", "100", "--simpo.batch-size", "8", "--simpo.actor-batch-size", "2", "--simpo.particles", "4",
            "--simpo.refresh-every", "3", "--simpo.actor-burst", "2", "--simpo.actor-every", "8", "--out", str(out), *extra]
    assert main(args) == 0


def test_resumed_run_continues_exactly_like_the_uninterrupted_one(tiny_push, tmp_path):
    from safetensors.torch import load_file

    # (episodes are stored whole: checkpoints fall between them; overlapped updates are waited for before them)
    n_step = ("--simpo.n-step", "3", "--overlap-updates", "true")
    _run(tiny_push, tmp_path / "straight", 200, *n_step)
    # stops (and checkpoints) after the first episodes, as a killed run would: without the burst at a run's end
    _run(tiny_push, tmp_path / "interrupted", 100, *n_step, "--simpo.final-burst", "false")
    assert (tmp_path / "interrupted" / "checkpoints" / "last" / "trainer_rank0.pt").is_file()
    _run(tiny_push, tmp_path / "interrupted", 200, *n_step, "--resume", str(tmp_path / "interrupted"))
    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    s1 = json.loads((tmp_path / "straight" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "interrupted" / "summary.json").read_text())
    for key in ("env_steps", "updates", "critic_updates", "actor_updates", "skipped_updates"):
        assert s1[key] == s2[key], key
    # the checkpoint folder holds exactly one complete state (no half-written leftovers)
    assert sorted(p.name for p in (tmp_path / "interrupted" / "checkpoints").iterdir()) == ["last"]

    # load_run gives the agent as the last checkpoint left it (the probes' way in)
    from simpo_robot.errors import SimpoRobotError
    from simpo_robot.rl.trainer import load_run

    saved = load_run(tmp_path / "straight")
    assert saved.cfg.env_steps == 200 and saved.summary["actor_updates"] == saved.agent.actor_updates > 0
    weights = saved.loaded.policy.state_dict()
    for key in straight:
        assert torch.equal(straight[key], weights[key]), key
    with pytest.raises(SimpoRobotError, match="no checkpoint"):
        load_run(tmp_path / "nothing")


def test_final_burst_runs_one_more_actor_burst_at_the_end_and_keeps_its_critic(tiny_push, tmp_path):
    from safetensors.torch import load_file

    from simpo_robot.rl.critic import load_critic
    from simpo_robot.rl.trainer import load_run

    _run(tiny_push, tmp_path / "plain", 200, "--simpo.final-burst", "false")
    _run(tiny_push, tmp_path / "final", 200)  # (on by default)
    plain, final = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("plain", "final"))
    assert final["actor_updates"] == plain["actor_updates"] + 2 and final["critic_updates"] == plain["critic_updates"]
    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("plain", "final"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the extra burst changed the policy
    # the critic shipped is the fitted one (no reset after the final burst), and the checkpoint matches final/
    saved = load_run(tmp_path / "final")
    critic, _ = load_critic(tmp_path / "final" / "final")
    assert all(torch.equal(v, critic.state_dict()[k]) for k, v in saved.agent.critic.state_dict().items())
    assert any(not torch.equal(v, saved.agent.critic_init[k]) for k, v in critic.state_dict().items())
    assert saved.agent.actor_updates == final["actor_updates"] and saved.agent.final_burst_at == final["env_steps"]
    # resuming the finished run at the same budget does not run the final burst twice
    _run(tiny_push, tmp_path / "final", 200, "--resume", str(tmp_path / "final"))
    again = json.loads((tmp_path / "final" / "summary.json").read_text())
    assert again["actor_updates"] == final["actor_updates"]
    # a run finished without it gets it on resumption (here of a copy of its folder), and ends exactly as the run
    # that had it from the start
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "plain", moved)
    _run(tiny_push, moved, 200, "--simpo.final-burst", "true", "--resume", str(moved))
    finished = json.loads((moved / "summary.json").read_text())
    assert finished["actor_updates"] == final["actor_updates"]
    c = load_file(moved / "final" / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)
    config = json.loads((moved / "finetune_config.json").read_text())
    assert config["simpo"]["final_burst"] is True and config["out"] == str(moved)


def test_a_save_killed_between_its_two_renames_resumes_from_the_state_before_it(tiny_push, tmp_path):
    from simpo_robot.rl.trainer import load_run

    out = tmp_path / "run"
    _run(tiny_push, out, 100, "--simpo.final-burst", "false")
    saved = load_run(out).loaded.policy.state_dict()
    # the kill came after `last` was moved aside and before the new state was moved in
    checkpoints = out / "checkpoints"
    (checkpoints / "last").rename(checkpoints / ".previous")
    (checkpoints / ".incoming").mkdir()
    (checkpoints / ".incoming" / "trainer_rank0.pt").write_bytes(b"half a checkpoint")
    restored = load_run(out).loaded.policy.state_dict()
    assert sorted(p.name for p in checkpoints.iterdir()) == [".incoming", "last"]
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    # and the run goes on from it, the stale .incoming cleared by its next save
    _run(tiny_push, out, 200, "--simpo.final-burst", "false", "--resume", str(out))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last"]
    assert json.loads((out / "summary.json").read_text())["env_steps"] >= 200


def test_ctrl_c_stops_a_run_with_130_and_leaves_a_resumable_checkpoint(tiny_push, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from simpo_robot.rl.trainer import load_run

    out = tmp_path / "run"
    args = ["finetune", "--policy", str(tiny_push), "--task", "fetch_push", "--env-steps", "1000000",
            "--simpo.learning-starts", "50", "--simpo.actor-starts", "50", "--num-envs", "2", "--eval-every", "0",
            "--final-eval-episodes", "1",
            "--checkpoint-every", "100", "--simpo.batch-size", "8", "--simpo.actor-batch-size", "2",
            "--simpo.particles", "4", "--simpo.actor-burst", "2", "--simpo.actor-every", "8", "--out", str(out)]
    # (a process started in the background by a non-interactive shell, as pytest may be, inherits SIGINT ignored:
    # the child gets the terminal's default back, as a run started at a prompt has)
    proc = subprocess.Popen([sys.executable, "-m", "simpo_robot", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "last").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "final").exists()
    state = torch.load(out / "checkpoints" / "last" / "trainer_rank0.pt", weights_only=False)
    assert state["counters"]["env_steps"] >= 100
    load_run(out)  # the state it leaves loads whole; --resume goes on from it


def test_non_finite_losses_and_gradients_skip_their_update_and_are_logged(tiny_push, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from simpo_robot.rl.simpo import SimpoAgent

    critic_loss, calls = SimpoAgent.critic_loss, []

    def poisoned(self, *args, **kwargs):
        loss = critic_loss(self, *args, **kwargs)
        calls.append(len(calls) % 4)
        if calls[-1] == 1:  # a NaN loss
            return loss * float("nan")
        if calls[-1] == 3:  # a finite loss whose gradient is NaN (d/dx sqrt(x) at 0 is inf; times 0 is NaN)
            weight = next(self.critic.parameters())
            return loss + 0.0 * (weight - weight.detach()).abs().sqrt().sum()
        return loss

    monkeypatch.setattr(SimpoAgent, "critic_loss", poisoned)
    out = tmp_path / "run"
    _run(tiny_push, out, 200, "--log-every", "1")
    summary = json.loads((out / "summary.json").read_text())
    poisoned_calls = sum(1 for c in calls if c in (1, 3))
    assert poisoned_calls > 0 and summary["skipped_updates"] == poisoned_calls
    # every other update went through, and nothing non-finite reached the weights that ship
    assert summary["updates"] == len(calls) - poisoned_calls + summary["actor_updates"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [m["charts/skipped_updates"] for m in metrics if "charts/skipped_updates" in m]
    assert logged == sorted(logged) and logged[-1] == poisoned_calls
    for name in ("model.safetensors", "critic.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(out / "final" / name).values()), name


def test_a_policy_gone_non_finite_is_never_saved_and_the_last_good_checkpoint_is_kept(tiny_push, tmp_path,
                                                                                      monkeypatch, capsys):
    from simpo_robot.rl.simpo import SimpoAgent
    from simpo_robot.rl.trainer import load_run

    finish = SimpoAgent.finish

    def blown_up(self, *args, **kwargs):  # the final burst ends with a NaN in the denoiser (as a diverged run would)
        metrics = finish(self, *args, **kwargs)
        with torch.no_grad():
            next(self.actor.unet.parameters()).view(-1)[0] = float("nan")
        return metrics

    monkeypatch.setattr(SimpoAgent, "finish", blown_up)
    out = tmp_path / "run"
    with pytest.raises(AssertionError):  # (the command fails)
        _run(tiny_push, out, 200)
    assert "not finite; nothing was saved" in capsys.readouterr().err
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    # the resumable state is the last one taken before the blow-up, whole and finite
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last"]
    saved = load_run(out)
    assert saved.agent.final_burst_at is None
    for module in (saved.loaded.policy, saved.agent.critic, saved.agent.pi_old):
        assert all(torch.isfinite(p).all() for p in module.parameters())


def test_overlapped_updates_give_exactly_the_sequential_run(tiny_push, tmp_path, monkeypatch):
    import threading

    from safetensors.torch import load_file

    from simpo_robot.rl.simpo import SimpoAgent

    threads: list[str] = []
    update = SimpoAgent.update

    def recorded(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(SimpoAgent, "update", recorded)
    _run(tiny_push, tmp_path / "overlapped", 200, "--log-every", "3", "--overlap-updates", "true")
    overlapped, threads = threads, []
    _run(tiny_push, tmp_path / "sequential", 200, "--log-every", "3", "--overlap-updates", "false")
    # critic rounds ran beside the collection, actor bursts in the main thread; without it, all in the main thread
    assert {name.split("_")[0] for name in overlapped} == {"updates", "MainThread"} and set(threads) == {"MainThread"}
    a = load_file(tmp_path / "overlapped" / "final" / "model.safetensors")
    b = load_file(tmp_path / "sequential" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s1, s2 = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("overlapped", "sequential"))
    for key in ("env_steps", "updates", "critic_updates", "actor_updates", "skipped_updates"):
        assert s1[key] == s2[key], key

    def losses(run):  # every logged loss, in order (wall-clock charts differ)
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(m["env_steps"], {k: v for k, v in m.items() if k.startswith("losses/")}) for m in lines]
    assert losses("overlapped") == losses("sequential")


def test_final_evaluation_also_measures_the_deterministic_policy(tiny_push, tmp_path, monkeypatch):
    import simpo_robot.evaluate as evaluate_module
    from simpo_robot.evaluate import evaluate_policy
    from simpo_robot.tasks import load_task

    calls = []  # (noise scale, the evaluated policy's weights)

    def spy(loaded, *args, noise_scale=1.0, **kwargs):
        calls.append((noise_scale, {k: v.clone() for k, v in loaded.policy.state_dict().items()}))
        return evaluate_policy(loaded, *args, noise_scale=noise_scale, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_policy", spy)
    out = tmp_path / "run"
    _run(tiny_push, out, 100)
    base = load_policy(tiny_push).policy.state_dict()
    final = load_policy(out / "final")
    assert [scale for scale, _ in calls] == [1.0, 0.0, 1.0, 0.0]  # before, before at x_T = 0, after, after
    assert all(torch.equal(calls[1][1][k], base[k]) for k in base)
    assert all(torch.equal(calls[3][1][k], final.policy.state_dict()[k]) for k in base)
    summary = json.loads((out / "summary.json").read_text())
    info = json.loads((out / "final" / "training_info.json").read_text())
    assert info["success_after_deterministic"]["pc_success"] == summary["pc_success_deterministic_after"]
    assert info["success_before_deterministic"]["n_episodes"] == 1
    # eval_info_deterministic.json is what `simpo-robot eval --noise_scale 0` measures on the saved policy
    written = json.loads((out / "eval_info_deterministic.json").read_text())
    again = evaluate_policy(final, load_task("fetch_push"), 1, 1000, noise_scale=0.0)
    assert written["noise_scale"] == 0.0
    assert written["per_episode"][0]["sum_reward"] == pytest.approx(again.per_episode[0].sum_reward, abs=1e-9)

    # a checkpoint of an older version (no deterministic "before") resumes and measures the base policy then
    state_file = out / "checkpoints" / "last" / "trainer_rank0.pt"
    state = torch.load(state_file, weights_only=False)
    del state["before_deterministic"]
    torch.save(state, state_file)
    calls.clear()
    _run(tiny_push, out, 200, "--resume", str(out))
    assert [scale for scale, _ in calls] == [0.0, 1.0, 0.0]  # the base policy at x_T = 0, then after, after at 0
    assert all(torch.equal(calls[0][1][k], base[k]) for k in base)
    # and without --deterministic-eval, only the sampled policy is measured
    calls.clear()
    _run(tiny_push, tmp_path / "plain", 100, "--deterministic-eval", "false")
    assert [scale for scale, _ in calls] == [1.0, 1.0]
    assert "pc_success_deterministic_after" not in json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert not (tmp_path / "plain" / "eval_info_deterministic.json").exists()


def test_resume_refuses_a_different_command_and_a_missing_checkpoint(tiny_push, tmp_path, capsys):
    old_defaults = ("--simpo.actor-burst", "1", "--simpo.critic-reset", "false")  # before these options existed
    _run(tiny_push, tmp_path / "run", 100, *old_defaults)
    args = ["finetune", "--policy", str(tiny_push), "--task", "fetch_push", "--weighting", "exp",
            "--resume", str(tmp_path / "run")]
    assert main(args) == 1
    assert "weighting" in capsys.readouterr().err
    assert main(["finetune", "--policy", str(tiny_push), "--resume", str(tmp_path / "nothing")]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    # a run saved before an option existed resumes with the option's old behaviour, and only with it
    config_file = tmp_path / "run" / "finetune_config.json"
    config = json.loads(config_file.read_text())
    for name in ("weighting_critic_every", "actor_burst", "critic_reset", "n_step", "critic_layer_norm"):
        del config["simpo"][name]
    config_file.write_text(json.dumps(config))
    _run(tiny_push, tmp_path / "run", 150, *old_defaults, "--resume", str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["env_steps"] >= 150
    with pytest.raises(AssertionError):
        _run(tiny_push, tmp_path / "run", 200, "--resume", str(tmp_path / "run"))  # today's defaults: not that run
    assert "--resume" in (err := capsys.readouterr().err) and "simpo.actor_burst: saved 1, now 2" in err
    assert "critic_hidden" not in err  # only the options that differ
    # a damaged checkpoint is named, not a traceback from the unpickler, and is left as it was
    last = tmp_path / "run" / "checkpoints" / "last"
    for name, damage in (("trainer_rank0.pt", b"garbage"), ("model.safetensors", None)):
        path = last / name
        intact = path.read_bytes()
        path.write_bytes(damage if damage is not None else intact[: len(intact) // 2])
        with pytest.raises(AssertionError):
            _run(tiny_push, tmp_path / "run", 200, *old_defaults, "--resume", str(tmp_path / "run"))
        err = capsys.readouterr().err
        assert f"the checkpoint in {last} cannot be read" in err and "Traceback" not in err, name
        assert path.read_bytes() == (damage if damage is not None else intact[: len(intact) // 2])
        path.write_bytes(intact)


def test_two_processes_keep_parameters_identical_and_double_env_steps_per_update(tiny_push, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    def summary(out, launcher):
        args = ["finetune", "--policy", str(tiny_push), "--task", "fetch_push", "--env-steps", "400",
                "--simpo.learning-starts", "100", "--simpo.actor-starts", "100", "--num-envs", "2", "--final-eval-episodes", "1", "--eval-every", "0",
                "--checkpoint-every", "200", "--simpo.batch-size", "8", "--simpo.actor-batch-size", "2",
                "--simpo.particles", "4", "--simpo.actor-burst", "2", "--simpo.actor-every", "8",
                "--overlap-updates", "true", "--out", str(out)]  # (each rank's collectives stay in order)
        proc = subprocess.run([*launcher, "-m", "simpo_robot", *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "summary.json").read_text())

    accelerate = str(Path(sys.executable).parent / "accelerate")
    two = summary(tmp_path / "two", [accelerate, "launch", "--multi_gpu", "--num_processes", "2"])
    one = summary(tmp_path / "one", [sys.executable])
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["rank_param_divergence"] == 0.0  # DDP kept every parameter identical across ranks
    assert two["env_steps"] == one["env_steps"] == 400
    assert one["critic_updates"] == 2 * two["critic_updates"]  # twice the env steps per update
    # the command: accelerate itself would start one process here; simpo-robot starts both, and the run
    # is the same as under --multi_gpu (gloo either way)
    cpu = summary(tmp_path / "cpu", [accelerate, "launch", "--cpu", "--num_processes", "2"])
    assert cpu["num_processes"] == 2 and cpu["rank_param_divergence"] == 0.0
    assert cpu["critic_updates"] == two["critic_updates"] and cpu["actor_updates"] == two["actor_updates"]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / run / "final" / "model.safetensors") for run in ("two", "cpu"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accelerate_cpu_launch_is_recognised_only_when_it_started_a_single_process_of_several(tmp_path):
    from simpo_robot.rl.launch import requested_cpu_processes

    launched = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    argv = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "simpo_robot",
            "finetune", "--env-steps", "10"]
    assert requested_cpu_processes(launched, argv) == 2
    assert requested_cpu_processes(launched, [*argv[:4], "--num-processes=3", *argv[6:]]) == 3
    assert requested_cpu_processes(launched, [*argv[:6], "--num_machines", "2", *argv[6:]]) is None  # not all here
    assert requested_cpu_processes({**launched, "WORLD_SIZE": "2", "RANK": "0"}, argv) is None  # a launcher started them
    assert requested_cpu_processes({**launched, "ACCELERATE_USE_CPU": "False"}, argv) is None
    assert requested_cpu_processes(launched, ["/venv/bin/python", "-m", "simpo_robot", "finetune"]) is None
    # the number of processes from accelerate's config file, when the command does not give it
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nmixed_precision: 'no'\n"
                      "use_cpu: true\nnum_processes: 4\nnum_machines: 1\n")
    assert requested_cpu_processes(launched, [*argv[:3], "--config_file", str(config), *argv[6:]]) == 4


def test_processes_started_for_accelerate_cpu_that_fail_give_exit_code_1_and_their_error(tmp_path, caplog, capfd):
    import socket

    from simpo_robot.rl.launch import launch_processes

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    missing = tmp_path / "no_such_policy"
    with caplog.at_level("ERROR", logger="simpo_robot.rl.launch"):
        code = launch_processes(2, ["finetune", "--policy", str(missing), "--task", "fetch_push",
                                    "--out", str(tmp_path / "run")], {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    assert code == 1
    assert "ChildFailedError" in caplog.text or "Failures" in caplog.text  # torch's report of the failed processes
    assert str(missing) in capfd.readouterr().err  # each process said what was wrong


def _simpo_agent(tiny_push, **overrides):
    from simpo_robot.rl.simpo import SimpoAgent, SimpoConfig

    actor = DiffusionActor(load_policy(tiny_push).policy)
    cfg = SimpoConfig(**{"particles": 4, "buffer_size": 64, **overrides})
    agent = SimpoAgent(cfg, "linear", -0.5, actor, obs_dim=2 * 28, device=torch.device("cpu"))
    agent.critic_target = TwinCritic(2 * 28, actor.n_action_steps * actor.action_dim, (8,))
    return agent, actor


def _chunk_batch(actor, envs: int, live, ended, offset: float, reward: bool = False):
    """Env i's chunk is filled with offset + i (and so is its reward with `reward`; else 0); next states too."""
    from simpo_robot.rl.agent import ChunkBatch

    chunks = torch.full((envs, actor.horizon, actor.action_dim), offset) + torch.arange(envs).reshape(envs, 1, 1)
    r = offset + torch.arange(envs, dtype=torch.float32) if reward else torch.zeros(envs)
    nxt = (offset + torch.arange(envs, dtype=torch.float32)).reshape(envs, 1, 1)
    tr = Transition(torch.zeros(envs, 2, 10), torch.zeros(envs, 2, 18), chunks, r,
                    torch.ones(envs), nxt.repeat(1, 2, 10), torch.zeros(envs, 2, 18))
    live, ended = torch.tensor(live), torch.tensor(ended)
    return ChunkBatch(tr, live, ended, torch.ones(envs), {})


def test_simpo_stores_each_transition_with_the_next_chunk_of_its_env(tiny_push):
    agent, actor = _simpo_agent(tiny_push)
    g = torch.Generator().manual_seed(0)
    agent.observe(_chunk_batch(actor, 3, [True, True, True], [False, True, False], 0.0), g)
    assert len(agent.buffer) == 1  # env 1 ended: stored with a freshly sampled bootstrap chunk
    assert agent.buffer.storage.chunk[0, 0, 0] == 1.0 and agent.buffer.storage.next_chunk[0].abs().max() <= 1.0
    agent.observe(_chunk_batch(actor, 3, [True, False, True], [True, False, True], 100.0), g)
    assert agent.pending is None and len(agent.buffer) == 5
    chunk, nxt = agent.buffer.storage.chunk[:5, 0, 0].tolist(), agent.buffer.storage.next_chunk[:5, 0, 0].tolist()
    # envs 0 and 2 of the first chunk get the second chunk of the same env as their next chunk
    assert dict(zip(chunk[1:3], nxt[1:3], strict=True)) == {0.0: 100.0, 2.0: 102.0}
    assert agent.rank_state()["buffer"]["size"] == 5


def test_simpo_n_step_stores_an_episode_as_n_chunk_transitions_when_it_ends(tiny_push):
    agent, actor = _simpo_agent(tiny_push, n_step=2)
    g = torch.Generator().manual_seed(0)
    agent.observe(_chunk_batch(actor, 3, [True, True, True], [False, True, False], 0.0, reward=True), g)
    assert agent.buffer is None  # envs 0 and 2 are still running
    with pytest.raises(RuntimeError, match="between episodes"):
        agent.rank_state()
    agent.observe(_chunk_batch(actor, 3, [True, False, True], [False, False, False], 10.0, reward=True), g)
    agent.observe(_chunk_batch(actor, 3, [True, False, True], [True, False, True], 100.0, reward=True), g)
    assert agent.pending is None and not agent.episode and len(agent.buffer) == 7
    rows = agent.buffer.storage
    by_start = {(rows.chunk[i, 0, 0].item()): i for i in range(7)}
    # env 0, first chunk: rewards 0 + 1 * 10 (discounts 1), bootstrap from the second chunk's next state/chunk
    i = by_start[0.0]
    assert rows.reward[i] == 10.0 and rows.discount[i] == 1.0
    assert rows.next_state[i, 0, 0] == 10.0 and rows.next_chunk[i, 0, 0] == 100.0
    # env 2's second chunk: 12 + 102, bootstrapping from its last chunk's next state and a sampled chunk
    i = by_start[12.0]
    assert rows.reward[i] == 114.0 and rows.next_state[i, 0, 0] == 100.0 + 2
    assert rows.next_chunk[i].abs().max() <= 1.0
    # env 1 ended after one chunk: its one row is a 1-chunk transition; each env's last row too
    assert rows.reward[by_start[1.0]] == 1.0 and rows.reward[by_start[102.0]] == 102.0
    assert agent.rank_state()["buffer"]["size"] == 7


def test_anchored_update_is_exactly_zero_when_q_is_flat_and_the_papers_is_not(tiny_push):
    from simpo_robot.rl.simpo import SimpoTransition

    agent, actor = _simpo_agent(tiny_push)
    assert agent.cfg.self_fit == "pi_old"

    class Flat(torch.nn.Module):
        def forward(self, obs, chunk):
            return TwinQ(torch.zeros(obs.shape[0]), torch.zeros(obs.shape[0]))

    agent.critic = Flat()
    batch = _chunk_batch(actor, 2, [True, True], [True, True], 0.0).transition
    ab = agent.actor_batch(SimpoTransition(*batch, batch.chunk), torch.Generator().manual_seed(0))
    torch.testing.assert_close(ab.weights, torch.ones_like(ab.weights))  # the critic cannot tell particles apart

    def grad_norm(anchor):
        actor.unet.zero_grad(set_to_none=True)
        agent.objective(ab.particles, ab.global_cond, ab.weights, torch.Generator().manual_seed(1), anchor).backward()
        return max(p.grad.abs().max().item() for p in actor.unet.parameters() if p.grad is not None)

    assert grad_norm(agent.pi_old) == 0.0  # pi_old is a copy of the actor: nothing to move
    assert grad_norm(None) > 1e-4  # the paper's loss re-fits the model to its own samples



def test_flow_policy_finetunes_with_the_weighted_flow_loss(tmp_path):
    from simpo_robot.deploy.testing import save_tiny_flow_policy

    flow = save_tiny_flow_policy(tmp_path / "flow", env_state_dim=18)
    out = tmp_path / "run"
    assert load_policy(flow).config.num_inference_steps != 1
    _run(flow, out, 200, "--final-eval-episodes", "1", "--num-inference-steps", "1")  # one Euler step
    info = json.loads((out / "final" / "training_info.json").read_text())
    assert info["algorithm"] == "simpo" and info["env_steps"] >= 200
    assert (out / "checkpoints" / "last" / "trainer_rank0.pt").is_file()  # the run ends between episodes
    reloaded = load_policy(out / "final")
    assert reloaded.config.type == "flow" and reloaded.config.num_inference_steps == 1
    from simpo_robot.rl.trainer import load_run

    assert load_run(out).loaded.config.num_inference_steps == 1
    before, after = load_policy(flow).policy.state_dict(), reloaded.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_flow_actor_samples_like_the_policy_and_dppo_refuses_flow(tmp_path, capsys):
    from simpo_robot.deploy.testing import save_tiny_flow_policy
    from simpo_robot.rl.actor import FlowActor, make_actor

    flow = save_tiny_flow_policy(tmp_path / "flow", env_state_dim=18)
    policy = load_policy(flow).policy
    actor = make_actor(policy)
    assert isinstance(actor, FlowActor)
    cond = torch.randn(3, 2 * 28, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, actor.horizon, actor.action_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = policy.flow.sample(cond, noise)
        ours = actor.sample(actor.unet, cond, noise=noise)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    code = main(["finetune", "--policy", str(flow), "--task", "fetch_push", "--algo", "dppo", "--out", str(tmp_path / "x")])
    assert code == 1 and "needs a diffusion policy" in capsys.readouterr().err


def _dim0_after_updates(policy_dir, self_fit: str, weighting: str, bound: float, sign: float) -> float:
    """Mean first action dimension of the policy's samples after 30 SiMPO actor updates with Q = sign * dim 0."""
    from simpo_robot.rl.simpo import SimpoAgent, SimpoConfig, SimpoTransition

    torch.manual_seed(0)
    actor = DiffusionActor(load_policy(policy_dir).policy)
    cfg = SimpoConfig(particles=8, self_fit=self_fit, refresh_every=10)
    agent = SimpoAgent(cfg, weighting, bound, actor, obs_dim=2 * 28, device=torch.device("cpu"))

    class Dim0(torch.nn.Module):
        def forward(self, obs, chunk):
            q = sign * chunk.reshape(chunk.shape[0], -1, actor.action_dim)[..., 0].mean(-1)
            return TwinQ(q, q)

    agent.critic = Dim0()
    g = torch.Generator().manual_seed(0)
    state, env_state = torch.randn(16, 2, 10, generator=g), torch.randn(16, 2, 18, generator=g)
    chunks = torch.zeros(16, actor.horizon, actor.action_dim)
    batch = SimpoTransition(state, env_state, chunks, torch.zeros(16), torch.ones(16), state, env_state, chunks)
    opt = torch.optim.Adam(actor.unet.parameters(), lr=3e-3)
    for update in range(30):
        if update % cfg.refresh_every == 0:
            agent.pi_old.load_state_dict(actor.unet.state_dict())
        ab = agent.actor_batch(batch, g)
        loss = agent.objective(ab.particles, ab.global_cond, ab.weights, g, agent.pi_old if self_fit == "pi_old" else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = actor.sample(actor.unet, actor.global_cond(state, env_state), generator=torch.Generator().manual_seed(5))
    return actor.executed(x)[..., 0].mean().item()


@pytest.mark.parametrize("self_fit, weighting, bound", [("pi_old", "linear", -0.5), ("samples", "exp", 0.0)])
def test_actor_updates_follow_the_critic(tiny_push, self_fit, weighting, bound):
    """Same data, same noise, opposite critics (Q = +-dim 0): the policy ends higher on dim 0 under +dim 0.

    Comparing the two removes whatever the update does regardless of Q (re-fitting an untrained model)."""
    up = _dim0_after_updates(tiny_push, self_fit, weighting, bound, +1.0)
    down = _dim0_after_updates(tiny_push, self_fit, weighting, bound, -1.0)
    assert up > down + 0.02, (up, down)


def _agent_with_data(tiny_push, **overrides):
    """A prepared single-process SiMPO agent (one critic update per update() call) with 3 stored transitions;
    interleaved updates without critic resets unless overridden."""
    agent, actor = _simpo_agent(tiny_push, **{"critic_updates": 1, "actor_starts": 0, "batch_size": 4,
                                              "actor_batch_size": 2, "actor_burst": 1, "critic_reset": False,
                                              **overrides})
    agent.set_prepared({}, lambda m: m)
    g = torch.Generator().manual_seed(0)
    agent.observe(_chunk_batch(actor, 3, [True, True, True], [True, True, True], 0.0), g)
    return agent, g


def _plain_step(loss, optimizer, module) -> bool:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return True


def test_weighting_critic_is_a_frozen_copy_refreshed_every_n_actor_updates(tiny_push):
    from simpo_robot.rl.simpo import SimpoConfig

    agent, g = _agent_with_data(tiny_push, weighting_critic_every=2, actor_every=1)

    def same() -> bool:
        online, frozen = agent.critic.state_dict(), agent.weighting_critic.state_dict()
        return all(torch.equal(online[k], frozen[k]) for k in online)

    copies = []
    for _ in range(4):  # each call: one critic update, then one actor update (copying first at 0 and 2)
        agent.update(_plain_step, lambda x: x, g, torch.Generator().manual_seed(1), lambda m: m, env_steps=10)
        copies.append(same())
    assert copies == [True, False, True, False]
    assert agent.weighting_critic in agent.shared_state() and not any(
        p.requires_grad for p in agent.weighting_critic.parameters())

    class Flat(torch.nn.Module):
        def forward(self, obs, chunk):
            return TwinQ(torch.zeros(obs.shape[0]), torch.zeros(obs.shape[0]))

    agent.weighting_critic = Flat()  # the frozen copy, not the online critic, weights the particles
    batch = agent._sample(2, torch.Generator().manual_seed(2))
    torch.testing.assert_close(agent.actor_batch(batch, g).weights, torch.ones(2 * agent.cfg.particles))
    assert SimpoConfig(weighting_critic_every=0).weighting_critic_every == 0
    with pytest.raises(ValueError, match="weighting_critic_every"):
        SimpoConfig(weighting_critic_every=-1)


def test_actor_burst_runs_n_actor_updates_in_a_row_at_the_same_ratio(tiny_push):
    from simpo_robot.rl.simpo import SimpoConfig

    agent, g = _agent_with_data(tiny_push, actor_burst=3, actor_every=2)

    counts = []
    for _ in range(12):  # one critic update per call; three actor updates after every 2 * 3 of them
        critic_before = {k: v.clone() for k, v in agent.critic.state_dict().items()}
        may_overlap = agent.can_overlap(env_steps=10)
        metrics = agent.update(_plain_step, lambda x: x, g, torch.Generator().manual_seed(1), lambda m: m, env_steps=10)
        counts.append(agent.actor_updates)
        assert ("losses/actor" in metrics) == (agent.critic_updates % 6 == 0)
        assert may_overlap == ("losses/actor" not in metrics)  # the trainer overlaps only critic-only rounds
        assert not all(torch.equal(critic_before[k], v) for k, v in agent.critic.state_dict().items())
    assert counts == [0, 0, 0, 0, 0, 3, 3, 3, 3, 3, 3, 6]
    assert agent.critic_updates == 12  # the same ratio as one actor update every 2 critic updates
    agent.critic_updates = 5  # a burst is due, but not before actor_starts; actor targets draw from `generator`
    assert not agent.can_overlap(env_steps=10) and agent.can_overlap(env_steps=-1)
    agent.cfg.target = "actor"
    assert not agent.can_overlap(env_steps=-1)
    with pytest.raises(ValueError, match="actor_burst"):
        SimpoConfig(actor_burst=0)


def test_critic_reset_restarts_the_critic_after_each_burst(tiny_push):
    agent, g = _agent_with_data(tiny_push, actor_burst=2, actor_every=2, critic_reset=True)
    init = {k: v.clone() for k, v in agent.critic.state_dict().items()}

    def at_init(module) -> bool:
        return all(torch.equal(init[k], v) for k, v in module.state_dict().items())

    resets = []
    for _ in range(8):  # a burst (then the reset) after every 4th critic update
        agent.update(_plain_step, lambda x: x, g, torch.Generator().manual_seed(1), lambda m: m, env_steps=10)
        resets.append(at_init(agent.critic) and at_init(agent.critic_target) and not agent.critic_opt.state)
    assert resets == [False, False, False, True, False, False, False, True]
    assert agent.actor_updates == 4


def test_resume_compares_the_reward_trained_on_not_the_flag(tmp_path):
    from simpo_robot.errors import SimpoRobotError
    from simpo_robot.rl.trainer import FinetuneConfig, _check_resumable, _write_config

    for task, resumable in (("fetch_pick_place", True), ("fetch_push", False)):  # no shaped reward / a dense one
        out = tmp_path / task
        (out / "checkpoints" / "last").mkdir(parents=True)
        (out / "checkpoints" / "last" / "trainer_rank0.pt").write_bytes(b"")
        _write_config(FinetuneConfig(policy="p", task=task, out=out, shaped_reward=False), out)
        again = FinetuneConfig(policy="p", task=task, out=out, shaped_reward=True, resume=out)
        if resumable:
            assert _check_resumable(again, out) == out / "checkpoints" / "last"
        else:
            with pytest.raises(SimpoRobotError, match="shaped_reward: saved False, now True"):
                _check_resumable(again, out)
