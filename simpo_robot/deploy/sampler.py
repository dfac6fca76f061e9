"""The sampling loops with explicit timesteps and explicit noise, in numpy around any network:
diffusion (DDPM/DDIM around a noise predictor) and flow (Euler around a velocity field).

Shapes: `B` batch, `H` horizon (steps the denoiser generates), `Da` action dim, `C` global
conditioning dim, `K` inference (denoising or Euler) steps.

The same loop runs around the torch noise-prediction network (`TorchDenoiser`) and around its ONNX
export (`OnnxDenoiser`), so the two backends differ only in the network: given the same observation
and the same `SamplerNoise`, they give the same actions up to float rounding.

diffusers' schedulers provide the tables (alphas_cumprod, the inference timesteps); the steps are
computed here from those tables, never through a scheduler's internal step counter. One step, for
model output m at timestep t with previous timestep t' (t' = -1 after the last step):

    x0   = (x - sqrt(1 - a_t) * m) / sqrt(a_t)          prediction_type "epsilon"
    x0   = m                                             prediction_type "sample"
    x0   = clip(x0, -r, r)                               when clip_sample
    DDPM:  x' = sqrt(a_t') * b_t / (1 - a_t) * x0 + sqrt(1 - b_t) * (1 - a_t') / (1 - a_t) * x + s_t * z
           b_t = 1 - a_t / a_t',  s_t = sqrt((1 - a_t') / (1 - a_t) * b_t) for t > 0, else 0
    DDIM (eta = 0):  x' = sqrt(a_t') * x0 + sqrt(1 - a_t') * eps,   eps = the model's noise estimate

with a = alphas_cumprod (a_{-1} = 1) and z the explicit per-step noise. This is exactly what
`DDPMScheduler.step` / `DDIMScheduler.step` compute (fixed_small variance, no thresholding).

Flow (rectified flow, `simpo_robot.policies.flow`; t = 0 is noise, t = 1 the action), K Euler steps:

    x_0 = initial noise,   x_{k+1} = x_k + (1/K) v(x_k, t_k),   t_k = k / K,   action = clip(x_K, -r, r)

The velocity network takes t in [0, 1] (the torch policy and its ONNX export scale it for the UNet's
time embedding themselves), so the loop needs nothing but K. It adds no noise after the initial sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Denoiser = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(x (B, H, Da) float32, timestep (B,) int64, global_cond (B, C) float32) -> model output (B, H, Da)."""

Velocity = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(x (B, H, Da) float32, t (B,) float32 in [0, 1], global_cond (B, C) float32) -> velocity (B, H, Da)."""

SCHEDULERS = ("DDPM", "DDIM")
PREDICTION_TYPES = ("epsilon", "sample")


@dataclass(frozen=True)
class SamplerSettings:
    """How actions are sampled: the noise scheduler and the number of inference steps.

    The fields mirror LeRobot's `DiffusionConfig` (same names), so a bundle's sampler settings can be
    checked against its policy config.
    """

    noise_scheduler_type: str
    """"DDPM" or "DDIM"."""
    num_train_timesteps: int
    """Length of the forward diffusion schedule the network was trained on."""
    num_inference_steps: int
    """Denoising steps at inference (K), evenly spaced over the training schedule."""
    beta_schedule: str
    """diffusers beta schedule name, e.g. "squaredcos_cap_v2"."""
    beta_start: float
    beta_end: float
    prediction_type: str
    """"epsilon" (the network predicts the noise) or "sample" (it predicts the clean action)."""
    clip_sample: bool
    """Clip the predicted clean sample to [-clip_sample_range, clip_sample_range] at every step."""
    clip_sample_range: float

    def __post_init__(self) -> None:
        if self.noise_scheduler_type not in SCHEDULERS:
            raise ValueError(f"noise_scheduler_type must be one of {SCHEDULERS}, got {self.noise_scheduler_type!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, num_train_timesteps={self.num_train_timesteps}], "
                f"got {self.num_inference_steps}"
            )

    @classmethod
    def from_policy_config(cls, config: Any) -> SamplerSettings:
        """Read the settings from a LeRobot `DiffusionConfig` (num_inference_steps None = training steps)."""
        steps = config.num_inference_steps or config.num_train_timesteps
        return cls(
            noise_scheduler_type=config.noise_scheduler_type,
            num_train_timesteps=config.num_train_timesteps,
            num_inference_steps=steps,
            beta_schedule=config.beta_schedule,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            prediction_type=config.prediction_type,
            clip_sample=config.clip_sample,
            clip_sample_range=config.clip_sample_range,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SamplerTables:
    """Per-step scalars of the reverse process, each of shape (K,), in the order the steps run."""

    timesteps: np.ndarray
    """(K,) int64, decreasing: the training timestep each denoising step starts from."""
    sqrt_alpha_prod: np.ndarray
    """sqrt(a_t)."""
    sqrt_one_minus_alpha_prod: np.ndarray
    """sqrt(1 - a_t)."""
    x0_coeff: np.ndarray
    """Coefficient of the clipped clean-sample estimate x0 in x'."""
    x_coeff: np.ndarray
    """Coefficient of the current sample x in x' (DDPM; 0 for DDIM)."""
    eps_coeff: np.ndarray
    """Coefficient of the noise estimate in x' (DDIM; 0 for DDPM)."""
    noise_std: np.ndarray
    """s_t, the std of the fresh noise added at the step (0 at t = 0 and for DDIM)."""


