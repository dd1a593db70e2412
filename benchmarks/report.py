"""What every benchmark prints: Markdown tables, the issue's gates, and one JSON line at the end."""

from __future__ import annotations

import json
import platform
from datetime import datetime
from pathlib import Path
from typing import Any

RESULTS: dict[str, Any] = {}
"""Everything a run measured; `finish` prints it as one JSON line."""


def start(**facts: Any) -> None:
    RESULTS.update(
        when=datetime.now().isoformat(timespec="seconds"),
        machine=f"{platform.node()} {platform.processor() or platform.machine()}",
        **facts,
    )


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row) + " |")


def gate(name: str, value: float | None, limit: float, higher_is_better: bool) -> None:
    if value is None:
        print(f"- gate {name}: not measured")
        return
    ok = value >= limit if higher_is_better else value <= limit
    print(f"- gate {name}: {value:.2f} ({'≥' if higher_is_better else '≤'} {limit}) {'met' if ok else 'NOT met'}")
    RESULTS.setdefault("gates", {})[name] = {"value": round(value, 3), "limit": limit, "met": ok}


def finish(json_path: str | None) -> None:
    line = json.dumps(RESULTS, default=str)
    print("\n" + line)
    if json_path:
        Path(json_path).write_text(line + "\n")
