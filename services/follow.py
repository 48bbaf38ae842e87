"""A replica that follows its registry alias (``LMFORGE_FOLLOW_ALIAS_S``; 0, the default: never).

Every period it asks the registry which version the alias it serves names. When that is another
version, it loads it beside the running one (a second engine), swaps it in between requests and
closes the old engine once its rows are done. Each request keeps the backend it began with, so a
stream in flight finishes on the old version; requests that arrive after the swap get the new one.
A load that fails keeps the old version serving: the log says why, ``lmforge_model_reloads`` counts
it (``outcome="failed"``), and the same version is tried again only after ``retry_s``.
Replicas behind one registry each poll it, so all serve the new version within one period.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bentoml.lmforge")


class AliasFollower:
    """Polls `resolve()` (the alias's version) every `period_s`; on a new version calls `load(version)`
    (a new backend) and `swap(new)` (which returns the old one), then drains and closes the old engine
    on a thread of its own. `outcome(kind)` hears "swapped" or "failed"."""

    def __init__(
        self,
        *,
        current: Callable[[], str],
        resolve: Callable[[], str],
        load: Callable[[str], Any],
        swap: Callable[[Any], Any],
        period_s: float,
        drain_s: float,
        retry_s: float | None = None,
        settle_s: float = 2.0,
        outcome: Callable[[str], None] = lambda kind: None,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"LMFORGE_FOLLOW_ALIAS_S must be > 0 to follow the alias, got {period_s}")
        self._current, self._resolve, self._load, self._swap = current, resolve, load, swap
        self.period_s, self.drain_s, self.settle_s = period_s, drain_s, settle_s
        self.retry_s = period_s * 10 if retry_s is None else retry_s
        self._outcome = outcome
        self._failed: dict[str, float] = {}  # version -> when its load failed
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one check at a time (the thread, or a caller of check())
        self._thread = threading.Thread(target=self._run, name="lmforge-follow-alias", daemon=True)

    def start(self) -> AliasFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.check()
            except Exception:  # the registry unreachable for a while: keep serving, keep asking
                log.exception("follow alias: asking the registry failed; serving on")

    def check(self) -> str | None:
        """One poll: "swapped", "failed", or None (nothing to do)."""
        with self._lock:
            version, serving = str(self._resolve()), self._current()
            if version == serving:
                return None
            failed_at = self._failed.get(version)
            if failed_at is not None and time.monotonic() - failed_at < self.retry_s:
                return None
            log.info("follow alias: the alias names version %s (serving %s); loading it", version, serving)
            started = time.perf_counter()
            try:
                new = self._load(version)
            except Exception as exc:
                self._failed[version] = time.monotonic()
                log.error(
                    "follow alias: loading version %s failed, still serving %s: %s", version, serving, exc
                )
                self._outcome("failed")
                return "failed"
            old = self._swap(new)
            self._failed.pop(version, None)
            log.info(
                "follow alias: now serving version %s (loaded in %.1fs); version %s drains",
                version,
                time.perf_counter() - started,
                serving,
            )
            self._outcome("swapped")
            threading.Thread(target=self._retire, args=(old,), name="lmforge-retire", daemon=True).start()
            return "swapped"

    def _retire(self, old: Any) -> None:
        """After `settle_s` (a request that took the old backend just before the swap still submits to
        it), the old engine takes no new rows; its running rows finish within `drain_s`, then it stops."""
        time.sleep(self.settle_s)
        try:
            old.engine.close(self.drain_s)
        except Exception:
            log.exception("follow alias: closing version %s's engine failed", old.version)
