"""Group commit: callers on many threads hand in one item each and wait; whichever of them finds
no commit running leads, and commits every item waiting in one transaction. Twenty associations
storing at once then share commits instead of queueing for SQLite's write lock, and a lone caller
pays nothing for it (it leads a batch of one at once).

Nothing returns before its transaction committed, so acknowledging after `submit` returns keeps
the promise of ROBUSTNESS.md: an ACK or a C-STORE success only for what is durable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

LARGEST_BATCH = 64
"""Items in one transaction, at most: a batch's callers all wait for its slowest part."""


@dataclass
class _Ticket(Generic[Item, Result]):
    item: Item
    key: Hashable
    done: bool = False
    result: Result | None = None
    error: BaseException | None = None


class GroupCommit(Generic[Item, Result]):
    """`commit(items)` runs one transaction for a batch and returns a result for each item, in
    order. When it raises for a batch of several, each item is committed again on its own, so one
    bad item fails alone; `shared_failure(error)` says which errors would fail every item alike
    (the database busy or gone) and are given to the whole batch at once instead.

    Two items with the same `key` never share a batch: the second waits for the first's commit,
    so it sees the first's rows as any later caller would.
    """

    def __init__(
        self,
        commit: Callable[[Sequence[Item]], Sequence[Result]],
        key: Callable[[Item], Hashable],
        shared_failure: Callable[[BaseException], bool] = lambda _error: False,
    ) -> None:
        self._commit = commit
        self._key = key
        self._shared_failure = shared_failure
        self._condition = threading.Condition()
        self._waiting: list[_Ticket[Item, Result]] = []
        self._leading = False

    def submit(self, item: Item) -> Result:
        """Commit `item` with whatever else is waiting; its result once committed, or its error."""
        ticket: _Ticket[Item, Result] = _Ticket(item, self._key(item))
        with self._condition:
            self._waiting.append(ticket)
            while not ticket.done:
                if self._leading:
                    self._condition.wait()
                    continue
                self._leading = True
                batch = self._take()
                self._condition.release()
                try:
                    self._run(batch)
                finally:
                    self._condition.acquire()
                    self._leading = False
                    self._condition.notify_all()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result  # type: ignore[return-value]  # set with done, None only if Result allows it

    def _take(self) -> list[_Ticket[Item, Result]]:
        """The oldest waiting tickets, one per key, up to LARGEST_BATCH; the rest wait."""
        batch: list[_Ticket[Item, Result]] = []
        keys: set[Hashable] = set()
        later: list[_Ticket[Item, Result]] = []
        for ticket in self._waiting:
            if len(batch) < LARGEST_BATCH and ticket.key not in keys:
                batch.append(ticket)
                keys.add(ticket.key)
            else:
                later.append(ticket)
        self._waiting = later
        return batch

    def _run(self, batch: list[_Ticket[Item, Result]]) -> None:
        try:
            results = self._commit([ticket.item for ticket in batch])
        except BaseException as error:
            if len(batch) == 1 or self._shared_failure(error) or not isinstance(error, Exception):
                for ticket in batch:
                    ticket.error, ticket.done = error, True
                return
            for ticket in batch:
                self._run([ticket])
            return
        for ticket, result in zip(batch, results, strict=True):
            ticket.result, ticket.done = result, True
