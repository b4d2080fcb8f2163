"""KV transfer between live replicas: the source's worker exports a migrated request's KV
before its next step (before that step frees the blocks), the destination's worker imports it
before the step that admits the request (PAPER.md section 5: migration by KV copy).

Each executor is touched only by its own worker thread. A transfer that cannot complete
(export failed, source dead, timeout) fails the destination's step, which the core requeues
for recompute, so the request is never lost."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from ..errors import DloraError

log = logging.getLogger(__name__)


class TransferError(DloraError):
    """A request's KV did not arrive; its step is requeued and the request recomputed."""


class KVMailbox:
    def __init__(self, num_replicas: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._exports: list[list[int]] = [[] for _ in range(num_replicas)]
        self._box: dict[int, Any] = {}  # request id -> KV tensor (None: export failed)
        self._pending: set[int] = set()  # requests whose KV is on its way
        self._closed = False

    @property
    def pending(self) -> set[int]:
        with self._cond:
            return set(self._pending)

    def expect(self, source: int, request_id: int) -> None:
        """The request moved off `source` with its KV (called under the cluster lock)."""
        with self._cond:
            self._exports[source].append(request_id)
            self._pending.add(request_id)

    def take_exports(self, source: int) -> list[int]:
        with self._cond:
            out, self._exports[source] = self._exports[source], []
            return out

    def fail_exports(self, source: int) -> None:
        for rid in self.take_exports(source):
            self._post(rid, None)

    def export(self, executor: Any, request_ids: Iterable[int]) -> None:
        for rid in request_ids:
            try:
                kv = executor.export_kv(rid)
            except Exception as exc:  # noqa: BLE001  (the destination recomputes instead)
                log.warning("exporting the KV of request %d failed: %s; it will be recomputed", rid, exc)
                kv = None
            self._post(rid, kv)

    def import_(self, executor: Any, request_ids: Iterable[int]) -> None:
        for rid in request_ids:
            kv = self._take(rid)
            if kv is None:
                raise TransferError(f"the KV of request {rid} did not arrive from its old replica; "
                                    "recomputing the step's requests")
            executor.import_kv(rid, kv)

    def forget(self, request_id: int) -> None:
        with self._cond:
            self._box.pop(request_id, None)
            self._pending.discard(request_id)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _post(self, request_id: int, kv: Any) -> None:
        with self._cond:
            if request_id in self._pending:
                self._box[request_id] = kv
                self._cond.notify_all()

    def _take(self, request_id: int) -> Any:
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while request_id not in self._box and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._pending.discard(request_id)
            return self._box.pop(request_id, None)
