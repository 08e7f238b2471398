"""Llama 3 with tensor parallelism built in."""

from .config import PRESETS, ModelArgs
from .model import Transformer
from .weights.loading import load_model

__all__ = ["ModelArgs", "PRESETS", "Transformer", "load_model"]
