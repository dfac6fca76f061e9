"""Load and save LeRobot policies: a local folder or a Hugging Face Hub repo id, in LeRobot's layout.

A policy folder holds what `lerobot-train` writes and what `DiffusionPolicy.from_pretrained` reads (or
`FlowPolicy.from_pretrained` for simpo-robot's own "flow" type, registered by `simpo_robot.policies`):

    config.json                                   policy config (its `type` picks the policy class)
    model.safetensors                             weights
    policy_preprocessor.json (+ *.safetensors)    normalisation (dataset stats), batching, device
    policy_postprocessor.json (+ *.safetensors)   unnormalisation of actions

`load_policy` resolves a repo id with `huggingface_hub.snapshot_download`, which returns the cached
snapshot when one exists (also with HF_HUB_OFFLINE=1), so a Hub checkpoint downloaded once loads offline.
Every failure the user can fix (missing folder, missing or corrupt file, offline and not cached) is a
`SimpoRobotError` naming the file or repo and what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simpo_robot.errors import SimpoRobotError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"

# Hub repo ids are "name" or "owner/name"; anything else (several slashes, ./, ~) can only be a path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedPolicy:
    """A policy ready for inference, with the processors that go around it."""

    policy: Any
    """The LeRobot `PreTrainedPolicy`, in eval mode, on the requested device."""
    preprocessor: Any
    """`PolicyProcessorPipeline` raw observation batch -> normalised model input (on the device)."""
    postprocessor: Any
    """`PolicyProcessorPipeline` model action -> unnormalised action (on CPU)."""
    path: Path
    """The local folder it was loaded from (a Hub snapshot folder for a repo id)."""
    config: Any
    """The policy config (`PreTrainedConfig` subclass, e.g. `DiffusionConfig`)."""


def resolve_policy_path(ref: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return the local folder for `ref`: an existing folder as is, a Hub repo id via the HF cache.

    `cache_dir` overrides the Hugging Face cache (default: `HF_HUB_CACHE`).
    """
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SimpoRobotError(f"policy {str(ref)!r} is a file; pass the folder that holds {CONFIG_FILE}.")
        return path
    text = str(ref)
    if not _REPO_ID.match(text) or text.startswith((".", "~")):
        raise SimpoRobotError(f"policy folder {text!r} does not exist (and it is not a Hub repo id).")
    return _snapshot(text, cache_dir)


