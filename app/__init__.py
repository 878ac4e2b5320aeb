"""Molmo Studio's Gradio app: `MolmoService` (owns the model) + `build_demo(service)` (the UI)."""

from .service import MolmoService
from .ui import CSS, build_demo

__all__ = ["MolmoService", "build_demo", "CSS"]
