"""Scripted experts: solve their tasks, noise is seeded, bad names are refused."""

import numpy as np
import pytest

from simpo_robot.experts import ScriptedExpert, reach
from simpo_robot.tasks import OBS_ENV_STATE, OBS_STATE, load_task, make_vec_env


def success_rate(task: str, noise: float, n: int = 10, seed: int = 100) -> float:
    spec = load_task(task)
    env = make_vec_env(spec, n)
    expert, rng = ScriptedExpert(spec.expert, noise), np.random.default_rng(0)
    obs, _ = env.reset(seed=list(range(seed, seed + n)))
    for _ in range(spec.max_episode_steps):
        obs, _, _, _, info = env.step(expert(obs, rng))
    env.close()
    return float(np.mean(info["is_success"]))


@pytest.mark.parametrize("task", ["fetch_reach", "fetch_push", "fetch_pick_place"])
def test_expert_solves_task(task):
    assert success_rate(task, noise=0.0) == 1.0


def test_reach_action_is_clipped_error():
    obs = {OBS_STATE: np.zeros((2, 10)), OBS_ENV_STATE: np.array([[0.01, -0.02, 0.0], [1.0, 0.0, -1.0]])}
    np.testing.assert_allclose(reach(obs), [[0.2, -0.4, 0.0, 0.0], [1.0, 0.0, -1.0, 0.0]])


def test_noise_is_seeded_and_clipped():
    obs = {OBS_STATE: np.zeros((3, 10)), OBS_ENV_STATE: np.zeros((3, 3))}
    a = ScriptedExpert("fetch_reach", 0.5)(obs, np.random.default_rng(7))
    b = ScriptedExpert("fetch_reach", 0.5)(obs, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and np.abs(a).max() <= 1.0 and np.abs(a[:, :3]).min() > 0
    np.testing.assert_array_equal(a[:, 3], 0.0)


def test_bad_expert():
    with pytest.raises(ValueError, match="no scripted expert 'nope'"):
        ScriptedExpert("nope")
    with pytest.raises(ValueError, match="noise must be >= 0"):
        ScriptedExpert("fetch_reach", -1.0)
