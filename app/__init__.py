"""Molmo Studio's Gradio app: `MolmoService` (owns the model) + `build_demo(service)` (the UI).

Imported lazily, so that `launch.py --users ...` (app.access) starts without loading Gradio and torch."""

__all__ = ["MolmoService", "build_demo", "CSS"]


def __getattr__(name: str):
    if name == "MolmoService":
        from .service import MolmoService

        return MolmoService
    if name in ("build_demo", "CSS"):
        from . import ui

        return getattr(ui, name)
    raise AttributeError(f"module 'app' has no attribute {name!r}")
