"""run-sim: a task played through the server equals the same play in-process, and eval_info.json is complete."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from simpo_robot.deploy.bundle import PolicyEngine
from simpo_robot.deploy.client import PolicyClient
from simpo_robot.deploy.export import ExportConfig, run_export
from simpo_robot.deploy.run_sim import RunSimConfig, play_episode, request_seed, run_run_sim
from simpo_robot.deploy.server import BackgroundServer, ServeConfig
from simpo_robot.deploy.testing import save_tiny_policy
from simpo_robot.errors import SimpoRobotError
from simpo_robot.tasks import load_task, make_env

TASK = "fetch_push"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A random fetch_push-shaped policy, exported and served (ONNX backend), and its in-process twin."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run_sim")
    save_tiny_policy(root / "policy", env_state_dim=18, num_inference_steps=4)
    bundle = run_export(ExportConfig(policy=str(root / "policy"), out=root / "bundle")).bundle
    server = BackgroundServer(PolicyEngine.load(bundle, "onnx"), ServeConfig(bundle=bundle, port=0, backend="onnx"))
    server.start()
    yield server, PolicyEngine.load(bundle, "onnx")
    server.stop()


def _recording(source, log):
    def wrapped(frames, seed):
        actions = source(frames, seed)
        log.append(actions)
        return actions

    return wrapped


def test_episode_through_server_equals_in_process(served):
    server, engine = served
    spec = load_task(TASK)
    env = make_env(spec)
    keys = ["observation.state", "observation.environment_state"]
    remote, local = [], []
    with PolicyClient(server.url) as client:
        got = play_episode(env, spec, _recording(lambda f, s: client.infer(f, seed=s).actions, remote), 2, keys, 0, 7)
    want = play_episode(env, spec, _recording(lambda f, s: engine.infer(f, seed=s).actions, local), 2, keys, 0, 7)
    env.close()
    assert got == want
    assert got.steps == spec.max_episode_steps and got.requests == len(remote) == 7  # ceil(50 / 8)
    np.testing.assert_allclose(np.concatenate(remote), np.concatenate(local), atol=1e-5)


def test_run_sim_writes_eval_info(served, tmp_path):
    server, _ = served
    info = run_run_sim(RunSimConfig(server=server.url, task=TASK, episodes=2, out=tmp_path, seed=100))
    on_disk = json.loads((tmp_path / "eval_info.json").read_text())
    assert on_disk == json.loads(json.dumps(info))
    assert [e["seed"] for e in on_disk["per_episode"]] == [100, 101]
    assert set(on_disk["per_episode"][0]) == {"episode_ix", "sum_reward", "max_reward", "success", "seed"}
    assert {"avg_sum_reward", "avg_max_reward", "pc_success", "pc_success_ci95", "eval_s", "eval_ep_s"} <= set(
        on_disk["aggregated"])
    assert on_disk["task"] == TASK and on_disk["backend"] == "onnx"
    latency = on_disk["latency_ms"]
    assert latency["requests"] == 14 and 0 < latency["p50"] <= latency["p99"] <= latency["max"]


def test_run_sim_refuses_a_policy_that_does_not_fit(served, tmp_path):
    server, _ = served
    with pytest.raises(SimpoRobotError, match="does not fit task fetch_reach"):
        run_run_sim(RunSimConfig(server=server.url, task="fetch_reach", episodes=1, out=tmp_path))


def test_unreachable_server_is_a_clear_error(tmp_path):
    with pytest.raises(SimpoRobotError, match="cannot reach the policy server"):
        run_run_sim(RunSimConfig(server="ws://127.0.0.1:9", task=TASK, episodes=1, out=tmp_path, timeout_s=2))


def test_helpers():
    assert request_seed(3, 1) == request_seed(3, 1) != request_seed(3, 2)


@pytest.mark.slow
def test_shipped_checkpoint_success_through_server_matches_eval(tmp_path):
    """The shipped fetch_push policy: run-sim through the server vs in-process `simpo-robot eval`."""
    from simpo_robot.evaluate import EvalConfig, run_eval

    checkpoint = REPO / "pretrained" / TASK
    if not (checkpoint / "config.json").is_file():
        pytest.skip("pretrained/fetch_push is not there")
    episodes = 50
    bundle = run_export(ExportConfig(policy=str(checkpoint), out=tmp_path / "bundle")).bundle
    with BackgroundServer(PolicyEngine.load(bundle, "onnx"), ServeConfig(bundle=bundle, port=0, backend="onnx")) as url:
        served = run_run_sim(RunSimConfig(server=url, task=TASK, episodes=episodes, out=tmp_path / "sim"))
    local = run_eval(EvalConfig(policy=str(checkpoint), task=TASK, episodes=episodes, out=tmp_path / "eval"))
    lo, hi = served["aggregated"]["pc_success_ci95"]
    assert lo <= 100 * local.success_rate <= hi, (served["aggregated"], local.success_rate)
