"""`simpo-robot pretrain`: behaviour-clone a LeRobot `DiffusionPolicy` (or a `FlowPolicy`) from a local dataset.

State-only policy (no camera): a small 1-D conditional UNet over action chunks, trained as a DDPM noise
predictor (`--policy-type diffusion`, the default) or as a rectified-flow velocity field (`--policy-type flow`,
`simpo_robot.policies.flow`). Feature shapes come from the task's env spaces and must match the dataset's.
Training uses Accelerate; the output folder has LeRobot's layout (config.json, model.safetensors,
policy_{pre,post}processor.json + stats), which stock `DiffusionPolicy.from_pretrained` (or, after
`import simpo_robot.policies`, `FlowPolicy.from_pretrained`) and `make_pre_post_processors(pretrained_path=...)` load.

The windows (n_obs_steps observations, horizon actions, padding flags) are read once through
`LeRobotDataset` with LeRobot's delta timestamps and kept in memory: the datasets are small and CPU time
is better spent on the network.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from simpo_robot.errors import SimpoRobotError
from simpo_robot.logging_utils import console
from simpo_robot.tasks import TaskSpec, load_task, policy_features

log = logging.getLogger(__name__)

POLICY_TYPES = ("diffusion", "flow")


@dataclass
class PretrainConfig:
    task: str = "fetch_push"
    """Task name (a file in tasks/) or path to a task YAML; gives the policy's features."""
    dataset: Path = Path("outputs/datasets/fetch_push")
    """Local LeRobot dataset folder (from `simpo-robot collect`)."""
    out: Path = Path("outputs/pretrained/fetch_push")
    """Folder to write the policy to (LeRobot layout)."""
    policy_type: str = "diffusion"
    """"diffusion" (LeRobot DiffusionPolicy, DDIM sampling) or "flow" (rectified flow, Euler sampling)."""
    max_episodes: int | None = None
    """Train on the first this many episodes of the dataset only (None: all)."""
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 64
    lr: float = 1e-3
    """AdamW learning rate (cosine decay to 0, no warm-up)."""
    weight_decay: float = 1e-6
    seed: int = 0
    n_obs_steps: int = 2
    """Observations the policy conditions on (current and previous)."""
    horizon: int = 16
    """Actions predicted per chunk (a multiple of 2^(len(down_dims)-1))."""
    n_action_steps: int = 8
    """Actions executed per chunk before re-planning."""
    down_dims: tuple[int, ...] = (32, 64, 128)
    """UNet channel widths per resolution."""
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 64
    num_train_timesteps: int = 100
    """Diffusion only: length of the DDPM noise schedule."""
    num_inference_steps: int = 10
    """Steps at inference: DDIM denoising steps (diffusion) or Euler steps K (flow)."""
    timestep_scale: float = 100.0
    """Flow only: the UNet's time embedding sees t * timestep_scale for flow time t in [0, 1]."""
    log_every: int = 250
    overwrite: bool = False
    """Replace `out` if it already holds a policy."""

    def __post_init__(self) -> None:
        if self.policy_type not in POLICY_TYPES:
            raise ValueError(f"policy_type must be one of {POLICY_TYPES}, got {self.policy_type!r}")
        for name in ("steps", "batch_size", "n_obs_steps", "horizon", "n_action_steps", "num_inference_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        factor = 2 ** (len(self.down_dims) - 1)
        if self.horizon % factor:
            raise ValueError(f"horizon {self.horizon} must be a multiple of {factor} for down_dims {self.down_dims}")
        if self.n_action_steps > self.horizon - self.n_obs_steps + 1:
            raise ValueError(
                f"n_action_steps {self.n_action_steps} must be <= horizon - n_obs_steps + 1 "
                f"= {self.horizon - self.n_obs_steps + 1}")
        if self.max_episodes is not None and self.max_episodes <= 0:
            raise ValueError(f"max_episodes must be positive, got {self.max_episodes}")


class PretrainResult(NamedTuple):
    path: Path
    final_loss: float
    """Mean training loss over the last `log_every` steps."""
    seconds: float
    num_params: int
    episodes: int
    frames: int


def make_policy_config(spec: TaskSpec, cfg: PretrainConfig, device: str = "cpu") -> Any:
    """The policy config of `cfg.policy_type` for `spec` with the sizes in `cfg`."""
    if cfg.policy_type == "flow":
        return make_flow_config(spec, cfg, device)
    return make_diffusion_config(spec, cfg, device)


def make_flow_config(spec: TaskSpec, cfg: PretrainConfig, device: str = "cpu") -> Any:
    """A `FlowConfig` for `spec`: the same features, normalisation and UNet sizes as `make_diffusion_config`."""
    from simpo_robot.policies.flow import FlowConfig

    return FlowConfig(
        **_shared_policy_kwargs(spec, cfg, device),
        timestep_scale=cfg.timestep_scale,
    )


def make_diffusion_config(spec: TaskSpec, cfg: PretrainConfig, device: str = "cpu") -> Any:
    """A `DiffusionConfig` for `spec` (features from its env spaces) with the sizes in `cfg`."""
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig

    return DiffusionConfig(
        **_shared_policy_kwargs(spec, cfg, device),
        noise_scheduler_type="DDIM",
        num_train_timesteps=cfg.num_train_timesteps,
        pretrained_backbone_weights=None,
    )


def _shared_policy_kwargs(spec: TaskSpec, cfg: PretrainConfig, device: str) -> dict[str, Any]:
    """The config fields diffusion and flow policies share: features, normalisation, chunking, UNet, optimizer."""
    from lerobot.configs.types import NormalizationMode

    feats = policy_features(spec)
    return dict(
        input_features=dict(feats.inputs),
        output_features=dict(feats.outputs),
        # observations: mean/std (robust to near-constant dims); actions: min/max to [-1, 1] for clip_sample
        normalization_mapping={
            "STATE": NormalizationMode.MEAN_STD,
            "ENV": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MIN_MAX,
        },
        n_obs_steps=cfg.n_obs_steps,
        horizon=cfg.horizon,
        n_action_steps=cfg.n_action_steps,
        drop_n_last_frames=cfg.horizon - cfg.n_action_steps - cfg.n_obs_steps + 1,
        down_dims=tuple(cfg.down_dims),
        kernel_size=cfg.kernel_size,
        n_groups=cfg.n_groups,
        diffusion_step_embed_dim=cfg.diffusion_step_embed_dim,
        num_inference_steps=cfg.num_inference_steps,
        optimizer_lr=cfg.lr,
        optimizer_weight_decay=cfg.weight_decay,
        device=device,
        push_to_hub=False,
    )


def _load_windows(dataset_dir: Path, spec: TaskSpec, policy_cfg: Any, max_episodes: int | None):
    """All training windows of the dataset as in-memory tensors, plus its stats and size."""
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if not (dataset_dir / "meta" / "info.json").is_file():
        raise SimpoRobotError(f"{dataset_dir} is not a LeRobot dataset (no meta/info.json); run `simpo-robot collect`.")
    repo_id = f"local/{spec.name}"
    meta = LeRobotDatasetMetadata(repo_id, root=dataset_dir)
    wanted = {**policy_cfg.input_features, **policy_cfg.output_features}
    for name, feature in wanted.items():
        if name not in meta.features:
            raise SimpoRobotError(f"dataset {dataset_dir} has no feature {name} that task {spec.name} needs.")
        if tuple(meta.features[name]["shape"]) != tuple(feature.shape):
            raise SimpoRobotError(
                f"dataset {dataset_dir}: {name} has shape {tuple(meta.features[name]['shape'])}, "
                f"task {spec.name} gives {tuple(feature.shape)}; was it recorded for another task?")
    episodes = None if max_episodes is None else list(range(min(max_episodes, meta.total_episodes)))
    # no videos in these datasets; naming the backend skips a noisy torchcodec probe
    dataset = LeRobotDataset(repo_id, root=dataset_dir, episodes=episodes, video_backend="pyav",
                             delta_timestamps=resolve_delta_timestamps(policy_cfg, meta))
    keys = [*wanted, "action_is_pad"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False, num_workers=0)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for batch in loader:
        for k in keys:
            parts[k].append(batch[k])
    windows = {k: torch.cat(v) for k, v in parts.items()}
    # stats over the episodes actually used (LeRobot's meta.stats cover the whole dataset)
    stats = _stats(windows, policy_cfg)
    return windows, stats, dataset.num_episodes, dataset.num_frames


STD_FLOOR = 1e-2
"""Smallest std used for mean/std normalisation: a (near-)constant dimension in the demonstrations (the
closed fingers when pushing, the table height) would otherwise turn a tiny unseen deviation into a huge input."""


def _stats(windows: dict[str, torch.Tensor], policy_cfg: Any) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name in {**policy_cfg.input_features, **policy_cfg.output_features}:
        x = windows[name]
        if name == "action":
            x = x[~windows["action_is_pad"]]  # (N*H, Da) real actions only
        x = x.reshape(-1, x.shape[-1])
        out[name] = {"mean": x.mean(0), "std": x.std(0).clamp_min(STD_FLOOR), "min": x.min(0).values, "max": x.max(0).values,
                     "count": torch.tensor([x.shape[0]])}
    return out


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    import simpo_robot.policies  # noqa: F401  (registers the "flow" type with LeRobot's factory)
    from simpo_robot.policy_io import save_policy

    spec = load_task(cfg.task)
    out = Path(cfg.out)
    if (out / "config.json").exists() and not cfg.overwrite:
        raise SimpoRobotError(f"{out} already holds a policy; pass --overwrite true or another --out.")
    accelerator = Accelerator()
    set_seed(cfg.seed, device_specific=True)
    policy_cfg = make_policy_config(spec, cfg, device=accelerator.device.type)
    windows, stats, n_episodes, n_frames = _load_windows(Path(cfg.dataset), spec, policy_cfg, cfg.max_episodes)
    preprocessor, postprocessor = make_pre_post_processors(policy_cfg, dataset_stats=stats)

    policy = get_policy_class(policy_cfg.type)(policy_cfg)
    policy.train()
    num_params = sum(p.numel() for p in policy.parameters())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.95, 0.999),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = torch.utils.data.RandomSampler(range(len(windows["action"])), replacement=True,
                                             num_samples=cfg.steps * cfg.batch_size, generator=generator)
    index_loader = torch.utils.data.DataLoader(list(range(len(windows["action"]))), batch_size=cfg.batch_size,
                                               sampler=sampler, drop_last=True)
    policy, optimizer, scheduler, index_loader = accelerator.prepare(policy, optimizer, scheduler, index_loader)
    log.info("pretraining a %.2fM-parameter %s policy on %d episodes (%d frames) of %s for %d steps",
             num_params / 1e6, cfg.policy_type, n_episodes, n_frames, spec.name, cfg.steps)

    start, losses, recent = time.time(), [], float("nan")
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task(f"pretrain {spec.name}", total=cfg.steps, loss=float("nan"))
        for step, idx in enumerate(index_loader, start=1):
            batch = preprocessor({k: v[idx.cpu()] for k, v in windows.items()})
            loss, _ = policy(batch)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(policy.parameters(), 10.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if step % cfg.log_every == 0 or step == cfg.steps:
                recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
                log.info("step %d/%d  losses/%s %.4f  lr %.2e", step, cfg.steps, cfg.policy_type, recent,
                         scheduler.get_last_lr()[0])
            progress.update(bar, advance=1, loss=losses[-1])
    seconds = time.time() - start

    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(policy)
        unwrapped.eval()
        unwrapped.config.device = "cpu"  # a shareable artifact loads anywhere; load_policy picks the device
        save_policy(unwrapped.to("cpu"), out, preprocessor, postprocessor)
        (out / "train_info.json").write_text(json.dumps({
            "task": spec.name, "policy_type": cfg.policy_type, "dataset": str(cfg.dataset), "episodes": n_episodes, "frames": n_frames,
            "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
            "final_loss": recent, "train_seconds": round(seconds, 1), "num_params": num_params,
        }, indent=2))
        log.info("wrote %s (%.1f s of training, final loss %.4f)", out, seconds, recent)
    return PretrainResult(out, recent, seconds, num_params, n_episodes, n_frames)


def write_model_card(policy_dir: str | Path, eval_info_path: str | Path, commands: str, notes: str = "") -> Path:
    """Write `policy_dir/README.md`: a Hub-style model card with the measured success and rebuild commands.

    `eval_info_path` is the `eval_info.json` of the measuring `simpo-robot eval` run; `commands` the exact
    shell commands that rebuild the checkpoint (collect, pretrain, eval).
    """
    policy_dir = Path(policy_dir)
    info = json.loads(Path(eval_info_path).read_text())
    train = json.loads((policy_dir / "train_info.json").read_text())
    agg = info["aggregated"]
    n = len(info["per_episode"])
    seeds = [e["seed"] for e in info["per_episode"]]
    lo, hi = agg["pc_success_ci95"]
    task = train["task"]
    size_mb = (policy_dir / "model.safetensors").stat().st_size / 1e6
    cfg_json = _policy_config(policy_dir)
    name = policy_dir.name
    if cfg_json["type"] == "flow":
        kind, tag, or_lerobot = "flow-matching", "flow-matching", ""
        what = ("simpo-robot `FlowPolicy` (LeRobot policy type `flow`: rectified flow with LeRobot's "
                "diffusion-policy 1-D conditional UNet as the velocity network")
        sampling = (f"{cfg_json['num_inference_steps']} Euler steps from noise (t = 0) to action (t = 1), "
                    f"time embedding input t * {cfg_json['timestep_scale']:g}")
        load = (f'loaded = load_policy("pretrained/{name}")\n'
                f'# LeRobot: import simpo_robot.policies (registers "flow"), then FlowPolicy.from_pretrained("pretrained/{name}")')
    else:
        kind, tag, or_lerobot = "diffusion", "diffusion-policy", "      # or stock LeRobot:"
        what = "LeRobot `DiffusionPolicy` (1-D conditional UNet"
        sampling = f"DDIM with {cfg_json['num_inference_steps']} denoising steps"
        load = f'loaded = load_policy("pretrained/{name}")         # DiffusionPolicy.from_pretrained("pretrained/{name}")'
    card = f"""---
library_name: lerobot
license: apache-2.0
pipeline_tag: robotics
tags:
- lerobot
- {tag}
- robotics
- simpo-robot
- {task}
model-index:
- name: simpo-robot/{task}-{kind}-pretrained
  results:
  - task:
      type: robotics
      name: {task}
    metrics:
    - type: pc_success
      value: {agg['pc_success']:.1f}
      name: success rate (%) over {n} episodes, seeds {seeds[0]}-{seeds[-1]}
---

# {name}: deliberately imperfect pretrained {kind} policy

A small state-only {what}, {train['num_params'] / 1e6:.2f}M parameters,
{size_mb:.1f} MB) behaviour-cloned from scripted demonstrations of the `{task}` task (`tasks/{task}.yaml`).
It is the starting point for SiMPO fine-tuning and is **deliberately imperfect**: a small network trained
briefly on noisy demonstrations, far from converged, so that reinforcement learning has room to improve it.

## Measured success

| episodes | seeds | success | 95% CI (Wilson) | avg sum reward |
|---|---|---|---|---|
| {n} | {seeds[0]}..{seeds[-1]} | {agg['pc_success']:.1f}% | [{lo:.1f}, {hi:.1f}]% | {agg['avg_sum_reward']:.2f} |

Evaluation: `simpo-robot eval` on CPU; episode i is reset with seed {seeds[0]} + i and the sampling noise is seeded
per batch of 25 episodes, so the first 50 episodes of this run are exactly what
`simpo-robot eval --policy pretrained/{name} --task {task} --episodes 50` gives. Success =
`info["is_success"]` at the last step of the 50-step episode.

Policy: observations `observation.state` {tuple(cfg_json['input_features']['observation.state']['shape'])} (robot) and
`observation.environment_state` {tuple(cfg_json['input_features']['observation.environment_state']['shape'])} (object + goal), {cfg_json['n_obs_steps']} observation steps; predicts
{cfg_json['horizon']}-step action chunks and executes {cfg_json['n_action_steps']} before re-planning; {sampling};
UNet widths {tuple(cfg_json['down_dims'])}.

## Training

- data: {train['episodes']} successful scripted-expert episodes ({train['frames']} frames) from `{train['dataset']}`,
  recorded with Gaussian action noise and cut 10 steps after the first success (`simpo-robot collect` defaults)
- {train['steps']} AdamW steps, batch {train['batch_size']}, lr {train['lr']} (cosine), seed {train['seed']},
  final {kind} loss {train['final_loss']:.4f}, {train['train_seconds']:.0f} s of training on one CPU thread
{notes}
## Load it

```python
from simpo_robot.policy_io import load_policy{or_lerobot}
{load}
```

## Rebuild it

```bash
{commands.strip()}
```
"""
    path = policy_dir / "README.md"
    path.write_text(card)
    return path


def _policy_config(policy_dir: Path) -> dict[str, Any]:
    return json.loads((policy_dir / "config.json").read_text())
