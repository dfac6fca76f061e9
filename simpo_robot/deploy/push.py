"""`simpo-robot push --policy DIR --repo-id USER/NAME [--private true] [--dry-run OUT]`.

Uploads a policy folder in LeRobot's layout with a generated model card (README.md), in one commit
through `huggingface_hub` (create_repo, then upload_folder). `--dry-run OUT` writes exactly the files
that would be committed to OUT (the upload stages the same folder) and needs no token or network.

What is uploaded: config.json, model.safetensors, policy_{pre,post}processor*.{json,safetensors},
training_info.json and the learning-curve image it names, train_info.json (pretraining), deploy.json and
denoiser.onnx (diffusion) or velocity.onnx (flow) when the folder is an export bundle, and README.md (generated, or the folder's own with
`--card keep`). Other files in the folder are left out (and logged).

The model card reads the optional sidecar `training_info.json` in the policy folder, which the trainer
writes. Its schema (every field optional; without the file the card says what is unknown):

    {
      "base_model": "lerobot/diffusion_fetch_push",   # the policy fine-tuned from: Hub repo id (goes into
                                                      #   the card's YAML `base_model`) or a local path
      "task": "fetch_push",                           # tasks/<task>.yaml
      "algorithm": "simpo",                           # e.g. "simpo", "dppo", "bc"
      "weighting": "tanh",                            # SiMPO weighting g (exp, linear, square, tanh, ...)
      "weighting_params": {"negative_bound": -0.5},   # anything that pins the weighting down
      "env_steps": 200000,                            # environment steps of fine-tuning
      "control_hz": 25,
      "success_before": {"pc_success": 42.0, "n_episodes": 100, "first_seed": 1000,
                         "ci95": [32.8, 51.8]},       # base policy, same episodes as after;
                                                      #   episode i resets with seed first_seed + i
      "success_after":  {"pc_success": 81.0, "n_episodes": 100, "first_seed": 1000, "ci95": [72.2, 87.5]},
      "success_before_deterministic": {...},          # the same, with the sampler started from x_T = 0
      "success_after_deterministic": {...},           #   (`simpo-robot serve --noise_scale 0`)
      "learning_curve": "learning_curve.png"          # an image in the policy folder
    }
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from simpo_robot.errors import SimpoRobotError

log = logging.getLogger(__name__)

TRAINING_INFO_FILE = "training_info.json"
PRETRAIN_INFO_FILE = "train_info.json"
"""Written by `simpo-robot pretrain`; its `task` is used when there is no training_info.json."""
CARD_FILE = "README.md"
LEROBOT_PATTERNS = (
    "config.json",
    "model.safetensors",
    "policy_preprocessor*.json",
    "policy_preprocessor*.safetensors",
    "policy_postprocessor*.json",
    "policy_postprocessor*.safetensors",
)
BUNDLE_FILES = ("deploy.json", "denoiser.onnx", "velocity.onnx")
CARD_MODES = ("generate", "keep")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TAG = re.compile(r"^[\w.-]+$")


@dataclass
class PushConfig:
    policy: Path = Path("")
    """Local policy folder (LeRobot layout; an export bundle works too)."""
    repo_id: str = ""
    """Target Hub repo, USER/NAME (created if missing)."""
    private: bool = False
    """Create the repo as private (an existing repo keeps its visibility)."""
    dry_run: Path | None = None
    """Write the files that would be pushed to this folder instead of uploading."""
    license: str = "apache-2.0"
    """License identifier for the card's YAML header."""
    commit_message: str = "Upload policy (simpo-robot push)"
    revision: str | None = None
    """Branch to commit to (default: main)."""
    card: str = "generate"
    """"generate": write README.md from training_info.json; "keep": upload the folder's own README.md."""

    def __post_init__(self) -> None:
        self.policy = Path(self.policy)
        if not str(self.policy) or str(self.policy) == ".":
            raise ValueError("--policy is required (a local policy folder)")
        if not _REPO_ID.match(self.repo_id):
            raise ValueError(f"--repo-id must look like USER/NAME, got {self.repo_id!r}")
        if self.dry_run is not None:
            self.dry_run = Path(self.dry_run)
        if self.card not in CARD_MODES:
            raise ValueError(f"--card must be one of {CARD_MODES}, got {self.card!r}")


@dataclass(frozen=True)
class SuccessRecord:
    """Success rate of one evaluation (LeRobot's pc_success) and how it was measured."""

    pc_success: float
    n_episodes: int | None = None
    first_seed: int | None = None
    ci95: list[float] | None = None

    def describe(self) -> str:
        text = f"{self.pc_success:.1f}%"
        if self.ci95:
            text += f" (95% CI {self.ci95[0]:.1f}-{self.ci95[1]:.1f})"
        if self.n_episodes:
            text += f" over {self.n_episodes} episodes"
            if self.first_seed is not None:
                text += f", seeds {self.first_seed}-{self.first_seed + self.n_episodes - 1}"
        return text


