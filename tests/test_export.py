"""Export: the bundle loads in LeRobot, the explicit sampler is LeRobot's, ONNX matches torch."""

import json

import numpy as np
import pytest
import torch

from simpo_robot.deploy.bundle import MANIFEST_FILE, ONNX_FILE, BundleManifest, ObservationError, PolicyEngine
from simpo_robot.deploy.export import ExportConfig, run_export
from simpo_robot.deploy.sampler import SamplerNoise, SamplerSettings, make_tables
from simpo_robot.deploy.testing import save_tiny_policy
from simpo_robot.errors import SimpoRobotError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    save_tiny_policy(root / "policy")
    return run_export(ExportConfig(policy=str(root / "policy"), out=root / "bundle", control_hz=25.0)).bundle


def _observation(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "observation.state": rng.uniform(-1, 1, (2, 10)).astype(np.float32),
        "observation.environment_state": rng.uniform(-1, 1, (2, 25)).astype(np.float32),
    }


def test_bundle_layout_loads_with_lerobot_factory(bundle):
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    names = {p.name for p in bundle.iterdir()}
    assert {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json",
            MANIFEST_FILE, ONNX_FILE} <= names
    # What LeRobot's async-inference policy server does with `pretrained_name_or_path`.
    policy = DiffusionPolicy.from_pretrained(bundle)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(bundle))
    assert pre is not None and post is not None
    manifest = BundleManifest.read(bundle)
    assert manifest.control_hz == 25.0
    assert manifest.n_action_steps == 8 and manifest.n_obs_steps == 2 and manifest.action_shape == [4]
    assert manifest.observation_features == {"observation.state": [10], "observation.environment_state": [25]}
    assert manifest.sampler.noise_scheduler_type == "DDPM" and manifest.sampler.num_inference_steps == 10
    assert BundleManifest.from_dict(json.loads((bundle / MANIFEST_FILE).read_text())) == manifest


def test_explicit_sampler_reproduces_lerobot_predict_action_chunk(bundle):
    engine = PolicyEngine.load(bundle, "torch")
    obs = _observation(0)
    # LeRobot draws the DDPM step noise from torch's global RNG: draw the same numbers up front.
    k, shape = len(engine.tables.timesteps), (1, 16, 4)
    initial = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    steps = np.zeros((k, *shape), dtype=np.float32)
    for i, t in enumerate(engine.tables.timesteps):
        if t > 0:
            steps[i] = torch.randn(shape).numpy()
    torch.manual_seed(7)
    engine.policy.reset()
    batch = engine.preprocessor({name: torch.from_numpy(v).unsqueeze(0) for name, v in obs.items()})
    expected = engine.postprocessor(engine.policy.predict_action_chunk(batch, noise=initial.clone()))[0].numpy()
    got = engine.infer(obs, noise=SamplerNoise(initial=initial.numpy(), steps=steps)).actions
    assert got.shape == (8, 4)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_onnx_gives_torch_actions_for_same_observation_and_noise(bundle):
    torch_engine, onnx_engine = PolicyEngine.load(bundle, "torch"), PolicyEngine.load(bundle, "onnx")
    for seed in range(3):
        obs = _observation(seed)
        noise = torch_engine.draw_noise(np.random.default_rng(seed))
        a = torch_engine.infer(obs, noise=noise).actions
        b = onnx_engine.infer(obs, noise=noise).actions
        rel = np.abs(a - b).max() / np.abs(a).max()
        assert rel < 1e-4, rel
    check = BundleManifest.read(bundle).export_check
    assert check is not None and check.rel_error < 1e-4


def test_batched_inference_equals_one_by_one(bundle):
    """The server batches concurrent requests: each request's chunk depends only on its own seed."""
    engine = PolicyEngine.load(bundle, "onnx")
    observations = [_observation(seed) for seed in range(4)]
    batched = engine.infer_batch(observations, seeds=[10, 11, 12, 13])
    assert [r.timing.batch for r in batched] == [4] * 4
    for obs, seed, result in zip(observations, [10, 11, 12, 13], batched, strict=True):
        np.testing.assert_allclose(result.actions, engine.infer(obs, seed=seed).actions, atol=1e-5, rtol=0)


def test_noise_scale_scales_the_initial_sample_only(bundle):
    engine, scaled = PolicyEngine.load(bundle, "onnx"), PolicyEngine.load(bundle, "onnx", noise_scale=0.5)
    full, half = engine.draw_noise(np.random.default_rng(3)), scaled.draw_noise(np.random.default_rng(3))
    np.testing.assert_array_equal(half.initial, 0.5 * full.initial)  # the same draws, x_T scaled
    np.testing.assert_array_equal(half.steps, full.steps)  # a DDPM sampler's per-step noise as drawn
    obs = _observation(0)
    explicit = scaled.infer(obs, noise=full).actions  # explicit noise is used as given
    np.testing.assert_allclose(explicit, engine.infer(obs, seed=3).actions, atol=1e-6, rtol=0)
    assert not np.allclose(scaled.infer(obs, seed=3).actions, engine.infer(obs, seed=3).actions, atol=1e-3)
    np.testing.assert_allclose(scaled.infer(obs, noise=half).actions, scaled.infer(obs, seed=3).actions, atol=1e-6)
    for bad in (-1.0, float("nan")):
        with pytest.raises(SimpoRobotError, match="noise_scale"):
            PolicyEngine.load(bundle, "onnx", noise_scale=bad)


