"""Where a process's GIL time goes, from `py-spy record --gil --threads --format raw` output
(collapsed stacks: "thread (tid): name;frame;...;frame count"): samples per thread, then the
frames that held the GIL longest, inclusive (a frame counts every sample it was on the
stack of) and by their own time (the leaf). Compare two recordings (token ids and
prompt_embeds under the same load) to see what one kind of request costs the other.

    py-spy record --pid PID --duration 5 --rate 250 --gil --threads --format raw -o ids.txt
    python scripts/gil_profile.py ids.txt embeds.txt --top 25"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.+?) \((?P<file>[^():]+?)(?::\d+)?\)$")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recordings", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="inclusive rows only for frames matching it, e.g. 'serving|engine_client|worker.py'")
    parser.add_argument("--seconds", type=float, default=None,
                        help="the recordings' duration in seconds: also print the samples holding the GIL a second")
    return parser.parse_args(argv)


def frame_name(frame: str) -> str:
    """'function (path/to/file.py:LINE)' as 'file.py:function', lines merged."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{Path(match['file']).name}:{match['function']}"


def read(path: Path) -> tuple[Counter, Counter, Counter, int]:
    """(samples per thread, inclusive samples per frame, own samples per frame, total)."""
    threads, inclusive, own, total = Counter(), Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        thread, *frames = stack.split(";")
        threads[re.sub(r"\(\d+\)", "", thread).strip()] += samples
        names = [frame_name(f) for f in frames]
        for name in set(names):
            inclusive[name] += samples
        if names:
            own[names[-1]] += samples
        total += samples
    return threads, inclusive, own, total


def main(argv=None) -> None:
    args = parse_args(argv)
    for path in args.recordings:
        threads, inclusive, own, total = read(path)
        scale = f" ({total / args.seconds:.0f} a second)" if args.seconds else ""
        print(f"\n== {path}: {total} samples holding the GIL{scale}")
        for title, counts in (("threads", threads), ("inclusive", inclusive), ("own", own)):
            print(f"-- {title}")
            rows = counts.most_common()
            if title == "inclusive" and args.only:
                rows = [(name, samples) for name, samples in rows if re.search(args.only, name)]
            for name, samples in rows[:args.top]:
                print(f"{samples:>7} {100 * samples / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
