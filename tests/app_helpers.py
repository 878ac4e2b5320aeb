"""Fixtures and helpers for the app tests (service, gradio_client, browser).

Import the fixtures into a test module with `from app_helpers import *  # noqa: F401,F403`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from app import CSS, MolmoService, build_demo
from app.service import TaskLimits

# Small token budgets keep the tiny model's answers (random text) quick on 2 CPU cores.
TEST_LIMITS = TaskLimits(point=40, count=40, clock=16, ask=40, caption_min=16, caption_max=40)


def noise_image(path: Path, seed: int, size: tuple[int, int] = (96, 72)) -> Path:
    """A random-noise PNG: the tiny random model answers these with non-empty text."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height but holds no pixel data: tests the size check
    without allocating gigabytes (nothing may decode it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(service: MolmoService, **build_kwargs) -> Iterator[tuple[object, str]]:
    """Launch build_demo(service) in-process on a free port; yields (demo, local_url)."""
    demo = build_demo(service, **build_kwargs)
    demo.queue(max_size=64, default_concurrency_limit=4)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, css=CSS, show_error=False)
    try:
        yield demo, url
    finally:
        demo.close()


class ScriptedRunner:
    """A stand-in for a molmo_core runner with fixed answers per task: the real service, handlers and
    UI run; only the model is replaced (for tests that need known points, e.g. marker pixels)."""

    name = "scripted"
    device = torch.device("cpu")
    dtype = torch.float32
    quantize = None

    ANSWERS = {
        "Point to": '<points x1="25.0" y1="50.0" x2="50.0" y2="50.0" x3="75.0" y3="50.0" alt="coins">coins</points>',
        "How many": 'Counting the <points x1="25.0" y1="50.0" x2="50.0" y2="50.0" x3="75.0" y3="50.0" '
                    'alt="coins">coins</points> shows a total of 3.',
        "clocks:": "10:08",
    }

    def __init__(self) -> None:
        self.closed = False
        self.calls = 0

    def answer(self, prompt: str) -> str:
        for key, text in self.ANSWERS.items():
            if prompt.startswith(key):
                return text
        return "A photo of three coins on a table, seen from above."

    def stream(self, image, prompt: str, *, history=(), max_new_tokens: int = 200, **_) -> Iterator[str]:
        self.calls += 1
        text = self.answer(prompt)
        for i in range(0, len(text), 8):
            yield text[i:i + 8]

    def generate(self, image, prompt: str, **kwargs) -> str:
        return "".join(self.stream(image, prompt, **kwargs)).strip()

    def memory_bytes(self) -> int:
        return 1234

    def close(self) -> None:
        self.closed = True


def scripted_loader(source, **_kwargs) -> ScriptedRunner:
    return ScriptedRunner()


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from molmo_core.tiny import write_tiny_checkpoint

    return Path(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-d", "d"))


@pytest.fixture(scope="session")
def tiny_service(tiny_checkpoint) -> Iterator[MolmoService]:
    """One service with the tiny checkpoint loaded, shared by the tests that only read from it."""
    service = MolmoService(device="cpu", limits=TEST_LIMITS)
    service.load(str(tiny_checkpoint), wait=True)
    assert service.status().loaded, service.status().load
    yield service
    service.unload()


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    return [noise_image(folder / f"noise_{i}.png", seed=i) for i in range(4)]


@pytest.fixture(autouse=True)
def _gradio_temp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.getbasetemp() / "gradio"))


@pytest.fixture(scope="module")
def tiny_app(tiny_service) -> Iterator[tuple[MolmoService, str]]:
    with running_app(tiny_service) as (_, url):
        yield tiny_service, url


def make_client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def run_threads(fns) -> list:
    """Run callables at once (released together by a barrier); return their results in order."""
    results: list = [None] * len(fns)
    errors: list = []
    barrier = threading.Barrier(len(fns))

    def run(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results
