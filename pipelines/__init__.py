"""Model adapters: one small interface over diffusers models and the embedded toy model."""

from pipelines.base import Conditioning, ModelAdapter, Schedule

__all__ = ["Conditioning", "ModelAdapter", "Schedule"]
