"""Robot-side client for a simpo-robot policy server. Needs only numpy, msgpack and websockets (no torch).

This file is the whole client: `deploy/simpo_client.py` is a verbatim copy for robots (a test keeps the
two identical), so copy that one file next to your control code.

Protocol (WebSocket, binary frames, each one msgpack map; numpy arrays are maps
{"__ndarray__": true, "dtype": "<f4", "shape": [...], "data": <raw bytes>}, never pickle):

    server -> client, on connect: metadata
        {"protocol": 1, "policy_name": str, "policy_type": str,
         "observation_features": {name: {"shape": [...], "dtype": "float32"}}, "n_obs_steps": T,
         "action_feature": {"name": "action", "shape": [Da]}, "action_chunk": n, "control_hz": float | None,
         "backend": "torch" | "onnx", "max_message_bytes": int}
    client -> server: request
        {name: float32 array (T, *shape) for every observation feature, the last T frames, oldest first,
         optional "seed": int (makes the sampled chunk reproducible)}
    server -> client: reply
        {"actions": float32 array (n, Da), "timing": {"decode_ms", "queue_ms", "batch", "preprocess_ms",
         "sample_ms", "postprocess_ms", "server_ms"}}
        or {"error": message} (the connection stays open; send the next request)

Typical loop:

    with PolicyClient("ws://127.0.0.1:8765") as client:
        meta = client.metadata
        history = ObservationHistory(meta.n_obs_steps)
        obs = robot.observe()
        while True:
            history.push(obs)
            for action in client.infer(history.frames()).actions:  # executes the whole chunk
                robot.act(action); obs = robot.observe(); history.push(obs)
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from websockets.sync.client import connect

ND_KEY = "__ndarray__"
ALLOWED_DTYPES = frozenset({"<f2", "<f4", "<f8", "<i2", "<i4", "<i8", "|i1", "|u1", "<u2", "<u4", "<u8", "|b1"})
"""Array dtypes the codec accepts on the wire (little-endian numeric and bool; never objects)."""
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Across websockets versions (>= 13): since 15 connect() reads proxy settings from the environment
# unless told not to (loopback must not use one); since 17.1 a connection kept open outside a `with`
# block must say legacy=True.
_CONNECT_PARAMS = inspect.signature(connect).parameters
CONNECT_KWARGS: dict[str, Any] = {
    **({"proxy": None} if "proxy" in _CONNECT_PARAMS else {}),
    **({"legacy": True} if "legacy" in _CONNECT_PARAMS else {}),
}


class ProtocolError(ValueError):
    """Bytes that are not a valid message of this protocol."""


class ServerError(RuntimeError):
    """The server answered a request with {"error": message}."""


def _encode_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        array = np.ascontiguousarray(obj)
        if array.dtype.str not in ALLOWED_DTYPES:
            raise TypeError(f"cannot send arrays of dtype {array.dtype} (allowed: {sorted(ALLOWED_DTYPES)})")
        return {ND_KEY: True, "dtype": array.dtype.str, "shape": list(array.shape), "data": array.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _decode_hook(obj: dict) -> Any:
    if obj.get(ND_KEY) is not True:
        return obj
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"array dtype {dtype!r} is not allowed (allowed: {sorted(ALLOWED_DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"array shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(data, bytes):
        raise ProtocolError("array data must be bytes")
    dt = np.dtype(dtype)
    if len(data) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
        raise ProtocolError(f"array data has {len(data)} bytes, shape {shape} of {dtype} needs {int(np.prod(shape)) * dt.itemsize}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def pack(message: dict[str, Any]) -> bytes:
    """Encode a message (a map; numpy arrays anywhere inside) to msgpack bytes."""
    return msgpack.packb(message, default=_encode_default, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    """Decode msgpack bytes to a message map; raises ProtocolError for anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("messages must be binary frames of msgpack")
    try:
        message = msgpack.unpackb(data, object_hook=_decode_hook, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise ProtocolError(f"not a msgpack message: {type(exc).__name__}: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a msgpack map, got {type(message).__name__}")
    return message


@dataclass(frozen=True)
class ServerMetadata:
    """What the server announced on connect."""

    policy_name: str
    policy_type: str
    observation_features: dict[str, tuple[int, ...]]
    """Feature name -> shape of one frame."""
    n_obs_steps: int
    """Frames per request (T)."""
    action_chunk: int
    """Actions per reply."""
    action_dim: int
    control_hz: float | None
    backend: str
    max_message_bytes: int
    raw: dict[str, Any]

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ServerMetadata:
        try:
            return cls(
                policy_name=str(message["policy_name"]),
                policy_type=str(message["policy_type"]),
                observation_features={k: tuple(v["shape"]) for k, v in message["observation_features"].items()},
                n_obs_steps=int(message["n_obs_steps"]),
                action_chunk=int(message["action_chunk"]),
                action_dim=int(np.prod(message["action_feature"]["shape"])),
                control_hz=message.get("control_hz"),
                backend=str(message.get("backend", "")),
                max_message_bytes=int(message.get("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)),
                raw=message,
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ProtocolError(f"bad metadata from the server: {exc!r}") from exc


@dataclass(frozen=True)
class ActionChunk:
    actions: np.ndarray
    """(action_chunk, action_dim) float32: execute in order, one per control step."""
    timing: dict[str, float]
    """Server-side timing in milliseconds (and "batch": requests that shared the network pass)."""
    latency_ms: float
    """Round trip measured by the client (encode, send, server, receive, decode)."""


class PolicyClient:
    """A blocking client for one server. `connect()` (or `with`) opens it and reads the metadata."""

    def __init__(self, url: str, timeout_s: float = 10.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.url = url
        self.timeout_s = timeout_s
        self.max_message_bytes = max_message_bytes
        self._ws: Any = None
        self._metadata: ServerMetadata | None = None

    @property
    def metadata(self) -> ServerMetadata:
        if self._metadata is None:
            raise RuntimeError("not connected: call connect() first")
        return self._metadata

    def connect(self) -> ServerMetadata:
        self._ws = connect(
            self.url,
            open_timeout=self.timeout_s,
            close_timeout=2,
            max_size=self.max_message_bytes,
            compression=None,
            **CONNECT_KWARGS,
        )
        self._metadata = ServerMetadata.from_message(unpack(self._ws.recv(timeout=self.timeout_s)))
        return self._metadata

    def infer(self, observation: dict[str, np.ndarray], seed: int | None = None) -> ActionChunk:
        """Send one request (float32 arrays (T, *shape)) and wait for its chunk; ServerError on an error reply."""
        if self._ws is None:
            raise RuntimeError("not connected: call connect() first")
        message: dict[str, Any] = {k: np.asarray(v, dtype=np.float32) for k, v in observation.items()}
        if seed is not None:
            message["seed"] = int(seed)
        t0 = time.perf_counter()
        self._ws.send(pack(message))
        reply = unpack(self._ws.recv(timeout=self.timeout_s))
        latency_ms = (time.perf_counter() - t0) * 1e3
        if "error" in reply:
            raise ServerError(str(reply["error"]))
        return ActionChunk(actions=reply["actions"], timing=dict(reply.get("timing", {})), latency_ms=latency_ms)

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> PolicyClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ObservationHistory:
    """The last T observation frames per feature, as the server wants them (oldest first).

    Push every observation the robot makes (also while executing a chunk). Before T frames exist, the
    oldest one is repeated, as LeRobot's DiffusionPolicy does at the start of an episode.
    """

    def __init__(self, n_obs_steps: int):
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
        self.n_obs_steps = n_obs_steps
        self._frames: deque[dict[str, np.ndarray]] = deque(maxlen=n_obs_steps)

    def reset(self) -> None:
        self._frames.clear()

    def push(self, observation: dict[str, Any]) -> None:
        self._frames.append({k: np.asarray(v, dtype=np.float32) for k, v in observation.items()})

    def frames(self, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """Feature -> (T, *shape) float32; `keys` selects features (default: all pushed)."""
        if not self._frames:
            raise RuntimeError("push an observation first")
        frames = list(self._frames)
        frames = [frames[0]] * (self.n_obs_steps - len(frames)) + frames
        keys = list(frames[-1]) if keys is None else keys
        return {k: np.stack([f[k] for f in frames]) for k in keys}
