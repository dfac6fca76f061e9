"""`python -m simpo_robot ...` is the `simpo-robot` command (also what `accelerate launch -m` runs)."""

from simpo_robot.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
