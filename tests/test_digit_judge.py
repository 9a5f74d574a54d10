"""The independent digit judge: it reads digits it never saw, it is not the reward classifier's model
family, and an attack that fools the classifier (what a generator hacking the digit reward learns)
leaves the judge reading the true digit; the embedded default watches it."""

from __future__ import annotations

import torch

from pipelines.toy import COLOURS, colour_digits, digit_split
from rewards.digit_classifier import load_digit_classifier
from rewards.digit_judge import load_digit_judge


def unseen_digits(n=None):
    """The judge trains on digit_split's held-out part; the other part is new to it."""
    x, y, _, _ = digit_split()
    x, y = (x, y) if n is None else (x[:n], y[:n])
    return colour_digits(x, torch.arange(len(y)) % len(COLOURS), size=16), y


def test_the_judge_reads_digits_it_never_saw():
    images, labels = unseen_digits()
    with torch.no_grad():
        accuracy = (load_digit_judge()(images).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.97  # measured 0.991 on the 1438 digits


def test_the_judge_is_another_model_family_than_the_classifier():
    judge, classifier = load_digit_judge(), load_digit_classifier()
    assert not any(isinstance(m, torch.nn.Conv2d) for m in judge.modules())
    assert any(isinstance(m, torch.nn.Conv2d) for m in classifier.modules())


def test_an_attack_on_the_classifier_does_not_fool_the_judge():
    images, labels = unseen_digits(128)
    classifier, judge = load_digit_classifier(), load_digit_judge()
    target, eps, adv = (labels + 1) % 10, 0.15, images.clone()
    for _ in range(40):  # signed-gradient ascent on the classifier's log P(wrong digit), |delta| <= eps
        adv.requires_grad_(True)
        grad, = torch.autograd.grad(classifier(adv).log_softmax(-1).gather(1, target[:, None]).sum(), adv)
        adv = (adv.detach() + 0.01 * grad.sign()).clamp(images - eps, images + eps).clamp(0, 1)
    with torch.no_grad():
        fooled = (classifier(adv).argmax(-1) == labels).float().mean().item()
        judged = (judge(adv).argmax(-1) == labels).float().mean().item()
    assert fooled < 0.3 and judged > 0.75, (fooled, judged)  # measured 0.19 and 0.85


def test_digit_judge_reward_is_the_judges_accuracy_on_the_requested_digit():
    from rewards import build_reward

    images, labels = unseen_digits(20)
    wrong = [f"a red digit {(int(d) + 1) % 10}" for d in labels]
    right = [f"a red digit {int(d)}" for d in labels]
    reward = build_reward("digit_judge")
    with torch.no_grad():
        predicted = load_digit_judge()(images).argmax(-1)
    assert reward(images, right).total.tolist() == (predicted == labels).float().tolist()
    assert reward(images, wrong).total.tolist() == (predicted == (labels + 1) % 10).float().tolist()


def test_the_embedded_default_watches_the_judge_unless_told_otherwise():
    from align.config import load_config
    from align.trainers.scoring import heldout_specs
    from align.trainers.flow_grpo import FlowGRPOConfig

    assert heldout_specs(load_config(FlowGRPOConfig)) == ["digit_judge"]
    assert heldout_specs(load_config(FlowGRPOConfig, overrides=["heldout_rewards=[]"])) == []
    assert heldout_specs(load_config(FlowGRPOConfig, overrides=["model.name=sd3"])) == []
