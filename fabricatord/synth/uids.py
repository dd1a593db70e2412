"""UIDs under our root: always valid (PS3.5 9.1) and at most 64 characters."""

from __future__ import annotations

import random
import uuid

MAX_UID_LENGTH = 64


class UidFactory:
    """Makes UIDs from a random source, so that a seeded run makes the same ones again."""

    def __init__(self, root: str, rng: random.Random) -> None:
        self._root = root.rstrip(".")
        self._rng = rng
        # Under 2.25 the suffix is a whole UUID (PS3.5 B.2); elsewhere as many random digits as fit.
        self._bits = 128 if self._root == "2.25" else min(96, int((MAX_UID_LENGTH - len(self._root) - 1) * 3.3))

    def new(self) -> str:
        if self._bits == 128:
            suffix = uuid.UUID(int=self._rng.getrandbits(128), version=4).int
        else:
            suffix = self._rng.getrandbits(self._bits) | 1 << (self._bits - 1)
        uid = f"{self._root}.{suffix}"
        assert len(uid) <= MAX_UID_LENGTH
        return uid
