"""The flow policy type: Euler math on hand-computable fields, LeRobot registration, the training loss's
convention, the numpy sampler vs the torch policy, ONNX export parity, serving, eval and run-sim."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from simpo_robot.deploy.bundle import FLOW_ONNX_FILE, MANIFEST_FILE, BundleManifest, PolicyEngine
from simpo_robot.deploy.client import PolicyClient
from simpo_robot.deploy.export import ExportConfig, run_export
from simpo_robot.deploy.sampler import (
    FlowSamplerSettings,
    SamplerNoise,
    TorchVelocity,
    euler_step,
    euler_times,
    sample_flow,
)
from simpo_robot.deploy.server import BackgroundServer, ServeConfig
from simpo_robot.deploy.testing import save_tiny_flow_policy, save_tiny_policy
from simpo_robot.errors import SimpoRobotError
from simpo_robot.policies.flow import FlowConfig, FlowPolicy
from simpo_robot.policies.flow.modeling_flow import euler_sample
from simpo_robot.policies.flow.modeling_flow import euler_times as torch_euler_times
from simpo_robot.simpo.matching import flow_interpolate

torch.set_num_threads(1)
UNCLIPPED = dict(clip_sample=False, clip_sample_range=1.0)


def _numpy_sample(velocity, x0: np.ndarray, k: int, cond: np.ndarray | None = None, **settings) -> np.ndarray:
    cond = np.zeros((x0.shape[0], 1), np.float32) if cond is None else cond
    noise = SamplerNoise(initial=x0.astype(np.float32), steps=np.zeros((0, *x0.shape), np.float32))
    return sample_flow(velocity, cond, noise, FlowSamplerSettings(num_inference_steps=k, **(settings or UNCLIPPED)))


# ---- the Euler math, exact ---------------------------------------------------------------------------------

def test_euler_times_are_k_over_K():
    assert euler_times(1).tolist() == [0.0]
    assert euler_times(4).tolist() == [0.0, 0.25, 0.5, 0.75]
    assert torch_euler_times(4).tolist() == euler_times(4).tolist()
    np.testing.assert_array_equal(torch_euler_times(10).numpy(), euler_times(10))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="Euler steps"):
            euler_times(bad)
        with pytest.raises(ValueError, match="Euler steps"):
            torch_euler_times(bad)


def test_one_step_is_x_plus_v_at_t0():
    x0 = np.arange(8, dtype=np.float32).reshape(1, 2, 4) / 8
    seen = []

    def velocity(x, t, cond):
        seen.append(t.copy())
        return 2.0 * x + 1.0 + t[:, None, None]

    got = _numpy_sample(velocity, x0, 1)
    np.testing.assert_array_equal(got, x0 + (2.0 * x0 + 1.0))
    assert [s.tolist() for s in seen] == [[0.0]]
    np.testing.assert_array_equal(euler_step(x0, np.ones_like(x0), 0.5), x0 + 0.5)


@pytest.mark.parametrize("k", [1, 2, 4, 10])
def test_hand_computable_fields(k):
    x0 = (np.arange(6, dtype=np.float32).reshape(2, 1, 3) - 2.5) / 4
    # v = c: x_K = x_0 + c for any K (float32 sum of K increments c/K)
    np.testing.assert_allclose(_numpy_sample(lambda x, t, c: np.full_like(x, 0.3), x0, k), x0 + 0.3, atol=1e-6, rtol=0)
    # v = t: x_K = x_0 + sum_k (1/K)(k/K) = x_0 + (K - 1) / (2K)
    got = _numpy_sample(lambda x, t, c: np.broadcast_to(t[:, None, None], x.shape), x0, k)
    np.testing.assert_allclose(got, x0 + (k - 1) / (2 * k), atol=1e-6, rtol=0)
    # v = -x: x_K = x_0 (1 - 1/K)^K
    np.testing.assert_allclose(_numpy_sample(lambda x, t, c: -x, x0, k), x0 * (1 - 1 / k) ** k, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_the_straight_path_to_a_point_is_exact_for_any_k(k):
    """The rectified-flow field of a point mass a, v(x, t) = (a - x) / (1 - t), carries every x_0 to a:
    Euler moves along the straight line x_t = t a + (1 - t) x_0 (flow_interpolate's path) exactly."""
    a = np.array([[[0.5, -0.25, 0.125]]], dtype=np.float32)
    x0 = np.array([[[-1.0, 2.0, 0.0]]], dtype=np.float32)
    got = _numpy_sample(lambda x, t, c: (a - x) / (1 - t[:, None, None]), x0, k)
    np.testing.assert_allclose(got, a, atol=1e-6, rtol=0)
    torch_got = euler_sample(lambda x, t, c: (torch.from_numpy(a) - x) / (1 - t[:, None, None]), None,
                             torch.from_numpy(x0), k)
    np.testing.assert_allclose(torch_got.numpy(), a, atol=1e-6, rtol=0)
    # ... and the path is the one the loss trains on: x_t = t a + (1 - t) eps, target a - eps
    path = flow_interpolate(torch.from_numpy(a), torch.from_numpy(x0), torch.tensor([0.25]))
    np.testing.assert_allclose(path.x_t.numpy(), 0.25 * a + 0.75 * x0, atol=1e-7)
    np.testing.assert_array_equal(path.target.numpy(), a - x0)


def test_clip_applies_to_the_final_sample():
    x0 = np.zeros((1, 1, 2), np.float32)
    v = lambda x, t, c: np.full_like(x, 3.0)  # noqa: E731
    assert _numpy_sample(v, x0, 2, clip_sample=True, clip_sample_range=1.0).tolist() == [[[1.0, 1.0]]]
    assert _numpy_sample(v, x0, 2).tolist() == [[[3.0, 3.0]]]


def test_settings_reject_zero_steps():
    with pytest.raises(ValueError, match="Euler steps K"):
        FlowSamplerSettings(num_inference_steps=0, clip_sample=True, clip_sample_range=1.0)
    with pytest.raises(ValueError, match="Euler steps K"):
        FlowConfig(num_inference_steps=0, device="cpu")


# ---- the policy type in LeRobot -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_flow_policy(tmp_path_factory.mktemp("flow") / "policy", env_state_dim=18)


def test_registered_with_lerobot_factory(tiny):
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    assert "flow" in PreTrainedConfig.get_known_choices()
    assert get_policy_class("flow") is FlowPolicy
    config = PreTrainedConfig.from_pretrained(tiny)
    assert isinstance(config, FlowConfig) and config.type == "flow" and config.num_inference_steps == 4
    assert json.loads((tiny / "config.json").read_text())["type"] == "flow"
    policy = FlowPolicy.from_pretrained(tiny, strict=True)
    again = get_policy_class(config.type).from_pretrained(tiny, config=config, strict=True)
    for (name, a), (_, b) in zip(policy.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    pre, post = make_pre_post_processors(config, pretrained_path=str(tiny))
    assert pre is not None and post is not None


def test_make_policy_builds_a_fresh_flow_policy_from_dataset_features():
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    class Meta:  # what make_policy reads from LeRobotDatasetMetadata
        features = {"observation.state": {"dtype": "float32", "shape": (10,), "names": None},
                    "observation.environment_state": {"dtype": "float32", "shape": (18,), "names": None},
                    "action": {"dtype": "float32", "shape": (4,), "names": None}}
        stats = None

    policy = make_policy(FlowConfig(down_dims=(16, 32), horizon=8, n_action_steps=4, device="cpu"), ds_meta=Meta())
    assert isinstance(policy, FlowPolicy)
    assert policy.config.output_features == {"action": PolicyFeature(FeatureType.ACTION, (4,))}
    pre, post = make_pre_post_processors(policy.config, dataset_stats=None)
    assert [type(s).__name__ for s in pre.steps][-1] == "NormalizerProcessorStep"


def test_policy_io_loads_both_types(tiny, tmp_path):
    from simpo_robot.policy_io import load_policy

    flow = load_policy(tiny)
    assert isinstance(flow.policy, FlowPolicy) and flow.config.type == "flow"
    diffusion = load_policy(save_tiny_policy(tmp_path / "diffusion"))
    assert diffusion.config.type == "diffusion"


def test_config_rejects_camera_features():
    from lerobot.configs.types import FeatureType, PolicyFeature

    config = FlowConfig(input_features={"observation.state": PolicyFeature(FeatureType.STATE, (2,)),
                                        "observation.image": PolicyFeature(FeatureType.VISUAL, (3, 8, 8))},
                        output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))}, device="cpu")
    with pytest.raises(ValueError, match="state-only"):
        FlowPolicy(config)


