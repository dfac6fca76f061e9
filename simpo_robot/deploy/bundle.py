"""A deploy bundle and the inference engine that runs it (in-process, behind the server, in benchmarks).

A bundle is a LeRobot policy folder (so `DiffusionPolicy.from_pretrained`, `make_pre_post_processors`
and LeRobot's async-inference policy server load it as is; a flow policy after `import simpo_robot.policies`)
plus two files:

    deploy.json      BundleManifest: features, chunking, control rate, sampler settings, export check
    denoiser.onnx    diffusion: the noise-prediction network (inputs sample (B,H,Da), timestep (B,) int64,
                     global_cond (B,C))
    velocity.onnx    flow (instead of denoiser.onnx): the velocity network (inputs sample (B,H,Da),
                     t (B,) float32 in [0, 1], global_cond (B,C))

Observations for one request: a map feature name -> float array of shape (n_obs_steps, *feature shape),
the last n_obs_steps frames, oldest first (what LeRobot's DiffusionPolicy keeps in its queues).
The engine returns the executed part of the chunk, (n_action_steps, Da), unnormalised.

Shapes: `T` n_obs_steps, `H` horizon, `Da` action dim, `C` global conditioning dim, `K` denoising/Euler steps.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from simpo_robot.deploy.sampler import (
    FlowSamplerSettings,
    OnnxDenoiser,
    OnnxVelocity,
    SamplerNoise,
    SamplerSettings,
    SamplerTables,
    TorchDenoiser,
    TorchVelocity,
    make_tables,
    sample,
    sample_flow,
)
from simpo_robot.errors import SimpoRobotError

log = logging.getLogger(__name__)

MANIFEST_FILE = "deploy.json"
ONNX_FILE = "denoiser.onnx"
FLOW_ONNX_FILE = "velocity.onnx"
ONNX_FILES = {"diffusion": ONNX_FILE, "flow": FLOW_ONNX_FILE}
"""The exported network's file per policy type (the policy types a bundle can hold)."""
FORMAT_VERSION = 1
ACCEPTED_DTYPES = ("float32", "float64")
"""Observation dtypes a request may use; float64 is cast to float32 (the policy's dtype)."""

Backend = Literal["torch", "onnx"]


@dataclass(frozen=True)
class ExportCheck:
    """How closely the ONNX denoiser reproduced torch at export time (same conditioning, same noise)."""

    max_abs_error: float
    rel_error: float
    """max |a_onnx - a_torch| / max |a_torch| over the sampled action chunks."""


