"""Each built-in loss against a hand-written reference (value and gradient) on a small example."""

import math

import pytest
import torch

from mintd.engine.losses import get_loss

LP = [-0.5, -1.2, -2.0, -0.1]
Q = [-0.7, -1.0, -2.5, -0.1]
ADV = [1.0, -0.5, 2.0, 0.0]


def run(name: str, inputs: dict, config: dict | None = None, lp=LP) -> tuple[float, list]:
    lp_t = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in inputs.items()}
    loss = get_loss(name)[0](lp_t, tensors, config or {})
    loss.backward()
    return loss.item(), lp_t.grad.tolist()


def rl_inputs() -> dict:
    return {"logprobs": Q, "advantages": ADV}


def test_cross_entropy_any_real_weights():
    w = [1.0, -2.0, 0.5, 0.0]
    value, grad = run("cross_entropy", {"weights": w})
    assert value == pytest.approx(-sum(wi * li for wi, li in zip(w, LP, strict=True)))
    assert grad == pytest.approx([-wi for wi in w])


def test_cross_entropy_two_dimensional_targets():
    lp = [[-0.5, -1.0], [-2.0, -0.3]]
    w = [[1.0, 0.5], [0.0, 2.0]]
    value, grad = run("cross_entropy", {"weights": w}, lp=lp)
    assert value == pytest.approx(-(-0.5 - 0.5 + 0.0 - 0.6))
    assert grad == [[-1.0, -0.5], [0.0, -2.0]]


def test_importance_sampling():
    value, grad = run("importance_sampling", rl_inputs())
    ratios = [math.exp(lp - q) for lp, q in zip(LP, Q, strict=True)]
    assert value == pytest.approx(-sum(r * a for r, a in zip(ratios, ADV, strict=True)))
    assert grad == pytest.approx([-r * a for r, a in zip(ratios, ADV, strict=True)])


def ppo_reference(low: float, high: float) -> tuple[float, list]:
    value, grad = 0.0, []
    for lp, q, a in zip(LP, Q, ADV, strict=True):
        r = math.exp(lp - q)
        clipped = min(max(r, low), high)
        unclipped_wins = r * a <= clipped * a
        value -= min(r * a, clipped * a)
        # d/dlp of the chosen term: r·A if the unclipped term is the min, or if clip is inactive
        grad.append(-r * a if unclipped_wins or low <= r <= high else 0.0)
    return value, grad


def assert_matches(actual: tuple[float, list], expected: tuple[float, list]) -> None:
    assert actual[0] == pytest.approx(expected[0])
    assert actual[1] == pytest.approx(expected[1])


def test_ppo_default_and_configured_thresholds():
    assert_matches(run("ppo", rl_inputs()), ppo_reference(0.8, 1.2))
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    assert_matches(run("ppo", rl_inputs(), config), ppo_reference(0.9, 1.1))


def test_ppo_per_token_thresholds_win_over_config():
    inputs = {**rl_inputs(), "clip_low_threshold": [0.9] * 4, "clip_high_threshold": [1.1] * 4}
    assert_matches(run("ppo", inputs, {"clip_low_threshold": 0.1}), ppo_reference(0.9, 1.1))


def test_cispo_detaches_the_clipped_ratio():
    value, grad = run("cispo", rl_inputs())
    clipped = [min(max(math.exp(lp - q), 0.8), 1.2) for lp, q in zip(LP, Q, strict=True)]
    assert value == pytest.approx(-sum(c * lp * a for c, lp, a in zip(clipped, LP, ADV, strict=True)))
    assert grad == pytest.approx([-c * a for c, a in zip(clipped, ADV, strict=True)])


def test_dro():
    beta = 0.3
    value, grad = run("dro", rl_inputs(), {"beta": beta})
    expected = -sum(lp * a - 0.5 * beta * (lp - q) ** 2 for lp, q, a in zip(LP, Q, ADV, strict=True))
    assert value == pytest.approx(expected)
    assert grad == pytest.approx([-(a - beta * (lp - q)) for lp, q, a in zip(LP, Q, ADV, strict=True)])


def test_unknown_loss_names_the_supported_ones():
    with pytest.raises(ValueError, match="loss_fn: unknown loss 'nope'; supported: cross_entropy"):
        get_loss("nope")
