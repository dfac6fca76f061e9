"""policy_io: exact save/load round-trip, Hub repo id from a pre-filled cache offline, clear errors."""

import json
import shutil
import tempfile
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
from lerobot.policies.factory import make_pre_post_processors

from simpo_robot.errors import SimpoRobotError
from simpo_robot.policy_io import LoadedPolicy, load_policy, save_policy


def tiny_policy() -> tuple[DiffusionPolicy, object, object]:
    torch.manual_seed(0)
    config = DiffusionConfig(
        input_features={
            "observation.state": PolicyFeature(FeatureType.STATE, (3,)),
            "observation.environment_state": PolicyFeature(FeatureType.ENV, (2,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))},
        normalization_mapping={"STATE": NormalizationMode.MIN_MAX, "ENV": NormalizationMode.MIN_MAX,
                               "ACTION": NormalizationMode.MIN_MAX},
        horizon=8, n_action_steps=4, down_dims=(8, 16), diffusion_step_embed_dim=8, n_groups=4,
        kernel_size=3, num_inference_steps=2, device="cpu", push_to_hub=False,
    )
    stats = {
        "observation.state": {"min": torch.zeros(3), "max": torch.arange(1.0, 4.0)},
        "observation.environment_state": {"min": -torch.ones(2), "max": torch.ones(2)},
        "action": {"min": -2 * torch.ones(2), "max": torch.tensor([2.0, 4.0])},
    }
    policy = DiffusionPolicy(config)
    pre, post = make_pre_post_processors(config, dataset_stats=stats)
    return policy, pre, post


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    policy, pre, post = tiny_policy()
    return save_policy(policy, tmp_path_factory.mktemp("policy") / "p", pre, post)


def test_layout_and_exact_round_trip(saved: Path):
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"} <= names
    loaded = load_policy(saved)
    assert isinstance(loaded, LoadedPolicy) and loaded.path == saved and loaded.config.type == "diffusion"
    assert not loaded.policy.training
    reference, _, _ = tiny_policy()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.policy.state_dict()[key], value, atol=0, rtol=0)
    # the normaliser stats travelled with the processors: action in [-2, 2]x[-2, 4] -> [-1, 1]
    out = loaded.postprocessor(torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 4.0]]))


def test_stock_lerobot_loads_what_we_save(saved: Path):
    policy = DiffusionPolicy.from_pretrained(saved, strict=True)
    pre, _ = make_pre_post_processors(policy.config, pretrained_path=str(saved))
    batch = pre({"observation.state": torch.tensor([1.0, 1.0, 1.5]),
                 "observation.environment_state": torch.tensor([0.0, 1.0])})
    torch.testing.assert_close(batch["observation.state"], torch.tensor([[1.0, 0.0, 0.0]]))


def test_save_round_trip_of_loaded(saved: Path, tmp_path: Path):
    again = save_policy(load_policy(saved), tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()


def _fill_cache(cache: Path, repo_id: str, src: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)


def test_repo_id_from_cache_offline(saved: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _fill_cache(tmp_path, "someone/tiny-diffusion", saved)
    loaded = load_policy("someone/tiny-diffusion", cache_dir=tmp_path)
    assert loaded.path.parent.name == "snapshots"
    assert loaded.config.horizon == 8


def test_repo_id_offline_not_cached_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SimpoRobotError, match="not in the Hugging Face cache.*offline"):
        load_policy("someone/not-there", cache_dir=tmp_path)


def test_missing_folder(tmp_path: Path):
    with pytest.raises(SimpoRobotError, match="does not exist"):
        load_policy(tmp_path / "nope")


def test_missing_config(saved: Path, tmp_path: Path):
    broken = shutil.copytree(saved, tmp_path / "b")
    (broken / "config.json").unlink()
    with pytest.raises(SimpoRobotError, match="has no config.json"):
        load_policy(broken)


def test_corrupt_config(saved: Path, tmp_path: Path):
    broken = shutil.copytree(saved, tmp_path / "b")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(SimpoRobotError, match="config.json is not valid JSON"):
        load_policy(broken)


def test_unknown_policy_type(saved: Path, tmp_path: Path):
    broken = shutil.copytree(saved, tmp_path / "b")
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "type": "nonsense"}))
    with pytest.raises(SimpoRobotError, match="'nonsense' is not registered"):
        load_policy(broken)


def test_corrupt_weights(saved: Path, tmp_path: Path):
    broken = shutil.copytree(saved, tmp_path / "b")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SimpoRobotError, match="model.safetensors cannot be read"):
        load_policy(broken)


def test_missing_weights(saved: Path, tmp_path: Path):
    broken = shutil.copytree(saved, tmp_path / "b")
    (broken / "model.safetensors").unlink()
    with pytest.raises(SimpoRobotError, match="has no model.safetensors"):
        load_policy(broken)


def test_missing_processor_points_to_migration(saved: Path, tmp_path: Path):
    broken = shutil.copytree(saved, tmp_path / "b")
    (broken / "policy_preprocessor.json").unlink()
    with pytest.raises(SimpoRobotError, match="has no policy_preprocessor.json.*migrate_policy_normalization"):
        load_policy(broken)


def test_weights_of_another_architecture(saved: Path, tmp_path: Path):
    broken = shutil.copytree(saved, tmp_path / "b")
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "down_dims": [8, 32]}))
    with pytest.raises(SimpoRobotError, match="does not match the architecture"):
        load_policy(broken)


def test_overrides_change_the_sampler_steps_and_refuse_unknown_fields(saved: Path):
    loaded = load_policy(saved, overrides={"num_inference_steps": 3})
    assert loaded.config.num_inference_steps == 3 and loaded.policy.diffusion.num_inference_steps == 3
    assert load_policy(saved).config.num_inference_steps != 3  # the folder is untouched
    with pytest.raises(SimpoRobotError, match="cannot set"):
        load_policy(saved, overrides={"no_such_field": 1})


def test_loading_leaves_no_temp_files(saved: Path, tmp_path: Path, monkeypatch):
    # LeRobot's config loader writes a temp JSON it never deletes; loading must not leave it behind.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for _ in range(3):
        load_policy(saved)
    assert list(scratch.iterdir()) == []
    assert tempfile.tempdir == str(scratch)
