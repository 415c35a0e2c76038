"""Summarise py-spy raw (collapsed) profiles: where the CPU went, by function, self and inclusive.

    python -m bench.profile_summary DIR/*.txt [--top 25] [--skip-startup]

``bench/hot_path.py --profile DIR`` writes one profile per server process (on-CPU samples only).
``--skip-startup`` drops samples under module imports, which dominate short runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "python3.11/", "/hotpath/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{match['func']} ({file})"


def summarise(path: Path, top: int, skip_startup: bool) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(f) for f in stack.split(";")]
        if skip_startup and any(f.startswith("_find_and_load ") for f in frames):
            continue
        n = int(count)
        total += n
        self_time[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    lines = [f"## {path.stem}: {total} on-CPU samples", "", "self:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in self_time.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--skip-startup", action="store_true")
    args = parser.parse_args()
    for path in args.profiles:
        print(summarise(path, args.top, args.skip_startup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
