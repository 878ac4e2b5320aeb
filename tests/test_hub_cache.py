"""Hub ids offline: a half-downloaded hub cache names its missing files; an uncached id says what to run.

Runs `molmo_core.load` in a fresh interpreter whose HF_HOME is a fake hub cache folder, because the hub
library reads HF_HOME and HF_HUB_OFFLINE once, when it is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

from molmo_core.tiny import write_tiny_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOAD_EACH = """
import sys, molmo_core
for repo in sys.argv[1:]:
    try:
        molmo_core.load(repo, device="cpu")
        print("LOADED", repo)
    except molmo_core.CheckpointError as e:
        print("ERROR", repo, str(e).replace("\\n", " "))
"""


def _fake_cache(hf_home, repo_id: str, drop: list[str]) -> None:
    """The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/files}, some files missing."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = write_tiny_checkpoint(repo / "snapshots" / COMMIT, "d", shards=2)
    for name in drop:
        (snapshot / name).unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def _load_offline(hf_home, *repos: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", LOAD_EACH, *repos], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split(" ", 2) for line in out.stdout.splitlines() if line.startswith(("LOADED", "ERROR"))]
    return {repo: (status + " " + (rest[0] if rest else "")).strip() for status, repo, *rest in lines}


def test_offline_hub_cache_complete_partial_and_missing(tmp_path):
    hf_home = tmp_path / "hf"
    _fake_cache(hf_home, "allenai/Molmo-7B-D-0924", drop=["model-00002-of-00002.safetensors"])
    _fake_cache(hf_home, "allenai/Molmo-72B-0924", drop=[])
    got = _load_offline(hf_home, "allenai/Molmo-7B-D-0924", "allenai/Molmo-72B-0924", "allenai/Molmo-7B-O-0924")

    partial = got["allenai/Molmo-7B-D-0924"]
    assert partial.startswith("ERROR allenai/Molmo-7B-D-0924 is only partly downloaded"), partial
    assert "missing shard(s) model-00002-of-00002.safetensors" in partial
    assert str(hf_home / "hub" / "models--allenai--Molmo-7B-D-0924" / "snapshots" / COMMIT) in partial
    assert "cannot be fetched here: the hub is offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)" in partial
    assert "`hf download allenai/Molmo-7B-D-0924 --local-dir ./checkpoints/Molmo-7B-D-0924`" in partial
    assert "not on this machine" not in partial

    assert got["allenai/Molmo-72B-0924"] == "LOADED"  # a complete cached copy loads offline

    missing = got["allenai/Molmo-7B-O-0924"]
    assert "The checkpoint allenai/Molmo-7B-O-0924 is not on this machine and the hub is offline" in missing
    assert "`hf download allenai/Molmo-7B-O-0924 --local-dir ./checkpoints/Molmo-7B-O-0924`" in missing