def _snapshot(repo_id: str, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        folder = snapshot_download(repo_id=repo_id, cache_dir=cache_dir)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise SimpoRobotError(
            f"policy {repo_id!r} is neither a local folder nor a Hub repo you can access ({type(exc).__name__})."
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise SimpoRobotError(
            f"policy {repo_id!r} is not a local folder, and as a Hub repo id it is not in the Hugging Face "
            f"cache while the Hub is offline or unreachable. Pass a local folder, or download it first where "
            f"the Hub is reachable (`hf download {repo_id}`, same HF_HOME/HF_HUB_CACHE) and run again."
        ) from exc
    except HfHubHTTPError as exc:
        raise SimpoRobotError(f"could not download policy {repo_id!r} from the Hub: {exc}") from exc
    return Path(folder)


def _check_file(folder: Path, name: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise SimpoRobotError(f"policy folder {str(folder)!r} has no {name}; is it a LeRobot policy folder?")
    return file


def load_policy_config(ref: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, Any]:
    """Resolve `ref` and parse its config.json into the registered config class (by its `type`)."""
    from lerobot.configs.policies import PreTrainedConfig

    import simpo_robot.policies  # noqa: F401  (registers simpo-robot's policy types, e.g. "flow")

    folder = resolve_policy_path(ref, cache_dir)
    config_file = _check_file(folder, CONFIG_FILE)
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SimpoRobotError(f"{config_file} is not valid JSON (corrupt checkpoint?): {exc}") from exc
    if not isinstance(raw, dict) or "type" not in raw:
        raise SimpoRobotError(f"{config_file} has no policy 'type' field; is it a LeRobot policy config?")
    if raw["type"] not in PreTrainedConfig.get_known_choices():
        raise SimpoRobotError(
            f"{config_file}: policy type {raw['type']!r} is not registered in LeRobot "
            f"(known: {sorted(PreTrainedConfig.get_known_choices())})."
        )
    try:
        with _scratch_tempdir():
            config = PreTrainedConfig.from_pretrained(folder)
    except Exception as exc:  # draccus reports bad fields with many exception types
        raise SimpoRobotError(f"{config_file} does not parse as a {raw['type']!r} config: {exc}") from exc
    return folder, config


@contextlib.contextmanager
def _scratch_tempdir() -> Iterator[None]:
    """Send the temporary files made inside the block to a private folder, removed on exit.

    LeRobot 0.6's `PreTrainedConfig.from_pretrained` writes the config to a `delete=False` temp file and
    never removes it: one stray JSON in /tmp per load, which adds up in a long evaluation or server run.
    """
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="simpo-robot-config-") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = previous


def load_policy(
    ref: str | Path, device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> LoadedPolicy:
    """Load a LeRobot policy and its pre/post-processors from a local folder or a Hub repo id.

    The policy class comes from the config's `type` through LeRobot's factory, so any registered
    policy type loads. Weights are loaded with `strict=True`. `overrides` change config fields that do not
    touch the weights before the policy is built (e.g. {"num_inference_steps": 1}: its sampler's steps).
    """
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors
    from safetensors import SafetensorError

    folder, config = load_policy_config(ref, cache_dir)
    if overrides:
        try:
            config = dataclasses.replace(config, **overrides)
        except (TypeError, ValueError) as exc:
            raise SimpoRobotError(f"cannot set {overrides} on the {config.type!r} policy {ref}: {exc}") from exc
    device = torch.device(device)
    config.device = device.type
    weights = _check_file(folder, WEIGHTS_FILE)
    for name in (PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        if not (folder / name).is_file():
            raise SimpoRobotError(
                f"policy folder {str(folder)!r} has no {name}. Checkpoints from LeRobot < 0.4 keep their "
                f"normalisation inside the weights; convert with `python -m "
                f"lerobot.processor.migrate_policy_normalization --pretrained-path {ref}` and load the result."
            )

    policy_cls = get_policy_class(config.type)
    try:
        policy = policy_cls.from_pretrained(folder, config=config, strict=True)
    except (SafetensorError, OSError) as exc:
        raise SimpoRobotError(f"{weights} cannot be read (corrupt or truncated checkpoint?): {exc}") from exc
    except RuntimeError as exc:  # strict load: missing/unexpected keys or shape mismatches
        raise SimpoRobotError(f"{weights} does not match the architecture in {CONFIG_FILE}: {exc}") from exc
    policy.to(device).eval()

    try:
        preprocessor, postprocessor = make_pre_post_processors(
            config,
            pretrained_path=str(folder),
            preprocessor_overrides={"device_processor": {"device": str(device)}},
        )
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError, KeyError) as exc:
        raise SimpoRobotError(
            f"the processor files in {folder} ({PREPROCESSOR_FILE}, {POSTPROCESSOR_FILE}) cannot be loaded: {exc}"
        ) from exc
    log.info("loaded %s policy from %s", config.type, folder)
    return LoadedPolicy(policy, preprocessor, postprocessor, folder, config)


def save_policy(
    policy: LoadedPolicy | Any,
    out_dir: str | Path,
    preprocessor: Any | None = None,
    postprocessor: Any | None = None,
) -> Path:
    """Write a policy in LeRobot's layout (config.json, model.safetensors, processor files).

    Pass a `LoadedPolicy`, or a `PreTrainedPolicy` with its `preprocessor` and `postprocessor`.
    """
    if isinstance(policy, LoadedPolicy):
        policy, preprocessor, postprocessor = policy.policy, policy.preprocessor, policy.postprocessor
    if preprocessor is None or postprocessor is None:
        raise ValueError("save_policy needs the preprocessor and postprocessor (or a LoadedPolicy).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out)
    preprocessor.save_pretrained(out)
    postprocessor.save_pretrained(out)
    return out
