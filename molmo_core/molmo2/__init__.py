"""Molmo2 through transformers' native classes, on CPU-only installs (no torchvision).

`processing` is our own preprocessing (parity-tested against transformers' Molmo2Processor), `load` finds and
loads a checkpoint, `runner.Molmo2Runner` offers the same methods as `molmo_core.api.MolmoRunner`, and `tiny`
writes tiny random checkpoints for tests. Submodules import transformers lazily where they can.
"""

from .load import load_molmo2, model_family
from .runner import Molmo2Runner

__all__ = ["load_molmo2", "model_family", "Molmo2Runner"]
