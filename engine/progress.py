"""Progress reporting that suits where the output goes.

On a terminal (stderr is a TTY) a tqdm bar; otherwise (a redirected log, Slurm) no bar frames at all, but a
plain line on stdout at a sync point at most every ``interval_s`` seconds, e.g.
``epoch 3/100 step 1200/5004 (24%) | loss 3.1234 top1 31.20 lr 0.3912 | 2541.3 img/s``.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0


def is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of one loop (an epoch, an evaluation).

    Args:
        total: steps in the loop; initial: steps already done (a resumed epoch).
        desc: label (``epoch 3/100``); enabled: False for a silent loop (non-zero ranks, ``train.progress``).
        interval_s: minimum seconds between two plain lines when not on a terminal.
        bar_stream: where a bar would go (a bar is drawn only if this is a TTY); line_stream: plain lines.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True,
                 interval_s: float = PLAIN_INTERVAL_S, bar_stream: TextIO | None = None,
                 line_stream: TextIO | None = None):
        bar_stream = bar_stream or sys.stderr
        self.total, self.done, self.desc = total, initial, desc
        self.enabled, self.interval_s = enabled, interval_s
        self.line_stream = line_stream or sys.stdout
        self.bar = (tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False, file=bar_stream)
                    if enabled and is_tty(bar_stream) else None)
        self._last_line = time.monotonic()
        self._t0, self._done0 = time.monotonic(), initial

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def report(self, images_per_step: int = 0, **values: Any) -> None:
        """New metric values (at a sync point): shown on the bar, or as a plain line if one is due."""
        text = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(**text)
            return
        now = time.monotonic()
        if not self.enabled or now - self._last_line < self.interval_s:
            return
        rate = (self.done - self._done0) * images_per_step / max(now - self._t0, 1e-9)
        pct = 100.0 * self.done / max(self.total, 1)
        metrics = " ".join(f"{k} {v}" for k, v in text.items())
        line = f"{self.desc} step {self.done}/{self.total} ({pct:.0f}%) | {metrics}"
        if images_per_step:
            line += f" | {rate:.1f} img/s"
        print(line, file=self.line_stream, flush=True)
        self._last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def log_line(msg: str) -> None:
    """Print a log line without breaking a bar that may be on screen."""
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()
