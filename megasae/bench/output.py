"""How a benchmark ends: its table on stdout and, with --json, its whole result in that file."""

from __future__ import annotations

import json
from pathlib import Path


def report(table: str, result: dict, json_path: Path | None) -> None:
    print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
