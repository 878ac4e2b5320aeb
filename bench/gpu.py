"""The prepared one-shot GPU run: the whole performance story of Molmo Studio in one command.

    bash bench/gpu.sh                           # on the GPU machine (installs the carried bitsandbytes wheel)
    python -m bench.gpu --out DIR               # the same without the wheel step
    python -m bench.gpu --dry-run --out DIR     # CPU, tiny shapes, no compile, seconds (run by the tests)

What travels to the GPU machine: the working tree (tracked files), `.whl/` with the bitsandbytes wheel
(`pip download bitsandbytes==0.50.2 --no-deps -d .whl`, 43 MB) and `bench/official/` with the hub's
remote-code files (`python -m bench.official --help`); both folders are git-ignored.

Sections, most valuable first; each is skipped (and says so) when the time budget (`--budget-s`)
cannot fit it, and every result is written to DIR/gpu.json as soon as it exists:
  env          device, versions, memory bandwidth measured by a device-to-device copy (read + write)
  7b-d         real Molmo-7B-D shapes, random bf16 weights: time to first token for a 12-crop image
               (13 crops), decode tokens/s at batch 1 and 8 (no-cache baseline, static cache, compiled
               + CUDA graphs), peak VRAM, share of the bandwidth bound
  official     the official implementation on the same weights, same inputs: logits difference,
               greedy agreement, time to first token, decode tokens/s
  lora         one LoRA training step on 7B-D shapes (tokens/s, peak VRAM)
  4bit         NF4 7B-D: time to first token, decode tokens/s, peak VRAM; one QLoRA step
  moe          MolmoE-1B shapes: the old per-expert loop vs stacked experts (eager, compiled)
  correctness  mid config: compiled == eager greedy tokens, bf16 vs fp32 logits, batch == one at a time
  8bit         LLM.int8 7B-D: time to first token, decode tokens/s, peak VRAM
  molmo2       Molmo2-4B and -8B shapes through transformers' native classes (bench/molmo2_gpu.py), with
               Molmo v1 7B-D (ours, eager) in the same run as the baseline
DIR/gpu.md gets the table that is also printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import time
import traceback
from pathlib import Path

import torch

from bench import official
from bench.speed import (CONFIGS, build, fake_inputs, old_expert_loop, peak_memory, sync, time_decode,
                         time_to_first_token, weight_bytes_per_token)
from molmo_core.generation import GenerationOptions, can_compile, collate, generate_tokens
from molmo_core.tiny import VARIANTS

# Real shapes on the GPU; tiny stand-ins of the same families in the dry run.
SHAPES = {"7b-d": ("7b-d", "d"), "1b-e": ("1b-e", "e"), "mid": ("mid", "d")}


class Run:
    """Results, budget and output files of one bench run."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool, compile: bool):
        self.out, self.dry_run, self.compile = out, dry_run, compile
        self.deadline = time.monotonic() + budget_s
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.dtype = torch.float32 if dry_run else torch.bfloat16
        self.steps = 4 if dry_run else 32
        self.hw = (336, 336) if dry_run else (768, 1024)  # dry run: 1 crop + global view instead of 12 + 1
        self.results: dict = {"sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def config(self, name: str):
        real, tiny = SHAPES[name]
        return VARIANTS[tiny] if self.dry_run else CONFIGS[real]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def section(self, name: str, needs_s: float):
        """Run the body unless the budget cannot fit `needs_s` seconds; record its result or its error."""
        res = self.results["sections"].setdefault(name, {})
        if not self.dry_run and self.left() < needs_s:
            res["skipped"] = f"time budget: {self.left():.0f} s left, needs ~{needs_s:.0f} s"
            print(f"[{name}] skipped: {res['skipped']}", flush=True)
            yield None
            return
        t = time.monotonic()
        print(f"[{name}] ...", flush=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            yield res
        except Exception as e:  # one broken section must not cost the others
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()
            print(res["traceback"], flush=True)
        finally:
            res["seconds"] = round(time.monotonic() - t, 1)
            print(f"[{name}] {json.dumps({k: v for k, v in res.items() if k != 'traceback'})}", flush=True)
            free()
            self.save()

    def save(self) -> None:
        (self.out / "gpu.json").write_text(json.dumps(self.results, indent=2))


def free() -> None:
    torch._dynamo.reset()  # CUDA-graph trees hold the weights of the models they captured
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def measure_bandwidth(device: torch.device) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written (median of 20)."""
    n = (2 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 5:
            times.append(time.perf_counter() - t)
    times.sort()
    return 2 * n / times[len(times) // 2] / 1e9


def inputs(run: Run, cfg, batch: int, image: bool):
    return fake_inputs(cfg, batch, image, run.hw)


def decode_rates(run: Run, model, res: dict, prefix: str = "", eager: bool = True, compile: bool = True) -> None:
    """Decode tokens/s at batch 1 (image prompt) and 8 (text prompts) over the static KV cache: eager,
    and compiled (torch.compile; CUDA graphs on GPU) where the model and the run allow it."""
    cfg = model.config
    compile = compile and run.compile and can_compile(model)
    for bsz in (1, 8):
        batch = inputs(run, cfg, bsz, image=bsz == 1)
        if eager:
            res[f"{prefix}decode_b{bsz}_eager"] = round(
                time_decode(model, batch, run.steps, cache=True, compile=False, device=run.device), 1)
        if compile and run.left() > 45:
            t = time.monotonic()
            time_decode(model, batch, run.steps, cache=True, compile=True, device=run.device)  # compile + warm-up
            res[f"{prefix}compile_b{bsz}_s"] = round(time.monotonic() - t, 1)
            res[f"{prefix}decode_b{bsz}_compiled"] = round(
                time_decode(model, batch, run.steps, cache=True, compile=True, device=run.device), 1)


def random_model(run: Run, shapes: str, res: dict, quantize: str | None = None):
    torch.manual_seed(0)
    model = build(run.config(shapes), run.device, run.dtype, quantize)
    res["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    return model


def ttft_ms(run: Run, model) -> float:
    return round(time_to_first_token(model, inputs(run, model.config, 1, image=True), run.device,
                                     repeats=1 if run.dry_run else 3) * 1e3, 1)


def best(res: dict, prefix: str, bsz: int) -> float:
    return max((v for k, v in res.items() if k.startswith(f"{prefix}decode_b{bsz}_")), default=0.0)


def train_step(run: Run, model, res: dict, prefix: str) -> None:
    """One LoRA step (rank 16, gradient checkpointing, bf16 autocast) on one 12-crop image + 256 answer
    tokens; timed after a warm-up step."""
    from molmo_core.train.lora import add_lora
    from molmo_core.train.recipe import enable_gradient_checkpointing, loss_sums, make_optimizer, param_groups

    add_lora(model, rank=16)
    enable_gradient_checkpointing(model)
    model.train()
    opt = make_optimizer(param_groups(model, {"llm": 1e-4, "connector": 1e-4, "vit": 1e-4}, 0.0))
    b = inputs(run, model.config, 1, image=True).to(run.device, run.dtype)
    answer = torch.randint(0, model.config.text.vocab_size - 8, (1, 256), device=run.device)
    ids = torch.cat([b.input_ids, answer], 1)
    T = ids.shape[1]
    loss_mask = torch.zeros(1, T, device=run.device)
    loss_mask[:, -256:] = 1
    batch = {"input_ids": ids, "images": b.images, "image_masks": b.image_masks,
             "image_input_idx": b.image_input_idx, "position_ids": torch.arange(T, device=run.device)[None],
             "allowed": None, "loss_mask": loss_mask, "targets": torch.roll(ids, -1, 1)}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if run.device.type == "cuda" else contextlib.nullcontext()
    times = []
    for _ in range(3):
        sync(run.device)
        t = time.perf_counter()
        with amp:
            total, _, n = loss_sums(model, batch, 1e-4)
        (total / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(run.device)
        times.append(time.perf_counter() - t)
    res[f"{prefix}step_s"] = round(min(times[1:]), 3)
    res[f"{prefix}tokens_per_s"] = round(T / min(times[1:]), 1)
    res[f"{prefix}loss"] = round(float(total.detach() / n), 3)
    res[f"{prefix}seq_len"] = T
    res[f"{prefix}peak_gib"] = gib(peak_memory(run.device))


# ------------------------------------------------------------------------------------------ sections
def section_env(run: Run) -> None:
    with run.section("env", 10) as res:
        if res is None:
            return
        res.update(torch=torch.__version__, python=platform.python_version(), device=str(run.device))
        if run.device.type == "cuda":
            res.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                       memory_gib=gib(torch.cuda.get_device_properties(0).total_memory))
        res["bandwidth_gbs"] = round(measure_bandwidth(run.device), 1)
        try:
            import bitsandbytes

            res["bitsandbytes"] = bitsandbytes.__version__
        except Exception as e:  # noqa: BLE001 - reported, the quantized sections then say why they fail
            res["bitsandbytes"] = f"unavailable: {e}"
        res["official"] = official.available() or official.sha256s()


def section_dense(run: Run) -> None:
    """7B-D bf16 eager, the official implementation on the same weights, 7B-D compiled, a LoRA step."""
    model = None
    with run.section("7b-d", 60) as res:
        if res is None:
            return
        model = random_model(run, "7b-d", res)
        res["ttft_ms"] = ttft_ms(run, model)
        base = inputs(run, model.config, 1, image=True)
        res["prompt_tokens"] = int(base.input_ids.shape[1])
        res["decode_b1_nocache"] = round(time_decode(model, base, 2, cache=False, compile=False, device=run.device), 1)
        decode_rates(run, model, res, compile=False)
        res["peak_gib"] = gib(peak_memory(run.device))
    if model is None:
        return
    with run.section("official", 60) as res:
        if res is not None:
            why = official.available()
            if why:
                res["skipped"] = why
            else:
                compare_official(run, model, res)
    with run.section("7b-d-compiled", 90) as res:
        if res is not None:
            decode_rates(run, model, res, eager=False)
            res["peak_gib"] = gib(peak_memory(run.device))
    d = run.results["sections"]["7b-d"]
    both = {**d, **run.results["sections"]["7b-d-compiled"]}
    bw = run.results["sections"].get("env", {}).get("bandwidth_gbs")
    per_tok = weight_bytes_per_token(model)
    d["weight_gb_per_step"] = round(per_tok / 1e9, 2)
    if bw:
        d["bound_b1_tok_s"] = round(bw * 1e9 / per_tok, 1)
        d["b1_share_of_bound"] = round(best(both, "", 1) / d["bound_b1_tok_s"], 3)
    d["b8_over_b1"] = round(best(both, "", 8) / max(best(both, "", 1), 1e-9), 2)
    run.save()
    with run.section("lora", 60) as res:
        if res is not None:
            train_step(run, model, res, "lora_")
    del model


def compare_official(run: Run, model, res: dict) -> None:
    ref = official.build_official(model, run.device, run.dtype)
    res["files_sha256"] = official.sha256s()
    s = lambda: sync(run.device)  # noqa: E731
    n = run.steps
    img = inputs(run, model.config, 1, image=True).to(run.device, run.dtype)
    official.greedy(ref, img, 2, s)  # warm-up
    toks, logits, ttft, rate = official.greedy(ref, img, n, s)
    ours = torch.stack(list(generate_tokens(model, img, GenerationOptions(n, stop_on_eos=False))), 1)
    with torch.inference_mode():
        pos = ((img.input_ids != -1).long().cumsum(-1) - 1).clamp(min=0)
        our_logits = model(img.input_ids, img.images, img.image_masks, img.image_input_idx, position_ids=pos,
                           last_only=True)[:, -1].float()
    res["logits_max_abs_diff"] = float((our_logits - logits).abs().max())
    res["logits_rel_diff"] = float((our_logits - logits).norm() / logits.norm())
    res["greedy_equal_prefix"] = int((torch.cumprod((ours == toks.cpu()).int(), 1)).sum())
    res["greedy_tokens"] = n
    res["ttft_ms"] = round(ttft * 1e3, 1)
    res["decode_b1"] = round(rate, 1)
    _, _, _, rate8 = official.greedy(ref, inputs(run, model.config, 8, image=False).to(run.device, run.dtype), n, s)
    res["decode_b8"] = round(rate8, 1)
    res["peak_gib_both_models"] = gib(peak_memory(run.device))
    del ref


def section_quantized(run: Run, mode: str, needs_s: float) -> None:
    with run.section(mode, needs_s) as res:
        if res is None:
            return
        model = random_model(run, "7b-d", res, mode)
        res["build_peak_gib"] = gib(peak_memory(run.device))
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res["ttft_ms"] = ttft_ms(run, model)
        decode_rates(run, model, res, compile=False)
        res["peak_gib"] = gib(peak_memory(run.device))
        if run.compile and run.left() > 120:
            try:  # bitsandbytes kernels under torch.compile: measured when they compile
                batch = inputs(run, model.config, 1, image=True)
                time_decode(model, batch, run.steps, cache=True, compile=True, device=run.device)
                res["decode_b1_compiled"] = round(
                    time_decode(model, batch, run.steps, cache=True, compile=True, device=run.device), 1)
            except Exception as e:  # noqa: BLE001
                res["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if mode == "4bit":
            train_step(run, model, res, "qlora_")
        del model


def section_moe(run: Run) -> None:
    with run.section("moe", 60) as res:
        if res is None:
            return
        model = random_model(run, "1b-e", res)
        img = inputs(run, model.config, 1, image=True)
        opts = GenerationOptions(run.steps, stop_on_eos=False)
        with old_expert_loop():
            res["ttft_ms_loop"] = ttft_ms(run, model)
            old = [int(t[0]) for t in generate_tokens(model, img, opts)]
            for bsz in (1, 8):
                b = inputs(run, model.config, bsz, image=bsz == 1)
                res[f"loop_decode_b{bsz}_eager"] = round(
                    time_decode(model, b, run.steps, cache=True, compile=False, device=run.device), 1)
        res["ttft_ms"] = ttft_ms(run, model)
        new = [int(t[0]) for t in generate_tokens(model, img, opts)]
        res["greedy_equal_prefix_vs_loop"] = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), len(old))
        res["grouped_gemm"] = bool(model.transformer.blocks[0].mlp._stack[3])
        res["compiles"] = can_compile(model)
        decode_rates(run, model, res, prefix="stacked_")
        res["peak_gib"] = gib(peak_memory(run.device))
        for bsz in (1, 8):
            res[f"speedup_b{bsz}"] = round(best(res, "stacked_", bsz) / res[f"loop_decode_b{bsz}_eager"], 2)
        del model


def section_correctness(run: Run) -> None:
    with run.section("correctness", 90) as res:
        if res is None:
            return
        cfg = run.config("mid")
        torch.manual_seed(0)
        m32 = build(cfg, run.device, torch.float32, None)
        reqs = [inputs(run, cfg, 1, image=True), inputs(run, cfg, 1, image=False)]
        n = 16
        opts = GenerationOptions(n, stop_on_eos=False)

        def greedy(model, batch, compile=False):
            return torch.stack(list(generate_tokens(model, batch, opts, compile=compile)), 1).tolist()

        # batched == one at a time (fp32, exact)
        from molmo_core.preprocessing import ProcessedInput

        items = []
        for b in reqs:
            ids = b.input_ids[0].numpy()
            items.append(ProcessedInput(ids, None if b.images is None else b.images[0].numpy(),
                                        None if b.image_masks is None else b.image_masks[0].numpy(),
                                        None if b.image_input_idx is None else b.image_input_idx[0].numpy()))
        singles = [greedy(m32, collate([x]))[0] for x in items]
        res["batched_equals_single_fp32"] = greedy(m32, collate(items)) == singles
        # bf16 vs fp32 logits on the same weights
        m16 = build(cfg, run.device, run.dtype, None) if run.dtype != torch.float32 else m32
        m16.load_state_dict(m32.state_dict())
        b = reqs[0].to(run.device, torch.float32)
        with torch.inference_mode():
            pos = ((b.input_ids != -1).long().cumsum(-1) - 1).clamp(min=0)
            l32 = m32(b.input_ids, b.images, b.image_masks, b.image_input_idx, position_ids=pos, last_only=True)
            b16 = reqs[0].to(run.device, run.dtype)
            l16 = m16(b16.input_ids, b16.images, b16.image_masks, b16.image_input_idx, position_ids=pos,
                      last_only=True).float()
        res["bf16_vs_fp32_logits_rel"] = float((l16 - l32).norm() / l32.norm())
        res["bf16_vs_fp32_argmax_equal"] = bool((l16.argmax(-1) == l32.argmax(-1)).all())
        del m32
        if run.compile and can_compile(m16):
            eager = greedy(m16, reqs[0])
            res["compiled_equals_eager"] = greedy(m16, reqs[0], compile=True) == eager
            batch8 = inputs(run, cfg, 8, image=False)
            res["compiled_equals_eager_b8"] = greedy(m16, batch8, compile=True) == greedy(m16, batch8)
        del m16


SECTIONS = ("env", "dense", "4bit", "moe", "correctness", "8bit", "molmo2")


def section_molmo2(run: Run) -> None:
    from bench import molmo2_gpu

    why = molmo2_gpu.available()
    for size in ("molmo2-4b", "molmo2-8b"):
        with run.section(size, 60) as res:
            if res is None:
                continue
            if why:
                res["skipped"] = why
                continue
            molmo2_gpu.measure(size, run, res)
        free()
        if run.dry_run:
            break  # one tiny size stands in for both
    with run.section("v1-7b-d-baseline", 30) as res:
        if res is not None:
            molmo2_gpu.v1_baseline(run, res)
    free()


def table(results: dict) -> str:
    s = results["sections"]
    rows = [("section", "metric", "value")]
    goals = []

    def add(sec, key, label=None):
        v = s.get(sec, {}).get(key)
        if v is not None:
            rows.append((sec, label or key, str(v)))

    for sec, res in s.items():
        if "skipped" in res or "error" in res:
            rows.append((sec, "skipped" if "skipped" in res else "error", (res.get("skipped") or res["error"])[:90]))
        for k, v in res.items():
            if k not in ("skipped", "error", "traceback", "files_sha256", "official") and not isinstance(v, dict):
                add(sec, k)
    d, o, q4 = {**s.get("7b-d", {}), **s.get("7b-d-compiled", {})}, s.get("official", {}), s.get("4bit", {})
    if "b1_share_of_bound" in d:
        goals.append(f"7B-D bf16 batch-1 decode at {d['b1_share_of_bound']:.0%} of the measured bandwidth bound "
                     f"(goal >= 70 %)")
    if "ttft_ms" in d:
        goals.append(f"time to first token, 12-crop image: {d['ttft_ms']} ms (goal < 200 ms)")
    if q4:
        goals.append(f"4-bit decode batch 1: {best(q4, '', 1)} tokens/s (goal > 100)")
    if "b8_over_b1" in d:
        goals.append(f"batch-8 throughput / batch 1: {d['b8_over_b1']}x (goal >= 5x)")
    if "decode_b1" in o and d:
        goals.append(f"vs the official implementation: decode batch 1 {best(d, '', 1) / o['decode_b1']:.1f}x, "
                     f"batch 8 {best(d, '', 8) / max(o.get('decode_b8', 0), 1e-9):.1f}x, time to first token "
                     f"{o['ttft_ms'] / max(d.get('ttft_ms', 1e-9), 1e-9):.1f}x faster")
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(r[i].ljust(w[i]) for i in range(3)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(lines + [""] + [f"- {g}" for g in goals]) + "\n"


def main(out: Path, budget_s: float = 450, dry_run: bool = False, compile: bool = True,
         sections=SECTIONS) -> dict:
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("bench.gpu needs a CUDA GPU; use --dry-run on a CPU")
    run = Run(out, budget_s, dry_run, compile and not dry_run)
    steps = {"env": lambda: section_env(run), "dense": lambda: section_dense(run),
             "4bit": lambda: section_quantized(run, "4bit", 120), "moe": lambda: section_moe(run),
             "correctness": lambda: section_correctness(run), "8bit": lambda: section_quantized(run, "8bit", 60),
             "molmo2": lambda: section_molmo2(run)}
    for name in sections:
        steps[name]()
    text = table(run.results)
    (out / "gpu.md").write_text(text)
    print("\n" + text, flush=True)
    return run.results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=450, help="stop starting sections after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes of the same families, no compile")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    a = p.parse_args()
    main(a.out, a.budget_s, a.dry_run, not a.no_compile, a.sections)