def test_velocity_scales_t_once(tiny):
    flow = FlowPolicy.from_pretrained(tiny).flow
    x, cond = torch.randn(3, 16, 4), torch.randn(3, flow.global_cond_dim)
    t = torch.tensor([0.0, 0.3, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(flow.velocity(x, t, cond), flow.unet(x, t * 100.0, global_cond=cond), atol=0, rtol=0)


def test_loss_is_the_flow_matching_loss_of_matching_py(tiny):
    """compute_loss = mean (v(t a + (1 - t) eps, t) - (a - eps))^2 with eps then t drawn from the generator."""
    policy = FlowPolicy.from_pretrained(tiny)
    g = torch.Generator().manual_seed(0)
    batch = {"observation.state": torch.randn(5, 2, 10, generator=g),
             "observation.environment_state": torch.randn(5, 2, 18, generator=g),
             "action": torch.rand(5, 16, 4, generator=g) * 2 - 1, "action_is_pad": torch.zeros(5, 16, dtype=torch.bool)}
    with torch.no_grad():
        loss = policy.flow.compute_loss(batch, generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        eps, t = torch.randn(5, 16, 4, generator=g), torch.rand(5, generator=g)
        cond = policy.flow._prepare_global_conditioning(batch)
        x_t = t[:, None, None] * batch["action"] + (1 - t[:, None, None]) * eps
        expected = ((policy.flow.velocity(x_t, t, cond) - (batch["action"] - eps)) ** 2).mean()
    torch.testing.assert_close(loss, expected, atol=0, rtol=0)
    loss, out = policy.train()(batch)
    loss.backward()
    assert out is None and all(p.grad is not None for p in policy.flow.unet.parameters())


def test_conditioning_orders_features_as_lerobot_diffusion():
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionModel

    feats = dict(input_features={"observation.state": PolicyFeature(FeatureType.STATE, (3,)),
                                 "observation.environment_state": PolicyFeature(FeatureType.ENV, (2,))},
                 output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))},
                 horizon=8, n_action_steps=4, down_dims=(8, 16), n_groups=4, diffusion_step_embed_dim=8, device="cpu")
    batch = {"observation.state": torch.arange(12.0).reshape(2, 2, 3),
             "observation.environment_state": -torch.arange(8.0).reshape(2, 2, 2)}
    theirs = DiffusionModel(DiffusionConfig(**feats, pretrained_backbone_weights=None))._prepare_global_conditioning(batch)
    ours = FlowPolicy(FlowConfig(**feats)).flow._prepare_global_conditioning(batch)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("k", [1, 4, 10])