def make_tables(settings: SamplerSettings) -> SamplerTables:
    """Build the step tables from the diffusers scheduler's alphas_cumprod and inference timesteps."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    scheduler_cls = DDPMScheduler if settings.noise_scheduler_type == "DDPM" else DDIMScheduler
    scheduler = scheduler_cls(
        num_train_timesteps=settings.num_train_timesteps,
        beta_start=settings.beta_start,
        beta_end=settings.beta_end,
        beta_schedule=settings.beta_schedule,
        clip_sample=settings.clip_sample,
        clip_sample_range=settings.clip_sample_range,
        prediction_type=settings.prediction_type,
    )
    scheduler.set_timesteps(settings.num_inference_steps)
    timesteps = scheduler.timesteps.numpy().astype(np.int64)
    # Computed in float64 from the float32 table diffusers uses, then stored as float32.
    alphas = scheduler.alphas_cumprod.numpy().astype(np.float64)
    k = len(timesteps)
    if settings.noise_scheduler_type == "DDPM":
        prev = np.append(timesteps[1:], -1)  # DDPMScheduler.previous_timestep
    else:
        prev = timesteps - settings.num_train_timesteps // settings.num_inference_steps  # DDIM
    a_t = alphas[timesteps]
    a_prev = np.where(prev >= 0, alphas[np.maximum(prev, 0)], 1.0)
    if settings.noise_scheduler_type == "DDPM":
        beta = 1.0 - a_t / a_prev
        x0_coeff = np.sqrt(a_prev) * beta / (1.0 - a_t)
        x_coeff = np.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a_t)
        eps_coeff = np.zeros(k)
        variance = np.maximum((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20)
        noise_std = np.where(timesteps > 0, np.sqrt(variance), 0.0)
    else:
        x0_coeff = np.sqrt(a_prev)
        x_coeff = np.zeros(k)
        eps_coeff = np.sqrt(1.0 - a_prev)
        noise_std = np.zeros(k)
    f32 = np.float32
    return SamplerTables(
        timesteps=timesteps,
        sqrt_alpha_prod=np.sqrt(a_t).astype(f32),
        sqrt_one_minus_alpha_prod=np.sqrt(1.0 - a_t).astype(f32),
        x0_coeff=x0_coeff.astype(f32),
        x_coeff=x_coeff.astype(f32),
        eps_coeff=eps_coeff.astype(f32),
        noise_std=noise_std.astype(f32),
    )


@dataclass(frozen=True)
class SamplerNoise:
    """All the randomness of one sampling run, drawn up front."""

    initial: np.ndarray
    """(B, H, Da) float32: the starting sample x_T."""
    steps: np.ndarray
    """(K, B, H, Da) float32: z for each step (unused where noise_std is 0)."""

    @classmethod
    def draw(cls, rng: np.random.Generator, batch: int, horizon: int, action_dim: int, num_steps: int) -> SamplerNoise:
        shape = (batch, horizon, action_dim)
        initial = rng.standard_normal(shape, dtype=np.float32)
        steps = rng.standard_normal((num_steps, *shape), dtype=np.float32)
        return cls(initial=initial, steps=steps)


def sample(
    denoise: Denoiser, global_cond: np.ndarray, noise: SamplerNoise, tables: SamplerTables, settings: SamplerSettings
) -> np.ndarray:
    """Run the K denoising steps from `noise.initial`; returns the clean sample (B, H, Da) float32."""
    x = noise.initial.astype(np.float32, copy=True)
    batch = x.shape[0]
    for k, t in enumerate(tables.timesteps):
        out = np.asarray(denoise(x, np.full((batch,), t, dtype=np.int64), global_cond), dtype=np.float32)
        if settings.prediction_type == "epsilon":
            eps = out
            x0 = (x - tables.sqrt_one_minus_alpha_prod[k] * out) / tables.sqrt_alpha_prod[k]
        else:
            x0 = out
            eps = (x - tables.sqrt_alpha_prod[k] * out) / tables.sqrt_one_minus_alpha_prod[k]
        if settings.clip_sample:
            x0 = np.clip(x0, -settings.clip_sample_range, settings.clip_sample_range)
        x_next = tables.x0_coeff[k] * x0 + tables.x_coeff[k] * x + tables.eps_coeff[k] * eps
        if tables.noise_std[k] > 0:
            x_next = x_next + tables.noise_std[k] * noise.steps[k]
        x = x_next.astype(np.float32, copy=False)
    return x


class TorchDenoiser:
    """The policy's own noise-prediction network (LeRobot `DiffusionConditionalUnet1d`) on CPU."""

    def __init__(self, unet: Any):
        self.unet = unet

    def __call__(self, x: np.ndarray, timestep: np.ndarray, global_cond: np.ndarray) -> np.ndarray:
        return _call_torch(self.unet, x, timestep, global_cond)


