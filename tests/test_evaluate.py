"""eval: LeRobot's eval_info.json keys, same seed same result, Wilson CI, videos, clear errors."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest

from simpo_robot.cli import main
from simpo_robot.collect import CollectConfig, run_collect
from simpo_robot.errors import SimpoRobotError
from simpo_robot.evaluate import EvalConfig, evaluate_policy, run_eval, wilson_interval
from simpo_robot.policy_io import load_policy
from simpo_robot.pretrain import PretrainConfig, run_pretrain
from simpo_robot.tasks import load_task

TINY = dict(steps=2, batch_size=8, horizon=8, n_action_steps=4, down_dims=(8, 16), n_groups=4,
            diffusion_step_embed_dim=8, kernel_size=3, num_inference_steps=2)


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    run_collect(CollectConfig(task="fetch_reach", episodes=2, num_envs=2, out=root / "data"))
    return run_pretrain(PretrainConfig(task="fetch_reach", dataset=root / "data", out=root / "policy", **TINY)).path


def test_eval_info_keys_and_determinism(policy: Path, tmp_path: Path):
    cfg = EvalConfig(policy=str(policy), task="fetch_reach", episodes=3, seed=7, batch_size=2, out=tmp_path / "a")
    result = run_eval(cfg)
    info = json.loads((tmp_path / "a" / "eval_info.json").read_text())
    assert [e["seed"] for e in info["per_episode"]] == [7, 8, 9]
    assert set(info["per_episode"][0]) >= {"sum_reward", "max_reward", "success", "seed"}
    assert set(info["aggregated"]) >= {"avg_sum_reward", "avg_max_reward", "pc_success", "eval_s", "eval_ep_s"}
    assert info["aggregated"]["pc_success"] == 100.0 * result.success_rate
    for e in info["per_episode"]:  # Fetch sparse reward: -1 per step until solved, 0 when solved
        assert -50.0 <= e["sum_reward"] <= 0.0 and e["max_reward"] in (-1.0, 0.0)
    again = run_eval(EvalConfig(**{**vars(cfg), "out": tmp_path / "b"}))
    assert again.per_episode == result.per_episode


def test_on_step_sees_every_observation_of_the_same_rollouts(policy: Path):
    spec = load_task("fetch_reach")
    seen: list[tuple[int, int, float]] = []
    watched = evaluate_policy(load_policy(policy), spec, 3, seed=7, batch_size=2,
                              on_step=lambda first, obs: seen.append((first, len(obs["observation.state"]),
                                                                      float(obs["observation.state"][0, 0]))))
    steps = spec.max_episode_steps  # Fetch episodes run to the time limit
    assert [(f, n) for f, n, _ in seen] == [(0, 2)] * (steps + 1) + [(2, 1)] * (steps + 1)  # reset + every step
    assert len({x for _, _, x in seen[: steps + 1]}) > 1  # the observations move along the episode
    assert evaluate_policy(load_policy(policy), spec, 3, seed=7, batch_size=2).per_episode == watched.per_episode


def test_eval_overrides_the_executed_actions_and_sampler_steps(policy: Path, tmp_path: Path):
    cfg = EvalConfig(policy=str(policy), task="fetch_reach", episodes=2, batch_size=2, out=tmp_path,
                     n_action_steps=2, num_inference_steps=1)
    assert cfg.overrides() == {"num_inference_steps": 1, "n_action_steps": 2}
    run_eval(cfg)
    assert load_policy(policy, overrides=cfg.overrides()).policy.config.n_action_steps == 2
    with pytest.raises(ValueError, match=">= 1"):
        EvalConfig(n_action_steps=0)


def test_noise_scale_zero_is_deterministic_and_one_is_the_policy_as_sampled(policy: Path, tmp_path: Path):
    spec = load_task("fetch_reach")
    loaded = load_policy(policy)

    def rollout(noise_scale: float, noise_seed: int) -> tuple[list, list[np.ndarray]]:
        """The same episodes (env seeds 7, 8) with the sampler's noise seeded from `noise_seed`."""
        seen: list[np.ndarray] = []
        result = evaluate_policy(loaded, spec, 2, seed=7, batch_size=2, noise_scale=noise_scale, noise_seed=noise_seed,
                                 on_step=lambda first, obs: seen.append(obs["observation.state"].copy()))
        return result.per_episode, seen

    as_sampled = evaluate_policy(loaded, spec, 2, seed=7, batch_size=2).per_episode
    assert rollout(1.0, 7)[0] == as_sampled  # scale 1: the policy's own noise, the same RNG stream as before
    moved = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # noqa: E731
    assert moved(rollout(1.0, 7)[1], rollout(1.0, 100)[1])  # other noise, other trajectories...
    assert not moved(rollout(0.0, 7)[1], rollout(0.0, 100)[1])  # ...but at scale 0 the noise is not used
    assert moved(rollout(0.0, 7)[1], rollout(1.0, 7)[1])

    run_eval(EvalConfig(policy=str(policy), task="fetch_reach", episodes=2, batch_size=2, out=tmp_path,
                        noise_scale=0.0))
    assert json.loads((tmp_path / "eval_info.json").read_text())["noise_scale"] == 0.0
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="noise_scale"):
            EvalConfig(noise_scale=bad)