def test_numpy_sampler_equals_torch_policy(tiny, k):
    """The deploy loop (numpy around TorchVelocity) and FlowModel.sample agree for the same noise and K."""
    flow = FlowPolicy.from_pretrained(tiny).flow
    rng = np.random.default_rng(k)
    cond = rng.standard_normal((3, flow.global_cond_dim), dtype=np.float32)
    noise = SamplerNoise.draw(rng, 3, 16, 4, 0)
    with torch.no_grad():
        want = flow.sample(torch.from_numpy(cond), torch.from_numpy(noise.initial), num_steps=k).numpy()
    got = sample_flow(TorchVelocity(flow), cond, noise, FlowSamplerSettings(k, True, 1.0))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_select_action_runs_chunks(tiny):
    from lerobot.policies.factory import make_pre_post_processors

    policy = FlowPolicy.from_pretrained(tiny)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(tiny))
    policy.reset()
    obs = {"observation.state": torch.zeros(1, 10), "observation.environment_state": torch.zeros(1, 18)}
    torch.manual_seed(0)
    first = [post(policy.select_action(pre(dict(obs)))) for _ in range(8)]
    torch.manual_seed(0)
    policy.reset()
    stacked = {k: v.unsqueeze(1).repeat(1, 2, 1) for k, v in pre(dict(obs)).items() if k in obs}  # (1, O, ...)
    chunk = post(policy.predict_action_chunk(stacked))
    assert chunk.shape == (1, 8, 4) and torch.all(chunk.abs() <= 2.0)
    torch.testing.assert_close(torch.stack(first, dim=1), chunk, atol=1e-6, rtol=0)


