"""What the tools share: their progress output on stderr, apart from the tables they print on stdout.

Takes a message or a step count; gives a flushed ``[HH:MM:SS] message`` line (:func:`log`) or a
progress bar (:func:`progress_bar`). Never reads or writes results, and never touches the library.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def rss_mib() -> float | None:
    """This process's resident memory in MiB (Linux ``/proc``), or None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def log(msg: str, *, stream: TextIO | None = None, rss: bool = False) -> None:
    """Print ``[HH:MM:SS] msg`` to ``stream`` (default stderr), flushed; ``rss``: append the resident memory."""
    if rss:
        mib = rss_mib()
        msg += f" (rss {mib:.0f} MiB)" if mib is not None else ""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=stream or sys.stderr, flush=True)


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr for ``total`` steps, or one rewritten stderr line where tqdm is missing."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=2.0)

    class Plain:  # one stderr line, rewritten
        def __init__(self):
            self.n, self.start, self.post = 0, time.time(), ""

        def update(self, k=1):
            self.n += k
            el = time.time() - self.start
            eta = el / self.n * (total - self.n)
            print(f"\r{desc}: {self.n}/{total} [{el:.0f}s<{eta:.0f}s] {self.post}", end="", file=sys.stderr,
                  flush=True)

        def set_postfix_str(self, s):
            self.post = s

        def close(self):
            print(file=sys.stderr, flush=True)

    return Plain()
