"""The client side of a PACS tool: peers named as users name them, the production guard, and
query and retrieve across several PACS at once (seed 000: "query studies on one or more PACS,
and perform C-MOVE")."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from pydicom.dataset import Dataset

from fabricatord.config import PeerSettings, Settings
from fabricatord.config.values import check_ae_title
from fabricatord.dicom import keys as query_keys
from fabricatord.dicom import scu

SELF = "self"


class UnknownPeer(ValueError):
    """A name that is no `[[peers]]` entry, not `self` and no AET@host:port."""


class ProdRefused(PermissionError):
    """A command would send to, or bring data from, a peer with `environment = "prod"`."""


def resolve(settings: Settings, text: str) -> scu.Peer:
    """A peer as the command line names it: a `[[peers]]` name (one named `self` wins), `self`
    for our own node, asked over DICOM like any other, or `AET@host:port`."""
    configured = settings.peer(text)
    if configured is not None:
        return scu.Peer.of(configured)
    if text == SELF:
        return own_node(settings)
    address = scu.parse_address(text)
    if address is None:
        names = ", ".join(p.name for p in settings.peers) or "none configured"
        raise UnknownPeer(f"unknown peer {text!r}: give a [[peers]] name ({names}), self, or AET@host:port")
    # An address a `tls = true` entry serves is reached over TLS as that entry is.
    known = next((p for p in settings.peers if (p.host, p.port) == (address.host, address.port)), None)
    return replace(address, tls=known.tls) if known is not None else address


def own_node(settings: Settings) -> scu.Peer:
    """Our node as a client reaches it: a wildcard bind is reached on loopback."""
    return scu.Peer.own(settings.node.ae_title, settings.dicom, SELF)


def prod_entry(settings: Settings, peer: scu.Peer) -> PeerSettings | None:
    """The production `[[peers]]` entry `peer` is: by its name, or, for an address typed on the
    command line, by the host and port it reaches (names resolved)."""
    for entry in settings.peers:
        if entry.environment != "prod":
            continue
        if peer.name == entry.name:
            return entry
        if peer.name == "other" and peer.port == entry.port and _same_host(peer.host, entry.host):
            return entry
    return None


def guard(settings: Settings, peer: scu.Peer, verb: str, allowed: bool) -> None:
    """Refuse to `verb` a production peer unless the user said `--prod`."""
    entry = prod_entry(settings, peer)
    if entry is not None and not allowed:
        raise ProdRefused(
            f"{peer.ae_title}@{peer.host}:{peer.port} is the production peer {entry.name!r} "
            f'(environment = "prod"): say --prod to {verb} it anyway'
        )


def _same_host(left: str, right: str) -> bool:
    if left == right:
        return True
    return bool(_addresses(left) & _addresses(right))


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


# -- find -----------------------------------------------------------------------------------


@dataclass
class PeerAnswer:
    """One peer's matches, or why it gave none."""

    name: str
    peer: scu.Peer | None
    matches: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


def find(
    settings: Settings,
    peers: Sequence[str],
    level: str,
    keys: Iterable[query_keys.Key],
    timeout: float,
    finished: Callable[[PeerAnswer], None] | None = None,
) -> list[PeerAnswer]:
    """Ask every peer side by side; the answers in the order the peers were named. `finished`
    hears of each peer as it is done. A peer that fails is an answer with its error."""
    query = query_keys.identifier(level, keys, query_keys.DEFAULT_KEYS[level])
    timeouts = replace(scu.Timeouts.of(settings.dicom), acse=timeout, dimse=timeout, network=timeout)
    timeouts = replace(timeouts, connect=min(timeouts.connect, timeout))
    lock = threading.Lock()

    def ask(name: str) -> PeerAnswer:
        started = time.monotonic()
        answer = PeerAnswer(name, None)
        try:
            answer.peer = resolve(settings, name)
            found = scu.find(answer.peer, settings.node.ae_title, query, timeouts, started + timeout)
            answer.matches = [query_keys.plain(ds) for ds in found]
        except (ValueError, scu.ScuError, OSError) as exc:  # ValueError: UnknownPeer, or pynetdicom refusing the query
            answer.error = str(exc)
        answer.seconds = time.monotonic() - started
        if finished is not None:
            with lock:
                finished(answer)
        return answer

    with ThreadPoolExecutor(max_workers=max(len(peers), 1), thread_name_prefix="find") as pool:
        return list(pool.map(ask, peers))


# -- move -----------------------------------------------------------------------------------


def destination(settings: Settings, text: str, allow_prod: bool) -> str:
    """The AE title a C-MOVE sends to: a `[[peers]]` name's, `self` for our node's, or a bare AE
    title. A production destination is refused unless `allow_prod`; a bare AE title that a prod
    peer has counts as that peer (a test and a prod PACS may share one: the source decides)."""
    configured = settings.peer(text)
    if configured is not None:
        ae_title, prod = configured.ae_title, configured if configured.environment == "prod" else None
    elif text == SELF:
        ae_title, prod = settings.node.ae_title, None
    else:
        ae_title = text.strip()
        problem = check_ae_title(ae_title)
        if problem is not None:
            raise UnknownPeer(f"--to {text!r}: give a [[peers]] name, self, or {problem}")
        # Sources compare AE titles loosely: PRODPACS and prodpacs are the same peer to them.
        prod = next(
            (e for e in settings.peers if e.environment == "prod" and e.ae_title.strip().upper() == ae_title.upper()),
            None,
        )
    if prod is not None and not allow_prod:
        raise ProdRefused(
            f'{ae_title} is the production peer {prod.name!r} (environment = "prod"): say --prod to move to it anyway'
        )
    return ae_title


def study_query(study_instance_uid: str) -> Dataset:
    """A Study Root C-MOVE identifier for one study, by its UID."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_instance_uid
    return ds


def move_timeouts(settings: Settings, timeout: float | None) -> scu.Timeouts:
    """A C-MOVE may run long without a word from the source (not every source sends pending
    responses): no limit between messages unless the user sets one, as DCMTK's movescu."""
    return replace(scu.Timeouts.of(settings.dicom), dimse=timeout, network=timeout)
