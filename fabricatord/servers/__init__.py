"""The listeners on the reactor: DICOM, MLLP and HTTP."""

from __future__ import annotations

import threading
from typing import Any

from twisted.python.threadpool import ThreadPool


def worker_pool(name: str, size: int) -> ThreadPool:
    """A pool whose threads all start with it, so that the thread count never grows, and are
    daemon threads, so that a start that fails after it (a port in use) leaves no thread for
    the process to wait for. A stopped service stops its pool, which waits for the work in hand."""
    pool = ThreadPool(minthreads=size, maxthreads=size, name=name)
    pool.threadFactory = _daemon_thread  # type: ignore[assignment]
    return pool


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)
