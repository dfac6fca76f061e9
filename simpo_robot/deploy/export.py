"""`simpo-robot export --policy P --out BUNDLE`: a self-contained deploy bundle.

The bundle is the policy in LeRobot's layout (config.json, model.safetensors, processor files: LeRobot's
factory and its async-inference server load it as is), `deploy.json` (features, chunk length, control
rate, sampler settings) and the network that onnxruntime runs inside the same sampling loop as torch (see
`simpo_robot.deploy.sampler`): `denoiser.onnx`, the noise predictor of a diffusion policy, or
`velocity.onnx`, the velocity field of a flow policy (with the time scaling of `FlowModel.velocity` inside,
so it takes t in [0, 1]). Export checks that ONNX and torch give the same actions for the same
conditioning and noise and refuses a bundle where they do not.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from simpo_robot.deploy.bundle import MANIFEST_FILE, ONNX_FILES, BundleManifest, ExportCheck
from simpo_robot.deploy.sampler import (
    FlowSamplerSettings,
    OnnxDenoiser,
    OnnxVelocity,
    SamplerNoise,
    SamplerSettings,
    TorchDenoiser,
    TorchVelocity,
    make_tables,
    sample,
    sample_flow,
    settings_for,
)
from simpo_robot.errors import SimpoRobotError

log = logging.getLogger(__name__)

TRAINING_INFO_FILE = "training_info.json"
PRETRAIN_INFO_FILE = "train_info.json"
ONNX_OPSET = 18


@dataclass
class ExportConfig:
    policy: str = ""
    """Policy to export: a local LeRobot policy folder or a Hub repo id."""
    out: Path = Path("bundle")
    """Bundle folder to write (must be empty or absent unless --overwrite true)."""
    control_hz: float | None = None
    """Control rate in steps per second; default: the source bundle's, its training_info.json's, or its task's."""
    num_inference_steps: int | None = None
    """Override the number of denoising steps (diffusion) or Euler steps K (flow); default: the policy config's."""
    max_rel_error: float = 1e-4
    """Largest accepted ONNX-vs-torch relative action error in the export check."""
    overwrite: bool = False
    """Replace an existing non-empty --out folder."""

    def __post_init__(self) -> None:
        if not self.policy:
            raise ValueError("--policy is required (a policy folder or a Hub repo id)")
        self.out = Path(self.out)
        if self.control_hz is not None and self.control_hz <= 0:
            raise ValueError(f"--control_hz must be positive, got {self.control_hz}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"--num_inference_steps must be >= 1, got {self.num_inference_steps}")


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    manifest: BundleManifest


def export_onnx(unet: Any, path: Path, horizon: int, action_dim: int, global_cond_dim: int) -> None:
    """Export the UNet (sample (B,H,Da), timestep (B,) int64, global_cond (B,C)) -> (B,H,Da), batch dynamic."""
    import torch

    args = (torch.zeros(2, horizon, action_dim), torch.zeros(2, dtype=torch.long), torch.zeros(2, global_cond_dim))
    _export(unet, args, path, arg_names=("x", "timestep", "global_cond"),
            input_names=["sample", "timestep", "global_cond"], output_name="model_output")


def export_velocity_onnx(flow: Any, path: Path, horizon: int, action_dim: int, global_cond_dim: int) -> None:
    """Export `flow.velocity` (sample (B,H,Da), t (B,) float32 in [0, 1], global_cond (B,C)) -> (B,H,Da)."""
    import torch

    from simpo_robot.policies.flow.modeling_flow import VelocityNetwork

    args = (torch.zeros(2, horizon, action_dim), torch.full((2,), 0.5), torch.zeros(2, global_cond_dim))
    _export(VelocityNetwork(flow), args, path, arg_names=("x", "t", "global_cond"),
            input_names=["sample", "t", "global_cond"], output_name="velocity")


def _export(module: Any, args: tuple, path: Path, arg_names: tuple[str, ...], input_names: list[str],
            output_name: str) -> None:
    """torch.onnx.export (dynamo) of `module(*args)` to `path`, the batch (dim 0 of every input) dynamic.

    `arg_names` are the names of `module.forward`'s parameters (the keys of dynamic_shapes), `input_names`
    the ONNX graph's input names.
    """
    import torch

    batch = torch.export.Dim("batch", min=1, max=1024)
    module = module.eval()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The exporter's own deprecation chatter (pytree LeafSpec, dynamic axis renaming) is not actionable.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*")
        program = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=[output_name],
            dynamic_shapes={name: {0: batch} for name in arg_names},
            opset_version=ONNX_OPSET,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))


