from __future__ import annotations

from pathlib import Path

import pytest

from fabricatord.config import ConfigError, load, locate
from fabricatord.synth.checks import settings_problems
from tests.conftest import ROOT
from tests.pki import make_material

DESIGN_EXAMPLE = """
[node]
ae_title = "FABRICATORD"
data_dir = "var"

[dicom]
host = "127.0.0.1"
port = 11112

[hl7]
host = "127.0.0.1"
port = 2575

[http]
host = "127.0.0.1"
port = 8080

[synth]
acquisition = "immediate"
acquisition_delay = "0s"
seed = 1234

[[peers]]
name = "orthanc"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

[[routes]]
name = "generated-to-orthanc"
match = { source = "generated" }
to = ["orthanc"]
"""


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, environ=environ or {}, checks=[settings_problems])
    return [str(p) for p in info.value.problems]


def test_defaults_without_a_file() -> None:
    settings = load(None, environ={})
    assert settings.node.ae_title == "FABRICATORD"
    assert (settings.dicom.port, settings.hl7.port, settings.http.port) == (11112, 2575, 8080)
    assert settings.http.host == "127.0.0.1"
    assert settings.node.data_dir.is_absolute()
    assert settings.database_url.startswith("sqlite:///")


def test_design_example_and_shipped_file_are_valid(write_config) -> None:
    settings = load(write_config(DESIGN_EXAMPLE), environ={}, checks=[settings_problems])
    assert settings.synth.seed == 1234
    assert settings.peer("orthanc") is not None and settings.peer("orthanc").port == 4242
    assert settings.routes[0].match == {"source": "generated"}
    shipped = load(ROOT / "conf" / "fabricatord.toml", environ={}, checks=[settings_problems])
    assert shipped.node.data_dir == ROOT / "var"


def test_relative_data_dir_is_taken_from_the_file_folder(write_config, tmp_path: Path) -> None:
    settings = load(write_config('[node]\ndata_dir = "here"\n'), environ={})
    assert settings.node.data_dir == tmp_path / "here"


def test_environment_overrides_scalars(write_config) -> None:
    path = write_config("[dicom]\nport = 104\n")
    settings = load(
        path,
        environ={
            "FABRICATORD__DICOM__PORT": "11113",
            "FABRICATORD__LOG__PHI": "true",
            "FABRICATORD__SYNTH__SEED": "7",
        },
    )
    assert settings.dicom.port == 11113
    assert settings.log.phi is True
    assert settings.synth.seed == 7


def test_every_problem_is_reported_with_file_and_key(write_config) -> None:
    path = write_config(
        """
[node]
ae_title = "A TITLE THAT IS FAR TOO LONG"
colour = "blue"

[dicom]
port = "eleven"
duplicates = "reject"

[bogus]
x = 1
"""
    )
    found = problems(path, {"FABRICATORD__DICOM__MAX_ASSOCIATIONS": "many"})
    text = "\n".join(found)
    assert all(line.startswith(str(path)) or line.startswith("environment") for line in found)
    assert "node.ae_title" in text and "AE title" in text
    assert "node.colour: unknown key" in text
    assert "dicom.port: expected a whole number, got 'eleven'" in text
    assert "dicom.duplicates: expected one of 'keep', 'overwrite'" in text
    assert "bogus: unknown section" in text
    assert "dicom.max_associations" in text and "from the environment" in text
    assert len(found) == 6


def test_unknown_environment_key_is_named(write_config) -> None:
    found = problems(write_config(""), {"FABRICATORD__DICOM__PROT": "1"})
    assert found == [
        "environment: FABRICATORD__DICOM__PROT: not a scalar key FABRICATORD__SECTION__KEY of a known section"
    ]


def test_routes_and_peers_are_cross_checked(write_config) -> None:
    path = write_config(
        """
[[peers]]
name = "pacs"
ae_title = "PACS"
environment = "prod"

[[peers]]
name = "pacs"
ae_title = "PACS2"

[[routes]]
name = "r1"
match = { source = "sometimes", colour = "x" }
to = ["pacs", "nowhere"]
"""
    )
    text = "\n".join(problems(path))
    assert "peers[1].name: peer name 'pacs' is used twice" in text
    assert "routes[0].match.source" in text
    assert "routes[0].match.colour: unknown match key" in text
    assert "no [[peers]] entry is named 'nowhere'" in text
    assert "peer 'pacs' is prod: the route must say allow_prod = true" in text


def test_pattern_that_cannot_fit_its_vr_is_a_config_error(write_config) -> None:
    path = write_config('[synth]\naccession_pattern = "{YYYY}{MM}{DD}{9digits}"\npatient_id_pattern = "X{oops}"\n')
    text = "\n".join(problems(path))
    assert "synth.accession_pattern" in text and "up to 17 characters" in text and "SH" in text
    assert "synth.patient_id_pattern: unknown placeholder {oops}" in text


