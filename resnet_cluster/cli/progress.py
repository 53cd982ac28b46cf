"""Plain progress lines for logs that are not a terminal.

A Ray job's log (the dashboard's Jobs page, ``ray job logs``, ``--follow``), CI and ``| tee``
keep what a command writes, line by line, and show nothing of a live display that redraws one
terminal line. Where stdout is not a terminal, ``submit`` and ``sweep`` feed these printers
instead: whole lines, timestamped, never folded or cut to 80 columns, flushed at once.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _err(v: Any) -> str:
    return f"{v:.2f}%" if isinstance(v, (int, float)) else "-"


def _dashboard(url: Any) -> str:
    return url if str(url).startswith("http") else f"http://{url}"


class LineWriter:
    """Writes whole lines to ``out`` (stdout, or stderr under ``--json``), one at a time."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out
        self._lock = threading.Lock()

    @property
    def out(self) -> IO[str]:
        return self._out if self._out is not None else sys.stdout

    def line(self, text: str) -> None:
        with self._lock:
            self.out.write(f"{_now()} {text}\n")
            self.out.flush()


class PlainProgress(LineWriter):
    """``submit``'s progress as lines: a start line, one line per log window, one per
    evaluation. Fed the same items as the live display (``cluster``, ``start``, ``log``,
    ``epoch``)."""

    def __init__(self, out: IO[str] | None = None) -> None:
        super().__init__(out)
        self.total_epochs = 0
        self.total_iterations = 0
        self.run_id = ""
        self.uri = ""

    def __call__(self, item: dict[str, Any]) -> None:
        kind = item.get("kind")
        if kind == "cluster":
            self.run_id, self.uri = item.get("run_id", ""), item.get("uri", "")
            dash = item.get("dashboard_url")
            self.line(
                f"run {self.run_id}: store {self.uri}"
                + (f"; Ray dashboard {_dashboard(dash)}" if dash else "")
                + "; starting Ray Train workers"
            )
        elif kind == "start":
            self.total_epochs = int(item.get("total_epochs") or 0)
            self.total_iterations = int(item.get("total_iterations") or 0)
            devices = item.get("devices")
            if isinstance(devices, (list, tuple)):
                devices = ", ".join(str(d) for d in devices)
            self.line(
                f"run {self.run_id} {'resumed' if item.get('resumed') else 'started'}: "
                f"{item.get('world_size', '?')} workers on {devices or '?'}; "
                f"iteration {item.get('start_iteration', 0)}/{self.total_iterations}, "
                f"epoch {int(item.get('start_epoch', 0)) + 1}/{self.total_epochs}; store {self.uri}"
            )
        elif kind == "log":
            wait = item.get("data_wait_fraction")
            self.line(
                f"epoch {int(item['epoch']) + 1}/{self.total_epochs} "
                f"iter {item['iteration']}/{self.total_iterations} "
                f"loss {item['loss']:.4f} train_err {_err(item.get('train_err'))} lr {item['lr']:.4g} "
                f"img/s {item['images_per_sec']:.1f}"
                + (f" data_wait {100 * wait:.1f}%" if isinstance(wait, (int, float)) else "")
            )
        elif kind == "epoch" and "top1_err" in item:
            self.line(
                f"eval epoch {int(item['epoch']) + 1}/{self.total_epochs} iter {item.get('iteration', '-')}: "
                f"top1_err {_err(item.get('top1_err'))} top5_err {_err(item.get('top5_err'))}"
                + (f" test_loss {item['test_loss']:.4f}" if isinstance(item.get("test_loss"), (int, float)) else "")
            )

    def summary(self, result: dict[str, Any]) -> None:
        final, best = result.get("final") or {}, result.get("best") or {}
        ips = result.get("images_per_sec")
        self.line(
            f"run {result['run_id']} {result['status']}: final top1_err {_err(final.get('top1_err'))} "
            f"top5_err {_err(final.get('top5_err'))}; best top1_err {_err(best.get('top1_err'))} "
            f"(epoch {best.get('epoch')}); iterations {final.get('iteration')}"
            + (f"; img/s {ips:.1f}" if isinstance(ips, (int, float)) else "")
            + (f"; {result['seconds']:.0f} s" if isinstance(result.get("seconds"), (int, float)) else "")
            + f"; artifacts {result.get('uri', '')}"
        )


class PlainTrialLog(LineWriter):
    """``sweep``'s progress as lines: one per trial state change, and every ``table_every_s``
    seconds a plain table of all trials. Fed the same events as the live trial table."""

    def __init__(
        self,
        sweep_id: str,
        trials: list[dict[str, Any]],
        out: IO[str] | None = None,
        *,
        table_every_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(out)
        self.sweep_id = sweep_id
        self.rows = {t["run_id"]: {"row": t["label"], "seed": t["seed"], "status": "pending"} for t in trials}
        self.table_every_s = table_every_s
        self.clock = clock
        self.last_table = clock()

    def __call__(self, ev: dict[str, Any]) -> None:
        if ev.get("kind") == "cluster":
            dash = ev.get("dashboard_url")
            self.line(
                f"sweep {self.sweep_id}: {ev.get('pending')} trials to run, {ev.get('concurrent')} at a time"
                + (f"; Ray dashboard {_dashboard(dash)}" if dash else "")
            )
        elif ev.get("kind") == "trial" and ev.get("run_id") in self.rows:
            row = self.rows[ev["run_id"]]
            changed = ev.get("status") != row["status"]
            row.update({k: v for k, v in ev.items() if k in ("status", "epoch", "iteration", "loss", "top1_err")})
            if changed:
                self.line(
                    f"trial {ev['run_id']} ({row['row']}, seed {row['seed']}): {row['status']}"
                    + (f" at epoch {row['epoch']}" if row.get("epoch") is not None else "")
                    + (f", test error {_err(row.get('top1_err'))}" if row.get("top1_err") is not None else "")
                )
        if self.clock() - self.last_table >= self.table_every_s:
            self.table()

    def table(self) -> None:
        """All trials, one line each, under a header line with the counts per status."""
        self.last_table = self.clock()
        counts: dict[str, int] = {}
        for r in self.rows.values():
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        lines = [f"sweep {self.sweep_id}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
        for run_id, r in self.rows.items():
            loss = r.get("loss")
            lines.append(
                f"  {run_id}  {r['row']}  seed {r['seed']}  {r['status']}  epoch {r.get('epoch', '-')}  "
                f"iter {r.get('iteration', '-')}  loss {f'{loss:.4f}' if isinstance(loss, (int, float)) else '-'}  "
                f"test_err {_err(r.get('top1_err'))}"
            )
        self.line("\n".join(lines))
