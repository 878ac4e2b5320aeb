"""Fine-tuning a Molmo2 base (molmo_core/train/molmo2.py) on tiny random Molmo2 checkpoints, CPU, fp32:
LoRA learns (loss and greedy answers), the adapter and the merged export load back with the same logits, labels
mask the prompt, QLoRA runs, the CLI dispatches on the family and refuses --mode full."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from molmo_core.molmo2 import load_molmo2, model_family
from molmo_core.molmo2.tiny import write_tiny_molmo2
from molmo_core.train import TrainArgs
from molmo_core.train.data import Annotation
from molmo_core.train.molmo2 import (Molmo2Trainer, Target, build_example, collate, load_adapter, loss_sums,
                                     molmo2_target, response_mask)

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a red cup", "two dogs", "blue car"]
POINT = {"label": "dot", "points": [[25.0, 50.0]]}  # percent -> Molmo2 0-1000: x 250, y 500


@pytest.fixture(scope="module")
def m2(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("m2train")
    return {"a": write_tiny_molmo2(root / "a", "a"), "b": write_tiny_molmo2(root / "b", "b")}


def write_data(folder: Path) -> Path:
    """3 caption records and 1 point record on random images, as one JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(4):
        Image.fromarray((np.random.default_rng(50 + i).random((40, 56, 3)) * 255).astype("uint8")).save(
            folder / f"{i}.png")
    rows = [{"image": f"{i}.png", "caption": c} for i, c in enumerate(CAPTIONS)]
    rows.append({"image": "3.png", **POINT})
    path = folder / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args_for(base: Path, data: Path, out: Path, **kw) -> TrainArgs:
    d = dict(model=str(base), data=[str(data)], out=str(out), lr=1e-2, max_crops=1, batch_size=4, grad_accum=1,
             warmup=0, eval_fraction=0.0, save_every=0, gradient_checkpointing=False, lora_rank=8, z_loss=0.0,
             lora_dropout=0.0, resume="no")
    d.update(kw)
    return TrainArgs(**d)


@torch.no_grad()
def logits_of(model, runner, image: Path, prompt: str) -> torch.Tensor:
    x = runner.process(str(image), prompt)
    return model(**x.tensors).logits.float()


@pytest.fixture(scope="module")
def trained(m2, tmp_path_factory):
    root = tmp_path_factory.mktemp("m2run")
    data = write_data(root / "data")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()  # module-scoped: set up before the function-scoped one_thread fixture
    torch.set_num_threads(1)
    try:
        trainer = Molmo2Trainer(args_for(m2["b"], data, root / "run", max_steps=30, response_dropout=0.0),
                                log=lambda s: None)
        result = trainer.run()
    finally:
        torch.set_num_threads(threads)
    print(f"molmo2 lora: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {result.steps} steps, "
          f"{time.perf_counter() - t0:.1f} s with the export")
    return trainer, result, root


