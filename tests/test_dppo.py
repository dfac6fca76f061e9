"""DPPO: GAE against a hand computation, the Gaussian denoising step against diffusers, and the CLI."""

import copy
import json
import math

import pytest
import torch
from diffusers import DDIMScheduler

from simpo_robot.cli import main
from simpo_robot.deploy.testing import save_tiny_policy
from simpo_robot.policy_io import load_policy
from simpo_robot.rl.actor import step_tables
from simpo_robot.rl.dppo import clip_schedule, gae, gaussian_logprob, gaussian_steps, step_logprob, step_mean


def test_gae_hand_computed():
    # One env, three chunks; the episode ends (truncation) after chunk 1, so the trace is cut there.
    rewards = torch.tensor([[1.0], [2.0], [0.5]])
    values = torch.tensor([[0.5], [1.0], [2.0]])
    next_values = torch.tensor([[1.0], [3.0], [4.0]])
    discounts = torch.tensor([[0.25], [0.5], [0.0]])  # gamma^steps; chunk 2 terminated -> 0
    gamma_steps = torch.tensor([[0.25], [0.5], [0.5]])
    ended = torch.tensor([[False], [True], [True]])
    adv = gae(rewards, values, next_values, discounts, gamma_steps, ended, lam=0.5)
    d0 = 1.0 + 0.25 * 1.0 - 0.5  # 0.75
    d1 = 2.0 + 0.5 * 3.0 - 1.0  # 2.5
    d2 = 0.5 + 0.0 * 4.0 - 2.0  # -1.5
    expected = [d0 + 0.25 * 0.5 * d1, d1, d2]  # A1 does not look past the end of its episode
    torch.testing.assert_close(adv.squeeze(1), torch.tensor(expected))


def test_gaussian_logprob_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    x, mean = torch.randn(5, 4, 3, generator=gen), torch.randn(5, 4, 3, generator=gen)
    torch.testing.assert_close(gaussian_logprob(x, mean, 0.3), torch.distributions.Normal(mean, 0.3).log_prob(x))
    std = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]).reshape(5, 1, 1)
    torch.testing.assert_close(gaussian_logprob(x, mean, std), torch.distributions.Normal(mean, std).log_prob(x))


def test_step_logprob_averages_the_clamped_executed_actions():
    # One sample, horizon 3, 2 action dims, std 1; actions 1..2 are executed, action 0 is not.
    mean = torch.zeros(1, 3, 2)
    x = torch.tensor([[[9.0, 9.0], [0.0, 1.0], [2.0, 4.0]]])
    c = -0.5 * math.log(2 * math.pi)  # log N(0; 0, 1)
    elems = [c, c - 0.5, c - 2.0, max(c - 8.0, -5.0)]  # the last one (z = 4) is clamped to -5
    assert elems[-1] == -5.0
    torch.testing.assert_close(step_logprob(x, mean, 1.0, start=1, length=2), torch.tensor([sum(elems) / 4]))
    # the unexecuted action changes nothing; the largest value is capped at 2 (std 0.01: log-density 3.69)
    x2 = x.clone()
    x2[0, 0] = -3.0
    torch.testing.assert_close(step_logprob(x2, mean, 1.0, 1, 2), step_logprob(x, mean, 1.0, 1, 2))
    assert step_logprob(torch.zeros(1, 3, 2), mean, 0.01, 0, 3).item() == pytest.approx(2.0)


def test_clip_schedule_grows_exponentially_from_base_to_final():
    clips = clip_schedule(3, base=1e-3, final=1e-2, rate=3.0)
    mid = 1e-3 + 9e-3 * (math.exp(1.5) - 1) / (math.exp(3.0) - 1)
    torch.testing.assert_close(clips, torch.tensor([1e-3, mid, 1e-2]))
    assert clip_schedule(1, 1e-3, 1e-2, 3.0).tolist() == pytest.approx([1e-2])
    assert torch.all(clip_schedule(10, 1e-3, 1e-2, 3.0).diff() > 0)


@pytest.fixture(scope="module")
def tiny_push(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny") / "policy", env_state_dim=18,
                            noise_scheduler_type="DDIM", num_inference_steps=10)


