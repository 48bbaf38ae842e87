"""Shutdown that always finishes: SIGTERM (or SIGINT) ends the worker within the grace period plus
a margin, whatever state its engine is in.

Uvicorn, on SIGTERM, stops accepting connections and then waits for the open ones to finish before
it runs the application's shutdown hooks, where the engine used to be closed. A stream the engine
never ends (an engine wedged or lost) therefore held the server up for ever. Here the signal itself
starts the engine's close at once: running replies get ``grace_s`` seconds, then end with an error
event, so every connection can finish and uvicorn goes on. If the process is still there
``grace_s + margin_s`` seconds after the signal, a watchdog kills the engine process and exits:
nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger("bentoml.lmforge")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(engine: Any, grace_s: float, margin_s: float = 5.0) -> bool:
    """Chain a handler in front of the current SIGTERM/SIGINT handlers (uvicorn's). Only the main
    thread may set handlers: returns False (and changes nothing) elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return False
    begun = threading.Event()

    def close() -> None:
        try:
            engine.close(grace_s)
        except Exception:
            log.exception("closing the engine failed")

    def watchdog() -> None:
        # Daemon thread: when the worker exits on time, it simply vanishes with it.
        threading.Event().wait(grace_s + margin_s)
        log.error(
            "still running %.0f s after the stop signal: killing the engine and exiting", grace_s + margin_s
        )
        kill = getattr(engine, "kill", None)
        if kill is not None:
            try:
                kill()
            except Exception:
                log.exception("killing the engine failed")
        os._exit(1)

    def chain(previous: Any) -> Any:
        def handler(signum: int, frame: Any) -> None:
            if not begun.is_set():
                begun.set()
                log.info("%s: closing the engine (grace %.0f s)", signal.Signals(signum).name, grace_s)
                threading.Thread(target=close, name="lmforge-shutdown", daemon=True).start()
                threading.Thread(target=watchdog, name="lmforge-shutdown-watchdog", daemon=True).start()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        return handler

    for sig in SIGNALS:
        signal.signal(sig, chain(signal.getsignal(sig)))
    return True
