"""A snapshot of the trainable weights that can be swapped into the model (old / reference policies)."""

from __future__ import annotations

from dataclasses import dataclass, field

import math
from contextlib import contextmanager

import torch

from align.errors import ConfigError


class WeightSnapshot:
    """A copy of the trainable parameters: DiffusionNFT's "old" policy (an EMA of them), the online
    DPO reference and PRDP's sampling snapshot (refreshed copies). ``swapped()`` puts it into the
    model and restores the trained weights after; ``update(d)`` is old <- d old + (1 - d) theta
    (d = 0: a fresh copy). Like a module's, ``state_dict()`` holds the tensors themselves
    (updated in place), so it can be stored once and saved at any later time."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = list(params)
        from align.sharding import has_sharded

        if has_sharded(self.params):
            raise ConfigError("run.fully_shard: this trainer keeps a snapshot of the weights (an old or reference "
                              "policy), which is not supported on sharded weights; run it with DDP")
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(decay).add_(p.detach().to(s.dtype), alpha=1 - decay)

    @contextmanager
    def swapped(self):
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, trained):
                    p.copy_(value)

    def distance(self) -> float:
        """Root mean square difference between the old and the trained weights."""
        total = sum(float(((p.detach().float() - s.float()) ** 2).sum()) for p, s in zip(self.params, self.shadow))
        count = sum(p.numel() for p in self.params)
        return math.sqrt(total / max(1, count))

    def state_dict(self) -> dict:
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow) or any(
                a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ConfigError("the checkpoint's weight snapshot does not match the trainable weights: "
                              "was it made with other LoRA settings?")
        with torch.no_grad():
            for s, value in zip(self.shadow, state["shadow"]):
                s.copy_(value.to(s.device, s.dtype))


def growing_decay(cap: float, rate: float, updates: int) -> float:
    """An EMA decay that grows with training: d = min(cap, rate * updates) after ``updates`` optimizer
    updates (AWM's and DGPO's EMA of the weights: cap 0.3, rate 0.001)."""
    return min(cap, rate * updates)


@dataclass
class SnapshotState:
    """The trainer state of the trainers that keep a second copy of the trained weights (DPO's
    refreshed reference, PRDP's sampling snapshot, DiffusionNFT's old policy)."""

    #: the snapshot's weights (null: not taken yet)
    snapshot: dict | None = None
    #: run.async_rollout: the weights of the versions that batches in flight were asked with ({version: weights}),
    #: so a resumed run asks for them again with the same weights
    rollout_weights: dict = field(default_factory=dict)


def checkpointed_snapshot(run) -> WeightSnapshot:
    """A snapshot of the trained weights kept in the trainer state (:class:`SnapshotState`): restored
    from it on resume, and stored there by reference (its tensors move in place), so every
    checkpoint saves the snapshot as it is then."""
    snapshot = WeightSnapshot(run.adapter.trainable_parameters())
    if run.state.trainer.snapshot is not None:  # resumed
        snapshot.load_state_dict(run.state.trainer.snapshot)
    run.state.trainer.snapshot = snapshot.state_dict()
    return snapshot
