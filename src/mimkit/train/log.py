"""What a run tells its user: a progress bar (loss, lr, images/s, ETA), TensorBoard scalars and a
metrics.jsonl file, all from rank 0."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mimkit.checkpoint import check_output
from mimkit.progress import PLAIN_INTERVAL, is_terminal


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
        resume_step: int = 0,
    ) -> None:
        """``resume_step``: the optimizer step the run (re)starts from; what an earlier session logged after
        it (before being killed) is dropped, so that no step appears twice."""
        self.enabled = enabled
        self.total, self.done, self.started, self.start_done = total, initial, time.monotonic(), initial
        self.bar = None
        self.plain = False
        self.last_line = time.monotonic()
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(out_dir / "metrics.jsonl", resume_step)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:  # imported here: tensorboard costs a second to import and a run may go without it
                from torch.utils.tensorboard import SummaryWriter

                # TensorBoard hides the events an earlier session wrote after resume_step
                self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is a declared dependency; stay usable without it
                self.writer = None
        if progress and is_terminal():
            self.bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, file=sys.stderr)
        self.plain = progress and self.bar is None

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.plain and time.monotonic() - self.last_line >= PLAIN_INTERVAL:
            # no terminal and logged steps far apart: a plain line now and then says the run is alive
            self.last_line = time.monotonic()
            print(f"{self.done}/{self.total} it, eta {self.eta()}", file=sys.stderr, flush=True)

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
            self.last_line = time.monotonic()

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


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows of a metrics file up to ``last_step`` (and any unreadable tail is dropped: a kill
    mid-write leaves half a line). Rewritten atomically, and only when something is dropped."""
    if not path.is_file():
        return
    kept, dropped = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped = True
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped = True
    if dropped:
        replace_text(path, "".join(f"{line}\n" for line in kept))


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (NaN and inf become null, which every reader accepts), written atomically."""
    text = json.dumps(_finite(data), indent=2, default=str, allow_nan=False)
    replace_text(path, text + "\n")


def replace_text(path: Path, text: str) -> None:
    """Write beside ``path`` then rename over it, so a reader (or a kill) never sees half a file; the
    temporary is one the next run removes if a kill leaves it (checkpoint.remove_stale_temporaries)."""
    check_output(path)  # never renamed over a device or a pipe
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this
            tmp.unlink()  # a full disk leaves no temporary behind
        raise


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def format_summary(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, default=str)
