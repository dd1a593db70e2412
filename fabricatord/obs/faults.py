"""Fault injection for tests: `FABRICATORD_FAULTPOINT=point:action[,point:action]`.

Code marks the places where a crash would matter with `faultpoint("store.after_tmp_write")`.
Unset, the hook costs one dictionary look-up. Actions: `kill` (SIGKILL this process, as a power
cut or OOM kill would), `raise` (an `InjectedFault` exception), `exit` (exit code 70), `hang`
(the calling thread blocks for good, as a deadlock or a stuck system call would).
"""

from __future__ import annotations

import os
import signal
import threading

ENV_NAME = "FABRICATORD_FAULTPOINT"


class InjectedFault(RuntimeError):
    """Raised at a fault point whose action is `raise`."""


def _parse(spec: str) -> dict[str, str]:
    actions: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, action = item.partition(":")
        actions[point] = action or "kill"
    return actions


_ACTIONS = _parse(os.environ.get(ENV_NAME, ""))


def reload_from_environment() -> None:
    """Re-read the variable; tests that set it in-process call this."""
    global _ACTIONS
    _ACTIONS = _parse(os.environ.get(ENV_NAME, ""))


def faultpoint(name: str) -> None:
    if not _ACTIONS:
        return
    action = _ACTIONS.get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(70)
    elif action == "hang":
        threading.Event().wait()
    else:
        raise InjectedFault(f"fault injected at {name}")
