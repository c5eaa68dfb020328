"""Stopping a long run cleanly: SIGTERM (a scheduler's kill, a machine being handed back)
is turned into KeyboardInterrupt, so that the run saves its checkpoint as on Ctrl-C."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def sigterm_as_interrupt():
    """Inside: SIGTERM raises KeyboardInterrupt (main thread only: signal handlers cannot
    be set from another thread, where this does nothing)."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