def test_eval_runs_on_the_threads_finetune_uses(policy: Path, tmp_path: Path):
    import torch

    assert EvalConfig().torch_threads == 1  # finetune's default: its before/after numbers reproduce in eval
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run_eval(EvalConfig(policy=str(policy), task="fetch_reach", episodes=1, batch_size=1, out=tmp_path))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="torch_threads"):
        EvalConfig(torch_threads=0)


def test_videos(policy: Path, tmp_path: Path):
    result = run_eval(EvalConfig(policy=str(policy), task="fetch_reach", episodes=2, batch_size=2, videos=1,
                                 out=tmp_path))
    assert result.video_paths == [str(tmp_path / "videos" / "eval_episode_0.mp4")]
    assert Path(result.video_paths[0]).stat().st_size > 1000


def test_wilson_interval():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.236593, abs=1e-6) and hi == pytest.approx(0.763407, abs=1e-6)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0


def test_feature_mismatch(policy: Path, tmp_path: Path):
    with pytest.raises(SimpoRobotError, match=r"observation.environment_state: policy expects shape \(3,\), task gives \(18,\)"):
        run_eval(EvalConfig(policy=str(policy), task="fetch_push", episodes=1, out=tmp_path))


def test_unknown_task(policy: Path, tmp_path: Path):
    with pytest.raises(SimpoRobotError, match="unknown task 'nope'"):
        run_eval(EvalConfig(policy=str(policy), task="nope", episodes=1, out=tmp_path))


def test_missing_and_corrupt_checkpoint_via_cli(policy: Path, tmp_path: Path, capsys):
    assert main(["eval", "--policy", str(tmp_path / "missing"), "--task", "fetch_reach", "--episodes", "1"]) == 1
    assert "does not exist" in " ".join(capsys.readouterr().err.split())
    broken = shutil.copytree(policy, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"garbage")
    assert main(["eval", "--policy", str(broken), "--task", "fetch_reach", "--episodes", "1"]) == 1
    assert "model.safetensors cannot be read" in " ".join(capsys.readouterr().err.split())


def test_offline_repo_id_not_cached(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SimpoRobotError, match="not in the Hugging Face cache"):
        run_eval(EvalConfig(policy="lerobot/diffusion_pusht_keypoints", task="pusht", episodes=1, out=tmp_path))


SHIPPED = Path(__file__).resolve().parent.parent / "pretrained"


@pytest.mark.parametrize("task", ["fetch_reach", "fetch_push", "fetch_pick_place"])
def test_shipped_checkpoint_loads_fits_and_has_a_card(task):
    from simpo_robot.policy_io import load_policy
    from simpo_robot.tasks import check_policy_fits_task, load_task

    folder = SHIPPED / task
    assert (folder / "model.safetensors").stat().st_size <= 10_000_000
    loaded = load_policy(folder)
    check_policy_fits_task(loaded.config, load_task(task))
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: lerobot\n") and "## Rebuild it" in card
    assert f"--task {task} --episodes 200 --seed 1000" in card


@pytest.mark.slow
@pytest.mark.parametrize("task", ["fetch_reach", "fetch_push", "fetch_pick_place"])
def test_shipped_checkpoint_reproduces_its_card(task, tmp_path: Path):
    import re

    card = (SHIPPED / task / "README.md").read_text()
    lo, hi = map(float, re.search(r"\| \[([\d.]+), ([\d.]+)\]% \|", card).groups())
    result = run_eval(EvalConfig(policy=str(SHIPPED / task), task=task, episodes=50, seed=1000, out=tmp_path))
    assert lo <= 100 * result.success_rate <= hi


def test_pusht_keypoints_checkpoint_fits_and_runs(tmp_path: Path):
    """A policy with the features of LeRobot's PushT-keypoints diffusion checkpoint (agent_pos 2,
    keypoints 16, action 2) fits the pusht task unchanged, and eval runs it (termination on success)."""
    import torch
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    from simpo_robot.policy_io import save_policy

    config = DiffusionConfig(
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (2,)),
                        "observation.environment_state": PolicyFeature(FeatureType.ENV, (16,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))},
        normalization_mapping={"STATE": NormalizationMode.MIN_MAX, "ENV": NormalizationMode.MIN_MAX,
                               "ACTION": NormalizationMode.MIN_MAX},
        horizon=8, n_action_steps=8, down_dims=(8, 16), diffusion_step_embed_dim=8, n_groups=4, kernel_size=3,
        num_inference_steps=1, noise_scheduler_type="DDIM", device="cpu", push_to_hub=False)
    box = {"min": torch.zeros(1), "max": torch.full((1,), 512.0)}
    stats = {k: {s: v.expand(n) for s, v in box.items()}
             for k, n in [("observation.state", 2), ("observation.environment_state", 16), ("action", 2)]}
    save_policy(DiffusionPolicy(config), tmp_path / "pusht", *make_pre_post_processors(config, dataset_stats=stats))
    result = run_eval(EvalConfig(policy=str(tmp_path / "pusht"), task="pusht", episodes=1, out=tmp_path / "eval"))
    assert len(result.per_episode) == 1 and 0.0 <= result.per_episode[0].max_reward <= 1.0
