"""The policy server: protocol, correct answers, bad input of every kind, many clients, SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from simpo_robot.deploy.bundle import PolicyEngine
from simpo_robot.deploy.client import (
    CONNECT_KWARGS,
    ObservationHistory,
    PolicyClient,
    ServerError,
    pack,
    unpack,
)
from simpo_robot.deploy.export import ExportConfig, run_export
from simpo_robot.deploy.server import BackgroundServer, ServeConfig, run_serve
from simpo_robot.deploy.testing import save_tiny_policy
from simpo_robot.errors import SimpoRobotError

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    save_tiny_policy(root / "policy", num_inference_steps=5)
    return run_export(ExportConfig(policy=str(root / "policy"), out=root / "bundle", control_hz=10.0)).bundle


@pytest.fixture(scope="module")
def reference(bundle):
    """In-process inference on a separate engine: what every good reply must equal."""
    return PolicyEngine.load(bundle, "onnx")


def _start(bundle, inference: str) -> BackgroundServer:
    config = ServeConfig(bundle=bundle, port=0, backend="onnx", max_message_bytes=MAX_BYTES, idle_timeout_s=1.0,
                         open_timeout_s=1.0, shutdown_grace_s=5.0, inference=inference)
    background = BackgroundServer(PolicyEngine.load(bundle, "onnx"), config)
    background.start()
    return background


@pytest.fixture(scope="module")
def server(bundle):
    """Inference inline on the event loop (the default)."""
    background = _start(bundle, "inline")
    yield background
    background.stop()


@pytest.fixture(scope="module")
def thread_server(bundle):
    """Inference on a dedicated thread."""
    background = _start(bundle, "thread")
    yield background
    background.stop()


BOTH = pytest.mark.parametrize("which", ["server", "thread_server"])


def _observation(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "observation.state": rng.uniform(-1, 1, (2, 10)).astype(np.float32),
        "observation.environment_state": rng.uniform(-1, 1, (2, 25)).astype(np.float32),
    }


def _assert_serves_correctly(url: str, reference: PolicyEngine, seed: int = 0) -> None:
    with PolicyClient(url, timeout_s=10) as client:
        chunk = client.infer(_observation(seed), seed=seed)
    expected = reference.infer(_observation(seed), seed=seed).actions
    np.testing.assert_allclose(chunk.actions, expected, atol=1e-5, rtol=0)


def _raw(url: str):
    ws = connect(url, open_timeout=5, max_size=None, compression=None, **CONNECT_KWARGS)
    unpack(ws.recv(timeout=5))  # metadata
    return ws


def test_metadata_then_correct_chunk(server, reference):
    with PolicyClient(server.url) as client:
        meta = client.metadata
        assert meta.observation_features == {"observation.state": (10,), "observation.environment_state": (25,)}
        assert (meta.n_obs_steps, meta.action_chunk, meta.action_dim) == (2, 8, 4)
        assert meta.control_hz == 10.0 and meta.backend == "onnx" and meta.policy_type == "diffusion"
        assert meta.max_message_bytes == MAX_BYTES and meta.policy_name == "policy"
        chunk = client.infer(_observation(3), seed=3)
        assert chunk.actions.shape == (8, 4) and chunk.actions.dtype == np.float32
        assert {"server_ms", "queue_ms", "sample_ms"} <= set(chunk.timing)
        np.testing.assert_allclose(chunk.actions, reference.infer(_observation(3), seed=3).actions, atol=1e-5)
        # float64 is accepted and cast; without a seed the chunk is still well-formed.
        assert client.infer({k: v.astype(np.float64) for k, v in _observation(3).items()}).actions.shape == (8, 4)


def test_observation_history_repeats_first_frame():
    history = ObservationHistory(3)
    history.push({"x": np.array([1.0])})
    assert history.frames()["x"].tolist() == [[1.0], [1.0], [1.0]]
    history.push({"x": np.array([2.0])})
    history.push({"x": np.array([3.0])})
    history.push({"x": np.array([4.0])})
    assert history.frames()["x"].tolist() == [[2.0], [3.0], [4.0]]


def test_bad_requests_get_errors_and_the_connection_survives(server, reference):
    good = _observation(0)
    nd = {"__ndarray__": True, "dtype": "<f4", "shape": [2, 10], "data": b"\x00" * 7}
    bad_messages = {
        "not msgpack": b"\xc1\xc1\xc1",
        "truncated msgpack": pack(good)[:-5],
        "not a map": msgpack.packb([1, 2, 3]),
        "missing key": pack({"observation.state": good["observation.state"]}),
        "unexpected key": pack({**good, "observation.stat": good["observation.state"]}),
        "wrong shape": pack({**good, "observation.state": np.zeros((10,), np.float32)}),
        "wrong dtype": pack({**good, "observation.state": np.zeros((2, 10), np.int32)}),
        "string instead of array": pack({**good, "observation.state": "hello"}),
        "nan": pack({**good, "observation.state": np.full((2, 10), np.nan, np.float32)}),
        "inf": pack({**good, "observation.environment_state": np.full((2, 25), np.inf, np.float32)}),
        "bad array bytes": msgpack.packb({**{k: v.tolist() for k, v in good.items()}, "observation.state": nd}),
        "object dtype": msgpack.packb({"observation.state": {**nd, "dtype": "|O"}}),
        "bad seed": pack({**good, "seed": -1}),
    }
    ws = _raw(server.url)
    try:
        for name, data in bad_messages.items():
            ws.send(data)
            reply = unpack(ws.recv(timeout=10))
            assert set(reply) == {"error"}, name
            assert isinstance(reply["error"], str) and reply["error"], name
        ws.send("a text frame")
        assert "binary" in unpack(ws.recv(timeout=10))["error"]
        ws.send(pack({**good, "seed": 5}))  # same connection, next good request
        reply = unpack(ws.recv(timeout=10))
        np.testing.assert_allclose(reply["actions"], reference.infer(good, seed=5).actions, atol=1e-5)
    finally:
        ws.close()
    with PolicyClient(server.url) as client, pytest.raises(ServerError, match="missing observation keys"):
        client.infer({"observation.state": good["observation.state"]})


def test_oversized_payload_closes_the_connection(server, reference):
    ws = _raw(server.url)
    ws.send(b"\x00" * (MAX_BYTES + 1))
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    _assert_serves_correctly(server.url, reference, seed=1)


@BOTH
def test_client_disconnecting_mid_request(which, request, reference):
    server = request.getfixturevalue(which)
    # A full request, then gone before the reply.
    ws = _raw(server.url)
    ws.send(pack(_observation(0)))
    ws.socket.shutdown(socket.SHUT_RDWR)
    ws.socket.close()
    # Half a frame (header says 4096 bytes, 10 arrive), then gone.
    ws = _raw(server.url)
    ws.socket.sendall(b"\x82\xfe\x10\x00" + b"\x01\x02\x03\x04" + b"x" * 10)
    ws.socket.close()
    time.sleep(0.2)
    _assert_serves_correctly(server.url, reference, seed=2)


@BOTH
def test_slow_clients_are_dropped_without_blocking_others(which, request, reference):
    server = request.getfixturevalue(which)
    # No handshake at all.
    silent = socket.create_connection(("127.0.0.1", server.server.port), timeout=10)
    # Handshake, then a frame that never completes (slowloris).
    trickle = _raw(server.url)
    trickle.socket.sendall(b"\x82\xfe\x10\x00" + b"\x01\x02\x03\x04" + b"x" * 10)
    # Handshake, then nothing.
    idle = _raw(server.url)
    t0 = time.monotonic()
    _assert_serves_correctly(server.url, reference, seed=3)  # served while the slow ones hang
    assert time.monotonic() - t0 < 1.0
    assert silent.recv(1024) == b"" or silent.recv(1024) == b""  # closed by the server after open_timeout
    with pytest.raises(ConnectionClosed) as info:
        idle.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    with pytest.raises(ConnectionClosed) as info:  # the half frame never completes: idle timeout
        trickle.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert time.monotonic() - t0 < 8
    silent.close()
    _assert_serves_correctly(server.url, reference, seed=4)


@BOTH
def test_several_clients_at_once(which, request, reference):
    server = request.getfixturevalue(which)
    expected = {s: reference.infer(_observation(s), seed=s).actions for s in range(4)}
    failures: list[str] = []

    def worker(index: int) -> None:
        try:
            with PolicyClient(server.url) as client:
                for _ in range(5):
                    chunk = client.infer(_observation(index), seed=index)
                    if not np.allclose(chunk.actions, expected[index], atol=1e-5):
                        failures.append(f"client {index}: wrong actions")
        except Exception as exc:
            failures.append(f"client {index}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == []


def test_sigterm_shuts_down_gracefully(bundle):
    """Through the command line, with --noise_scale (the served chunks are those of an engine at that scale)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simpo_robot", "serve", "--bundle", str(bundle), "--port", str(port),
         "--backend", "onnx", "--noise_scale", "0.5"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"ws://127.0.0.1:{port}"
        deadline = time.monotonic() + 180  # importing torch takes a while on a loaded machine
        while True:
            try:
                client = PolicyClient(url, timeout_s=5)
                client.connect()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        expected = PolicyEngine.load(bundle, "onnx", noise_scale=0.5).infer(_observation(0), seed=0).actions
        np.testing.assert_allclose(client.infer(_observation(0), seed=0).actions, expected, atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        with pytest.raises(ConnectionClosed) as info:
            client.infer(_observation(0))
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        output = proc.stdout.read()
        assert "stopped after 1 request" in output and "noise scale 0.5" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_robot_kit_is_the_client_and_needs_no_torch():
    kit = REPO / "deploy" / "simpo_client.py"
    # One source: the kit's file is a link to the package's client (cp/scp copy the target).
    assert kit.resolve() == (REPO / "simpo_robot" / "deploy" / "client.py").resolve(), (
        "deploy/simpo_client.py must link to simpo_robot/deploy/client.py"
    )
    code = "import sys, simpo_client; assert 'torch' not in sys.modules and 'simpo_robot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=kit.parent, check=True, timeout=60)


def test_serve_rejects_a_bad_noise_scale_before_listening(bundle):
    for bad in (-0.1, float("inf")):
        with pytest.raises(SimpoRobotError, match="noise_scale"):
            run_serve(ServeConfig(bundle=bundle, port=0, noise_scale=bad))


def test_client_limit_and_inference_failure(bundle, reference):
    engine = PolicyEngine.load(bundle, "onnx")
    infer_batch = engine.infer_batch

    def flaky(observations, seeds=None, **kwargs):
        if seeds and seeds[0] == 666:
            raise RuntimeError("boom")
        return infer_batch(observations, seeds, **kwargs)

    engine.infer_batch = flaky
    with BackgroundServer(engine, ServeConfig(bundle=bundle, port=0, backend="onnx", max_clients=1)) as url:
        with PolicyClient(url) as client:
            second = connect(url, open_timeout=5, compression=None, **CONNECT_KWARGS)
            with pytest.raises(ConnectionClosed) as info:
                second.recv(timeout=5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013
            with pytest.raises(ServerError, match="inference failed: RuntimeError: boom"):
                client.infer(_observation(0), seed=666)
            np.testing.assert_allclose(client.infer(_observation(0), seed=1).actions,
                                       reference.infer(_observation(0), seed=1).actions, atol=1e-5)