def _check(ref: np.ndarray, got: np.ndarray) -> ExportCheck:
    max_abs = float(np.abs(got - ref).max())
    return ExportCheck(max_abs_error=max_abs, rel_error=max_abs / max(float(np.abs(ref).max()), 1e-12))


def check_onnx(unet: Any, onnx_path: Path, settings: SamplerSettings, horizon: int, action_dim: int,
               global_cond_dim: int, seed: int = 0, batch: int = 4) -> ExportCheck:
    """Sample the same chunks with the torch and the ONNX denoiser (same conditioning, same noise)."""
    rng = np.random.default_rng(seed)
    tables = make_tables(settings)
    cond = rng.standard_normal((batch, global_cond_dim), dtype=np.float32)
    noise = SamplerNoise.draw(rng, batch, horizon, action_dim, len(tables.timesteps))
    ref = sample(TorchDenoiser(unet), cond, noise, tables, settings)
    got = sample(OnnxDenoiser.load(str(onnx_path)), cond, noise, tables, settings)
    return _check(ref, got)


def check_velocity_onnx(flow: Any, onnx_path: Path, settings: FlowSamplerSettings, horizon: int, action_dim: int,
                        global_cond_dim: int, seed: int = 0, batch: int = 4) -> ExportCheck:
    """Sample the same chunks (K Euler steps) with the torch and the ONNX velocity network."""
    rng = np.random.default_rng(seed)
    cond = rng.standard_normal((batch, global_cond_dim), dtype=np.float32)
    noise = SamplerNoise.draw(rng, batch, horizon, action_dim, 0)
    ref = sample_flow(TorchVelocity(flow), cond, noise, settings)
    got = sample_flow(OnnxVelocity.load(str(onnx_path)), cond, noise, settings)
    return _check(ref, got)


def _control_hz(cfg: ExportConfig, folder: Path) -> float | None:
    if cfg.control_hz is not None:
        return cfg.control_hz
    if (folder / MANIFEST_FILE).is_file():  # re-exporting a bundle keeps its rate
        previous = BundleManifest.read(folder).control_hz
        if previous:
            return previous
    info: dict = {}
    for name in (PRETRAIN_INFO_FILE, TRAINING_INFO_FILE):  # fine-tuning's sidecar wins over pretraining's
        if (folder / name).is_file():
            info.update(json.loads((folder / name).read_text()))
    if info.get("control_hz"):
        return float(info["control_hz"])
    if info.get("task"):
        from simpo_robot.tasks import load_task

        try:
            return float(load_task(info["task"]).fps)
        except SimpoRobotError as exc:  # a task file that is gone: the rate is only metadata
            log.warning("could not read the control rate of task %r: %s", info["task"], exc)
    log.warning("control rate unknown (pass --control-hz); the bundle will say control_hz=null")
    return None


