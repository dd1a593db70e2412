"""What the HTTP side works with: the daemon's own parts, handed over by the composition root."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fabricatord.config import PeerSettings, Settings
from fabricatord.db import Database
from fabricatord.db.audit import AuditLog
from fabricatord.dicom.storage import InstanceWriter
from fabricatord.workflow.access import Directory, may_reach
from fabricatord.workflow.proxy import Proxies

ReadinessCheck = tuple[str, Callable[[], bool]]
"""(name, check): `/readyz` is 200 only when every check is true."""


@dataclass
class Department:
    settings: Settings
    database: Database
    directory: Directory
    audit: AuditLog
    writer: InstanceWriter | None = None
    """The daemon's storage writer: generated studies go where received ones go."""
    wake_acquirer: Callable[[], None] = lambda: None
    listeners: dict[str, str] = field(default_factory=dict)
    checks: list[ReadinessCheck] = field(default_factory=list)
    proxies: Proxies | None = None
    """The anonymizing proxies, whose records re-identification opens."""
    started: float = field(default_factory=time.time)

    def reload(self, settings: Settings) -> None:
        """SIGHUP: new peers and routes reach the console too."""
        self.settings = settings

    def peers_for(self, role: str) -> list[tuple[PeerSettings, bool, bool]]:
        """Each `[[peers]]` entry with whether `role` may read (query, echo) and write (store, move to) it."""
        return [
            (peer, may_reach(role, peer.environment, False), may_reach(role, peer.environment, True))
            for peer in self.settings.peers
        ]
