"""Sum py-spy collapsed stacks (`--format raw`) by function: self and inclusive share.

.venv/bin/python benchmarks/stacks.py benchmarks/out/gateway.txt [--top 40] [--match clawgate]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default="", help="only functions whose frame contains this")
    args = parser.parse_args()
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in args.file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    print(f"{total} samples")
    for title, counter in (("self", own), ("inclusive", incl)):
        print(f"-- {title}")
        for frame, n in counter.most_common():
            if args.match in frame:
                print(f"{100 * n / total:6.1f}%  {frame}")
                args.top -= 1
                if args.top <= 0:
                    break
        args.top = parser.parse_args().top


if __name__ == "__main__":
    main()
