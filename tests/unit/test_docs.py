"""The documents users read name every configuration key and every command."""

from __future__ import annotations

import dataclasses

from fabricatord.cli import build_parser
from fabricatord.config.schema import SECTIONS, TABLE_ARRAYS, FhirDestination, Hl7Profile, ModalityOverride
from tests.conftest import ROOT


def test_configuration_doc_lists_every_key() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for title, cls in [
        *((f"[{n}]", c) for n, c in SECTIONS.items()),
        ("[synth.modality.XX]", ModalityOverride),
        ("[[hl7.profiles]]", Hl7Profile),
        ("[[fhir.destinations]]", FhirDestination),
        *((f"[[{n}]]", c) for n, c in TABLE_ARRAYS.items()),
    ]:
        section = text.split(f"## {title}\n", 1)
        assert len(section) == 2, f"docs/configuration.md has no section {title}"
        body = section[1].split("\n## ", 1)[0]
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in body, f"{title} {field.name} is not documented"


def test_shipped_config_mentions_every_scalar_key() -> None:
    text = (ROOT / "conf" / "fabricatord.toml").read_text()
    for name, cls in SECTIONS.items():
        assert f"[{name}]" in text
        for field in dataclasses.fields(cls):
            if field.name not in ("modality", "profiles", "destinations"):
                assert f"{field.name} =" in text, f"conf/fabricatord.toml lacks {name}.{field.name}"


def test_readme_shows_every_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in commands:
        assert f"fabricatord {command}" in readme or (command == "serve" and "scripts/run" in readme), command


def test_operations_doc_lists_every_metric() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from fabricatord.obs import metrics

    text = (ROOT / "docs" / "operations.md").read_text()
    names = [
        value._name + ("_total" if value._type == "counter" else "")
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
    ]
    assert len(names) > 30 and "fabricatord_sent_bytes_total" in names
    assert [name for name in names if f"`{name}`" not in text] == []


def test_console_doc_lists_every_api_route() -> None:
    from unittest.mock import MagicMock

    from fabricatord.servers.http import router
    from fabricatord.servers.http.department import Department

    text = (ROOT / "docs" / "console.md").read_text()
    table = router(Department(MagicMock(), MagicMock(), MagicMock(), MagicMock()))
    for route in table.routes:
        if route.pattern.startswith("/api/"):
            assert f"| {route.method} | `{route.pattern}` |" in text, (route.method, route.pattern)
        elif not route.pattern.startswith(("/static", "/login", "/logout")) and route.method == "GET":
            page = route.pattern.split("/{")[0] or "/"
            assert f"`{page}" in text, route.pattern
