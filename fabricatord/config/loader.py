"""Read a TOML file and `FABRICATORD__SECTION__KEY` overrides into `Settings`.

Every problem is collected and reported together, each naming the file and the key's dotted
path, so that one run of `check-config` shows everything there is to fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabricatord.config.schema import (
    MODALITY_KEY,
    SECTIONS,
    TABLE_ARRAYS,
    FhirDestination,
    Hl7Profile,
    ModalityOverride,
    Settings,
)
from fabricatord.config.tls import problems as tls_problems
from fabricatord.config.values import check_ae_title, check_uri

ENV_PREFIX = "FABRICATORD__"
CONFIG_VARIABLE = "FABRICATORD_CONFIG"
SYSTEM_CONFIG = Path("/etc/fabricatord/fabricatord.toml")
LOCAL_CONFIG = Path("conf/fabricatord.toml")
ROUTE_MATCH_KEYS = frozenset({"source", "modality", "calling_ae", "called_ae", "study_description"})
ROUTE_SOURCES = frozenset({"generated", "received", "any"})
PROFILE_MATCH_KEYS = frozenset({"sending_application", "sending_facility"})


@dataclass(frozen=True)
class ConfigProblem:
    origin: str
    """The file, `environment` or `defaults`."""
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.path}: {self.message}"


class ConfigError(Exception):
    """The settings cannot be used; `problems` lists every reason."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


SettingsCheck = Callable[[Settings], Iterable[tuple[str, str]]]
"""A check of a layer above config: yields (dotted path, message) for each problem."""


@dataclass(frozen=True)
class Located:
    """Which configuration a command reads, and why: users of DCMTK, Orthanc and systemd units
    expect one order everywhere, and a command that guessed must say what it found."""

    path: Path | None
    """None: the built-in defaults."""
    reason: str
    """How it was chosen: `--config`, `FABRICATORD_CONFIG`, `found`, or `nothing found`."""

    def describe(self) -> str:
        """One line for stderr, naming what was read."""
        if self.path is None:
            if self.reason == CONFIG_VARIABLE:
                return f"built-in defaults ({CONFIG_VARIABLE} is set and empty)"
            return f"built-in defaults (no {LOCAL_CONFIG} here, no {SYSTEM_CONFIG})"
        if self.reason == CONFIG_VARIABLE:
            return f"configuration {self.path} (from {CONFIG_VARIABLE})"
        return f"configuration {self.path}"


def locate(explicit: str | None, environ: Mapping[str, str], cwd: Path, system: Path = SYSTEM_CONFIG) -> Located:
    """`--config`, then `$FABRICATORD_CONFIG` (set and empty: the built-in defaults), then
    `conf/fabricatord.toml` under `cwd`, then `system`, else the built-in defaults."""
    if explicit:
        return Located(Path(explicit), "--config")
    if CONFIG_VARIABLE in environ:
        value = environ[CONFIG_VARIABLE]
        return Located(Path(value) if value else None, CONFIG_VARIABLE)
    for candidate in (cwd / LOCAL_CONFIG, system):
        if candidate.is_file():
            return Located(candidate, "found")
    return Located(None, "nothing found")


def load(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    checks: Iterable[SettingsCheck] = (),
) -> Settings:
    """Settings from `path` (None: built-in defaults) with environment overrides applied."""
    environ = os.environ if environ is None else environ
    problems: list[ConfigProblem] = []
    origin = str(path) if path is not None else "defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                raw = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError([ConfigProblem(origin, "-", f"cannot read: {exc.strerror}")]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([ConfigProblem(origin, "-", f"not valid TOML: {exc}")]) from exc
    base_dir = path.resolve().parent if path is not None else Path.cwd()
    builder = _Builder(origin, base_dir, problems)
    _apply_environment(raw, environ, problems)
    settings = builder.settings(raw)
    # Keys that failed above kept their defaults, so the checks that span keys still run:
    # one pass reports everything, a key once (its default may break a rule its value broke too).
    named = {problem.path for problem in problems}
    for check in (_cross_check, *checks):
        problems.extend(ConfigProblem(origin, where, what) for where, what in check(settings) if where not in named)
    if problems:
        raise ConfigError(problems)
    node = settings.node
    if not node.data_dir.is_absolute():
        node = dataclasses.replace(node, data_dir=Path(os.path.normpath(base_dir / node.data_dir)))
    return dataclasses.replace(settings, node=node, source=path)


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str], problems: list[ConfigProblem]) -> None:
    """Fold `FABRICATORD__SECTION__KEY=value` into the raw tree as strings marked for parsing."""
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        section_cls = SECTIONS.get(parts[0])
        fields = {f.name: f for f in dataclasses.fields(section_cls)} if section_cls else {}
        if len(parts) != 2 or parts[1] not in fields or parts[1] in ("modality", "profiles", "destinations"):
            problems.append(
                ConfigProblem(
                    "environment",
                    name,
                    "not a scalar key FABRICATORD__SECTION__KEY of a known section",
                )
            )
            continue
        raw.setdefault(parts[0], {})[parts[1]] = _EnvValue(value)