@dataclass(frozen=True)
class TrainingInfo:
    """The sidecar `training_info.json` (schema in the module docstring); every field optional."""

    base_model: str | None = None
    task: str | None = None
    algorithm: str | None = None
    weighting: str | None = None
    weighting_params: dict[str, Any] = field(default_factory=dict)
    env_steps: int | None = None
    control_hz: float | None = None
    success_before: SuccessRecord | None = None
    success_after: SuccessRecord | None = None
    success_before_deterministic: SuccessRecord | None = None
    success_after_deterministic: SuccessRecord | None = None
    learning_curve: str | None = None

    @classmethod
    def read(cls, folder: Path) -> TrainingInfo | None:
        """The sidecar, or for a pretrained checkpoint (train_info.json only) its task; None without either."""
        file = folder / TRAINING_INFO_FILE
        if not file.is_file():
            pretrain = folder / PRETRAIN_INFO_FILE
            if pretrain.is_file():
                try:
                    task = json.loads(pretrain.read_text()).get("task")
                except (json.JSONDecodeError, AttributeError):
                    return None
                return cls(task=task, algorithm="behaviour cloning (pretraining)")
            return None
        try:
            raw = json.loads(file.read_text())
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(raw) - known)
            if unknown:
                log.warning("%s: ignoring unknown fields %s", file, unknown)
            raw = {k: v for k, v in raw.items() if k in known}
            for key in (k for k in known if k.startswith("success_")):
                if raw.get(key) is not None:
                    raw[key] = SuccessRecord(**raw[key])
            return cls(**raw)
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise SimpoRobotError(f"{file} does not follow the training_info schema (see `simpo_robot.deploy.push`): {exc}") from exc


@dataclass(frozen=True)
class PushResult:
    files: list[str]
    """Paths in the repo, sorted."""
    url: str | None
    """Commit URL (None for a dry run)."""


def model_card(config: dict[str, Any], info: TrainingInfo | None, repo_id: str, license: str,
               has_critic: bool = False) -> str:
    """README.md: YAML header (library_name, base_model, tags, license) and what the policy is and does
    (`has_critic`: the repo also holds the SiMPO critic, for acting by it)."""
    from huggingface_hub import ModelCardData

    info = info or TrainingInfo()
    tags = ["lerobot", "robotics", config.get("type", "policy"), "simpo-robot"]
    tags += [t for t in (info.task, info.algorithm) if t and _TAG.match(t) and t not in tags]
    base_model = info.base_model if info.base_model and _REPO_ID.match(info.base_model) else None
    data = ModelCardData(library_name="lerobot", license=license, tags=tags, base_model=base_model,
                         pipeline_tag="robotics")
    unknown = "not recorded"
    weighting = info.weighting or unknown
    if info.weighting_params:
        weighting += " (" + ", ".join(f"{k}={v}" for k, v in info.weighting_params.items()) + ")"
    before = info.success_before.describe() if info.success_before else unknown
    after = info.success_after.describe() if info.success_after else unknown
    features = ", ".join(f"`{k}` {list(v.get('shape', []))}" for k, v in config.get("input_features", {}).items())
    flow = config.get("type") == "flow"
    if flow:
        sampler = f"{config.get('num_inference_steps', '?')} Euler steps (rectified flow)"
        use = ["from simpo_robot.policies import FlowPolicy  # the import registers the \"flow\" type with LeRobot",
               "from lerobot.policies.factory import make_pre_post_processors", "",
               f'policy = FlowPolicy.from_pretrained("{repo_id}")']
    else:
        steps = config.get("num_inference_steps") or config.get("num_train_timesteps", "?")
        sampler = f"{config.get('noise_scheduler_type', '?')} with {steps} steps"
        use = ["from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy",
               "from lerobot.policies.factory import make_pre_post_processors", "",
               f'policy = DiffusionPolicy.from_pretrained("{repo_id}")']
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {repo_id}", "",
        f"A LeRobot `{config.get('type', 'policy')}` policy"
        + (f" for the `{info.task}` task" if info.task else "")
        + (f", fine-tuned online from `{info.base_model}`" if info.base_model else "")
        + (f" with {info.algorithm}" if info.base_model and info.algorithm else "")
        + ", made with simpo-robot.", "",
        "| | |", "|---|---|",
        f"| task | {info.task or unknown} |",
        f"| base model | {info.base_model or unknown} |",
        f"| algorithm | {info.algorithm or unknown} |",
        f"| weighting | {weighting} |",
        f"| fine-tuning env steps | {info.env_steps if info.env_steps is not None else unknown} |",
        f"| success before | {before} |",
        f"| success after | {after} |",
        *(f"| success {when}, deterministic (x_T = 0) | {record.describe()} |" for when, record in
          (("before", info.success_before_deterministic), ("after", info.success_after_deterministic)) if record),
        f"| observations | {features or unknown} |",
        f"| action chunk | {config.get('n_action_steps', '?')} of horizon {config.get('horizon', '?')}, {sampler} |",
        "",
    ]
    if info.learning_curve:
        lines += ["## Learning curve", "", f"![learning curve]({info.learning_curve})", ""]
    lines += [
        "## Use", "",
        "```python",
        *use,
        f'preprocessor, postprocessor = make_pre_post_processors(policy.config, pretrained_path="{repo_id}")',
        "```", "",
        "Or serve it to a robot: `simpo-robot export --policy "
        f"{repo_id} --out bundle && simpo-robot serve --bundle bundle`.", "",
    ]
    if has_critic:
        lines += [
            "## Acting by the critic", "",
            "This repo also holds the SiMPO critic fitted in the run's last phase (`critic.safetensors`, `critic.json`). "
            f"`simpo-robot eval --policy {repo_id} --task {info.task or 'TASK'} --best_of 10` plays the best of 10 "
            "sampled chunks by its Q value, as the SiMPO reference recipe evaluates; `simpo-robot serve --best_of 10` "
            "does the same for a robot.", "",
        ]
    return "\n".join(lines)


