"""molmo_core: a clean implementation of AI2's Molmo v1 (arXiv 2409.17146) that loads the official
checkpoints unchanged. No Gradio, no audio. Public API: see docs/core_api.md."""

from .api import MolmoRunner, load
from .errors import CheckpointError, MolmoInputError

__all__ = ["load", "MolmoRunner", "CheckpointError", "MolmoInputError"]
