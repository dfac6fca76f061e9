"""SiMPO's core math as small pure functions: weightings, normalisers, temperature, matching losses."""

from simpo_robot.simpo.matching import (
    DEFAULT_CLIP,
    FlowSample,
    diffuse,
    flow_interpolate,
    make_noise_scheduler,
    weighted_denoising_loss,
    weighted_flow_loss,
)
from simpo_robot.simpo.temperature import (
    LearnedTemperature,
    temperature_loss,
    weight_entropy,
    weight_kl_from_uniform,
)
from simpo_robot.simpo.weighting import WEIGHTINGS, ParticleWeights, Weighting, get_weighting, solve_weights

__all__ = [
    "DEFAULT_CLIP",
    "WEIGHTINGS",
    "FlowSample",
    "LearnedTemperature",
    "ParticleWeights",
    "Weighting",
    "diffuse",
    "flow_interpolate",
    "get_weighting",
    "make_noise_scheduler",
    "solve_weights",
    "temperature_loss",
    "weight_entropy",
    "weight_kl_from_uniform",
    "weighted_denoising_loss",
    "weighted_flow_loss",
]