def test_ddim_tables_match_diffusers_step():
    """One DDIM step from the tables equals DDIMScheduler.step (epsilon, clipped) on arange-based inputs."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    settings = SamplerSettings("DDIM", 100, 10, "squaredcos_cap_v2", 1e-4, 0.02, "epsilon", True, 1.0)
    tables = make_tables(settings)
    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    scheduler.set_timesteps(10)
    assert tables.timesteps.tolist() == scheduler.timesteps.tolist()
    x = torch.arange(8, dtype=torch.float32).reshape(1, 2, 4) / 8
    eps = torch.arange(8, 0, -1, dtype=torch.float32).reshape(1, 2, 4) / 8
    for k in (0, 5, 9):
        t = int(tables.timesteps[k])
        expected = scheduler.step(eps, t, x).prev_sample.numpy()
        x0 = np.clip((x.numpy() - tables.sqrt_one_minus_alpha_prod[k] * eps.numpy()) / tables.sqrt_alpha_prod[k], -1, 1)
        got = tables.x0_coeff[k] * x0 + tables.eps_coeff[k] * eps.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_engine_rejects_bad_observations(bundle):
    engine = PolicyEngine.load(bundle, "onnx")
    good = _observation(0)
    cases = {
        "missing": {"observation.state": good["observation.state"]},
        "shape": {**good, "observation.state": good["observation.state"][0]},
        "dtype": {**good, "observation.state": good["observation.state"].astype(np.int32)},
        "nan": {**good, "observation.state": np.full((2, 10), np.nan, dtype=np.float32)},
        "extra": {**good, "observation.stat": good["observation.state"]},
    }
    for name, obs in cases.items():
        with pytest.raises(ObservationError):
            engine.validate(obs)
            pytest.fail(f"{name} was accepted")


def test_export_refuses_to_overwrite(bundle):
    with pytest.raises(SimpoRobotError, match="not empty"):
        run_export(ExportConfig(policy=str(bundle), out=bundle))


def test_cli_export_and_clear_errors(bundle, tmp_path):
    from simpo_robot.cli import main

    assert main(["export", "--policy", str(bundle), "--out", str(tmp_path / "again")]) == 0
    assert BundleManifest.read(tmp_path / "again").control_hz == 25.0  # kept from the source bundle
    assert main(["export", "--policy", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1


def test_best_of_answers_with_the_chunk_the_critic_rates_highest(bundle, tmp_path):
    import shutil

    from simpo_robot.rl.critic import TwinCritic, save_critic

    with pytest.raises(SimpoRobotError, match="has no critic"):
        PolicyEngine.load(bundle, "torch", best_of=4)  # a pretrained policy: nothing to act by
    acting = tmp_path / "bundle"
    shutil.copytree(bundle, acting)
    manifest = BundleManifest.read(acting)
    obs_dim = manifest.n_obs_steps * (10 + 25)
    critic = TwinCritic(obs_dim, manifest.n_action_steps * manifest.action_dim, (1,))
    with torch.no_grad():  # Q increases with the first executed action's first (normalised) coordinate
        for q in (critic.q1, critic.q2):
            q[0].weight.zero_()
            q[0].weight[0, obs_dim] = 1.0
            q[0].bias.fill_(5.0)  # keeps Mish's input where it is increasing
            q[2].weight.fill_(1.0)
            q[2].bias.zero_()
    save_critic(acting, critic, {"task": "test"})
    plain, best = PolicyEngine.load(acting, "torch"), PolicyEngine.load(acting, "torch", best_of=4)
    obs = _observation(0)
    draws = best.draw_noise(np.random.default_rng(5), batch=4)  # what best.infer(seed=5) samples
    candidates = [plain.infer(obs, noise=SamplerNoise(draws.initial[i:i + 1], draws.steps[:, i:i + 1])).actions
                  for i in range(4)]
    chosen = best.infer(obs, seed=5).actions
    winner = int(np.argmax([c[0, 0] for c in candidates]))
    np.testing.assert_allclose(chosen, candidates[winner], atol=1e-5, rtol=0)
    assert len({round(float(c[0, 0]), 4) for c in candidates}) == 4  # four different chunks to choose from
    with pytest.raises(SimpoRobotError, match="noise_scale 1"):
        PolicyEngine.load(acting, "torch", noise_scale=0.0, best_of=4)


def test_export_carries_a_simpo_runs_critic(tmp_path):
    from simpo_robot.rl.critic import TwinCritic, load_critic, save_critic

    save_tiny_policy(tmp_path / "policy")
    critic = TwinCritic(2 * (10 + 25), 8 * 4, (8,))
    save_critic(tmp_path / "policy", critic, {"task": "test"})
    out = run_export(ExportConfig(policy=str(tmp_path / "policy"), out=tmp_path / "bundle", control_hz=25.0)).bundle
    exported, card = load_critic(out)
    assert card.trained_on == {"task": "test"}
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in critic.state_dict().items())
