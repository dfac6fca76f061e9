"""The command line: every subcommand's --help renders (argparse formats config docstrings with %)."""

import pytest

from simpo_robot.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_working_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"simpo-robot {name}" in capsys.readouterr().out


def test_unknown_subcommand(capsys):
    assert main(["fly"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err
