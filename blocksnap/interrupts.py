"""SIGTERM, SIGHUP and SIGINT end a command cleanly (docs/FORMAT.md, "Interrupts").

The CLI turns SIGTERM and SIGHUP into :class:`Terminated` (SIGINT is Python's KeyboardInterrupt), raised
in the main thread wherever it is, so they unwind like any failure: a create marks its snapshot failed
and gives back what it wrote, a restore leaves no output file, gc stops between two crash-safe steps.
Cleanup itself runs under :func:`deferred`: a second signal arriving then is held until the cleanup is
done, instead of cutting it short.
"""
import contextlib
import signal
import threading

CAUGHT = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (``signum``); a BaseException, like KeyboardInterrupt."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum

    def __str__(self):
        return f"interrupted by {signal.Signals(self.signum).name}"


_state = threading.local()
_held = []  # signals that arrived while cleanup ran


def _deferring():
    return getattr(_state, "depth", 0) > 0


def _on_signal(signum, frame):
    if _deferring():
        _held.append(signum)
        return
    raise Terminated(signum)


def _on_sigint(signum, frame):
    if _deferring():
        _held.append(signum)
        return
    raise KeyboardInterrupt


def install():
    """Make SIGTERM and SIGHUP raise Terminated, and SIGINT KeyboardInterrupt, in the main thread (the CLI)."""
    for sig in CAUGHT:
        signal.signal(sig, _on_signal)
    signal.signal(signal.SIGINT, _on_sigint)


@contextlib.contextmanager
def deferred():
    """Hold SIGTERM, SIGHUP and SIGINT while the block runs (cleanup); raise the first one after it."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        if not _deferring() and _held and threading.current_thread() is threading.main_thread():
            signum = _held[0]
            _held.clear()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise Terminated(signum)


def describe(exc):
    """What an interrupt that ended an operation was, for the record it leaves (None if it is not one)."""
    if isinstance(exc, Terminated):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by SIGINT"
    return None
