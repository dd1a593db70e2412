"""The container files hold together: compose parses (Debian's docker-compose needs no engine),
the image runs as a user with a health check, the mounted config is valid, and every metric the
Grafana dashboard queries is one the daemon exports."""

from __future__ import annotations

import json
import re
import subprocess

from prometheus_client import REGISTRY

from fabricatord.config import load
from fabricatord.hl7.mapping import profile_problems
from fabricatord.obs import metrics  # noqa: F401  (declares every metric)
from fabricatord.synth.checks import settings_problems
from tests.conftest import ROOT, need

DOCKER = ROOT / "docker"


def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        [need("docker-compose"), "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_the_image_is_multi_stage_non_root_and_checks_its_health() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) == 2
    assert "\nUSER fabricatord\n" in dockerfile and "HEALTHCHECK" in dockerfile and "/readyz" in dockerfile


def test_the_mounted_config_is_valid() -> None:
    settings = load(DOCKER / "fabricatord.toml", environ={}, checks=[settings_problems, profile_problems])
    assert settings.peer("orthanc") is not None and settings.routes[0].verify


def test_the_dashboard_queries_only_metrics_that_exist() -> None:
    dashboard = json.loads((DOCKER / "grafana" / "fabricatord.json").read_text())
    suffixes = ("", "_total", "_bucket", "_count", "_sum")
    exported = {family.name + suffix for family in REGISTRY.collect() for suffix in suffixes}
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"fabricatord_[a-z0-9_]+", target["expr"])
    }
    assert queried and queried <= exported, queried - exported
