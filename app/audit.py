"""The audit log: one JSON line per admin action and per refused attempt, appended to
`<data root>/.studio/audit.jsonl`. Lines hold who, what (the event or command), when and the outcome,
never argument values (a password typed into the Admin tab must not land here)."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


class AuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def write(self, user: str | None, action: str, outcome: str = "ok", **detail: Any) -> None:
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "user": user,
                "action": action, "outcome": outcome, **detail}
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")

    def tail(self, n: int = 200) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for raw in self.path.read_text(encoding="utf-8").splitlines()[-n:]:
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out
