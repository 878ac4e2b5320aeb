"""The embedded trainer: PixMo-Cap-style records -> packed examples -> LoRA / QLoRA / full fine-tune ->
a checkpoint in the official format.

    python launch.py --finetune --model allenai/Molmo-7B-D-0924 --data caps.parquet --out runs/a
    python -m molmo_core.train --model ... --data ... --out ...          (same CLI)

Modules, in data-flow order: `data` (records -> examples -> batches), `recipe` (TrainArgs, parameter groups,
schedule, clipping, loss, text-only dropout), `lora` (peft adapters, QLoRA, merging), `dist` (one process, DDP
or FSDP: one strategy object per mode), `loop` (Trainer: setup / fit / validate / checkpoints / export), `export`
(official checkpoint folder), `plot`, `cli`.
"""

from .recipe import TrainArgs
from .loop import Trainer, TrainError, TrainResult, train

__all__ = ["TrainArgs", "Trainer", "TrainError", "TrainResult", "train"]