def test_stochastic_step_equals_diffusers_ddim_eta_one(tiny_push):
    config = copy.deepcopy(load_policy(tiny_push).config)
    config.clip_sample = False  # diffusers recomputes eps after clipping; compare the unclipped step
    tables = step_tables(config, 5, scheduler="DDIM")
    steps = gaussian_steps(tables, min_std=1e-12)
    scheduler = DDIMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                              clip_sample=False, prediction_type="epsilon", set_alpha_to_one=True)
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(0)
    for k, t in enumerate(scheduler.timesteps[:-1]):  # the last step has sigma 0 in diffusers (floored here)
        x, eps, z = (torch.randn(2, 16, 4, generator=gen) for _ in range(3))
        theirs = scheduler.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        ours = step_mean(x, eps, k, tables, steps) + steps.std[k] * z
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # per-sample step indices give the same means as one index at a time
    x, eps = torch.randn(3, 16, 4, generator=gen), torch.randn(3, 16, 4, generator=gen)
    ks = torch.tensor([0, 2, 4])
    together = step_mean(x, eps, ks, tables, steps)
    for row, k in enumerate(ks.tolist()):
        torch.testing.assert_close(together[row], step_mean(x[row:row + 1], eps[row:row + 1], k, tables, steps)[0])
    assert steps.std.min() >= 1e-12 and gaussian_steps(tables, 0.1).std.min() == pytest.approx(0.1)


def test_dppo_cli_end_to_end(tiny_push, tmp_path):
    out = tmp_path / "dppo"
    args = ["finetune", "--algo", "dppo", "--policy", str(tiny_push), "--task", "fetch_push", "--env-steps", "200",
            "--num-envs", "2", "--final-eval-episodes", "1", "--eval-every", "0", "--dppo.n-steps", "7",
            "--dppo.epochs", "2", "--dppo.minibatch-size", "64", "--dppo.denoising-steps", "4",
            "--dppo.ft-denoising-steps", "2", "--log-every", "7", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ppo_iterations"] == 2  # 200 env steps = 2 episodes of 7 chunks x 2 envs
    assert summary["updates"] == 2 * 2 * 2 * ((2 * 7 * 2 + 63) // 64)  # iters x epochs x (policy+value) x minibatches
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("losses/policy" in m and "losses/value" in m for m in metrics)
    info = json.loads((out / "final" / "training_info.json").read_text())
    assert info["algorithm"] == "dppo" and info["algorithm_params"]["ft_denoising_steps"] == 2
    assert not (out / "final" / "critic.json").exists()  # a state value cannot rank chunks: nothing to act by
    before = load_policy(tiny_push).policy.state_dict()
    after = load_policy(out / "final").policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_ppo_ratio_is_one_before_any_update(tiny_push):
    """The log-densities the update recomputes from the stored chains equal those recorded while acting."""
    from simpo_robot.rl.actor import DiffusionActor
    from simpo_robot.rl.agent import ChunkBatch
    from simpo_robot.rl.dppo import DppoAgent, DppoConfig
    from simpo_robot.rl.replay import Transition

    for ft in (10, 4):  # every denoising step fine-tuned, and only the last 4 (the first 6 from a frozen copy)
        actor = DiffusionActor(load_policy(tiny_push).policy)
        cfg = DppoConfig(n_steps=2, epochs=1, minibatch_size=10_000, ft_denoising_steps=ft)
        agent = DppoAgent(cfg, 0.99, actor, obs_dim=2 * 28, device=torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        envs = 3
        for _ in range(cfg.n_steps):
            state, env_state = torch.randn(envs, 2, 10, generator=gen), torch.randn(envs, 2, 18, generator=gen)
            chunk, extras = agent.act(actor.global_cond(state, env_state), gen)
            tr = Transition(state, env_state, chunk, torch.randn(envs, generator=gen), torch.ones(envs),
                            torch.randn(envs, 2, 10, generator=gen), torch.randn(envs, 2, 18, generator=gen))
            agent.observe(ChunkBatch(tr, torch.ones(envs, dtype=torch.bool), torch.zeros(envs, dtype=torch.bool),
                                     torch.ones(envs), extras), gen)
        assert extras["logprob"].shape == (envs, ft)
        # one minibatch holding every (chunk, step) pair, and no optimiser step: the ratio must be exactly 1
        metrics = agent.update(lambda loss, optimizer, module: True, lambda x: x, gen, torch.Generator().manual_seed(0),
                               lambda m: m, 0)
        assert metrics["dppo/clip_frac"] == 0.0
        assert metrics["dppo/approx_kl"] == pytest.approx(0.0, abs=1e-6)
