"""`FlowConfig`: a state-only rectified-flow policy over action chunks, registered in LeRobot as "flow".

The sizes and features mirror LeRobot's `DiffusionConfig` (same field names where the meaning is the same:
the 1-D conditional UNet of the diffusion policy is reused as the velocity network and reads them), so a
flow policy and a diffusion policy built from the same task and sizes differ only in what the network
predicts (a velocity instead of the noise) and how actions are sampled (K Euler steps instead of DDIM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs import NormalizationMode, PreTrainedConfig
from lerobot.optim import AdamConfig, DiffuserSchedulerConfig


@PreTrainedConfig.register_subclass("flow")
@dataclass
class FlowConfig(PreTrainedConfig):
    """Configuration of `FlowPolicy` (simpo_robot.policies.flow.modeling_flow).

    Inputs: "observation.state" (required) and "observation.environment_state" (required); no cameras.
    Output: "action".
    """

    n_obs_steps: int = 2
    """Observations the policy conditions on (the current one and n_obs_steps - 1 before it)."""
    horizon: int = 16
    """Actions generated per chunk (a multiple of 2^len(down_dims))."""
    n_action_steps: int = 8
    """Actions executed per chunk before re-planning (<= horizon - n_obs_steps + 1)."""

    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "STATE": NormalizationMode.MEAN_STD,
            "ENV": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MIN_MAX,
        }
    )
    """Normalisation per feature type (the same as simpo-robot's diffusion policies)."""
    drop_n_last_frames: int = 7
    """Frames at the end of each episode that start no training window (horizon - n_action_steps - n_obs_steps + 1)."""

    down_dims: tuple[int, ...] = (32, 64, 128)
    """UNet channel widths per resolution."""
    kernel_size: int = 5
    """Convolution kernel size of the UNet."""
    n_groups: int = 8
    """GroupNorm groups in the UNet's blocks."""
    diffusion_step_embed_dim: int = 64
    """Width of the UNet's (flow-)time embedding. The name is DiffusionConfig's: the UNet reads it."""
    use_film_scale_modulation: bool = True
    """FiLM conditioning with scale and bias (False: bias only)."""
    gradient_checkpointing: bool = False
    """Recompute the UNet blocks in the backward pass (less memory, more compute)."""

    timestep_scale: float = 100.0
    """The UNet's sinusoidal time embedding sees t * timestep_scale for flow time t in [0, 1]; 100 spans the
    range 0..99 that the same embedding sees as integer DDPM timesteps in the diffusion policy."""
    num_inference_steps: int = 10
    """K, the Euler steps from noise (t = 0) to action (t = 1) at inference: t_k = k / K, k = 0..K-1."""
    clip_sample: bool = True
    """Clip the sampled chunk to [-clip_sample_range, clip_sample_range] (normalised action space)."""
    clip_sample_range: float = 1.0
    do_mask_loss_for_padding: bool = False
    """Leave copy-padded actions past an episode's end out of the loss (LeRobot's diffusion default: keep them)."""

    optimizer_lr: float = 1e-4
    optimizer_betas: tuple = (0.95, 0.999)
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float = 1e-6
    scheduler_name: str = "cosine"
    scheduler_warmup_steps: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_obs_steps", "horizon", "n_action_steps", "kernel_size", "n_groups", "diffusion_step_embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(
                f"num_inference_steps (Euler steps K) must be an integer >= 1, got {self.num_inference_steps!r}")
        if not self.timestep_scale > 0:
            raise ValueError(f"timestep_scale must be > 0, got {self.timestep_scale}")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if not self.down_dims:
            raise ValueError("down_dims must name at least one UNet width")
        factor = 2 ** len(self.down_dims)
        if self.horizon % factor:
            raise ValueError(f"horizon {self.horizon} must be a multiple of {factor} (2^len(down_dims={self.down_dims}))")
        if self.n_action_steps > self.horizon - self.n_obs_steps + 1:
            raise ValueError(
                f"n_action_steps {self.n_action_steps} must be <= horizon - n_obs_steps + 1 "
                f"= {self.horizon - self.n_obs_steps + 1}")

    def get_optimizer_preset(self) -> AdamConfig:
        return AdamConfig(lr=self.optimizer_lr, betas=self.optimizer_betas, eps=self.optimizer_eps,
                          weight_decay=self.optimizer_weight_decay)

    def get_scheduler_preset(self) -> DiffuserSchedulerConfig:
        return DiffuserSchedulerConfig(name=self.scheduler_name, num_warmup_steps=self.scheduler_warmup_steps)

    def validate_features(self) -> None:
        if self.image_features:
            raise ValueError(
                f"the flow policy is state-only; it cannot take camera features {sorted(self.image_features)} "
                "(use LeRobot's diffusion policy for images)")
        if self.robot_state_feature is None:
            raise ValueError("the flow policy needs an 'observation.state' input feature")
        if self.env_state_feature is None:
            raise ValueError("the flow policy needs an 'observation.environment_state' input feature")
        if self.action_feature is None:
            raise ValueError("the flow policy needs an 'action' output feature")

    @property
    def observation_delta_indices(self) -> list:
        return list(range(1 - self.n_obs_steps, 1))

    @property
    def action_delta_indices(self) -> list:
        return list(range(1 - self.n_obs_steps, 1 - self.n_obs_steps + self.horizon))

    @property
    def reward_delta_indices(self) -> None:
        return None