def _call_torch(network: Any, x: np.ndarray, t: np.ndarray, global_cond: np.ndarray) -> np.ndarray:
    """`network(x, t, global_cond)` on torch views of the arrays, without autograd; the output as numpy."""
    import torch

    with torch.inference_mode():
        out = network(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(global_cond))
    return out.numpy()


class OnnxDenoiser:
    """The exported network run by onnxruntime (inputs "sample", "timestep", "global_cond")."""

    def __init__(self, session: Any):
        self.session = session

    @classmethod
    def load(cls, path: str, threads: int = 1) -> OnnxDenoiser:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        return cls(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))

    def __call__(self, x: np.ndarray, timestep: np.ndarray, global_cond: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"sample": x, "timestep": timestep, "global_cond": global_cond})[0]


@dataclass(frozen=True)
class FlowSamplerSettings:
    """How a flow policy's actions are sampled (the fields mirror `FlowConfig`'s)."""

    num_inference_steps: int
    """K, the Euler steps from noise (t = 0) to action (t = 1)."""
    clip_sample: bool
    """Clip the final sample to [-clip_sample_range, clip_sample_range]."""
    clip_sample_range: float

    def __post_init__(self) -> None:
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps (Euler steps K) must be an integer >= 1, got {self.num_inference_steps!r}")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")

    @classmethod
    def from_policy_config(cls, config: Any) -> FlowSamplerSettings:
        """Read the settings from a `FlowConfig`."""
        return cls(num_inference_steps=config.num_inference_steps, clip_sample=config.clip_sample,
                   clip_sample_range=config.clip_sample_range)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def settings_for(config: Any) -> SamplerSettings | FlowSamplerSettings:
    """The sampler settings of a LeRobot policy config: diffusion or flow; ValueError for any other type."""
    if config.type == "flow":
        return FlowSamplerSettings.from_policy_config(config)
    if config.type == "diffusion":
        return SamplerSettings.from_policy_config(config)
    raise ValueError(f"no sampler for policy type {config.type!r} (supported: diffusion, flow)")


def euler_times(num_steps: int) -> np.ndarray:
    """(K,) float32 start times t_k = k / K of the K Euler steps (the same float32 values as the torch policy)."""
    if num_steps < 1:
        raise ValueError(f"the number of Euler steps must be >= 1, got {num_steps}")
    return np.arange(num_steps, dtype=np.float32) / np.float32(num_steps)


def euler_step(x: np.ndarray, velocity: np.ndarray, dt: float) -> np.ndarray:
    """x + dt * v, in float32."""
    return (x + np.float32(dt) * velocity).astype(np.float32, copy=False)


def sample_flow(velocity: Velocity, global_cond: np.ndarray, noise: SamplerNoise,
                settings: FlowSamplerSettings) -> np.ndarray:
    """Integrate from `noise.initial` (t = 0) to t = 1 in K Euler steps; returns (B, H, Da) float32."""
    x = noise.initial.astype(np.float32, copy=True)
    batch = x.shape[0]
    dt = 1.0 / settings.num_inference_steps
    for t in euler_times(settings.num_inference_steps):
        v = np.asarray(velocity(x, np.full((batch,), t, dtype=np.float32), global_cond), dtype=np.float32)
        x = euler_step(x, v, dt)
    if settings.clip_sample:
        x = np.clip(x, -settings.clip_sample_range, settings.clip_sample_range)
    return x


class TorchVelocity:
    """The flow policy's own velocity network (`FlowModel.velocity`, which scales t for the UNet) on CPU."""

    def __init__(self, flow: Any):
        self.flow = flow

    def __call__(self, x: np.ndarray, t: np.ndarray, global_cond: np.ndarray) -> np.ndarray:
        return _call_torch(self.flow.velocity, x, t, global_cond)


class OnnxVelocity(OnnxDenoiser):
    """The exported velocity network run by onnxruntime (inputs "sample", "t" (B,) float32, "global_cond")."""

    def __call__(self, x: np.ndarray, t: np.ndarray, global_cond: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"sample": x, "t": t, "global_cond": global_cond})[0]
