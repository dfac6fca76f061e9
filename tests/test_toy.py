"""The toy benchmark: its landscape, the real CLI end to end on a tiny budget, determinism, bad input."""

import json

import pytest
import torch

from simpo_robot.cli import main
from simpo_robot.toy import (
    BEST_CENTRE,
    DECOY_CENTRE,
    ToyConfig,
    bad_region_mass,
    best_mode_mass,
    run_toy,
    toy_reward,
)

TINY = ["--seeds", "2", "--updates", "4", "--pretrain_steps", "5", "--particles", "16",
        "--eval_samples", "32", "--eval_every", "2", "--denoising_steps", "5", "--hidden", "16"]


def test_landscape_has_best_mode_decoy_and_bad_region():
    points = torch.tensor([BEST_CENTRE, DECOY_CENTRE, [0.0, -0.9], [0.9, 0.05]])
    r = toy_reward(points)
    assert r[0] > 0.95 and 0.45 < r[1] < 0.55 and r[2] < -0.99 and abs(r[3]) < 0.1
    assert r.argmax() == 0
    assert best_mode_mass(points) == 0.25
    assert bad_region_mass(points) == 0.25


def test_cli_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "toy.png"
    assert main(["toy", *TINY, "--json", str(out), "--plot", str(png)]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2 * 4  # seeds x default variants
    assert {(r["weighting"], r["negative_bound"]) for r in results} == {
        ("exp", 0.0), ("linear", 0.0), ("linear", -0.5), ("square", 0.0)}
    for r in results:
        assert isinstance(r["weighting"], str) and isinstance(r["seed"], int)
        for key in ("negative_bound", "final_reward", "best_mode_mass"):
            assert isinstance(r[key], float)
        assert 0.0 <= r["best_mode_mass"] <= 1.0
        assert [p["update"] for p in r["curve"]] == [0, 2, 4]
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_result():
    cfg = dict(seeds=1, updates=3, pretrain_steps=3, particles=8, eval_samples=16, eval_every=3,
               denoising_steps=4, hidden=8, variants=["linear@-0.5"])
    first, second = run_toy(ToyConfig(**cfg)), run_toy(ToyConfig(**cfg))
    assert [(r.final_reward, r.best_mode_mass, r.curve) for r in first] == [
        (r.final_reward, r.best_mode_mass, r.curve) for r in second]


@pytest.mark.parametrize("args, message", [
    (["--variants", "[softmax]"], "unknown weighting"),
    (["--variants", "[linear@0.5]"], "negative bound"),
    (["--variants", "[linear@abc]"], "not a number"),
    (["--seeds", "0"], "seeds must be >= 1"),
])
def test_bad_arguments_get_clear_messages(args, message, capsys):
    assert main(["toy", *args]) == 2
    assert message in capsys.readouterr().err


def test_json_path_that_is_a_directory_is_refused(tmp_path, capsys):
    assert main(["toy", *TINY, "--json", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_flags_accept_dashes_as_well_as_underscores(tmp_path):
    out = tmp_path / "o.json"
    args = [a.replace("_", "-") if a.startswith("--") else a for a in TINY]
    assert main(["toy", *args, "--variants", "[exp]", "--seeds", "1", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["results"]) == 1


def test_bare_boolean_flags_mean_true():
    from simpo_robot.cli import normalise_flags
    from simpo_robot.rl.trainer import FinetuneConfig

    assert normalise_flags(["--overwrite", "--seed", "3"], FinetuneConfig) == ["--overwrite", "true", "--seed", "3"]
    assert normalise_flags(["--simpo.standardise-q"], FinetuneConfig) == ["--simpo.standardise_q", "true"]
    assert normalise_flags(["--overwrite", "false"], FinetuneConfig) == ["--overwrite", "false"]
    assert normalise_flags(["--config", "f.yaml"], FinetuneConfig) == ["--config_path", "f.yaml"]
