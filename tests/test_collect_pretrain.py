"""collect -> LeRobot dataset on disk; pretrain -> LeRobot policy folder that stock LeRobot loads."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from simpo_robot.cli import main
from simpo_robot.collect import CollectConfig, run_collect
from simpo_robot.errors import SimpoRobotError
from simpo_robot.pretrain import PretrainConfig, run_pretrain

TINY = dict(steps=4, batch_size=8, horizon=8, n_action_steps=4, down_dims=(8, 16), n_groups=4,
            diffusion_step_embed_dim=8, kernel_size=3, num_inference_steps=2, log_every=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "reach"
    result = run_collect(CollectConfig(task="fetch_reach", episodes=3, num_envs=2, out=out, seed=5,
                                       success_tail=None))
    assert result.episodes == 3 and result.attempts == 4 and result.frames == 150
    assert result.expert_success == 1.0
    return out


def test_dataset_loads_in_lerobot(dataset: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("local/fetch_reach", root=dataset)
    assert ds.num_episodes == 3 and ds.num_frames == 150 and ds.fps == 25
    item = ds[0]
    assert item["observation.state"].shape == (10,) and item["observation.environment_state"].shape == (3,)
    assert item["action"].shape == (4,) and item["task"].startswith("Fetch arm moves")
    last = ds[49]
    assert bool(last["next.done"]) and bool(last["next.success"])
    assert ds.meta.stats["action"]["max"].shape == (4,)


def test_collect_is_deterministic(dataset: Path, tmp_path: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    run_collect(CollectConfig(task="fetch_reach", episodes=1, num_envs=2, out=tmp_path / "again", seed=5,
                              success_tail=None))
    a = LeRobotDataset("local/fetch_reach", root=dataset).hf_dataset["observation.environment_state"][:50]
    b = LeRobotDataset("local/fetch_reach", root=tmp_path / "again").hf_dataset["observation.environment_state"]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_success_tail_cuts_after_first_success(tmp_path: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    result = run_collect(CollectConfig(task="fetch_reach", episodes=1, num_envs=1, out=tmp_path / "d", seed=5,
                                       success_tail=2))
    ds = LeRobotDataset("local/fetch_reach", root=tmp_path / "d")
    n = result.frames
    assert 3 <= n < 50 and ds.num_frames == n
    success = [bool(ds[i]["next.success"]) for i in range(n)]
    assert success[n - 3] and not any(success[: n - 3])  # first success, then 2 more steps
    assert bool(ds[n - 1]["next.done"])


def test_collect_refuses_existing_folder(dataset: Path):
    with pytest.raises(SimpoRobotError, match="exists and is not empty"):
        run_collect(CollectConfig(task="fetch_reach", episodes=1, out=dataset))


def test_collect_task_without_expert(tmp_path: Path):
    with pytest.raises(SimpoRobotError, match="pusht has no scripted expert"):
        run_collect(CollectConfig(task="pusht", episodes=1, out=tmp_path / "x"))


def test_pretrain_writes_lerobot_layout(dataset: Path, tmp_path: Path):
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
    from lerobot.policies.factory import make_pre_post_processors

    result = run_pretrain(PretrainConfig(task="fetch_reach", dataset=dataset, out=tmp_path / "p", **TINY))
    assert np.isfinite(result.final_loss) and result.episodes == 3
    names = {p.name for p in result.path.iterdir()}
    assert {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"} <= names
    policy = DiffusionPolicy.from_pretrained(result.path, strict=True)
    assert policy.config.input_features["observation.environment_state"].shape == (3,)
    assert policy.config.horizon == 8 and policy.config.n_action_steps == 4
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(result.path))
    batch = pre({"observation.state": torch.zeros(10), "observation.environment_state": torch.zeros(3)})
    action = post(policy.select_action(batch))
    assert action.shape == (1, 4)


def test_pretrain_flow_policy_loads_and_acts(dataset: Path, tmp_path: Path):
    from lerobot.configs.policies import PreTrainedConfig

    from simpo_robot.policies.flow import FlowPolicy
    from simpo_robot.policy_io import load_policy

    assert main(["pretrain", "--task", "fetch_reach", "--dataset", str(dataset), "--out", str(tmp_path / "f"),
                 "--policy-type", "flow", "--steps", "4", "--batch-size", "8", "--horizon", "8",
                 "--n-action-steps", "4", "--down-dims", "[8,16]", "--n-groups", "4",
                 "--diffusion-step-embed-dim", "8", "--kernel-size", "3", "--num-inference-steps", "2",
                 "--log-every", "2"]) == 0
    config = PreTrainedConfig.from_pretrained(tmp_path / "f")
    assert config.type == "flow" and config.num_inference_steps == 2 and config.timestep_scale == 100.0
    assert config.input_features["observation.environment_state"].shape == (3,)
    loaded = load_policy(tmp_path / "f")
    assert isinstance(loaded.policy, FlowPolicy)
    batch = loaded.preprocessor({"observation.state": torch.zeros(10), "observation.environment_state": torch.zeros(3)})
    assert loaded.postprocessor(loaded.policy.select_action(batch)).shape == (1, 4)
    info = json.loads((tmp_path / "f" / "train_info.json").read_text())
    assert info["policy_type"] == "flow" and np.isfinite(info["final_loss"])


def test_pretrain_unknown_policy_type():
    with pytest.raises(ValueError, match="policy_type must be one of"):
        PretrainConfig(policy_type="gan")


def test_pretrain_max_episodes_and_seed(dataset: Path, tmp_path: Path):
    a = run_pretrain(PretrainConfig(task="fetch_reach", dataset=dataset, out=tmp_path / "a", max_episodes=1, **TINY))
    b = run_pretrain(PretrainConfig(task="fetch_reach", dataset=dataset, out=tmp_path / "b", max_episodes=1, **TINY))
    assert a.episodes == 1 and a.frames == 50
    assert (a.path / "model.safetensors").read_bytes() == (b.path / "model.safetensors").read_bytes()


def test_pretrain_dataset_of_another_task(dataset: Path, tmp_path: Path):
    with pytest.raises(SimpoRobotError, match=r"observation.environment_state has shape \(3,\), task fetch_push gives \(18,\)"):
        run_pretrain(PretrainConfig(task="fetch_push", dataset=dataset, out=tmp_path / "p", **TINY))


def test_pretrain_missing_dataset(tmp_path: Path):
    with pytest.raises(SimpoRobotError, match="is not a LeRobot dataset"):
        run_pretrain(PretrainConfig(task="fetch_reach", dataset=tmp_path, out=tmp_path / "p", **TINY))


def test_config_validation():
    with pytest.raises(ValueError, match="horizon 6 must be a multiple of 4"):
        PretrainConfig(horizon=6, down_dims=(8, 16, 32))
    with pytest.raises(ValueError, match="episodes must be positive"):
        CollectConfig(episodes=0)


def test_cli_collect_unknown_task(tmp_path: Path, capsys):
    assert main(["collect", "--task", "fetch_fly", "--out", str(tmp_path / "d")]) == 1
