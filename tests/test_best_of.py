"""Acting by the critic: picking, the critic file beside a policy, and BestOfN against the policy it wraps."""

import pytest
import torch
from torch import nn

from simpo_robot.cli import main
from simpo_robot.deploy.testing import save_tiny_policy
from simpo_robot.errors import SimpoRobotError
from simpo_robot.evaluate import EvalConfig
from simpo_robot.policy_io import load_policy
from simpo_robot.rl.best_of import BestOfN, pick_best
from simpo_robot.rl.critic import CRITIC_WEIGHTS, TwinCritic, TwinQ, load_critic, save_critic
from simpo_robot.tasks import OBS_ENV_STATE, OBS_STATE

OBS_DIM, CHUNK_DIM = 2 * (10 + 18), 8 * 4  # tiny fetch_push policy: 2 observations, 8 executed actions of 4


@pytest.fixture(scope="module")
def tiny_push(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny") / "policy", env_state_dim=18,
                            noise_scheduler_type="DDIM", num_inference_steps=10)


class SumQ(nn.Module):
    """Q = sum of the executed chunk (twin 2: plus 1, so min picks twin 1): the best chunk is the largest sum."""

    obs_dim, chunk_dim = OBS_DIM, CHUNK_DIM

    def forward(self, obs, chunk):
        return TwinQ(chunk.sum(-1), chunk.sum(-1) + 1)


def batches(steps: int, b: int = 3):
    gen = torch.Generator().manual_seed(7)
    return [{OBS_STATE: torch.randn(b, 10, generator=gen), OBS_ENV_STATE: torch.randn(b, 18, generator=gen)}
            for _ in range(steps)]


def test_pick_best_keeps_each_rows_highest_q_and_the_first_on_ties():
    q = torch.tensor([[0.0, 2.0, 1.0], [5.0, 5.0, -1.0]])
    chunks = torch.arange(2 * 3 * 2 * 1, dtype=torch.float32).reshape(2, 3, 2, 1)
    assert torch.equal(pick_best(q, chunks), torch.stack([chunks[0, 1], chunks[1, 0]]))


def test_critic_round_trips_exactly_and_bad_files_get_clear_errors(tmp_path):
    critic = TwinCritic(OBS_DIM, CHUNK_DIM, (32, 16), layer_norm=True)
    save_critic(tmp_path, critic, {"task": "fetch_push", "gamma": 0.99})
    loaded, card = load_critic(tmp_path)
    assert (card.obs_dim, card.chunk_dim, card.hidden, card.layer_norm) == (OBS_DIM, CHUNK_DIM, (32, 16), True)
    assert card.trained_on == {"task": "fetch_push", "gamma": 0.99}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in critic.state_dict().items())
    (tmp_path / CRITIC_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(SimpoRobotError, match="critic.safetensors does not load"):
        load_critic(tmp_path)
    with pytest.raises(SimpoRobotError, match="has no critic"):
        load_critic(tmp_path / "elsewhere")


def test_best_of_one_plays_exactly_what_the_policy_plays(tiny_push):
    policy = load_policy(tiny_push).policy
    wrapped = BestOfN(policy, TwinCritic(OBS_DIM, CHUNK_DIM, (8,)), n=1)
    theirs, ours = [], []
    for actor, out in ((policy, theirs), (wrapped, ours)):
        actor.reset()
        torch.manual_seed(3)  # the initial noise x_T comes from the global stream in both
        out += [actor.select_action(batch) for batch in batches(10)]  # 2 decisions of 8 actions
    for a, b in zip(theirs, ours, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_best_of_n_executes_the_highest_q_of_the_n_samples(tiny_push):
    policy = load_policy(tiny_push).policy
    wrapped = BestOfN(policy, SumQ(), n=6, generator=torch.Generator().manual_seed(0))
    b = batches(1)[0]
    state, env_state = b[OBS_STATE].unsqueeze(1).repeat(1, 2, 1), b[OBS_ENV_STATE].unsqueeze(1).repeat(1, 2, 1)
    chosen = wrapped.choose(state, env_state)
    actor = wrapped.actor
    cond = actor.global_cond(state, env_state).repeat_interleave(6, 0)
    all_chunks = actor.sample(actor.unet, cond, generator=torch.Generator().manual_seed(0)).reshape(3, 6, 16, 4)
    sums = actor.executed(all_chunks).flatten(2).sum(-1)  # (3, 6)
    assert torch.equal(chosen, all_chunks[torch.arange(3), sums.argmax(1)])
    assert not torch.equal(chosen, all_chunks[:, 0])  # the pick mattered
    # select_action executes the chosen chunk's executed actions, one per call
    wrapped.reset()
    wrapped.generator.manual_seed(0)
    first, second = wrapped.select_action(b), wrapped.select_action(batches(2)[1])
    assert torch.equal(first, actor.executed(chosen)[:, 0]) and torch.equal(second, actor.executed(chosen)[:, 1])


def test_a_critic_that_does_not_fit_and_bad_eval_flags_are_refused(tiny_push, tmp_path, capsys):
    policy = load_policy(tiny_push).policy
    with pytest.raises(SimpoRobotError, match="n_action_steps the policy was fine-tuned with"):
        BestOfN(policy, TwinCritic(OBS_DIM, 2 * 4, (8,)), n=4)
    with pytest.raises(ValueError, match="leave noise_scale at 1"):
        EvalConfig(best_of=4, noise_scale=0.0)
    with pytest.raises(ValueError, match="best_of must be >= 1"):
        EvalConfig(best_of=0)
    # a policy without a critic beside it (a pretrained one): a clear message, no traceback
    assert main(["eval", "--policy", str(tiny_push), "--task", "fetch_push", "--episodes", "1", "--best_of", "4",
                 "--out", str(tmp_path)]) == 1
    assert "has no critic" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "eval_info.json").exists()
