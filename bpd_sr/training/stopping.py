"""Stopping a long run cleanly: SIGTERM (a scheduler's kill, a machine being handed back)
stops the run as Ctrl-C does, so that it saves its checkpoint, but at a safe point: a
KeyboardInterrupt raised by the signal handler itself lands wherever the run happens to be,
which may be inside a checkpoint or export being written, or inside library code that
calls back into Python and may turn the exception into another one (an error instead of a
saved checkpoint)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def sigterm_as_interrupt() -> Iterator[Callable[[], None]]:
    """Inside: SIGTERM is noted, and the function yielded raises KeyboardInterrupt once it
    has come: call it where nothing is half-done (between training steps). Main thread
    only: signal handlers cannot be set from another thread, where SIGTERM keeps its
    default and the function never raises."""
    received = threading.Event()

    def note(signum, frame):
        received.set()

    def stop_point() -> None:
        if received.is_set():
            raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, note) if main else None
    try:
        yield stop_point
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