# ---- export, serve, eval, run-sim ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory) -> Path:
    """The tiny policy (K = 4) exported through the CLI with K overridden to 10."""
    from simpo_robot.cli import main

    out = tmp_path_factory.mktemp("flowb") / "bundle"
    assert main(["export", "--policy", str(tiny), "--out", str(out), "--control-hz", "25",
                 "--num-inference-steps", "10"]) == 0
    return out


def _observation(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"observation.state": rng.uniform(-1, 1, (2, 10)).astype(np.float32),
            "observation.environment_state": rng.uniform(-1, 1, (2, 18)).astype(np.float32)}


def test_export_writes_a_flow_bundle(bundle):
    manifest = BundleManifest.read(bundle)
    assert manifest.policy_type == "flow" and manifest.onnx_file == FLOW_ONNX_FILE
    assert (bundle / FLOW_ONNX_FILE).is_file() and not (bundle / "denoiser.onnx").exists()
    assert manifest.sampler == FlowSamplerSettings(num_inference_steps=10, clip_sample=True, clip_sample_range=1.0)
    assert json.loads((bundle / "config.json").read_text())["num_inference_steps"] == 10
    assert manifest.export_check.rel_error < 1e-4 and manifest.control_hz == 25.0
    assert BundleManifest.from_dict(json.loads((bundle / MANIFEST_FILE).read_text())) == manifest
    assert FlowPolicy.from_pretrained(bundle) is not None  # still a LeRobot policy folder


def test_engine_equals_policy_and_onnx_equals_torch(bundle):
    torch_engine, onnx_engine = PolicyEngine.load(bundle, "torch"), PolicyEngine.load(bundle, "onnx")
    for seed in range(3):
        obs = _observation(seed)
        noise = torch_engine.draw_noise(np.random.default_rng(seed))
        assert noise.steps.shape[0] == 0  # no noise after x_0
        a = torch_engine.infer(obs, noise=noise).actions
        b = onnx_engine.infer(obs, noise=noise).actions
        assert np.abs(a - b).max() / np.abs(a).max() < 1e-4
        policy = torch_engine.policy
        policy.reset()
        batch = torch_engine.preprocessor({k: torch.from_numpy(v).unsqueeze(0) for k, v in obs.items()})
        want = torch_engine.postprocessor(policy.predict_action_chunk(batch, noise=torch.from_numpy(noise.initial)))
        np.testing.assert_allclose(a, want[0].numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 4])
def test_onnx_velocity_matches_torch_at_other_step_counts(bundle, k):
    from simpo_robot.deploy.export import check_velocity_onnx

    flow = FlowPolicy.from_pretrained(bundle).flow
    settings = FlowSamplerSettings(k, clip_sample=False, clip_sample_range=1.0)
    check = check_velocity_onnx(flow, bundle / FLOW_ONNX_FILE, settings, 16, 4, flow.global_cond_dim, batch=8)
    assert check.rel_error < 1e-4, check


def test_export_refuses_other_policy_types(tiny, tmp_path):
    import shutil

    other = shutil.copytree(tiny, tmp_path / "act")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "type": "vqbet"}))
    with pytest.raises(SimpoRobotError):
        run_export(ExportConfig(policy=str(other), out=tmp_path / "b"))