def test_lora_learns_and_answers_with_a_training_target(trained):
    trainer, result, root = trained
    assert result.steps == 30 and result.losses[-1] < 0.5 * result.losses[0], result.losses
    rows = [json.loads(ln) for ln in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    assert {"step", "loss", "lr", "lr_connector", "lr_vit", "tokens_per_s", "loss_tokens", "elapsed_s"} <= set(rows[0])
    assert (root / "run" / "loss.png").is_file() and (root / "run" / "checkpoints" / "latest").is_file()
    runner = load_molmo2(root / "run" / "final", device="cpu")
    answers = {c: runner.generate(str(root / "data" / f"{i}.png"), "long_caption: Describe this image.",
                                  max_new_tokens=12) for i, c in enumerate(CAPTIONS)}
    print("greedy answers after training:", answers)
    assert sum(a == c for c, a in answers.items()) >= 2, answers  # trained without dropout: reproduced exactly
    point = runner.generate(str(root / "data" / "3.png"), "Point to dot", max_new_tokens=48)
    print("point answer:", point)
    assert point.startswith("<points"), point


def test_adapter_and_merged_export_load_back_with_the_same_logits(trained, m2):
    trainer, _, root = trained
    final, adapter = root / "run" / "final", root / "run" / "adapter"
    assert model_family(final) == "molmo2"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert {"tokenizer.json", "processor_config.json", "chat_template.jinja", "finetune.json"} <= {
        p.name for p in final.iterdir()}
    image, prompt = root / "data" / "0.png", "long_caption: Describe this image."
    trainer.model.eval()
    in_memory = logits_of(trainer.model, trainer.runner, image, prompt)
    merged = load_molmo2(final, device="cpu")
    base = load_molmo2(m2["b"], device="cpu")
    plain = logits_of(base.model, base, image, prompt)
    with_adapter = logits_of(load_adapter(base.model, adapter).eval(), base, image, prompt)
    from_merged = logits_of(merged.model, merged, image, prompt)
    d_adapter = (with_adapter - in_memory).abs().max().item()
    d_merged = (from_merged - in_memory).abs().max().item()
    print(f"max |dlogit| vs the trained model: adapter {d_adapter:.2e}, merged {d_merged:.2e}; "
          f"vs base {(plain - in_memory).abs().max().item():.2f}")
    assert (plain - in_memory).abs().max() > 1e-1  # training changed the model...
    assert d_adapter < 1e-4 and d_merged < 1e-4  # ...and both exports reproduce it


def test_labels_mask_the_prompt(m2):
    runner = load_molmo2(m2["b"], device="cpu")
    tok, end_id = runner.tokenizer, runner.tokenizer.convert_tokens_to_ids("<|im_end|>")
    img = (np.random.default_rng(0).random((30, 40, 3)) * 255).astype("uint8")
    targets = [Target(img, "long_caption: Describe this image.", "a red cup", "long_caption"),
               Target(img, "Point to dot", '<points alt="dot" coords="1 1 250 500">dot</points>', "point")]
    exs = [build_example(t, runner.processor, tok, end_id, max_crops=1) for t in targets]
    batch = collate(exs, runner.pad_id)
    length = max(e["input_ids"].shape[1] for e in exs)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, length)
    for row, (t, e) in enumerate(zip(targets, exs)):
        n = e["input_ids"].shape[1]
        prompt_ids = runner.process(img, t.prompt, max_crops=1)["input_ids"][0]
        answer = tok(t.answer, add_special_tokens=False)["input_ids"] + [end_id]
        assert n == len(prompt_ids) + len(answer)
        assert torch.equal(batch["input_ids"][row, :len(prompt_ids)], prompt_ids)  # the prompt is the runner's
        labels = batch["labels"][row]
        assert (labels[:len(prompt_ids)] == -100).all() and (labels[n:] == -100).all()
        assert labels[len(prompt_ids):n].tolist() == answer
        assert tok.decode(answer[:-1]) == t.answer
        assert (batch["attention_mask"][row, n:] == 0).all() and (batch["attention_mask"][row, :n] == 1).all()
    # padding and batching change nothing: the batch's loss is the sum of the examples' own
    with torch.no_grad():
        together = loss_sums(runner.model, batch, 0.0)
        alone = [loss_sums(runner.model, collate([e], runner.pad_id), 0.0) for e in exs]
    assert together[2] == sum(a[2] for a in alone)
    assert abs(float(together[1]) - sum(float(a[1]) for a in alone)) < 1e-3
    # crops of both examples, pooling indices of the second shifted past the first's patches
    p0 = exs[0]["pixel_values"].shape[0] * exs[0]["pixel_values"].shape[1]
    k0 = exs[0]["image_token_pooling"].shape[0]
    second = batch["image_token_pooling"][k0:]
    assert torch.equal(second[second >= 0], exs[1]["image_token_pooling"][exs[1]["image_token_pooling"] >= 0] + p0)


def test_targets_are_written_in_molmo2_form():
    assert molmo2_target(Annotation("transcript", "um a cup")) == ("transcript: Describe this image.", "um a cup")
    prompt, answer = molmo2_target(Annotation("point", '<points x1="10.0" y1="20.0" x2="55.5" y2="70.0" alt="cats">'
                                                       'cats</points>', "Point to cats"))
    assert prompt == "Point to cats" and answer == '<points alt="cats" coords="1 1 100 200 2 555 700">cats</points>'
    prompt, answer = molmo2_target(Annotation("count", 'Counting the <point x="10.0" y="20.0" alt="stars">stars'
                                                       '</point> shows a total of 1.', "How many stars are there?"))
    assert prompt == "How many stars are there?"
    assert answer == 'Counting the <points alt="stars" coords="1 1 100 200">stars</points> shows a total of 1.'
    assert molmo2_target(Annotation("clock", "3:15", "clocks: What time is being shown?"))[0].startswith(
        "What time is being shown?")


