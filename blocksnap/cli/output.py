"""Shared CLI output: JSON, tables, byte sizes and the terminal progress bar."""
import json
import sys
import time


def waiting_for_gc():
    """on_wait for creates, disk adds, restores and verifies: say why nothing happens yet."""
    print("blocksnap: waiting for a running gc to finish", file=sys.stderr, flush=True)


def emit_json(obj):
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def human_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows, headers):
    """Print rows (lists of str) under headers, columns padded to fit."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers).rstrip())
    for row in rows:
        print(fmt.format(*row).rstrip())


class ProgressBar:
    """A one-line bar on stderr, shown only on a terminal; a callable(done, total)."""

    def __init__(self, label, enabled=None):
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last = 0.0

    def __call__(self, done, total):
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = done / total if total else 1.0
        width = 30
        fill = int(frac * width)
        rate = done / max(now - self.start, 1e-6)
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% "
                         f"{human_bytes(done)}/{human_bytes(total)} {human_bytes(rate)}/s ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_for(args, label):
    """A ProgressBar unless --json was asked for or stderr is not a terminal."""
    return ProgressBar(label, enabled=False if args.json else None)
