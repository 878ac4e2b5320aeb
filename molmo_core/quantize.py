"""8-bit / 4-bit (NF4) weights for the decoder's linear layers through bitsandbytes.

Only the decoder blocks' projections are quantized. The vision tower, the connector, the embeddings,
ln_f and the LM head stay in bf16: community 4-bit Molmo checkpoints skip the same modules, and a
quantized ViT is known to ruin accuracy (the `llm_int8_skip_modules` of the community NF4 checkpoints, e.g.
`SeanScripts/Molmo-72B-0924-nf4`, list the vision backbone, ff_out and ln_f). Tensors are
quantized one at a time while streaming, so the full bf16 decoder is never resident on the GPU.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import torch
from torch import nn

from .errors import CheckpointError

# bitsandbytes logs this on every 8-bit matmul whose input is not float16 (ours are bf16 by design: fp16
# overflows in Molmo), i.e. several times per layer per token. Dropped from that one logger only, and only
# once an 8-bit model is prepared; nothing else is filtered.
CAST_MESSAGE = "MatMul8bitLt: inputs will be cast"
BNB_MATMUL_LOGGER = "bitsandbytes.autograd._functions"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _silence_8bit_cast_message() -> None:
    logger = logging.getLogger(BNB_MATMUL_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(CAST_MESSAGE))

QUANTIZED = re.compile(
    r"^transformer\.blocks\.\d+\.(?:attn\.)?(?:att_proj|attn_out|ff_proj|ff_out)\.weight$"
    r"|^transformer\.blocks\.\d+\.mlp\.experts\.\d+\.(?:gate_proj|up_proj|down_proj)\.weight$"
)


class Quantizer:
    def __init__(self, mode: str, compute_dtype: torch.dtype, device_for: Callable[[str], torch.device]):
        try:
            import bitsandbytes as bnb
        except Exception as e:  # ImportError, or a broken native library
            raise CheckpointError(f"--quantize {mode} needs bitsandbytes, which failed to import ({e}). "
                                  "Install it with `pip install bitsandbytes`, or load without --quantize.") from e
        self.bnb, self.mode, self.compute_dtype, self.device_for = bnb, mode, compute_dtype, device_for
        self.replaced: set[str] = set()

    def wants(self, name: str) -> bool:
        """True for the weights of the layers `prepare` replaced."""
        return name.endswith(".weight") and name[: -len(".weight")] in self.replaced

    def prepare(self, model: nn.Module) -> None:
        """Swap the target nn.Linear modules (still on meta) for bitsandbytes layers."""
        bnb = self.bnb
        if self.mode == "8bit":
            _silence_8bit_cast_message()
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or not QUANTIZED.match(name + ".weight"):
                continue
            if (self.mode == "4bit" and torch.device(self.device_for(name + ".weight")).type == "cpu"
                    and module.in_features % 64):
                # bitsandbytes' CPU 4-bit kernels need in_features % 64 == 0 (true for every real Molmo
                # layer, not for some tiny test shapes): such a layer stays in bf16.
                continue
            with torch.device("meta"):
                if self.mode == "4bit":
                    q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                          compute_dtype=self.compute_dtype, quant_type="nf4")
                else:
                    q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                            has_fp16_weights=False, threshold=6.0)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, q)
            self.replaced.add(name)

    def __call__(self, model: nn.Module, name: str, weight: torch.Tensor) -> None:
        bnb = self.bnb
        module = model.get_submodule(name.rpartition(".")[0])
        device = self.device_for(name)
        if self.mode == "4bit":
            p = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        else:
            p = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        module.weight = p.to(device)


def make_quantizer(mode: str, compute_dtype: torch.dtype, device_for) -> Quantizer:
    if mode not in ("8bit", "4bit"):
        raise CheckpointError(f"Unknown quantization {mode!r}; use '8bit' or '4bit'.")
    return Quantizer(mode, compute_dtype, device_for)