@dataclass(frozen=True)
class _EnvValue:
    text: str


class _Builder:
    def __init__(self, origin: str, base_dir: Path, problems: list[ConfigProblem]) -> None:
        self.origin = origin
        self.base_dir = base_dir
        self.problems = problems

    def problem(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.origin, path, message))

    def settings(self, raw: dict[str, Any]) -> Settings:
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name in SECTIONS:
                if isinstance(value, dict):
                    values[name] = self.section(SECTIONS[name], value, name)
                else:
                    self.problem(name, "expected a table [" + name + "]")
            elif name in TABLE_ARRAYS:
                if isinstance(value, list) and all(isinstance(v, dict) for v in value):
                    values[name] = [
                        self.section(TABLE_ARRAYS[name], item, f"{name}[{i}]") for i, item in enumerate(value)
                    ]
                else:
                    self.problem(name, f"expected an array of tables [[{name}]]")
            else:
                known = ", ".join(sorted([*SECTIONS, *TABLE_ARRAYS]))
                self.problem(name, f"unknown section (known: {known})")
        return Settings(**values)

    def section(self, cls: type, raw: dict[str, Any], path: str) -> Any:
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in raw.items():
            where = f"{path}.{name}"
            spec = fields.get(name)
            if spec is None:
                self.problem(where, f"unknown key (known: {', '.join(fields)})")
                continue
            converted = self.value(hints[name], value, where)
            if converted is _INVALID:
                continue
            check = spec.metadata.get("check")
            message = check(converted) if check else None
            if message:
                self.problem(where, f"expected {message}, got {_show(value)}")
                continue
            values[name] = converted
        return cls(**values)

    def value(self, hint: Any, value: Any, where: str) -> Any:
        from_env = isinstance(value, _EnvValue)
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        expected, converted = _INVALID_PAIR
        if origin in (types.UnionType, typing.Union) and type(None) in args:
            inner = next(a for a in args if a is not type(None))
            if from_env and value.text == "":
                return None
            return self.value(inner, value, where)
        if origin in (types.UnionType, typing.Union) and bool in args:  # a switch with named modes
            names = next(typing.get_args(a) for a in args if typing.get_origin(a) is typing.Literal)
            expected = "true, false or one of " + ", ".join(repr(a) for a in names)
            text = value.text if from_env else value
            if text in names:
                converted = text
            else:
                converted = _parse_bool(text) if from_env else value if isinstance(value, bool) else _INVALID
        elif origin is typing.Literal:
            expected = "one of " + ", ".join(repr(a) for a in args)
            text = value.text if from_env else value
            converted = text if text in args else _INVALID
        elif hint is bool:
            expected = "true or false"
            converted = _parse_bool(value.text) if from_env else value if isinstance(value, bool) else _INVALID
        elif hint is int:
            expected = "a whole number"
            converted = _parse_int(value.text) if from_env else value if _is_int(value) else _INVALID
        elif hint is str:
            expected = "a string"
            converted = value.text if from_env else value if isinstance(value, str) else _INVALID
        elif hint is Path:
            expected = "a path"
            text = value.text if from_env else value
            converted = Path(os.path.normpath(self.base_dir / text)) if isinstance(text, str) and text else _INVALID
        elif origin is list and args == (str,):
            expected = "an array of strings"
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            converted = list(value) if ok else _INVALID
        elif origin is dict and args == (str, str):
            expected = "a table of strings"
            ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
            converted = dict(value) if ok else _INVALID
        elif origin is list and args[0] is Hl7Profile:
            expected = "tables [[hl7.profiles]]"
            if isinstance(value, list) and all(isinstance(item, dict) for item in value):
                converted = [self.section(Hl7Profile, item, f"{where}[{i}]") for i, item in enumerate(value)]
        elif origin is list and args[0] is FhirDestination:
            expected = "tables [[fhir.destinations]]"
            if isinstance(value, list) and all(isinstance(item, dict) for item in value):
                converted = [self.section(FhirDestination, item, f"{where}[{i}]") for i, item in enumerate(value)]
        elif origin is dict and args[1] is ModalityOverride:
            expected = "tables such as [synth.modality.CT]"
            if isinstance(value, dict):
                converted = {}
                for code, table in value.items():
                    if not MODALITY_KEY.match(code) or not isinstance(table, dict):
                        self.problem(
                            f"{where}.{code}",
                            "expected a two-letter upper-case modality table such as CT",
                        )
                        continue
                    converted[code] = self.section(ModalityOverride, table, f"{where}.{code}")
        if converted is _INVALID:
            self.problem(where, f"expected {expected}, got {_show(value)}")
        return converted


