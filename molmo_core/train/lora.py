"""LoRA / QLoRA on Molmo through peft, and merging adapters back into full weights.

Targets (the names the olmOCR Molmo LoRA config uses for the v1 remote code): the decoder blocks'
`att_proj`, `attn_out`, `ff_proj`, `ff_out` (MolmoE: `attn.att_proj`, `attn.attn_out` and the experts'
`gate_proj` / `up_proj` / `down_proj`), optionally the connector (`image_pooling_2d.wq/wk/wv/wo`,
`image_projector.w1/w2/w3`). The LM head (`transformer.ff_out`) and the ViT stay frozen.

QLoRA: the base decoder linears are bitsandbytes NF4 (`molmo_core.load(..., quantize="4bit")`), LoRA
adapters on top are trained in fp32 (peft upcasts adapter weights).

Adapters are saved as `adapter_config.json` + `adapter_model.safetensors` with our parameter names
(official keys minus the leading `model.`), i.e. `transformer.blocks.0.att_proj.lora_A.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

DECODER_TARGETS = (r"transformer\.blocks\.\d+\.(?:attn\.)?(?:att_proj|attn_out|ff_proj|ff_out)"
                   r"|transformer\.blocks\.\d+\.mlp\.experts\.\d+\.(?:gate_proj|up_proj|down_proj)")
CONNECTOR_TARGETS = r"vision_backbone\.(?:image_pooling_2d\.(?:wq|wk|wv|wo)|image_projector\.(?:w1|w2|w3))"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_config(rank: int, alpha: float, dropout: float, connector: bool):
    from peft import LoraConfig

    pattern = DECODER_TARGETS + ("|" + CONNECTOR_TARGETS if connector else "")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=f"^(?:{pattern})$",
                      bias="none")


def add_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.05,
             connector: bool = False, config=None) -> nn.Module:
    """Freeze `model` and inject LoRA adapters in place; returns the same module.

    Raises:
        RuntimeError: peft is missing or no target module matched.
    """
    try:
        from peft import inject_adapter_in_model
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("LoRA needs peft: pip install peft") from e
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = config or lora_config(rank, alpha, dropout, connector)
    inject_adapter_in_model(cfg, model)
    n = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
    if n == 0:
        raise RuntimeError("LoRA matched no module of this model; expected decoder linears named att_proj, "
                           "attn_out, ff_proj, ff_out.")
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            if p.dtype != torch.float32:
                p.data = p.data.float()
    model._lora_config = cfg
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.detach().float().cpu().contiguous()
            for n, p in model.named_parameters() if "lora_" in n}


def save_adapter(model: nn.Module, out: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = model._lora_config.to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    return out


def load_adapter_config(path: str | Path):
    from peft import LoraConfig

    d = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    allowed = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in d.items() if k in allowed and k not in ("peft_type",)})


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapter saved at `path` into `model` (in place) and load its weights."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"No {ADAPTER_CONFIG} in {path}: expected a folder written by save_adapter.")
    add_lora(model, config=load_adapter_config(path))
    set_adapter_weights(model, load_file(str(path / ADAPTER_WEIGHTS)))
    return model


def set_adapter_weights(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = []
    for name, p in params.items():
        if "lora_" not in name:
            continue
        key = name.replace(".default", "")
        if key not in sd:
            missing.append(key)
            continue
        with torch.no_grad():
            p.copy_(sd[key].to(p.dtype))
    if missing:
        raise RuntimeError(f"The adapter lacks {len(missing)} weights, e.g. {missing[:3]}; was it trained with "
                           "the same --lora-connector setting?")


def merge_lora_(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer into its base Linear and put the plain Linear back (in place).

    The base must be a full-precision nn.Linear (load it unquantized for QLoRA adapters)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise RuntimeError(f"{name}: cannot merge into a {type(base).__name__}; load the base model "
                               "unquantized to merge a QLoRA adapter.")
        module.merge(safe_merge=True)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, base)
    return model
