"""Molmo2 through transformers' native classes, on CPU-only installs (no torchvision). See README.md here.

`processing` is our own preprocessing (parity-tested against transformers' Molmo2Processor), `load` finds and
loads a checkpoint, `runner.Molmo2Runner` offers the methods of `molmo_core.api.MolmoRunner`, and `tiny`
writes tiny random checkpoints for tests. transformers itself is imported when a checkpoint is loaded.
"""

from .load import load_molmo2, model_family
from .processing import Molmo2Inputs, Molmo2Preprocessor, Video
from .runner import Molmo2Runner

__all__ = ["load_molmo2", "model_family", "Molmo2Runner", "Molmo2Preprocessor", "Molmo2Inputs", "Video"]