_INVALID: Any = object()
_INVALID_PAIR: tuple[str, Any] = ("a valid value", _INVALID)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_int(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return _INVALID


def _parse_bool(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    return _INVALID


def _show(value: Any) -> str:
    if isinstance(value, _EnvValue):
        return f"{value.text!r} (from the environment)"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _cross_check(settings: Settings) -> Iterable[tuple[str, str]]:
    """Rules that span keys: peer names, route targets, the production guard."""
    seen: set[str] = set()
    for index, peer in enumerate(settings.peers):
        where = f"peers[{index}]"
        if not peer.name:
            yield f"{where}.name", "every peer needs a name"
        elif peer.name in seen:
            yield f"{where}.name", f"peer name {peer.name!r} is used twice"
        seen.add(peer.name)
        if not peer.ae_title:
            yield f"{where}.ae_title", "every peer needs an ae_title"
    for index, route in enumerate(settings.routes):
        where = f"routes[{index}]"
        for match_key, pattern in route.match.items():
            if match_key not in ROUTE_MATCH_KEYS:
                yield (
                    f"{where}.match.{match_key}",
                    f"unknown match key (known: {', '.join(sorted(ROUTE_MATCH_KEYS))})",
                )
            elif match_key == "source" and pattern not in ROUTE_SOURCES:
                yield f"{where}.match.source", "expected generated, received or any"
            elif match_key == "study_description":
                try:
                    re.compile(pattern)
                except re.error as exc:
                    yield f"{where}.match.study_description", f"not a regular expression: {exc}"
        if not route.to:
            yield f"{where}.to", "a route needs at least one peer"
        for target in route.to:
            destination = settings.peer(target)
            if destination is None:
                yield f"{where}.to", f"no [[peers]] entry is named {target!r}"
            elif destination.environment == "prod" and not route.allow_prod:
                yield (
                    f"{where}.to",
                    f"peer {target!r} is prod: the route must say allow_prod = true",
                )
    for index, profile in enumerate(settings.hl7.profiles):
        for match_key in profile.match:
            if match_key not in PROFILE_MATCH_KEYS:
                yield (
                    f"hl7.profiles[{index}].match.{match_key}",
                    f"unknown match key (known: {', '.join(sorted(PROFILE_MATCH_KEYS))})",
                )
    for modality, station in settings.hl7.modality_station.items():
        problem = check_ae_title(station)
        if problem:
            yield f"hl7.modality_station.{modality}", f"expected {problem}, got {station!r}"
    if settings.synth.mpps_peer != "self" and settings.peer(settings.synth.mpps_peer) is None:
        yield (
            "synth.mpps_peer",
            f"expected 'self' or a [[peers]] name, got {settings.synth.mpps_peer!r}",
        )
    names: set[str] = set()
    for index, proxy in enumerate(settings.proxies):
        where = f"proxies[{index}]"
        if not proxy.name or proxy.name in names or "/" in proxy.name:
            yield f"{where}.name", "every proxy needs a name of its own (no `/`)"
        names.add(proxy.name)
        if not proxy.ae_title or proxy.ae_title == settings.node.ae_title:
            yield f"{where}.ae_title", "a proxy needs an AE title of its own, not the node's"
        elif sum(p.ae_title == proxy.ae_title for p in settings.proxies) > 1:
            yield f"{where}.ae_title", f"AE title {proxy.ae_title!r} is used by two proxies"
        backend = settings.peer(proxy.to)
        if backend is None:
            yield f"{where}.to", f"no [[peers]] entry is named {proxy.to!r}"
        elif backend.ae_title == settings.node.ae_title or settings.proxy(backend.ae_title) is not None:
            yield f"{where}.to", f"peer {proxy.to!r} is this node ({backend.ae_title}): a proxy forwards to another"
        elif backend.environment == "prod" and not proxy.allow_prod:
            yield f"{where}.to", f"peer {proxy.to!r} is prod: the proxy must say allow_prod = true"
        if not proxy.key_file.name:
            yield f"{where}.key_file", "a proxy needs a key file (fabricatord proxy keygen > FILE)"
        elif not proxy.key_file.is_file():
            yield f"{where}.key_file", f"{proxy.key_file} does not exist or is not a file"
    for issuer, system in settings.fhir.issuer_systems.items():
        problem = check_uri(system)
        if problem:
            yield f"fhir.issuer_systems.{issuer}", f"expected {problem}, got {system!r}"
    servers: set[str] = set()
    for index, server in enumerate(settings.fhir.destinations):
        where = f"fhir.destinations[{index}]"
        if not server.name or server.name in servers:
            yield f"{where}.name", "every FHIR destination needs a name of its own"
        servers.add(server.name)
        if not server.url:
            yield f"{where}.url", "a FHIR destination needs the server's base URL"
    yield from tls_problems(settings)
    if settings.node.workers > 1 and not settings.shared:
        yield "node.workers", "more than one worker process needs PostgreSQL ([node] database): SQLite has one writer"
    if settings.dicom.file_naming == "instance-number" and settings.dicom.storage_layout == "flat":
        yield (
            "dicom.file_naming",
            "instance-number needs a layout with a folder per series or study: in `flat` every series' "
            "instance 1 would share one name",
        )
    if not 0 <= settings.synth.min_age <= settings.synth.max_age <= 120:
        yield "synth.min_age", "expected 0 <= min_age <= max_age <= 120"
