"""The losses of AWM and DGPO (align/losses.py) on hand-checkable batches: AWM's weightings and its
gradient (zero at zero advantage, the plain flow-matching gradient scaled at a uniform advantage);
DGPO's group logit, its loss at the reference policy (ln 2 per group) and the surrogate's gradient
against the literal loss's."""

from __future__ import annotations

import math

import pytest
import torch

from align.losses import awm_loss, awm_weighted_error, dgpo_group_logits, dgpo_loss

MSE = torch.tensor([0.5, 2.0])
SIGMA = torch.tensor([0.5, 1.0])


@pytest.mark.parametrize("weighting, expected", [
    ("uniform", [0.5, 2.0]),
    ("t", [0.25, 2.0]),
    ("t2", [0.125, 2.0]),
    ("huber", [0.5 * math.sqrt(0.5), math.sqrt(2.0)]),
    # sigma ((m + 1e-10)^(1/4) - 1e-10^(1/4)) / (1/4)
    ("ghuber", [0.5 * 4 * (0.5 ** 0.25 - 10 ** -2.5), 4 * (2.0 ** 0.25 - 10 ** -2.5)]),
])
def test_awm_weightings(weighting, expected):
    got = awm_weighted_error(MSE, SIGMA, weighting)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=1e-6)


def test_awm_loss_is_the_advantage_weighted_mean():
    advantages = torch.tensor([1.0, -0.5])
    # (1 x 0.25 - 0.5 x 2.0) / 2 with the "t" weighting
    assert awm_loss(MSE, SIGMA, advantages, "t").item() == pytest.approx((0.25 - 1.0) / 2)


def _flow_matching_errors(model, x0, eps, sigma):
    x_sigma = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
    return ((model(x_sigma) - (eps - x0)) ** 2).mean(dim=1)


def test_awm_gradient_is_zero_at_zero_advantage_and_the_flow_matching_gradient_at_a_uniform_one():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    x0, eps, sigma = torch.randn(6, 4), torch.randn(6, 4), torch.rand(6)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten().clone() for p in model.parameters()])

    zero = grads(awm_loss(_flow_matching_errors(model, x0, eps, sigma), sigma, torch.zeros(6), "ghuber"))
    assert torch.count_nonzero(zero) == 0
    scaled = grads(awm_loss(_flow_matching_errors(model, x0, eps, sigma), sigma, torch.full((6,), 0.3), "uniform"))
    plain = grads(_flow_matching_errors(model, x0, eps, sigma).mean())  # the pretraining loss
    torch.testing.assert_close(scaled, 0.3 * plain, atol=1e-6, rtol=1e-5)


def test_dgpo_logit_and_its_loss_at_the_reference_policy():
    groups = torch.tensor([0, 0, 1, 1])
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    d_ref = torch.tensor([1.0, 1.0, 2.0, 2.0])
    d_theta = torch.tensor([0.5, 1.0, 2.0, 2.5])
    # group 0: (2 / 2) (1 x -0.5 + -1 x 0) = -0.5; group 1: (2 / 2) (-1 x 0 + 1 x 0.5) = 0.5
    logits = dgpo_group_logits(d_theta, d_ref, advantages, groups, beta=2.0, group_size=2)
    torch.testing.assert_close(logits, torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    literal = dgpo_loss(d_theta, d_ref, advantages, groups, beta=2.0, group_size=2, form="literal")
    assert literal.item() == pytest.approx((math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))) / 2)
    # at the reference policy every S_g is 0: -log sigmoid(0) = ln 2 for each group, whatever beta and A
    at_ref = dgpo_loss(d_ref, d_ref, advantages, groups, beta=100.0, group_size=2, form="literal")
    assert at_ref.item() == pytest.approx(math.log(2))


def test_dgpo_surrogate_gradient_is_the_literal_one_over_beta():
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    advantages = torch.tensor([1.2, -0.2, -1.0, 0.5, 0.5, -1.0])
    d_ref = torch.rand(6, generator=torch.Generator().manual_seed(1))
    beta = 7.0

    def grad(form):
        d_theta = (d_ref + 0.1 * torch.randn(6, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
        dgpo_loss(d_theta, d_ref, advantages, groups, beta=beta, group_size=3, form=form).backward()
        return d_theta.grad

    torch.testing.assert_close(grad("surrogate") * beta, grad("literal"), atol=1e-6, rtol=1e-5)


def test_awm_draws_one_level_from_each_stratum_the_smaller_strata_first():
    """The reference's 'discrete_wo_init' on 14 steps: steps 1..11 in 6 strata {1}, {2, 3}, ..., {10, 11}."""
    from align.trainers.awm import AWMConfig, level_steps, stratified_steps

    config = AWMConfig(t_per_sample=6)
    config.rollout.num_steps = 14
    steps = level_steps(config)
    assert list(steps) == list(range(1, 12))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([stratified_steps(steps, 6, generator) for _ in range(200)])
    strata = [{1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}]
    for column, stratum in zip(draws.T, strata):
        assert set(column.tolist()) == stratum  # every member drawn, nothing outside
    config.t_distribution = "discrete"
    assert list(level_steps(config)) == list(range(0, 12))


def test_dgpo_clip_stops_rows_that_moved_far_enough_their_advantages_way():
    """rho = exp(d_old - d_theta), c = 0.2: a good row (A > 0) whose error fell by 0.3 (rho = e^0.3 =
    1.35 > 1.2) stops; one whose error fell by 0.1 (1.105) trains on; a bad row (A < 0) whose error rose by
    0.3 (rho = e^-0.3 = 0.74 < 0.8) stops, one that rose 0.1 (0.905) trains on, and a good row whose
    error rose (0.74) is not clipped: it still has to move."""
    from align.losses import dgpo_clipped

    d_old = torch.ones(5)
    d_theta = torch.tensor([0.7, 0.9, 1.3, 1.1, 1.3])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    assert dgpo_clipped(d_old, d_theta, advantages, 0.2).tolist() == [True, False, True, False, False]


def test_dgpo_clip_and_ema_rollouts_in_a_run(tmp_path):
    """With clip_range the old policy (the EMA) is evaluated once more per row and step (counted in NFE)
    and the clipped share is logged; with ema_rollouts_after 1 the second iteration samples with the EMA."""
    import json

    from tests.conftest import GaussianAdapter, gaussian_trainer

    def rows(out, *extra):
        module, config = gaussian_trainer("dgpo", out, "group_size=4", "trunc_steps=2", "steps_per_iteration=2",
                                          "optim.lr=0.5", *extra)
        module.train(config, adapter=GaussianAdapter(shape=(3, 4, 4)))
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]

    plain = rows(tmp_path / "plain")
    clipped = rows(tmp_path / "clip", "clip_range=0.01", "ema_rollouts_after=1")
    # 4 rows x 6 sampling steps, plus 2 steps x 4 rows of reference evaluations (and as many of the EMA)
    assert [r["nfe"] for r in plain] == [24 + 8, 2 * (24 + 8)]
    assert [r["nfe"] for r in clipped] == [24 + 16, 2 * (24 + 16)]
    assert "train/clipped_fraction" not in plain[0] and 0 <= clipped[1]["train/clipped_fraction"] <= 1
    assert [r["policy/ema_rollouts"] for r in clipped] == [0.0, 1.0]
