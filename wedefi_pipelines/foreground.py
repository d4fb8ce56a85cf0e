"""Commands that serve until stopped (`stack`, `demo --keep`, `metrics`) block here."""

from __future__ import annotations

import signal
import threading


def wait_until_interrupted() -> None:
    """Block the main thread until SIGINT or SIGTERM (a stack's S3 server, or the metrics
    endpoint, lives in this process and stops with it)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass
