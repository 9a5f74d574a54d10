"""D3PO, PRDP, RAFT and Flow-RWR: the closed forms of METHODS.md at known inputs, the pair and
ranking selections, and the Pick-a-Pic converter writing the documented pair format."""

from __future__ import annotations

import json
import math

import pytest
import torch

from align.losses import d3po_loss, prdp_loss, rwr_weights
from align.trainers.d3po import pair_preferences
from align.trainers.raft import ranked_keep


def test_d3po_loss_closed_forms():
    # equal ratios: ln 2
    assert float(d3po_loss(torch.tensor([0.03]), torch.tensor([0.03]), beta=0.1, clip=0.1)) == pytest.approx(math.log(2))
    # inside the clip: -log sigmoid(beta (lw - ll))
    value = float(d3po_loss(torch.tensor([0.05]), torch.tensor([-0.05]), beta=0.1, clip=0.1))
    assert value == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * 0.1))), rel=1e-6)
    # outside: the ratios are clamped to [1 - clip, 1 + clip]
    clamped = float(d3po_loss(torch.tensor([0.5]), torch.tensor([-0.5]), beta=0.1, clip=0.1))
    inside = 0.1 * (math.log(1.1) - math.log(0.9))
    assert clamped == pytest.approx(-math.log(1 / (1 + math.exp(-inside))), rel=1e-6)
    # and pass no gradient there
    w = torch.tensor([0.5], requires_grad=True)
    d3po_loss(w, torch.tensor([0.0]), beta=0.1, clip=0.1).sum().backward()
    assert float(w.grad) == 0.0


def test_prdp_loss_is_zero_when_the_log_ratio_difference_equals_the_reward_difference_over_beta():
    rhat_a, rhat_b = torch.tensor([0.7, 0.2]), torch.tensor([0.3, 0.2])
    r_a, r_b = torch.tensor([0.9, 0.5]), torch.tensor([0.5, 0.5])
    assert prdp_loss(rhat_a, rhat_b, r_a, r_b, beta=1.0).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    # beta 2: the target difference halves, residual 0.4 - 0.2
    assert float(prdp_loss(rhat_a, rhat_b, r_a, r_b, beta=2.0)[0]) == pytest.approx(0.2 ** 2)


def test_rwr_weights_are_exp_r_over_t_normalised_to_mean_one():
    r = torch.tensor([0.1, 0.2, 0.4, 0.9])
    valid = torch.tensor([True, True, True, False])
    w = rwr_weights(r, 0.1, valid)
    expected = torch.exp(r[:3] / 0.1) / torch.exp(r[:3] / 0.1).sum() * 3
    torch.testing.assert_close(w[:3], expected)
    assert float(w[3]) == 0.0 and float(w.sum()) == pytest.approx(3.0)


def test_d3po_pairs_are_decided_by_the_reward_and_ties_dropped():
    scores = torch.tensor([0.2, 0.8, 0.5, 0.5, 0.9, 0.1, 0.3, 0.32])
    valid = torch.tensor([True, True, True, True, True, True, False, True])
    winner, loser = pair_preferences(scores, valid)
    assert winner.tolist() == [1, 4] and loser.tolist() == [0, 5]  # tie (2, 3) and unscored 6 dropped
    winner, _ = pair_preferences(scores, valid, min_gap=0.7)
    assert winner.tolist() == [4]


def test_raft_keeps_the_best_per_prompt_then_a_global_fraction():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.7, 0.2, 0.6])
    valid = torch.tensor([True, False, True, True, True, True, True, True])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert ranked_keep(rewards, valid, groups, per_group=1, fraction=1.0).tolist() == [4, 2]
    assert ranked_keep(rewards, valid, groups, per_group=2, fraction=0.5).tolist() == [4, 5]


def test_pickapic_rows_become_the_documented_pairs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from PIL import Image
    import io
    import subprocess
    import sys
    from pathlib import Path

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    shard = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"caption": ["a red cube", "a blue ball", "a tie"],
                             "jpg_0": [png((255, 0, 0)), png((0, 0, 255)), png((0, 0, 0))],
                             "jpg_1": [png((0, 255, 0)), png((9, 9, 9)), png((1, 1, 1))],
                             "label_0": [1.0, 0.0, 0.5]}), shard)
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "scripts" / "pickapic_to_pairs.py"), str(shard), str(tmp_path / "out")],
                   check=True, capture_output=True)
    from align.trainers.dpo import read_pairs

    lines = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert [line["label"] for line in lines] == [1.0, 0.0, 0.5]
    pairs = read_pairs(str(tmp_path / "out" / "pairs.jsonl"))  # the tie is dropped, label 0 flipped
    assert [(p.prompt, p.chosen.name) for p in pairs] == [("a red cube", "shard-000000_0.jpg"),
                                                           ("a blue ball", "shard-000001_1.jpg")]
    assert Image.open(pairs[0].chosen).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("trainer, overrides", [
    ("d3po", ["rollout.num_steps=6", "rollout.sde_steps=[5]"]),
    ("prdp", ["rollout.num_steps=6", "rollout.sde_steps=[5]"]),
    ("b2_diffurl", ["rollout.num_steps=6", "split_start=5"]),
])
def test_a_setting_that_leaves_no_step_to_train_is_one_line(trainer, overrides, tmp_path):
    from align.config import ConfigError
    from tests.conftest import gaussian_trainer

    module, config = gaussian_trainer(trainer, tmp_path, *overrides)
    with pytest.raises(ConfigError) as err:
        module.check_config(config)
    assert "\n" not in str(err.value) and ("no step to train" in str(err.value) or "nothing would train" in str(err.value))