def test_qlora_two_steps_on_cpu(m2, tmp_path):
    pytest.importorskip("bitsandbytes")
    data = write_data(tmp_path / "data")
    out = tmp_path / "q"
    # size a: the LM's in_features (64, 128) are multiples of 64, as bitsandbytes' CPU 4-bit packing needs
    trainer = Molmo2Trainer(args_for(m2["a"], data, out, mode="qlora", max_steps=2, batch_size=1, grad_accum=2,
                                     lr=3e-3), log=lambda s: None)
    result = trainer.run()
    import bitsandbytes as bnb

    q = trainer.runner.model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit)
    assert not isinstance(trainer.runner.model.model.vision_tower.patch_embedding, bnb.nn.Linear4bit)
    assert result.steps == 2 and all(np.isfinite(result.losses))
    assert model_family(out / "final") == "molmo2" and (out / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_dispatches_molmo2_and_refuses_full(m2, tmp_path, capsys):
    from molmo_core.train.cli import main

    data = write_data(tmp_path / "data")
    common = ["--model", str(m2["b"]), "--data", str(data), "--max-crops", "1", "--batch-size", "1",
              "--grad-accum", "1", "--eval-fraction", "0", "--no-gradient-checkpointing"]
    assert main(common + ["--out", str(tmp_path / "full"), "--mode", "full", "--max-steps", "1"]) == 2
    assert "not supported for Molmo2" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "lora"), "--mode", "lora", "--max-steps", "2", "--no-export"]) == 0
    printed = capsys.readouterr().out
    assert "Molmo2, lora" in printed and '"steps": 2' in printed
    rows = [json.loads(ln) for ln in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def test_stopped_run_resumes_to_the_same_losses(m2, tmp_path):
    data = write_data(tmp_path / "data")
    kw = dict(max_steps=4, batch_size=2, grad_accum=1, export=False, resume="auto")
    whole = Molmo2Trainer(args_for(m2["b"], data, tmp_path / "whole", **kw), log=lambda s: None).run()

    def stop_at_2(trainer, m):
        trainer.stop_requested = trainer.step == 2

    out = tmp_path / "resumed"
    # text-only dropout (the default 0.1) is on: the resumed run must restore the RNG state too
    first_trainer = Molmo2Trainer(args_for(m2["b"], data, out, **kw), log=lambda s: None, callbacks=[stop_at_2])
    first = first_trainer.run()
    tr = first_trainer
    assert tr.args.response_dropout > 0 and tr.dropout.handles
    batch = tr._to_device(collate([tr.example(tr.train_targets[0])], tr.pad_id))
    tr.model.train()
    tr.dropout.set_mask(response_mask(batch["labels"]))
    with torch.no_grad():  # train mode: answer positions see dropout; eval mode: they do not
        assert loss_sums(tr.model, batch, 0.0)[1] != loss_sums(tr.model, batch, 0.0)[1]
        tr.model.eval()
        assert loss_sums(tr.model, batch, 0.0)[1] == loss_sums(tr.model, batch, 0.0)[1]
    tr.dropout.set_mask(None)
    assert first.stopped and first.steps == 2 and (out / "checkpoints" / "step-0000002" / "adapter").is_dir()
    logs = []
    second = Molmo2Trainer(args_for(m2["b"], data, out, **kw), log=logs.append).run()
    assert any("resumed from" in s for s in logs) and second.steps == 4
    np.testing.assert_allclose(first.losses + second.losses, whole.losses, rtol=1e-5)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_held_out_questions_are_scored_in_molmo2_format():
    from molmo_core.train.data import load_records
    from molmo_core.train.molmo2 import score_molmo2, task_items
    from molmo_core.train.task_eval import summarize

    records, _ = load_records(["shapes:2", "clocks:1"])
    items = task_items(records)
    assert sorted(it.task for it in items) == ["clock", "count", "count", "point", "point"]
    assert all("coords=" in it.reference for it in items if it.task != "clock")
    perfect = summarize(score_molmo2(items, [it.reference for it in items]))
    assert perfect["eval_point_f1"] == perfect["eval_count_accuracy"] == perfect["eval_clock_overall_exact"] == 1.0
    wrong = summarize(score_molmo2(items, ["There are none."] * len(items)))
    assert wrong["eval_point_recall"] == 0.0


def test_the_app_loads_the_adapter_folder_and_the_merged_model(trained):
    """OUT/adapter and OUT/final load through the app's one entry (and its service) as the trained model."""
    import molmo_core
    from app.service import MolmoService

    trainer, _, root = trained
    final, adapter = root / "run" / "final", root / "run" / "adapter"
    image, prompt = root / "data" / "0.png", "long_caption: Describe this image."
    trainer.model.eval()
    in_memory = logits_of(trainer.model, trainer.runner, image, prompt)
    from molmo_core.api import family_of

    assert family_of(adapter) == "molmo2" and family_of(final) == "molmo2"
    from_adapter = molmo_core.load(adapter, device="cpu")
    assert "LoRA on" in from_adapter.name and from_adapter.family == "molmo2"
    assert (logits_of(from_adapter.model, from_adapter, image, prompt) - in_memory).abs().max() < 1e-4
    from_adapter.close()
    service = MolmoService(device="cpu")
    for folder in (adapter, final):
        service.load(str(folder), None, 8, wait=True)
        st = service.status()
        assert st.loaded and st.family == "molmo2", st
        assert service.caption(str(image), "long_caption", None).answer.strip()
    service.unload()