def test_manifest_policy_type_must_match_the_checkpoint(bundle, tmp_path):
    import shutil

    copy = shutil.copytree(bundle, tmp_path / "copy")
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps({**raw, "policy_type": "diffusion"}))
    with pytest.raises(SimpoRobotError, match="not a valid bundle manifest"):
        BundleManifest.read(copy)  # Euler settings where DDIM settings are needed
    ddim = {"noise_scheduler_type": "DDIM", "num_train_timesteps": 100, "num_inference_steps": 10,
            "beta_schedule": "squaredcos_cap_v2", "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon",
            "clip_sample": True, "clip_sample_range": 1.0}
    (copy / MANIFEST_FILE).write_text(json.dumps({**raw, "policy_type": "diffusion", "sampler": ddim}))
    with pytest.raises(SimpoRobotError, match="config.json says 'flow'"):
        PolicyEngine.load(copy, "torch")


def test_server_round_trip(bundle):
    reference = PolicyEngine.load(bundle, "onnx")
    server = BackgroundServer(PolicyEngine.load(bundle, "onnx"), ServeConfig(bundle=bundle, port=0, backend="onnx"))
    with server as url, PolicyClient(url, timeout_s=10) as client:
        assert client.metadata.policy_type == "flow" and client.metadata.action_chunk == 8
        for seed in (0, 5):
            chunk = client.infer(_observation(seed), seed=seed)
            np.testing.assert_allclose(chunk.actions, reference.infer(_observation(seed), seed=seed).actions,
                                       atol=1e-5, rtol=0)


def test_eval_and_run_sim_on_fetch_push(tiny, bundle, tmp_path):
    from simpo_robot.deploy.run_sim import RunSimConfig, run_run_sim
    from simpo_robot.evaluate import EvalConfig, run_eval

    result = run_eval(EvalConfig(policy=str(tiny), task="fetch_push", episodes=2, batch_size=2, out=tmp_path / "e"))
    assert len(result.per_episode) == 2
    server = BackgroundServer(PolicyEngine.load(bundle, "onnx"), ServeConfig(bundle=bundle, port=0, backend="onnx"))
    with server as url:
        info = run_run_sim(RunSimConfig(server=url, task="fetch_push", episodes=1, out=tmp_path / "s"))
    assert info["aggregated"]["n_episodes"] == 1 and info["latency_ms"]["requests"] == 7


# ---- the shipped checkpoint ----------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parent.parent / "pretrained" / "fetch_push-flow"


def test_shipped_flow_checkpoint_loads_fits_and_has_a_card():
    from simpo_robot.policy_io import load_policy
    from simpo_robot.tasks import check_policy_fits_task, load_task

    assert (SHIPPED / "model.safetensors").stat().st_size < 6_000_000
    loaded = load_policy(SHIPPED)
    assert loaded.config.type == "flow" and loaded.config.down_dims == (32, 64, 128)
    check_policy_fits_task(loaded.config, load_task("fetch_push"))
    card = (SHIPPED / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: lerobot\n") and "## Rebuild it" in card
    assert "--policy_type flow" in card and "--task fetch_push --episodes 200 --seed 1000" in card


@pytest.mark.slow
def test_shipped_flow_checkpoint_reproduces_its_card(tmp_path):
    import re

    from simpo_robot.evaluate import EvalConfig, run_eval

    lo, hi = map(float, re.search(r"\| \[([\d.]+), ([\d.]+)\]% \|", (SHIPPED / "README.md").read_text()).groups())
    result = run_eval(EvalConfig(policy=str(SHIPPED), task="fetch_push", episodes=50, seed=1000, out=tmp_path))
    assert lo <= 100 * result.success_rate <= hi


def test_predict_action_chunk_without_history_needs_stacked_frames(tiny):
    policy = FlowPolicy.from_pretrained(tiny)
    with pytest.raises(ValueError, match=r"must be \(B, n_obs_steps=2, dim\).*select_action"):
        policy.predict_action_chunk({"observation.state": torch.zeros(1, 10),
                                     "observation.environment_state": torch.zeros(1, 18)})
