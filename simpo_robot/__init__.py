"""simpo-robot: online fine-tuning of pretrained LeRobot diffusion/flow policies with SiMPO."""

__version__ = "0.1.0"
