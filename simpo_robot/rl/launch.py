"""Several CPU processes from `accelerate launch --cpu --num_processes N`.

Accelerate's launcher (1.15) starts several CPU processes only through mpirun (`--mpirun_hostfile`); without
it, it runs the script once, with the rendezvous variables (MASTER_ADDR, MASTER_PORT) set as for several
processes but no WORLD_SIZE or RANK (huggingface/accelerate#2741). The trainer would then run on one process
without a word. `requested_cpu_processes` recognises that case from the environment and the launching
command, read with accelerate's own parser, and `launch_processes` starts the N processes with
torch.distributed.run (torchrun), which is what `accelerate launch --multi_gpu` does on a machine without GPUs.
"""

import logging
import os

log = logging.getLogger(__name__)

# Set by a launcher that did start several processes (torchrun, mpirun, accelerate's multi-GPU launcher).
STARTED_SEVERAL = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def accelerate_launch_processes(launcher_argv: list[str]) -> int | None:
    """--num_processes of an `accelerate launch ...` command line (or of its config file), if it is one on a
    single machine; else None."""
    if "launch" not in launcher_argv[:3] or not any("accelerate" in os.path.basename(a) for a in launcher_argv[:2]):
        return None
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        args = launch_command_parser().parse_args(launcher_argv[launcher_argv.index("launch") + 1:])
        config = load_config_from_file(args.config_file) if args.num_processes is None else None
    except (SystemExit, Exception):  # not a command line accelerate itself would run: leave it alone
        return None
    processes = args.num_processes if config is None else config.num_processes
    machines = args.num_machines if args.num_machines is not None else getattr(config, "num_machines", 1)
    return processes if machines in (None, 1) else None


def requested_cpu_processes(env: dict[str, str] | None = None, launcher_argv: list[str] | None = None) -> int | None:
    """N > 1 when this process is the only one that `accelerate launch --cpu --num_processes N` started; else
    None (a single process was asked for, or a launcher started them all)."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "MASTER_ADDR" not in env:
        return None
    if any(name in env for name in STARTED_SEVERAL):
        return None
    if launcher_argv is None:
        import psutil

        try:
            launcher_argv = psutil.Process().parent().cmdline()
        except (psutil.Error, AttributeError):  # no parent left, or one we may not read
            return None
    n = accelerate_launch_processes(launcher_argv)
    return n if n is not None and n > 1 else None


def launch_processes(n: int, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run `python -m simpo_robot ARGV` in n processes with torch.distributed.run; their exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    env = os.environ if env is None else env
    log.info("accelerate launch --cpu started one process for --num_processes %d (it starts several CPU processes "
             "only through mpirun); starting the %d processes with torch.distributed.run", n, n)
    args = get_args_parser().parse_args([
        "--nproc_per_node", str(n), "--master_addr", env["MASTER_ADDR"], "--master_port", env.get("MASTER_PORT", "29500"),
        "--module", "simpo_robot", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        log.error("%s", exc)
        return 1
    return 0
