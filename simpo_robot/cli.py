"""The `simpo-robot` command: `simpo-robot SUBCOMMAND [--field value ...]`.

Flags may be written with dashes or underscores (`--negative-bound` = `--negative_bound`), and a
boolean flag alone means true (`--overwrite` = `--overwrite true`).

Each subcommand is a typed config dataclass (parsed with draccus, as LeRobot's scripts are, so
`--config_path FILE` loads a YAML/JSON file of the same fields) and a function that runs it. Modules
are imported only when their subcommand runs, so `simpo-robot --help` stays fast.
"""

import dataclasses
import importlib
import logging
import sys
import typing
from dataclasses import dataclass

import draccus

from simpo_robot.errors import SimpoRobotError
from simpo_robot.logging_utils import console, setup_logging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    module: str
    config: str
    run: str
    help: str
    several_processes: bool = False
    """Runs in several processes under a launcher (so `accelerate launch --cpu --num_processes N` must start N)."""


COMMANDS: dict[str, Command] = {
    "toy": Command("simpo_robot.toy", "ToyConfig", "run_toy", "SiMPO weightings on a 2-D multimodal reward (the first thing to run)"),
    "collect": Command("simpo_robot.collect", "CollectConfig", "run_collect", "record scripted-expert demonstrations as a LeRobot dataset"),
    "pretrain": Command("simpo_robot.pretrain", "PretrainConfig", "run_pretrain", "behaviour-clone a LeRobot DiffusionPolicy (or a flow policy) from demonstrations"),
    "finetune": Command("simpo_robot.rl.trainer", "FinetuneConfig", "run_finetune", "fine-tune a pretrained diffusion policy online with SiMPO", several_processes=True),
    "eval": Command("simpo_robot.evaluate", "EvalConfig", "run_eval", "evaluate a policy on a task (eval_info.json, success with 95% CI)"),
    "export": Command("simpo_robot.deploy.export", "ExportConfig", "run_export", "export a policy as a self-contained bundle (LeRobot layout + ONNX)"),
    "serve": Command("simpo_robot.deploy.server", "ServeConfig", "run_serve", "serve a bundle over WebSocket + msgpack"),
    "run-sim": Command("simpo_robot.deploy.run_sim", "RunSimConfig", "run_run_sim", "play a task through a policy server"),
    "push": Command("simpo_robot.deploy.push", "PushConfig", "run_push", "upload a policy with its model card to the Hugging Face Hub"),
}


def register(name: str, command: Command) -> None:
    """Add a subcommand (used by modules that extend the CLI)."""
    COMMANDS[name] = command


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: simpo-robot SUBCOMMAND [--help] [--field value ...]", "", "subcommands:"]
    lines += [f"  {name.ljust(width)}  {cmd.help}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def _config_error(exc: BaseException) -> BaseException:
    """The first error in the chain that is not draccus's own wrapper (the config's validation message)."""
    while exc.__cause__ is not None and type(exc).__module__.startswith("draccus"):
        exc = exc.__cause__
    return exc


CONFIG_FLAG = {"config": "config_path"}  # `--config FILE` is draccus's `--config_path FILE`


def _bool_fields(config_cls: type | None, prefix: str = "") -> set[str]:
    """Dotted names of the bool fields of a (nested) config dataclass."""
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        return set()
    hints = typing.get_type_hints(config_cls)
    names = set()
    for f in dataclasses.fields(config_cls):
        if hints[f.name] is bool:
            names.add(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            names |= _bool_fields(hints[f.name], f"{prefix}{f.name}.")
    return names


def normalise_flags(args: list[str], config_cls: type | None = None) -> list[str]:
    """Accept `--dry-run` as well as draccus's `--dry_run` (dashes in a flag's name become underscores),
    `--config FILE` for draccus's `--config_path FILE`, and a bare boolean flag (`--private`) for
    `--private true`."""
    bools = _bool_fields(config_cls)
    out = []
    for i, arg in enumerate(args):
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            arg = "--" + CONFIG_FLAG.get(name, name) + sep + value
            bare = not sep and (i + 1 == len(args) or args[i + 1].startswith("--"))
            if bare and name in bools:
                out += [arg, "true"]
                continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    if not argv or argv[0] in ("-h", "--help"):
        console.print(_usage(), markup=False, highlight=False, soft_wrap=True)
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        console.print(f"simpo-robot: unknown subcommand {name!r}.\n\n{_usage()}", markup=False, highlight=False, soft_wrap=True)
        return 2
    cmd = COMMANDS[name]
    module = importlib.import_module(cmd.module)
    config_cls, run = getattr(module, cmd.config), getattr(module, cmd.run)
    args = normalise_flags(args, config_cls)
    try:
        cfg = draccus.parse(config_class=config_cls, args=args, prog=f"simpo-robot {name}")
    except draccus.utils.ParsingError as exc:
        # draccus wraps the config's own validation error; show that one, it says what to fix.
        console.print(f"simpo-robot {name}: invalid arguments: {_config_error(exc)}", markup=False, highlight=False, soft_wrap=True)
        return 2
    if cmd.several_processes:
        from simpo_robot.rl.launch import launch_processes, requested_cpu_processes

        if (n := requested_cpu_processes()) is not None:
            return launch_processes(n, argv)
    try:
        run(cfg)
    except SimpoRobotError as exc:
        console.print(f"simpo-robot {name}: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
