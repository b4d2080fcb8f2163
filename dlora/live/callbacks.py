"""Token and finish callbacks of a live cluster, delivered in production order outside the
cluster lock (so a callback may call back into the cluster, e.g. abort)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..types import Request

log = logging.getLogger(__name__)
TokenCallback = Callable[[Request, int], None]
FinishCallback = Callable[[Request], None]


class Outbox:
    """Events are queued where they happen (under the cluster lock) and delivered by whichever
    thread calls `deliver` next; one delivery runs at a time, so order is kept."""

    def __init__(self, on_token: TokenCallback | None, on_finish: FinishCallback | None) -> None:
        self.on_token, self.on_finish = on_token, on_finish
        self._events: list[tuple[Request, int | None]] = []  # token id, or None: finished
        self._lock = threading.Lock()
        self._delivering = threading.RLock()

    def token(self, request: Request, token_id: int) -> None:
        if self.on_token is not None:
            with self._lock:
                self._events.append((request, token_id))

    def finish(self, request: Request) -> None:
        if self.on_finish is not None:
            with self._lock:
                self._events.append((request, None))

    def deliver(self) -> None:
        if self.on_token is None and self.on_finish is None:
            return
        with self._delivering:
            while True:
                with self._lock:
                    events, self._events = self._events, []
                if not events:
                    return
                for r, token in events:
                    try:
                        if token is None:
                            self.on_finish(r)  # type: ignore[misc]
                        else:
                            self.on_token(r, token)  # type: ignore[misc]
                    except Exception:  # noqa: BLE001  (a callback must not stop the cluster)
                        log.exception("callback for request %d failed", r.id)