@dataclass(frozen=True)
class BundleManifest:
    """Everything a server or client needs to know about a bundle besides the weights (deploy.json)."""

    policy_type: str
    """LeRobot policy type: "diffusion" or "flow"."""
    policy_name: str
    """A human name: the source folder's name or the Hub repo id."""
    source: str
    """The --policy reference the bundle was exported from."""
    observation_features: dict[str, list[int]]
    """Feature name -> shape of one frame (without the n_obs_steps axis)."""
    action_feature: str
    action_shape: list[int]
    n_obs_steps: int
    horizon: int
    n_action_steps: int
    """Actions executed per request: the length of the chunk the server returns."""
    global_cond_dim: int
    control_hz: float | None
    """Control rate the policy was trained at (steps per second), when known."""
    sampler: SamplerSettings | FlowSamplerSettings
    """DDPM/DDIM settings (diffusion) or Euler settings (flow)."""
    onnx_file: str = ONNX_FILE
    onnx_opset: int | None = None
    export_check: ExportCheck | None = None
    created: str = ""
    """UTC time of export, ISO 8601."""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.policy_type not in ONNX_FILES:
            raise ValueError(f"policy_type {self.policy_type!r} is not one of {sorted(ONNX_FILES)}")
        settings_cls = FlowSamplerSettings if self.policy_type == "flow" else SamplerSettings
        if not isinstance(self.sampler, settings_cls):
            raise ValueError(f"a {self.policy_type} bundle needs {settings_cls.__name__}, got {type(self.sampler).__name__}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"bundle format_version {self.format_version} is not supported (expected {FORMAT_VERSION})")
        if not 1 <= self.n_action_steps <= self.horizon - self.n_obs_steps + 1:
            raise ValueError(f"n_action_steps={self.n_action_steps} does not fit horizon={self.horizon}")
        if not self.observation_features:
            raise ValueError("a bundle needs at least one observation feature")

    @property
    def action_dim(self) -> int:
        return int(np.prod(self.action_shape))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BundleManifest:
        raw = dict(raw)
        settings_cls = FlowSamplerSettings if raw.get("policy_type") == "flow" else SamplerSettings
        raw["sampler"] = settings_cls(**raw["sampler"])
        if raw.get("export_check") is not None:
            raw["export_check"] = ExportCheck(**raw["export_check"])
        return cls(**raw)

    @classmethod
    def read(cls, bundle_dir: Path) -> BundleManifest:
        file = Path(bundle_dir) / MANIFEST_FILE
        if not file.is_file():
            raise SimpoRobotError(
                f"{bundle_dir} has no {MANIFEST_FILE}; is it a bundle? Make one with `simpo-robot export`."
            )
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except (json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
            raise SimpoRobotError(f"{file} is not a valid bundle manifest: {exc}") from exc

    def metadata(self, backend: str) -> dict[str, Any]:
        """What the server sends on connect (msgpack-able)."""
        return {
            "protocol": 1,
            "policy_name": self.policy_name,
            "policy_type": self.policy_type,
            "observation_features": {
                name: {"shape": list(shape), "dtype": "float32"} for name, shape in self.observation_features.items()
            },
            "n_obs_steps": self.n_obs_steps,
            "action_feature": {"name": self.action_feature, "shape": list(self.action_shape)},
            "action_chunk": self.n_action_steps,
            "control_hz": self.control_hz,
            "backend": backend,
        }


class ObservationError(ValueError):
    """A request's observation does not match the bundle's features; the message says how."""


@dataclass(frozen=True)
class InferenceTiming:
    preprocess_ms: float
    sample_ms: float
    postprocess_ms: float
    batch: int = 1
    """Observations that shared this pass of the network."""

    @property
    def total_ms(self) -> float:
        return self.preprocess_ms + self.sample_ms + self.postprocess_ms


@dataclass(frozen=True)
class Inference:
    actions: np.ndarray
    """(n_action_steps, Da) float32, unnormalised: the chunk to execute, in order."""
    timing: InferenceTiming


@dataclass
class PolicyEngine:
    """Observation frames -> action chunk: preprocessor, conditioning, sampler (torch or ONNX), postprocessor.

    Build with `PolicyEngine.load(bundle_dir, backend)`. Not thread-safe: call `infer` from one thread.
    """

    manifest: BundleManifest
    policy: Any
    preprocessor: Any
    postprocessor: Any
    backend: Backend
    network: Any
    """The sampler's network: a noise predictor (diffusion) or a velocity field (flow), torch or ONNX."""
    tables: SamplerTables | None = field(repr=False)
    """The diffusion step tables; None for a flow policy (Euler steps need only K)."""
    noise_scale: float = 1.0
    """Scale of the drawn initial sample x_T (`simpo-robot eval --noise_scale`): 1 is the policy as trained; 0 makes
    DDIM and flow sampling deterministic. Noise passed to `infer` explicitly is used as given."""
    critic: Any = None
    """The SiMPO critic exported beside the policy (`simpo_robot.rl.critic.TwinCritic`), when acting by it."""
    best_of: int = 1
    """Chunks sampled per request; the one with the highest Q by `critic` is returned (`simpo-robot eval --best_of`)."""

    @classmethod
    def load(cls, bundle_dir: str | Path, backend: Backend = "torch", onnx_threads: int = 1,
             noise_scale: float = 1.0, best_of: int = 1) -> PolicyEngine:
        from simpo_robot.policy_io import load_policy

        if not (np.isfinite(noise_scale) and noise_scale >= 0):
            raise SimpoRobotError(f"noise_scale must be a finite number >= 0, got {noise_scale}")
        if best_of < 1 or (best_of > 1 and noise_scale != 1.0):
            raise SimpoRobotError(f"best_of must be >= 1, and > 1 only with noise_scale 1 (got best_of {best_of}, "
                                  f"noise_scale {noise_scale})")
        bundle_dir = Path(bundle_dir)
        manifest = BundleManifest.read(bundle_dir)
        loaded = load_policy(bundle_dir, device="cpu")
        if loaded.config.type != manifest.policy_type:
            raise SimpoRobotError(
                f"{bundle_dir}: {MANIFEST_FILE} says policy type {manifest.policy_type!r}, config.json says "
                f"{loaded.config.type!r}; re-export it with `simpo-robot export`.")
        flow = manifest.policy_type == "flow"
        if backend == "torch":
            network: Any = TorchVelocity(loaded.policy.flow) if flow else TorchDenoiser(loaded.policy.diffusion.unet)
        elif backend == "onnx":
            onnx_path = bundle_dir / manifest.onnx_file
            if not onnx_path.is_file():
                raise SimpoRobotError(f"{bundle_dir} has no {manifest.onnx_file}; re-export it with `simpo-robot export`.")
            network = (OnnxVelocity if flow else OnnxDenoiser).load(str(onnx_path), threads=onnx_threads)
        else:
            raise SimpoRobotError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        return cls(
            manifest=manifest,
            policy=loaded.policy,
            preprocessor=loaded.preprocessor,
            postprocessor=loaded.postprocessor,
            backend=backend,
            network=network,
            tables=None if flow else make_tables(manifest.sampler),
            noise_scale=noise_scale,
            critic=_bundle_critic(bundle_dir, manifest) if best_of > 1 else None,
            best_of=best_of,
        )

    def validate(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        """Check names, shapes, dtypes and finiteness; returns float32 arrays (T, *shape). Raises ObservationError."""
        if not isinstance(observation, dict):
            raise ObservationError(f"the observation must be a map of feature name -> array, got {type(observation).__name__}")
        expected = self.manifest.observation_features
        missing = sorted(set(expected) - set(observation))
        unexpected = sorted(set(observation) - set(expected))
        if missing:
            raise ObservationError(f"missing observation keys {missing} (expected {sorted(expected)})")
        if unexpected:
            raise ObservationError(f"unexpected observation keys {unexpected} (expected {sorted(expected)})")
        out = {}
        for name, shape in expected.items():
            value = observation[name]
            want = (self.manifest.n_obs_steps, *shape)
            if not isinstance(value, np.ndarray):
                raise ObservationError(f"{name}: expected an array of shape {list(want)}, got {type(value).__name__}")
            if value.dtype.name not in ACCEPTED_DTYPES:
                raise ObservationError(f"{name}: dtype {value.dtype.name} is not accepted (use float32)")
            if value.shape != want:
                raise ObservationError(
                    f"{name}: shape {list(value.shape)} != {list(want)} (n_obs_steps={self.manifest.n_obs_steps} frames "
                    f"of {list(shape)}, oldest first)"
                )
            if not np.isfinite(value).all():
                raise ObservationError(f"{name}: contains NaN or inf")
            out[name] = np.array(value, dtype=np.float32)  # a writable copy (wire arrays are read-only views)
        return out

    def draw_noise(self, rng: np.random.Generator, batch: int = 1) -> SamplerNoise:
        """The initial sample (B, H, Da) and, for DDPM, the per-step noise (a flow sampler needs none after x_0)."""
        m = self.manifest
        steps = 0 if self.tables is None else len(self.tables.timesteps)
        noise = SamplerNoise.draw(rng, batch, m.horizon, m.action_dim, steps)  # the same draws at any scale
        return noise if self.noise_scale == 1.0 else replace(noise, initial=self.noise_scale * noise.initial)

    def global_conditioning(self, batch: dict[str, Any]) -> np.ndarray:
        """Normalised batch (B, T, ...) tensors -> (B, C) float32, exactly as the policy's own model builds it."""
        import torch
        from lerobot.utils.constants import OBS_IMAGES

        config = self.policy.config
        model = self.policy.flow if self.manifest.policy_type == "flow" else self.policy.diffusion
        batch = dict(batch)
        if config.image_features:
            batch[OBS_IMAGES] = torch.stack([batch[key] for key in config.image_features], dim=-4)
        with torch.inference_mode():
            return model._prepare_global_conditioning(batch).numpy()

    def sample(self, global_cond: np.ndarray, noise: SamplerNoise) -> np.ndarray:
        """The full chunk (B, H, Da) in the normalised action space: the diffusion or the flow loop."""
        if self.tables is None:
            return sample_flow(self.network, global_cond, noise, self.manifest.sampler)
        return sample(self.network, global_cond, noise, self.tables, self.manifest.sampler)

    def pick_by_critic(self, batch: dict[str, Any], executed: np.ndarray) -> np.ndarray:
        """Normalised batch (B, T, ...) and the executed parts of n chunks per request (B * n, S, Da) -> (B, S, Da):
        each request's chunk with the highest Q (min of the twins), as `simpo_robot.rl.best_of` picks in evaluation."""
        import torch

        from simpo_robot.rl.best_of import chunk_q, pick_best
        from simpo_robot.tasks import OBS_ENV_STATE, OBS_STATE

        state = batch[OBS_STATE]
        env_state = batch[OBS_ENV_STATE] if OBS_ENV_STATE in batch else state[..., :0]
        chunks = torch.from_numpy(np.ascontiguousarray(executed))
        with torch.inference_mode():
            q = chunk_q(self.critic, state, env_state, chunks)
            return pick_best(q, chunks.reshape(*q.shape, *chunks.shape[1:])).numpy()

    def infer(
        self,
        observation: dict[str, np.ndarray],
        noise: SamplerNoise | None = None,
        seed: int | None = None,
        validated: bool = False,
    ) -> Inference:
        """Observation -> Inference. Noise from `noise` (batch `best_of`), else drawn from `seed` (None: fresh).

        `validated=True` skips `validate` for an observation that already went through it.
        """
        return self.infer_batch([observation], seeds=[seed], noise=noise, validated=validated)[0]

    def infer_batch(
        self,
        observations: list[dict[str, np.ndarray]],
        seeds: list[int | None] | None = None,
        noise: SamplerNoise | None = None,
        validated: bool = False,
    ) -> list[Inference]:
        """B observations -> B Inferences in one pass of the network (the server batches concurrent requests).

        Request i's noise is drawn from `seeds[i]` alone, so its chunk does not depend on what it was
        batched with (up to float rounding of the batched kernels); `noise` (batch B * best_of, request by request)
        overrides the seeds. With best_of > 1 each request gets the best of its samples by the critic.
        """
        import torch

        obs = observations if validated else [self.validate(o) for o in observations]
        seeds = seeds if seeds is not None else [None] * len(obs)
        t0 = time.perf_counter()
        batch = {name: torch.from_numpy(np.stack([o[name] for o in obs])) for name in obs[0]}  # (B, T, ...)
        with torch.inference_mode():
            batch = self.preprocessor(batch)
        cond = self.global_conditioning(batch)
        t1 = time.perf_counter()
        n = self.best_of
        if noise is None:  # request i's n samples all come from seeds[i]
            parts = [self.draw_noise(np.random.default_rng(seed), batch=n) for seed in seeds]
            noise = SamplerNoise(initial=np.concatenate([p.initial for p in parts]),
                                 steps=np.concatenate([p.steps for p in parts], axis=1))
        chunk = self.sample(np.repeat(cond, n, axis=0) if n > 1 else cond, noise)  # (B * n, H, Da)
        start = self.manifest.n_obs_steps - 1  # as DiffusionModel.generate_actions
        chunk = chunk[:, start : start + self.manifest.n_action_steps]
        if n > 1:
            chunk = self.pick_by_critic(batch, chunk)
        t2 = time.perf_counter()
        with torch.inference_mode():
            actions = self.postprocessor(torch.from_numpy(np.ascontiguousarray(chunk)))
        actions = actions.numpy().astype(np.float32, copy=False)
        t3 = time.perf_counter()
        timing = InferenceTiming((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, batch=len(obs))
        return [Inference(actions=a, timing=timing) for a in actions]


def _bundle_critic(bundle_dir: Path, manifest: BundleManifest) -> Any:
    """The critic exported beside the policy, checked against the bundle's observation and chunk sizes."""
    from simpo_robot.rl.critic import load_critic
    from simpo_robot.tasks import OBS_ENV_STATE, OBS_STATE

    critic, _ = load_critic(bundle_dir)
    features = manifest.observation_features
    if set(features) - {OBS_STATE, OBS_ENV_STATE}:
        raise SimpoRobotError(f"{bundle_dir}: acting by the critic supports state-only policies, not {sorted(features)}")
    obs_dim = manifest.n_obs_steps * sum(int(np.prod(shape)) for shape in features.values())
    chunk_dim = manifest.n_action_steps * int(np.prod(manifest.action_shape))
    if (critic.obs_dim, critic.chunk_dim) != (obs_dim, chunk_dim):
        raise SimpoRobotError(f"{bundle_dir}: the critic takes ({critic.obs_dim}, {critic.chunk_dim}) observation and chunk "
                              f"numbers, the bundle gives ({obs_dim}, {chunk_dim}); export the run's final/ folder as is.")
    return critic
