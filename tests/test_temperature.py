"""The learned temperature: entropy/KL of (signed) weights, the loss and its gradient direction."""

import math

import pytest
import torch

from simpo_robot.simpo import LearnedTemperature, temperature_loss, weight_entropy, weight_kl_from_uniform


def test_entropy_and_kl_hand_computed():
    uniform = torch.full((1, 4), 0.25, dtype=torch.float64)
    one_hot = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    assert weight_entropy(uniform).item() == pytest.approx(math.log(4), abs=1e-12)
    assert weight_entropy(one_hot).item() == 0.0
    assert weight_kl_from_uniform(uniform).item() == pytest.approx(0.0, abs=1e-12)
    assert weight_kl_from_uniform(one_hot).item() == pytest.approx(math.log(4), abs=1e-12)
    # Signed weights: p = |w| / sum|w| = [0.25, 0.75] for w = [-0.5, 1.5].
    signed = torch.tensor([[-0.5, 1.5]], dtype=torch.float64)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert weight_entropy(signed).item() == pytest.approx(expected, abs=1e-12)


def test_loss_value_and_gradient_hand_computed():
    temperature = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    one_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = temperature_loss(temperature, one_hot, target_kl=0.5)
    # lambda * (target_kl - KL) = 2 * (0.5 - log 4); d/d lambda = 0.5 - log 4.
    assert loss.item() == pytest.approx(2 * (0.5 - math.log(4)), abs=1e-12)
    loss.backward()
    assert temperature.grad.item() == pytest.approx(0.5 - math.log(4), abs=1e-12)
    assert one_hot.grad is None  # the weights are not optimised through the temperature loss


@pytest.mark.parametrize("weights, grows", [([[1.0, 0.0, 0.0, 0.0]], True), ([[0.25, 0.25, 0.25, 0.25]], False)])
def test_temperature_moves_toward_target(weights, grows):
    temp = LearnedTemperature(init=1.0, target_kl=0.5)
    opt = torch.optim.SGD(temp.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        temp.loss(torch.tensor(weights)).backward()
        opt.step()
    # Greedier than the target (KL = log 4 > 0.5): lambda grows; flatter (KL = 0): it shrinks.
    assert (temp.value > 1.0) == grows


def test_temperature_stays_positive_under_large_steps():
    temp = LearnedTemperature(init=1.0, target_kl=3.0)
    opt = torch.optim.SGD(temp.parameters(), lr=50.0)
    for _ in range(20):
        opt.zero_grad()
        temp.loss(torch.full((2, 8), 1 / 8)).backward()
        opt.step()
    assert 0.0 < temp.value < 1.0
    assert temp.value == pytest.approx(temp.min_temperature)


def test_learned_temperature_parameterisation():
    temp = LearnedTemperature(init=0.5, target_kl=1.0, min_temperature=0.1)
    assert temp.value == pytest.approx(0.5)
    assert temp.theta.item() == pytest.approx(math.log(0.4))


@pytest.mark.parametrize("kwargs", [dict(init=0.0), dict(init=-1.0), dict(init=float("inf")), dict(target_kl=-0.1),
                                    dict(init=0.1, min_temperature=0.2)])
def test_invalid_temperature_settings(kwargs):
    with pytest.raises(ValueError):
        LearnedTemperature(**kwargs)
