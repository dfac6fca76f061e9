"""`simpo-robot serve --bundle BUNDLE --host 127.0.0.1 --port N`: the policy server.

One asyncio event loop owns the sockets (WebSocket, msgpack; the protocol is in
`simpo_robot.deploy.client`). Requests that arrive while a pass of the network is running are batched
into the next pass (up to `max_batch`), in arrival order: one client never waits for a batch to fill,
and many clients share passes. A request's noise comes from its own seed, so its actions do not depend
on what it was batched with.

Where passes run (`inference`): "inline" (default) runs them on the event loop between socket reads:
no thread hand-off, the lowest latency (about 0.5 ms less per request on a small VM, where waking an
idle thread is slow); sockets are served between passes, so limits, timeouts and batching all hold, but
each pass delays the loop by its duration. "thread" runs them on a dedicated inference thread, so the
loop stays responsive during long passes (large models, GPUs) at the cost of one more thread wake-up.

Robustness: every bad request (not msgpack, not a map, missing or unexpected keys, wrong shapes or
dtypes, NaN/inf) gets `{"error": message}` and the connection stays open; a message over
`max_message_bytes` closes the connection (code 1009) before it is read into memory; a client that
disconnects mid-request is dropped after its inference finishes; a client that completes no handshake
within `open_timeout_s` or sends nothing for `idle_timeout_s` is disconnected. SIGTERM/SIGINT stop
accepting connections, finish the requests in flight, close every connection (1001) and exit 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simpo_robot.deploy.bundle import ObservationError, PolicyEngine
from simpo_robot.deploy.client import ProtocolError, pack, unpack
from simpo_robot.errors import SimpoRobotError

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    bundle: Path = Path("bundle")
    """Bundle folder written by `simpo-robot export`."""
    host: str = "127.0.0.1"
    """Interface to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface, no authentication!)."""
    port: int = 8765
    """TCP port (0 picks a free one; the log says which)."""
    backend: str = "onnx"
    """Denoiser backend: "onnx" (onnxruntime on the exported denoiser.onnx, checked against torch at export;
    about 4x faster on CPU) or "torch" (the policy's own network)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request accepted; a bigger one closes the connection (WebSocket close code 1009)."""
    idle_timeout_s: float = 60.0
    """Disconnect a client that sends no request for this long."""
    open_timeout_s: float = 5.0
    """Disconnect a client that does not complete the WebSocket handshake within this time."""
    max_clients: int = 64
    """Connections beyond this are refused (close code 1013, try again later)."""
    threads: int = 1
    """CPU threads for torch and onnxruntime inference (1 is fastest for small policies on shared CPUs)."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, how long requests in flight may take to finish."""
    max_batch: int = 8
    """Most requests run in one pass of the network (1: one request at a time)."""
    noise_scale: float = 1.0
    """Scale of the sampler's initial noise x_T: 1 is the policy as trained; 0 makes DDIM and flow policies
    deterministic (`simpo-robot eval --noise_scale` measures what it does to success). `PolicyEngine.load` checks it."""
    best_of: int = 1
    """Sample this many chunks per request and answer with the one the SiMPO critic rates highest (the bundle must
    come from a `finetune --algo simpo` run's final/ folder, which holds the critic; `simpo-robot eval --best_of`
    measures what it does to success). The N samples of each request go through the network in one batch."""
    inference: str = "inline"
    """Where passes run: "inline" (on the event loop, lowest latency) or "thread" (a dedicated thread,
    for passes long enough that the loop should keep answering meanwhile)."""

    def __post_init__(self) -> None:
        self.bundle = Path(self.bundle)
        if self.inference not in ("inline", "thread"):
            raise ValueError(f"--inference must be 'inline' or 'thread', got {self.inference!r}")
        if self.backend not in ("torch", "onnx"):
            raise ValueError(f"--backend must be 'torch' or 'onnx', got {self.backend!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        for name in ("max_message_bytes", "max_clients", "threads", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("idle_timeout_s", "open_timeout_s", "shutdown_grace_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")


@dataclass
class _Connection:
    busy: bool = False


@dataclass
class _Pending:
    """A validated request waiting for the inference thread."""

    obs: dict[str, Any]
    seed: int | None
    future: asyncio.Future
    """Resolves to (Inference, time its pass started)."""


class PolicyServer:
    """Serves one PolicyEngine. `await serve(stop)` runs until `stop` is set, then shuts down gracefully."""

    def __init__(self, engine: PolicyEngine, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.port: int | None = None
        self.requests = 0
        self.errors = 0
        self._connections: dict[Any, _Connection] = {}
        self._stopping = False
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._metadata = pack({
            **engine.manifest.metadata(engine.backend),
            "max_message_bytes": config.max_message_bytes,
        })

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[int], None] | None = None) -> None:
        from websockets.asyncio.server import serve

        cfg = self.config
        if cfg.inference == "thread":
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._queue = asyncio.Queue()
        batcher = asyncio.create_task(self._batcher())
        try:
            async with serve(
                self._handle,
                cfg.host,
                cfg.port,
                max_size=cfg.max_message_bytes,
                open_timeout=cfg.open_timeout_s,
                compression=None,  # float arrays do not compress; deflate only adds latency
                ping_interval=20,
                ping_timeout=20,
                close_timeout=2,
            ) as server:
                self.port = server.sockets[0].getsockname()[1]
                log.info(
                    "serving %s (%s backend, noise scale %g, best of %d) on ws://%s:%d", self.engine.manifest.policy_name,
                    self.engine.backend, self.engine.noise_scale, self.engine.best_of, cfg.host, self.port,
                )
                if on_ready is not None:
                    on_ready(self.port)
                await stop.wait()
                log.info("shutting down: finishing %d request(s) in flight",
                         sum(c.busy for c in self._connections.values()))
                self._stopping = True
                server.close(close_connections=False)
                for ws, conn in list(self._connections.items()):
                    if not conn.busy:
                        await ws.close(1001, "server shutting down")
                try:
                    await asyncio.wait_for(server.wait_closed(), timeout=cfg.shutdown_grace_s)
                except TimeoutError:
                    log.warning("requests still running after %.0f s; closing anyway", cfg.shutdown_grace_s)
        finally:
            batcher.cancel()
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
        log.info("stopped after %d request(s), %d error reply(ies)", self.requests, self.errors)

    async def _handle(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        peer = ws.remote_address
        if self._stopping:
            await ws.close(1001, "server shutting down")
            return
        if len(self._connections) >= self.config.max_clients:
            log.warning("refusing %s: %d clients connected", peer, len(self._connections))
            await ws.close(1013, "too many clients")
            return
        conn = self._connections[ws] = _Connection()
        log.info("client %s connected (%d open)", peer, len(self._connections))
        try:
            await ws.send(self._metadata)
            while not self._stopping:
                try:
                    data = await asyncio.wait_for(ws.recv(), timeout=self.config.idle_timeout_s)
                except TimeoutError:
                    log.info("client %s idle for %.0f s: disconnecting", peer, self.config.idle_timeout_s)
                    await ws.close(1008, "idle timeout")
                    return
                conn.busy = True
                try:
                    reply = await self._reply(data)
                    await ws.send(pack(reply))
                finally:
                    conn.busy = False
            await ws.close(1001, "server shutting down")
        except ConnectionClosed as exc:
            log.info("client %s disconnected (%s)", peer, exc.rcvd.code if exc.rcvd else "no close frame")
        finally:
            del self._connections[ws]

    async def _reply(self, data: Any) -> dict[str, Any]:
        t_recv = time.perf_counter()
        self.requests += 1
        try:
            message = unpack(data)
            seed = message.pop("seed", None)
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
                raise ProtocolError(f"seed must be a non-negative int, got {seed!r}")
            obs = self.engine.validate(message)
        except (ProtocolError, ObservationError) as exc:
            self.errors += 1
            return {"error": str(exc)}
        t_decoded = time.perf_counter()
        pending = _Pending(obs, seed, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        try:
            result, started = await pending.future
        except Exception as exc:  # a failure inside the policy must not take the server down
            self.errors += 1
            return {"error": f"inference failed: {type(exc).__name__}: {exc}"}
        t_done = time.perf_counter()
        timing = {
            "decode_ms": (t_decoded - t_recv) * 1e3,
            "queue_ms": (started - t_decoded) * 1e3,
            "batch": result.timing.batch,
            "preprocess_ms": result.timing.preprocess_ms,
            "sample_ms": result.timing.sample_ms,
            "postprocess_ms": result.timing.postprocess_ms,
            "server_ms": (t_done - t_recv) * 1e3,
        }
        return {"actions": result.actions, "timing": timing}

    async def _batcher(self) -> None:
        """Take the waiting requests (up to max_batch) and run them in one pass (inline or on the thread)."""
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            if self._executor is None and len(self._connections) > 1:
                # An inline pass blocks the loop: first let requests already on other sockets reach the
                # queue (one loop turn reads the sockets, the next runs their handlers) so they share it.
                for _ in range(3):
                    await asyncio.sleep(0)
            while len(batch) < self.config.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            started = time.perf_counter()
            infer = functools.partial(self.engine.infer_batch, [p.obs for p in batch], [p.seed for p in batch],
                                      validated=True)
            try:
                results = infer() if self._executor is None else await loop.run_in_executor(self._executor, infer)
            except Exception as exc:
                log.exception("inference failed for a batch of %d", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, result in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result((result, started))
            await asyncio.sleep(0)  # let the replies go out before the next pass (inline passes never yield)


class BackgroundServer:
    """A PolicyServer on its own thread and event loop (tests, benchmarks, notebooks).

    with BackgroundServer(engine, config) as url: ...   # ws://host:port, stopped gracefully on exit
    """

    def __init__(self, engine: PolicyEngine, config: ServeConfig):
        self.server = PolicyServer(engine, config)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.server.config.host}:{self.server.port}"

    def start(self, timeout_s: float = 10.0) -> str:
        self._thread = threading.Thread(target=self._run, name="policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the server did not start within {timeout_s} s: {self._error!r}")
        if self._error is not None:
            raise RuntimeError(f"the server failed to start: {self._error!r}") from self._error
        return self.url

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.server.serve(self._stop, on_ready=lambda port: self._ready.set())

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def stop(self, timeout_s: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout_s)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_serve(cfg: ServeConfig) -> None:
    if not cfg.bundle.is_dir():
        raise SimpoRobotError(f"bundle {cfg.bundle} does not exist; make one with `simpo-robot export`.")
    set_threads(cfg.threads)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # per-connection open/close lines: ours say more
    engine = PolicyEngine.load(cfg.bundle, backend=cfg.backend, onnx_threads=cfg.threads,  # type: ignore[arg-type]
                               noise_scale=cfg.noise_scale, best_of=cfg.best_of)
    warm = engine.infer(_zeros_observation(engine), seed=0)  # load kernels now, not on the first robot request
    log.info("warm-up inference: %.1f ms", warm.timing.total_ms)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await PolicyServer(engine, cfg).serve(stop)

    try:
        asyncio.run(main())
    except OSError as exc:  # port in use, host not local, ...
        raise SimpoRobotError(f"cannot listen on {cfg.host}:{cfg.port}: {exc}") from exc


def _zeros_observation(engine: PolicyEngine) -> dict[str, Any]:
    import numpy as np

    m = engine.manifest
    return {name: np.zeros((m.n_obs_steps, *shape), dtype=np.float32) for name, shape in m.observation_features.items()}
