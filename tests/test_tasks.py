"""Task files: every one loads, its env runs, the observation mapping and features are exact."""

import numpy as np
import pytest

from simpo_robot.errors import SimpoRobotError
from simpo_robot.tasks import (
    OBS_ENV_STATE,
    OBS_STATE,
    ObsSource,
    available_tasks,
    check_policy_fits_task,
    is_success,
    load_task,
    make_env,
    make_vec_env,
    policy_features,
)

EXPECTED = {  # (state, environment_state, action) shapes, checked against the env's spaces
    "fetch_reach": (10, 3, 4),
    "fetch_push": (10, 18, 4),
    "fetch_pick_place": (10, 18, 4),
    "fetch_slide": (10, 18, 4),
    "pusht": (2, 16, 2),
}


def test_all_task_files_are_known():
    assert available_tasks() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_task_loads_and_steps(name):
    spec = load_task(name)
    assert spec.name == name
    feats = policy_features(spec)
    ds, de, da = EXPECTED[name]
    assert feats.inputs[OBS_STATE].shape == (ds,) and feats.inputs[OBS_ENV_STATE].shape == (de,)
    assert feats.outputs["action"].shape == (da,)
    env = make_env(spec)
    obs, _ = env.reset(seed=0)
    assert obs[OBS_STATE].shape == (ds,) and obs[OBS_STATE].dtype == np.float32
    assert env.observation_space.contains(obs) or name == "pusht"  # pusht's keypoints may leave the box
    obs, _, _, _, info = env.step(env.action_space.sample())
    assert obs[OBS_ENV_STATE].shape == (de,)
    assert is_success(spec, info) in (True, False)
    env.close()


def test_fetch_push_mapping_is_the_documented_slices():
    spec = load_task("fetch_push")
    env = make_env(spec)
    obs, _ = env.reset(seed=3)
    raw = env.unwrapped._get_obs()
    r = raw["observation"]
    np.testing.assert_array_equal(obs[OBS_STATE], np.concatenate([r[0:3], r[9:11], r[20:25]]).astype(np.float32))
    np.testing.assert_array_equal(
        obs[OBS_ENV_STATE], np.concatenate([r[3:9], r[11:20], raw["desired_goal"]]).astype(np.float32))
    assert spec.max_episode_steps == 50 and spec.env_id == "FetchPush-v4"


def test_episode_length_and_vector_env():
    spec = load_task("fetch_reach")
    env = make_vec_env(spec, 2)
    obs, _ = env.reset(seed=[0, 1])
    assert obs[OBS_STATE].shape == (2, 10)
    steps, done = 0, np.zeros(2, bool)
    while not done.all():
        _, _, term, trunc, _ = env.step(np.zeros((2, 4), np.float32))
        done |= term | trunc
        steps += 1
    assert steps == 50
    env.close()


def test_obs_source_parse():
    assert ObsSource.parse("observation[3:9]") == ObsSource("observation", 3, 9)
    assert ObsSource.parse("desired_goal") == ObsSource("desired_goal")
    np.testing.assert_array_equal(ObsSource("x", 1, 3).take({"x": np.arange(5)}), [1, 2])
    with pytest.raises(ValueError, match="bad observation source"):
        ObsSource.parse("observation[3]")


def test_unknown_task():
    with pytest.raises(SimpoRobotError, match="unknown task 'fetch_fly'.*fetch_push"):
        load_task("fetch_fly")


def test_invalid_task_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nenv_id: X-v0\nenv_package: gymnasium\nmax_episode_steps: 0\nstate: [a]\n"
                   "environment_state: []\n")
    with pytest.raises(SimpoRobotError, match="max_episode_steps must be positive"):
        load_task(bad)


def test_feature_mismatch_names_feature_and_shapes():
    from lerobot.configs.types import FeatureType, PolicyFeature

    class Cfg:
        input_features = {OBS_STATE: PolicyFeature(FeatureType.STATE, (10,)),
                          OBS_ENV_STATE: PolicyFeature(FeatureType.ENV, (16,))}
        output_features = {"action": PolicyFeature(FeatureType.ACTION, (4,))}

    Cfg.input_features[OBS_ENV_STATE] = PolicyFeature(FeatureType.ENV, (18,))
    check_policy_fits_task(Cfg, load_task("fetch_push"))  # fits: no error
    Cfg.input_features[OBS_ENV_STATE] = PolicyFeature(FeatureType.ENV, (16,))
    with pytest.raises(SimpoRobotError, match=r"observation.environment_state: policy expects shape \(16,\), task gives \(3,\)"):
        check_policy_fits_task(Cfg, load_task("fetch_reach"))


def test_training_envs_get_the_dense_reward_and_the_same_success_signal():
    spec = load_task("fetch_push")
    train = spec.training()
    assert spec.env_kwargs == {"reward_type": "sparse"} and train.env_kwargs == {"reward_type": "dense"}
    rewards = {}
    for label, task in (("sparse", spec), ("dense", train)):
        env = make_env(task)
        env.reset(seed=3)
        _, reward, _, _, info = env.step(np.zeros(4, np.float32))
        goal_distance = np.linalg.norm(env.unwrapped._get_obs()["achieved_goal"] - env.unwrapped.goal)
        rewards[label] = (reward, goal_distance, is_success(task, info))
        env.close()
    assert rewards["sparse"][0] == -1.0 and not rewards["sparse"][2]  # the block starts away from the goal
    assert rewards["dense"][0] == pytest.approx(-rewards["dense"][1]) and not rewards["dense"][2]
    # fetch_pick_place trains on its own sparse reward: its dense-reward critic could not rank chunks
    assert load_task("fetch_pick_place").training().env_kwargs == {"reward_type": "sparse"}
