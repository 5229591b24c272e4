"""Flow-DPO losses against the formulas written out by hand."""

import math

import pytest
import torch

from dpo.losses import flow_dpo_loss, flow_matching_error, sample_sigmas, velocity_distance

ERRS = dict(
    policy_err_w=torch.tensor([0.50, 0.30, 0.20]),
    policy_err_l=torch.tensor([0.40, 0.45, 0.20]),
    ref_err_w=torch.tensor([0.45, 0.35, 0.25]),
    ref_err_l=torch.tensor([0.42, 0.40, 0.15]),
)


def by_hand(beta):
    d_w = [0.50 - 0.45, 0.30 - 0.35, 0.20 - 0.25]
    d_l = [0.40 - 0.42, 0.45 - 0.40, 0.20 - 0.15]
    h = [-(a - b) / 2 for a, b in zip(d_w, d_l, strict=True)]
    return d_w, d_l, h


@pytest.mark.parametrize("beta", [1.0, 100.0, 2000.0])
def test_sigmoid_hinge_ipo_equal_the_formulas(beta):
    d_w, d_l, h = by_hand(beta)
    sigmoid = sum(-math.log(1 / (1 + math.exp(-beta * x))) for x in h) / 3
    hinge = sum(max(0.0, 1 - beta * x) for x in h) / 3
    ipo = sum((x - 1 / (2 * beta)) ** 2 for x in h) / 3
    for loss_type, expected in (("sigmoid", sigmoid), ("hinge", hinge), ("ipo", ipo)):
        loss, metrics = flow_dpo_loss(**ERRS, beta=beta, loss_type=loss_type)
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), loss_type
    assert metrics["implicit_accuracy"].item() == pytest.approx(2 / 3)  # pairs 0 and 1 win: d_w < d_l
    assert metrics["reward_margin"].item() == pytest.approx(beta * sum(h) / 3, rel=1e-5)


def test_sft_term_and_pair_weights():
    beta = 10.0
    _, _, h = by_hand(beta)
    per_pair = [-math.log(1 / (1 + math.exp(-beta * x))) + 0.5 * w for x, w in zip(h, [0.5, 0.3, 0.2], strict=True)]
    weights = torch.tensor([1.0, 2.0, 3.0])
    loss, _ = flow_dpo_loss(**ERRS, beta=beta, sft_weight=0.5, pair_weights=weights)
    # Weighted mean over the B = 3 pairs: the weights were normalised over the dataset, not this batch.
    assert loss.item() == pytest.approx(sum(w * x for w, x in zip([1, 2, 3], per_pair, strict=True)) / 3, rel=1e-5)


def test_margin_weights_act_at_one_pair_per_micro_batch():
    """Dataset-normalised weights (mean 1) must scale each pair's loss even when a micro-batch holds one pair.

    Summed over micro-batches of one pair each, the total is sum_i w_i loss_i; dividing by the batch's
    weight sum would give sum_i loss_i, the unweighted loss.
    """
    beta = 10.0
    _, _, h = by_hand(beta)
    per_pair = [-math.log(1 / (1 + math.exp(-beta * x))) for x in h]
    margins = [0.6, 1.2, 3.0]
    weights = [m / (sum(margins) / 3) for m in margins]  # PairData's normalisation: margin / mean margin
    total = 0.0
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in ERRS.items()}
        loss, _ = flow_dpo_loss(**one, beta=beta, pair_weights=torch.tensor([weights[i]]))
        assert loss.item() == pytest.approx(weights[i] * per_pair[i], rel=1e-5)
        total += loss.item()
    assert total == pytest.approx(sum(w * x for w, x in zip(weights, per_pair, strict=True)), rel=1e-5)
    assert total != pytest.approx(sum(per_pair), rel=1e-3)  # the weights changed the objective


def test_equal_policy_and_reference_give_log2_and_half_accuracy():
    err = torch.rand(5)
    loss, metrics = flow_dpo_loss(err, err + 0.1, err, err + 0.1, beta=500.0)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["implicit_accuracy"].item() == 0.5


def test_flow_matching_error_is_per_sample_mean_square():
    v, noise, x0 = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = torch.stack([((v[i] - (noise[i] - x0[i])) ** 2).mean() for i in range(2)])
    torch.testing.assert_close(flow_matching_error(v, noise, x0), expected)


def test_sigma_samplers():
    g = torch.Generator().manual_seed(0)
    logit = sample_sigmas(20000, g, "logit_normal", 0.0, 1.0, shift=1.0)
    assert 0 < logit.min() and logit.max() < 1 and abs(logit.mean().item() - 0.5) < 0.01
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    shifted, plain = sample_sigmas(100, g1, "uniform", shift=3.0), sample_sigmas(100, g2, "uniform", shift=1.0)
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))


def test_velocity_distance_is_per_sample_mean_square_and_constant_in_the_target():
    v = torch.randn(2, 3, 4, requires_grad=True)
    target = torch.randn(2, 3, 4, requires_grad=True)
    expected = torch.stack([((v[i] - target[i]) ** 2).mean() for i in range(2)])
    got = velocity_distance(v, target)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert target.grad is None and v.grad is not None
    assert velocity_distance(target, target).abs().max().item() == 0.0
