"""Evaluation during a run: the run's weights (the EMA when on) on fixed prompts and seeds, the
sample grid written to the run folder and logged to the tracker."""

from __future__ import annotations

from typing import Sequence

from align.training.optim import ema_weights
from align.training.trackers import log_grids


def evaluate(run, reward, prompts: Sequence[str], rollout_config, eval_config, *, negative_prompt: str = "",
             heldout: dict | None = None, grid_name: str | None = None) -> dict[str, float]:
    """:func:`align.evaluation.evaluate` with the run's weights (the EMA when on) and autocast;
    writes the sample grid ``samples/<grid_name>`` and logs it to the tracker."""
    from align.evaluation import evaluate as evaluate_model
    from align.media import write_samples

    with ema_weights(run), run.accelerator.autocast():
        metrics, pixels, sample_prompts = evaluate_model(run.adapter, reward, prompts, eval_config, rollout_config,
                                                         negative_prompt=negative_prompt, heldout=heldout,
                                                         latent_kwargs=run.latent_kwargs)
    if grid_name and run.is_main:
        grid = write_samples(pixels.cpu(), sample_prompts, run.dir / "samples" / grid_name,
                             columns=eval_config.per_prompt)
        log_grids(run, grid.parent, grid_name, run.state.iteration)
    return metrics
