"""Put the peer table's section into BENCHMARKS.md: section.md, then the last run's
RESULTS.md, as the first `##` section (replacing the one there). Both run.sh scripts
call it, so neither drops the other's part.

    python benchmarks/peers/section.py benchmarks/BENCHMARKS.md
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADING = "## Peers on SmolLM2-135M"


def splice(document: str, section: str) -> str:
    """`document` with its peers section replaced by `section`, or `section` put before
    its first `##` heading when it has none."""
    lines = document.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")]
    mine = next((i for i in starts if lines[i].rstrip() == HEADING), None)
    if mine is None:
        at = starts[0] if starts else len(lines)
        return "".join(lines[:at]) + section + "\n" + "".join(lines[at:])
    end = next((i for i in starts if i > mine), len(lines))
    tail = "\n" + "".join(lines[end:]) if end < len(lines) else ""
    return "".join(lines[:mine]) + section + tail


def main() -> None:
    target = Path(sys.argv[1])
    results = HERE / "RESULTS.md"
    if not results.exists():
        return
    section = (HERE / "section.md").read_text(encoding="utf-8").rstrip("\n") + "\n\n"
    section += results.read_text(encoding="utf-8").rstrip("\n") + "\n"
    target.write_text(splice(target.read_text(encoding="utf-8"), section), encoding="utf-8")


if __name__ == "__main__":
    main()