def stage(cfg: PushConfig, out: Path) -> list[str]:
    """Write into `out` exactly what the commit will contain; returns the repo paths."""
    from simpo_robot.rl.critic import CRITIC_CONFIG, CRITIC_WEIGHTS

    folder = cfg.policy
    if not (folder / "config.json").is_file():
        raise SimpoRobotError(f"{folder} is not a LeRobot policy folder (no config.json).")
    if not (folder / "model.safetensors").is_file():
        raise SimpoRobotError(f"{folder} has no model.safetensors.")
    info = TrainingInfo.read(folder)
    if info is None:
        log.warning("%s has no %s: the model card will not name the base model, task or success rates",
                    folder, TRAINING_INFO_FILE)
    names = sorted({p.name for pattern in LEROBOT_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    names += [n for n in (*BUNDLE_FILES, PRETRAIN_INFO_FILE, CRITIC_CONFIG, CRITIC_WEIGHTS) if (folder / n).is_file()]
    if (folder / TRAINING_INFO_FILE).is_file():
        names.append(TRAINING_INFO_FILE)
    if info is not None and info.learning_curve:
        if (folder / info.learning_curve).is_file():
            names.append(info.learning_curve)
        else:
            log.warning("learning curve %s named in %s is missing", info.learning_curve, TRAINING_INFO_FILE)
            info = dataclasses.replace(info, learning_curve=None)
    skipped = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in [*names, CARD_FILE])
    if skipped:
        log.info("not uploading %s", ", ".join(skipped))
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / name, out / name)
    if cfg.card == "keep":
        if not (folder / CARD_FILE).is_file():
            raise SimpoRobotError(f"--card keep: {folder} has no {CARD_FILE}; use --card generate.")
        shutil.copy2(folder / CARD_FILE, out / CARD_FILE)
    else:
        config = json.loads((folder / "config.json").read_text())
        (out / CARD_FILE).write_text(model_card(config, info, cfg.repo_id, cfg.license,
                                                has_critic=CRITIC_WEIGHTS in names))
    return sorted([*names, CARD_FILE])


def upload(cfg: PushConfig, staged: Path) -> str:
    """create_repo + upload_folder (one commit) to HF_ENDPOINT; clear errors for token and network problems."""
    import httpx
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = get_token()
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if not token:
        raise SimpoRobotError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens). `--dry-run OUT` shows what would be pushed without one."
        )
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=staged, repo_id=cfg.repo_id, repo_type="model",
                                   commit_message=cfg.commit_message, revision=cfg.revision)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise SimpoRobotError(
                f"the Hub at {endpoint} refused the token (HTTP {status}): it needs write access to {cfg.repo_id}. "
                "Check HF_TOKEN or run `hf auth login`."
            ) from exc
        raise SimpoRobotError(f"the Hub at {endpoint} answered HTTP {status}: {exc}") from exc
    except (httpx.TransportError, OSError) as exc:
        raise SimpoRobotError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({type(exc).__name__}: {exc}). Check the network "
            "or HF_ENDPOINT; `--dry-run OUT` works offline."
        ) from exc
    return str(commit.commit_url)


def run_push(cfg: PushConfig) -> PushResult:
    if not cfg.policy.is_dir():
        raise SimpoRobotError(f"policy folder {cfg.policy} does not exist.")
    if cfg.dry_run is not None:
        out = cfg.dry_run
        if out.exists() and any(out.iterdir()):
            raise SimpoRobotError(f"--dry-run folder {out} is not empty; pick a new one.")
        files = stage(cfg, out)
        log.info("dry run: the %d file(s) that would be pushed to %s are in %s", len(files), cfg.repo_id, out)
        return PushResult(files=files, url=None)
    with tempfile.TemporaryDirectory(prefix="simpo-push-") as tmp:
        files = stage(cfg, Path(tmp))
        url = upload(cfg, Path(tmp))
    log.info("pushed %d file(s) to %s in one commit: %s", len(files), cfg.repo_id, url)
    return PushResult(files=files, url=url)
