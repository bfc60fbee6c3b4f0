"""Each built-in loss against a hand-written reference (value and gradient) on a small example."""

import math

import pytest
import torch

from mintd.engine.losses import check_config, get_loss

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


def gspo_reference(mask: list, low: float, high: float) -> tuple[float, list]:
    log_ratios = [lp - q for lp, q, m in zip(LP, Q, mask, strict=True) if m]
    s = math.exp(sum(log_ratios) / len(log_ratios))  # one ratio for the datum
    clipped = min(max(s, low), high)
    value = -sum(min(s * a, clipped * a) for a in ADV)
    grad = [-s * a if s * a <= clipped * a or low <= s <= high else 0.0 for a in ADV]
    return value, grad


@pytest.mark.parametrize("mask", [[1, 1, 1, 0], [0, 1, 0, 0], [1, 0.5, 2, 1]])
def test_gspo_sequence_ratio_over_the_masked_rows(mask):
    inputs = {**rl_inputs(), "sequence_ratio_mask": mask}
    selected = [m != 0 for m in mask]  # the mask selects; its values are not weights
    assert_matches(run("gspo", inputs), gspo_reference(selected, 1 - 3e-4, 1 + 4e-4))
    config = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
    assert_matches(run("gspo", inputs, config), gspo_reference(selected, 0.5, 2.0))


def test_gspo_clipping_gates_the_whole_datum_by_sign():
    inputs = {**rl_inputs(), "sequence_ratio_mask": [1, 1, 1, 0]}  # mean log-ratio 1/6: s > 1.2
    _, grad = run("gspo", inputs, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.1})
    assert grad[0] == grad[2] == 0.0  # A > 0 rows are clipped away
    assert grad[1] == pytest.approx(0.5 * math.exp(1 / 6))  # the A < 0 row still gets −s·A


def stable_reinforce_reference(mask: list, cap: float, kl: float) -> tuple[float, list]:
    value, grad = 0.0, []
    for lp, q, a, m in zip(LP, Q, ADV, mask, strict=True):
        w = min(math.exp(lp - q), cap)
        value += m * (-w * a * lp + kl * (q - lp))
        grad.append(m * (-w * a - kl))
    return value, grad


@pytest.mark.parametrize(("cap", "kl"), [(None, None), (1.5, 0.0), (1.0, 0.01), (100.0, 0.3)])
def test_stable_reinforce_truncated_is_and_kl(cap, kl):
    mask = [1.0, 1.0, 1.0, 0.0]
    inputs = {**rl_inputs(), "sampled_mask": mask}
    config = {k: v for k, v in (("is_cap", cap), ("kl_coeff", kl)) if v is not None}
    expected = stable_reinforce_reference(mask, cap or 1.0, kl or 0.0)
    assert_matches(run("stable_reinforce", inputs, config), expected)


def test_stable_reinforce_ignores_rows_outside_the_sampled_mask():
    inputs = {"logprobs": Q, "advantages": [1.0, 1.0, 1.0, 5.0], "sampled_mask": [1.0, 1.0, 1.0, 0.0]}
    _, grad = run("stable_reinforce", inputs, {"kl_coeff": 0.5})
    assert grad[3] == 0.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kl_coeff": -0.1}, "loss_fn_config.kl_coeff"),
        ({"kl_coeff": math.inf}, "loss_fn_config.kl_coeff"),
        ({"is_cap": 0.0}, "loss_fn_config.is_cap"),
    ],
)
def test_bad_config_names_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        check_config(config)


def test_unknown_loss_names_the_supported_ones():
    with pytest.raises(ValueError, match="loss_fn: unknown loss 'nope'; supported: cross_entropy"):
        get_loss("nope")