def run_export(cfg: ExportConfig) -> ExportResult:
    from simpo_robot.policy_io import load_policy, save_policy

    out = cfg.out
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise SimpoRobotError(f"{out} exists and is not empty; pick another --out or pass --overwrite true.")
        shutil.rmtree(out)
    loaded = load_policy(cfg.policy, device="cpu")
    config = loaded.config
    if config.type not in ONNX_FILES:
        raise SimpoRobotError(
            f"export supports diffusion and flow policies; {cfg.policy!r} is a {config.type!r} policy.")
    if cfg.num_inference_steps is not None:
        config.num_inference_steps = cfg.num_inference_steps
    try:
        settings = settings_for(config)
    except ValueError as exc:
        raise SimpoRobotError(f"--num_inference_steps {cfg.num_inference_steps} does not fit {cfg.policy!r}: {exc}") from exc
    flow = config.type == "flow"
    unet = loaded.policy.flow.unet if flow else loaded.policy.diffusion.unet
    # The FiLM layers see [timestep embedding, global cond]; the latter's width is what the network expects.
    global_cond_dim = unet.down_modules[0][0].cond_encoder[1].in_features - config.diffusion_step_embed_dim
    action_dim = int(np.prod(config.action_feature.shape))

    out.mkdir(parents=True, exist_ok=True)
    save_policy(loaded, out)
    for extra in _sidecar_files(loaded.path):
        shutil.copy2(loaded.path / extra, out / extra)

    onnx_file = ONNX_FILES[config.type]
    log.info("exporting the %s network to ONNX (opset %d)", "velocity" if flow else "denoising", ONNX_OPSET)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # per-pass INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    dims = (config.horizon, action_dim, global_cond_dim)
    if flow:
        export_velocity_onnx(loaded.policy.flow, out / onnx_file, *dims)
        check = check_velocity_onnx(loaded.policy.flow, out / onnx_file, settings, *dims)
    else:
        export_onnx(unet, out / onnx_file, *dims)
        check = check_onnx(unet, out / onnx_file, settings, *dims)
    log.info("ONNX vs torch: max abs error %.2e, relative %.2e", check.max_abs_error, check.rel_error)
    if not check.rel_error < cfg.max_rel_error:
        raise SimpoRobotError(
            f"the ONNX network differs from torch by {check.rel_error:.2e} (relative) > {cfg.max_rel_error:.0e}; "
            f"the bundle in {out} is incomplete."
        )

    manifest = BundleManifest(
        policy_type=config.type,
        policy_name=_policy_name(cfg.policy),
        source=str(cfg.policy),
        observation_features={name: list(ft.shape) for name, ft in config.input_features.items()},
        action_feature="action",
        action_shape=list(config.action_feature.shape),
        n_obs_steps=config.n_obs_steps,
        horizon=config.horizon,
        n_action_steps=config.n_action_steps,
        global_cond_dim=global_cond_dim,
        control_hz=_control_hz(cfg, loaded.path),
        sampler=settings,
        onnx_file=onnx_file,
        onnx_opset=ONNX_OPSET,
        export_check=check,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    (out / MANIFEST_FILE).write_text(manifest.to_json())
    log.info("bundle written to %s (%s, %d steps, chunk of %d actions)", out,
             "Euler" if flow else settings.noise_scheduler_type, settings.num_inference_steps, config.n_action_steps)
    return ExportResult(bundle=out, manifest=manifest)


def _policy_name(ref: str) -> str:
    path = Path(ref)
    return path.resolve().name if path.exists() else ref


def _sidecar_files(folder: Path) -> list[str]:
    """train_info.json, training_info.json and the image it names, so `push` works on a bundle too, and a SiMPO
    run's critic, so `serve --best_of` can act by it."""
    from simpo_robot.rl.critic import CRITIC_CONFIG, CRITIC_WEIGHTS

    names = [n for n in (PRETRAIN_INFO_FILE, CRITIC_CONFIG, CRITIC_WEIGHTS) if (folder / n).is_file()]
    info_file = folder / TRAINING_INFO_FILE
    if not info_file.is_file():
        return names
    names.append(TRAINING_INFO_FILE)
    try:
        curve = json.loads(info_file.read_text()).get("learning_curve")
    except json.JSONDecodeError:
        return names
    if isinstance(curve, str) and (folder / curve).is_file():
        names.append(curve)
    return names