def test_modality_overrides(write_config) -> None:
    settings = load(write_config("[synth.modality.CT]\nimages = 200\n"), environ={}, checks=[settings_problems])
    assert settings.modality("ct").images == 200
    assert settings.modality("MR").images == 0
    text = "\n".join(problems(write_config("[synth.modality.XX]\nimages = 2\n[synth.modality.ct]\nimages = 1\n")))
    assert "synth.modality.XX: no template for XX" in text
    assert "synth.modality.ct: expected a two-letter upper-case modality" in text


def test_unreadable_and_invalid_toml(tmp_path: Path, write_config) -> None:
    assert "cannot read" in problems(tmp_path / "missing.toml")[0]
    assert "not valid TOML" in problems(write_config("[node\n"))[0]


def test_every_command_finds_its_file_in_one_order(tmp_path: Path) -> None:
    """--config, then $FABRICATORD_CONFIG (empty: the defaults), then ./conf/fabricatord.toml,
    then the system file, else the defaults; and a found file is named."""
    system = tmp_path / "etc" / "fabricatord.toml"
    here = tmp_path / "work"
    local = here / "conf" / "fabricatord.toml"
    assert locate("given.toml", {"FABRICATORD_CONFIG": "env.toml"}, here, system).path == Path("given.toml")
    assert locate(None, {"FABRICATORD_CONFIG": "env.toml"}, here, system).path == Path("env.toml")
    empty = locate(None, {"FABRICATORD_CONFIG": ""}, here, system)
    assert empty.path is None and "FABRICATORD_CONFIG is set and empty" in empty.describe()
    nothing = locate(None, {}, here, system)
    assert nothing.path is None and "no conf/fabricatord.toml here" in nothing.describe()
    system.parent.mkdir(parents=True)
    system.write_text("")
    assert locate(None, {}, here, system).path == system
    local.parent.mkdir(parents=True)
    local.write_text("")
    found = locate(None, {}, here, system)
    assert found.path == local and found.describe() == f"configuration {local}"


def test_a_proxy_needs_its_own_ae_title_a_backend_and_a_key_file(tmp_path: Path) -> None:
    (tmp_path / "proxy.key").write_text("x")
    config = tmp_path / "f.toml"
    config.write_text(
        '[[peers]]\nname = "pacs"\nae_title = "PACS"\nenvironment = "prod"\n'
        '[[proxies]]\nname = "a"\nae_title = "FABRICATORD"\nto = "pacs"\nkey_file = "proxy.key"\n'
        '[[proxies]]\nname = "a"\nae_title = "ANON"\nto = "nowhere"\nkey_file = "missing.key"\n'
    )
    found = problems(config)
    assert any("proxies[0].ae_title" in p and "node's" in p for p in found)
    assert any("proxies[0].to" in p and "prod" in p for p in found)
    assert any("proxies[1].name" in p for p in found)
    assert any("proxies[1].to" in p and "nowhere" in p for p in found)
    assert any("proxies[1].key_file" in p and "missing.key" in p for p in found)


def test_tls_files_are_checked_and_what_needs_them_is_named(tmp_path: Path) -> None:
    material = make_material(tmp_path / "pki")
    (tmp_path / "junk.pem").write_text("not a certificate")
    config = tmp_path / "f.toml"
    config.write_text(
        '[tls]\ncertificate = "pki/server.crt"\nprivate_key = "pki/client.key"\nca = "missing.pem"\n'
        '[[peers]]\nname = "pacs"\nae_title = "PACS"\ntls = true\n'
    )
    found = problems(config)
    assert any("tls.private_key" in p and "not the key of" in p for p in found)
    assert any("tls.ca" in p and "missing.pem" in p for p in found)
    config.write_text('[tls]\ncertificate = "junk.pem"\n[dicom]\nplain = false\n[hl7]\nplain = false\n')
    found = problems(config)
    assert any("tls.certificate" in p and "not a PEM file" in p for p in found)
    assert any("tls.private_key" in p and "its private key" in p for p in found)
    assert any("tls.ca" in p and "verify_client" in p for p in found)
    config.write_text('[http]\nplain = false\n[[peers]]\nname = "pacs"\nae_title = "PACS"\ntls = true\n')
    found = problems(config)
    assert any("http.plain" in p and "no port open" in p for p in found)
    assert any("peers[0].tls" in p for p in found)
    config.write_text(
        f'[tls]\ncertificate = "{material.server_cert}"\nprivate_key = "{material.server_key}"\nca = "{material.ca}"\n'
        '[dicom]\nplain = false\n[[peers]]\nname = "pacs"\nae_title = "PACS"\ntls = true\n'
    )
    settings = load(config)
    assert settings.tls.certificate == material.server_cert and settings.dicom.tls_port == 2762
    assert settings.peers[0].tls and not settings.dicom.plain


def test_an_encrypted_tls_key_is_refused_by_name(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    material = make_material(tmp_path / "pki")
    key = serialization.load_pem_private_key(material.server_key.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    config = tmp_path / "f.toml"
    config.write_text(
        f'[tls]\ncertificate = "{material.server_cert}"\nprivate_key = "locked.key"\nverify_client = false\n'
    )
    assert any("tls.private_key" in p and "encrypted" in p for p in problems(config))
