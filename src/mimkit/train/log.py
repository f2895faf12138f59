"""What a run tells its user: a progress bar (loss, lr, images/s, ETA), TensorBoard scalars and a
metrics.jsonl file, all from rank 0."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        total: int,
        initial: int,
        progress: bool,
        tensorboard: bool = True,
    ) -> None:
        self.enabled = enabled
        self.total, self.done, self.started, self.start_done = total, initial, time.monotonic(), initial
        self.bar = None
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tb"))
            except ImportError:  # tensorboard is a declared dependency; stay usable without it
                self.writer = None
        if progress:
            self.bar = tqdm(
                total=total, initial=initial, unit="it", dynamic_ncols=True, file=sys.stderr, disable=None
            )

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def scalars(self, step: int, values: dict[str, float], *, epoch: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, "epoch": round(epoch, 4), "time": round(time.time(), 3), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        shown = {k: values[k] for k in ("loss", "lr", "img/s", "knn_top1") if k in values}
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        else:  # no terminal: one line per logged step instead of a bar
            text = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
            print(f"step {step} epoch {epoch:.2f} {text} eta {self.eta()}", file=sys.stderr, flush=True)

    def eta(self) -> str:
        rate = (self.done - self.start_done) / max(time.monotonic() - self.started, 1e-9)
        return tqdm.format_interval((self.total - self.done) / rate) if rate > 0 else "?"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def format_summary(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, default=str)
