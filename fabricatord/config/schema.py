"""Typed settings, one frozen dataclass per section.

Each field carries its documentation and an optional check in its metadata, so that the loader,
`check-config` and docs/configuration.md all speak of the same keys.
"""

from __future__ import annotations

import random
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fabricatord.config.values import (
    check_ae_title,
    check_codec,
    check_duration,
    check_duration_range,
    check_host,
    check_networks,
    check_node_name,
    check_port,
    check_positive,
    check_size,
    check_uid_root,
    check_uri,
    parse_duration_range,
)

Check = Callable[[Any], str | None]


def key(default: Any, doc: str, check: Check | None = None) -> Any:
    """A settings field: its default, one line for the docs and an optional value check."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, "check": check})
    return field(default=default, metadata={"doc": doc, "check": check})


LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
Duplicates = Literal["keep", "overwrite"]
DatesOption = Literal["remove", "keep", "shift"]
BurnedIn = Literal["clean", "refuse"]
StorageLayout = Literal["study/series", "study", "patient", "patient/study/series", "date", "received-date", "flat"]
FileNaming = Literal["sop-uid", "instance-number", "timestamp", "sequence"]
Acquisition = Literal["immediate", "delay", "on_query", "manual"]
TransferSyntaxName = Literal["explicit", "implicit", "rle", "jpeg2000-lossless", "jpegls-lossless"]
Environment = Literal["test", "prod"]
MissingPolicy = Literal["generate", "reject"]
OruPolicy = Literal["complete", "ignore"]


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = key("FABRICATORD", "Our AE title; also the MLLP receiving application.", check_ae_title)
    data_dir: Path = key(
        Path("var"),
        "Database and stored files. A relative path is taken from the config file's folder.",
    )
    uid_root: str = key(
        "2.25",
        "Root of every UID we make. `2.25` derives UIDs from random UUIDs (PS3.5 B.2); an "
        "organisational root such as `1.2.826.0.1.3680043.10.999` gets a numeric suffix.",
        check_uid_root,
    )
    database: str = key(
        "",
        "SQLAlchemy URL of the database. Empty: SQLite at `data_dir/fabricatord.sqlite`. "
        "PostgreSQL: `postgresql+psycopg://user:pass@host/db`.",
    )
    shutdown_grace: str = key(
        "10s", "How long in-flight work may run after SIGTERM before it is aborted.", check_duration
    )
    name: str = key(
        "",
        "This daemon among several on one PostgreSQL: its jobs' leases, its temporary files and its lock "
        "carry the name. Empty: the host name. Letters, digits, `.`, `_` and `-`, at most 64.",
        check_node_name,
    )
    lease: str = key(
        "30s",
        "How long this node's claimed jobs and the leader's role stay its own without a heartbeat (one every "
        "third of it): after a node dies, another takes its jobs after this.",
        check_duration,
    )
    workers: int = key(
        1,
        "Processes that accept DICOM and MLLP connections on the same ports, for more than one core; the "
        "first also serves HTTP and runs the jobs. More than one needs PostgreSQL.",
        check_positive,
    )


@dataclass(frozen=True)
class LogSettings:
    level: LogLevel = key("info", "Lowest level logged.")
    format: LogFormat = key("auto", "`json` lines, `console` text, or `auto`: console on a terminal, JSON otherwise.")
    phi: bool = key(False, "Log patient names and IDs. Off: they are replaced by `***`.")


@dataclass(frozen=True)
class DicomSettings:
    host: str = key("127.0.0.1", "Address the DICOM listener binds.", check_host)
    port: int = key(11112, "DICOM listener port.", check_port)
    tls_port: int = key(
        2762, "DICOM over TLS (the registered dicom-tls port), open when `[tls]` has a certificate.", check_port
    )
    plain: bool = key(True, "Keep the plain `port` open beside the TLS one; false: TLS only.")
    max_associations: int = key(
        20, "Concurrent associations, over every worker process; the excess is rejected (RJ 2/3/2).", check_positive
    )
    max_pdu: int = key(
        1048576,
        "Largest P-DATA PDU we accept, in bytes: 1 MiB carries a CT image in one PDU (as fast as no limit) "
        "and bounds what one association can make us hold in memory; 0 means no limit.",
    )
    max_dataset_size: str = key(
        "4GiB",
        "Largest C-STORE dataset we receive (it goes to a file in data_dir/tmp); a larger one aborts the "
        "association. Query identifiers and MPPS datasets are held in memory and limited to 16 MiB.",
        check_size,
    )
    acse_timeout: str = key("30s", "Association negotiation and release timeout.", check_duration)
    dimse_timeout: str = key("30s", "Wait for a DIMSE message.", check_duration)
    network_timeout: str = key("60s", "An idle association is aborted after this.", check_duration)
    connect_timeout: str = key("10s", "TCP connect timeout of outgoing associations.", check_duration)
    peer_echo_interval: str = key(
        "60s",
        "How often every `[[peers]]` entry is C-ECHOed for `fabricatord_peer_up` (looked at every 15 s); `0`: never.",
        check_duration,
    )
    require_known_ae: bool = key(
        False, "Only calling AE titles listed in `[[peers]]` may associate (RJ 1/1/3); with no peers, none may."
    )
    allowed_hosts: list[str] = key(
        [], "Addresses or networks (`10.1.2.3`, `10.1.0.0/16`) that may connect; empty: any.", check_networks
    )
    allow_move_to_prod: bool = key(
        False,
        'A C-MOVE a peer asks us to make into a `[[peers]]` entry with `environment = "prod"`: refused with 0xA801 '
        "and a log line unless this is true.",
    )
    worklist_filter_by_calling_ae: bool = key(
        False,
        "A worklist query without a Scheduled Station AE Title gets only the steps scheduled for the calling AE, "
        "as Orthanc's `FilterIssuerAet`.",
    )
    audit: bool = key(True, "Record every association and DIMSE operation in the audit table (`fabricatord audit`).")
    max_find_results: int = key(
        10000,
        "More matches than this answers C-FIND with 0xA700 (out of resources).",
        check_positive,
    )
    duplicates: Duplicates = key(
        "keep",
        "A second instance with a known SOP Instance UID but other content: `keep` the first or `overwrite`.",
    )
    storage_layout: StorageLayout = key(
        "study/series",
        "Folders under `data_dir/storage` for new files: `study/series`, `study` (one folder per study), "
        "`patient` or its other name `patient/study/series`, `date` (YYYY/MM/DD of the StudyDate/study/series), "
        "`received-date` (YYYY/MM/DD of arrival/study/series) or `flat`.",
    )
    file_naming: FileNaming = key(
        "sop-uid",
        "Names of new files: `sop-uid` (`<SOPInstanceUID>.dcm`), `instance-number` (`<InstanceNumber>.dcm`; "
        "not with the `flat` layout), `timestamp` (arrival to the microsecond) or `sequence` (a database "
        "counter). A name taken in its folder gets `-2`, `-3`, …",
    )
    storage_quota: str = key(
        "0",
        "Most bytes stored instances may take (`50GiB`, `500MB`); beyond it C-STORE answers 0xA700. `0`: no quota.",
        check_size,
    )
    min_free_space: str = key(
        "0",
        "Free space the disk of data_dir keeps; an instance that would leave less is refused with 0xA700. `0`: none.",
        check_size,
    )
    retention: str = key(
        "0",
        "How long a study is kept after its last instance arrived (`30d`, `12h`) before cleanup may delete "
        "it; `0`: no age limit.",
        check_duration,
    )
    commitment_retention: str = key(
        "7d",
        "Cleanup never deletes a study with an instance we committed to (Storage Commitment) within this long.",
        check_duration,
    )
    cleanup: bool = key(
        False,
        "Delete whole studies instead of refusing new ones: daily those older than `retention`, and when "
        "`storage_quota` or `min_free_space` is reached the oldest eligible ones, until storage is under 90 % "
        "of the quota. Never a study younger than `retention` or with pending jobs.",
    )


@dataclass(frozen=True)
class Hl7Profile:
    """`[[hl7.profiles]]`: where one sender's dialect keeps what the worklist needs."""

    name: str = key("", "Profile name, shown in logs and `fabricatord hl7 log`.")
    match: dict[str, str] = key(
        {},
        "`sending_application` and/or `sending_facility` (MSH-3, MSH-4) this profile serves; "
        "the first profile that matches wins, and one without `match` serves every sender.",
    )
    fields: dict[str, str] = key(
        {},
        'Where a mapped value is read instead of the default: `accession_number = "OBR-3.1"`; '
        "alternatives separated by commas, the first with a value wins (names in docs/hl7.md).",
    )
    study_instance_uid: MissingPolicy = key(
        "generate", "A message without a Study Instance UID: `generate` one, or `reject` it (AE, ERR 101)."
    )
    accession_number: MissingPolicy = key(
        "generate",
        "A message without an accession number: `generate` one from `[synth] accession_pattern`, or `reject` it.",
    )


@dataclass(frozen=True)
class Hl7Settings:
    host: str = key("127.0.0.1", "Address the MLLP listener binds.", check_host)
    port: int = key(2575, "MLLP listener port.", check_port)
    tls_port: int = key(2576, "MLLP over TLS, open when `[tls]` has a certificate.", check_port)
    plain: bool = key(True, "Keep the plain `port` open beside the TLS one; false: TLS only.")
    max_message_bytes: int = key(
        10 * 1024 * 1024,
        "Largest HL7 frame accepted (bytes); a larger one is answered AR and the connection closed.",
        check_positive,
    )
    default_charset: str = key(
        "iso-8859-1", "Charset for messages without MSH-18 that are not valid UTF-8.", check_codec
    )
    idle_timeout: str = key(
        "10m", "A connection that sends nothing for this long is closed (senders reconnect).", check_duration
    )
    max_connections: int = key(
        100, "Concurrent MLLP connections, per worker process; the excess is closed at once.", check_positive
    )
    oru: OruPolicy = key(
        "complete",
        "What an ORU^R01 does: `complete` marks its order and steps COMPLETED, `ignore` only acknowledges it.",
    )
    procedure_modality: dict[str, str] = key(
        {}, 'Requested procedure code → modality, for orders that name no modality: `{ CTHEAD = "CT" }`.'
    )
    modality_station: dict[str, str] = key(
        {}, 'Modality → Scheduled Station AE Title, for orders that name no station: `{ CT = "CT01" }`.'
    )
    profiles: list[Hl7Profile] = key([], "Field-mapping profiles per sender: `[[hl7.profiles]]` (docs/hl7.md).")


@dataclass(frozen=True)
class HttpSettings:
    host: str = key("127.0.0.1", "Address the HTTP endpoint binds.", check_host)
    port: int = key(8080, "HTTP port (metrics, health, the API and the console).", check_port)
    tls_port: int = key(
        8443, "HTTPS, open when `[tls]` has a certificate; its session cookies are always Secure.", check_port
    )
    plain: bool = key(True, "Keep the plain `port` open beside the HTTPS one; false: HTTPS only.")
    cookie_secure: bool = key(
        False,
        "Mark the session cookie `Secure`: set it when a TLS proxy serves the console, so that the "
        "browser never sends the cookie over plain HTTP.",
    )
    session_idle: str = key("8h", "A console session unused this long ends; the user signs in again.", check_duration)
    status_requires_login: bool = key(
        False,
        "`/api/v1/status` (counts, no PHI) needs a user too. `/metrics`, `/healthz` and `/readyz` stay open.",
    )


def _check_policy(value: object) -> str | None:
    policies = ("", "immediate", "delay", "on_query", "manual")
    return None if value in policies else "immediate, delay, on_query or manual (or empty)"


@dataclass(frozen=True)
class ModalityOverride:
    """`[synth.modality.XX]`: what a study of this modality looks like by default."""

    series: int = key(0, "Series per study; 0 keeps the template's default.")
    images: int = key(0, "Images per series; 0 keeps the template's default.")
    rows: int = key(0, "Image rows; 0 keeps the template's default.")
    columns: int = key(0, "Image columns; 0 keeps the template's default.")
    study_description: str = key("", "Study Description; empty keeps the template's default.")
    transfer_syntax: str = key("", "Transfer syntax for this modality; empty uses `[synth] transfer_syntax`.")
    acquisition: str = key("", "Acquisition policy for this modality; empty uses `[synth] acquisition`.", _check_policy)
    acquisition_delay: str = key(
        "",
        "Delay for this modality; empty uses `[synth] acquisition_delay`.",
        lambda value: check_duration_range(value) if value else None,
    )


@dataclass(frozen=True)
class SynthSettings:
    acquisition: Acquisition = key(
        "immediate",
        "What a new worklist item triggers: `immediate`, `delay`, `on_query` or `manual`.",
    )
    acquisition_delay: str = key("0s", "For `delay`: a duration (`30s`) or a range (`10s-60s`).", check_duration_range)
    seed: int | None = key(
        None,
        "Same seed into a fresh data_dir: the same patients, identifiers, UIDs and pixels. Unset: random.",
    )
    locale: str = key("en_US", "Faker locale of names and addresses (`de_DE`, `fr_FR`, `ja_JP` …).")
    min_age: int = key(1, "Youngest synthetic patient, in years.")
    max_age: int = key(90, "Oldest synthetic patient, in years.")
    patient_id_pattern: str = key("PID{7digits}", "Pattern of new Patient IDs (see the pattern language).")
    patient_id_start: int = key(1, "First value of the Patient ID counter.")
    patient_id_step: int = key(1, "Step of the Patient ID counter.", check_positive)
    accession_pattern: str = key("{YYYY}{2letters}{7digits}", "Pattern of new accession numbers.")
    accession_start: int = key(1, "First value of the accession counter.")
    accession_step: int = key(1, "Step of the accession counter.", check_positive)
    issuer_of_patient_id: str = key("FABRICATORD", "Issuer of Patient ID written with every patient.")
    institution_name: str = key("Fabricatord General Hospital", "Institution Name in generated images.")
    transfer_syntax: TransferSyntaxName = key(
        "explicit",
        "Transfer syntax of generated files: `explicit`, `implicit`, `rle`, `jpeg2000-lossless`, `jpegls-lossless`.",
    )
    mpps_peer: str = key("self", "Where the simulated modality sends MPPS: `self` or a `[[peers]]` name.")
    procedure_templates: dict[str, str] = key(
        {},
        "Requested procedure code → the template (CR, DX, CT, MR, US, MG, SC) the simulated modality "
        'makes its study with, over the item\'s modality: `{ XRCHEST = "DX" }`.',
    )
    modality: dict[str, ModalityOverride] = key({}, "Per-modality overrides: `[synth.modality.CT]`.")


@dataclass(frozen=True)
class PeerSettings:
    name: str = key("", "Name used by routes and on the command line.")
    ae_title: str = key("", "The peer's AE title.", check_ae_title)
    host: str = key("127.0.0.1", "The peer's address.", check_host)
    port: int = key(104, "The peer's DICOM port.", check_port)
    environment: Environment = key("test", "`prod` peers receive nothing unless a route says `allow_prod`.")
    # What this peer may ask of us, as Orthanc's AllowEcho/AllowStore/AllowFind/AllowMove/AllowGet.
    allow_echo: bool = key(True, "May C-ECHO us.")
    allow_store: bool = key(True, "May C-STORE into us.")
    allow_find: bool = key(True, "May C-FIND (query/retrieve).")
    allow_find_worklist: bool = key(True, "May query the Modality Worklist.")
    allow_move: bool = key(True, "May C-MOVE from us.")
    allow_get: bool = key(True, "May C-GET from us.")
    allow_mpps: bool = key(True, "May send Modality Performed Procedure Step N-CREATE and N-SET.")
    allow_storage_commitment: bool = key(
        True, "May ask us for Storage Commitment (N-ACTION); its report goes back to this entry's address."
    )
    tls: bool = key(False, "Associations we open to it use TLS, verified against `[tls] ca`, with our certificate.")


@dataclass(frozen=True)
class ProxySettings:
    """`[[proxies]]`: an AE title of ours that de-identifies what it receives (PS3.15 Annex E)
    and forwards it to one backend peer, keeping the originals encrypted for re-identification."""

    name: str = key("", "Proxy name, for logs, route jobs (`proxy:NAME`) and `fabricatord reidentify`.")
    ae_title: str = key("", "The called AE title this proxy answers to (not the node's own).", check_ae_title)
    calling_aes: list[str] = key([], "Who may use it; empty: anyone the node admits.")
    to: str = key("", "The `[[peers]]` name of the backend that receives the de-identified copy.")
    allow_prod: bool = key(False, 'Allow `to` to be a peer with `environment = "prod"`.')
    retain_uids: bool = key(False, "Retain UIDs Option; otherwise each UID gets a keyed replacement.")
    dates: DatesOption = key(
        "remove",
        "`remove` (the profile), `keep` (Retain Longitudinal Temporal Information with Full Dates) or `shift` "
        "(… with Modified Dates: each patient's dates move back by one keyed offset).",
    )
    retain_device_identity: bool = key(False, "Retain Device Identity Option.")
    clean_descriptors: bool = key(
        False, "Clean Descriptors Option: descriptions kept with their identifying values masked; else removed."
    )
    burned_in: BurnedIn = key(
        "refuse",
        "An instance that says Burned In Annotation YES: `clean` blanks the text our templates draw (Clean "
        "Pixel Data Option), `refuse` answers it with a failure. Never forwarded as it is.",
    )
    keep_original: bool = key(
        False, "Also keep the original instance (encrypted), so re-identified files get their pixels."
    )
    key_file: Path = key(Path(), "File holding the key (`fabricatord proxy keygen`); every node needs the same one.")


@dataclass(frozen=True)
class RouteSettings:
    name: str = key("", "Route name, for logs and metrics.")

    match: dict[str, str] = key(
        {}, "What to match: `source`, `modality`, `calling_ae`, `called_ae`, `study_description`."
    )
    to: list[str] = key([], "`[[peers]]` names that receive every matching instance.")
    allow_prod: bool = key(False, 'Allow this route to send to peers with `environment = "prod"`.')
    verify: bool | Literal["find", "commitment"] = key(
        False,
        "After a send: `true` or `find` counts the study's instances at the peer by C-FIND once all are delivered; "
        "`commitment` asks the peer for Storage Commitment of what was sent and records its report on the jobs.",
    )
    attempts: int = key(
        8,
        "Sends of a route job before it is kept as `failed` (the dead letter; `fabricatord jobs retry` sends it "
        "again): 8 retries over about 8 minutes. A refusal the peer would repeat fails at once.",
        check_positive,
    )

    @property
    def verification(self) -> str:
        """`find`, `commitment`, or empty: how a delivery is confirmed."""
        return "find" if self.verify is True else self.verify or ""


def _check_endpoint(value: object) -> str | None:
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        return "an http:// or https:// URL of a FHIR server's base"
    return None


@dataclass(frozen=True)
class TlsSettings:
    """`[tls]`: one certificate for every TLS listener and every TLS association we open."""

    certificate: Path = key(
        Path(), "PEM certificate (chain) we present, as server and as client; set: TLS listeners open."
    )
    private_key: Path = key(Path(), "PEM private key of `certificate` (unencrypted).")
    ca: Path = key(
        Path(), "PEM certificates we trust: a client's, when `verify_client`, and every `tls = true` peer's."
    )
    verify_client: bool = key(
        True, "A client must present a certificate `ca` signed (as DCMTK's storescp asks); false: TLS without one."
    )


@dataclass(frozen=True)
class FhirDestination:
    """`[[fhir.destinations]]`: a FHIR server that receives a transaction Bundle per complete study."""

    name: str = key("", "Destination name, for logs, metrics and `fabricatord jobs`.")
    url: str = key("", "The server's base URL; the Bundle is POSTed to it.", _check_endpoint)
    bearer_token: str = key("", "Sent as `Authorization: Bearer …` when set.")
    timeout: str = key("30s", "How long one POST may take before it counts as failed and is retried.", check_duration)


@dataclass(frozen=True)
class FhirSettings:
    stable_age: str = key(
        "60s",
        "A received study is complete once no instance has arrived for this long (Orthanc's StableAge); "
        "acquired studies are complete at MPPS COMPLETED, generated ones when `generate` finishes.",
        check_duration,
    )
    patient_id_system: str = key(
        "urn:fabricatord:patient-id", "`Patient.identifier.system` of the Patient ID (your MRN's URI).", check_uri
    )
    issuer_systems: dict[str, str] = key(
        {},
        'Issuer of Patient ID → the system of the IDs it assigns: `{ NORTHHOSP = "https://north.example/mrn" }`; '
        "a Patient whose issuer is not here gets `patient_id_system`.",
    )
    accession_system: str = key(
        "urn:fabricatord:accession", "`identifier.system` of the accession number (type ACSN).", check_uri
    )
    placer_system: str = key(
        "urn:fabricatord:placer-order", "`ServiceRequest.identifier.system` of the placer order number.", check_uri
    )
    filler_system: str = key(
        "urn:fabricatord:filler-order", "`ServiceRequest.identifier.system` of the filler order number.", check_uri
    )
    attempts: int = key(
        8,
        "Sends of a FHIR job before it is kept as `failed` (`fabricatord jobs retry` sends it again); a refusal "
        "the server would repeat (4xx) fails at once.",
        check_positive,
    )
    destinations: list[FhirDestination] = key(
        [], "FHIR servers that receive every complete study: `[[fhir.destinations]]` (docs/fhir.md)."
    )


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    log: LogSettings = field(default_factory=LogSettings)
    dicom: DicomSettings = field(default_factory=DicomSettings)
    hl7: Hl7Settings = field(default_factory=Hl7Settings)
    http: HttpSettings = field(default_factory=HttpSettings)
    synth: SynthSettings = field(default_factory=SynthSettings)
    fhir: FhirSettings = field(default_factory=FhirSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    peers: list[PeerSettings] = field(default_factory=list)
    routes: list[RouteSettings] = field(default_factory=list)
    proxies: list[ProxySettings] = field(default_factory=list)
    source: Path | None = None
    """The file these settings came from; None for built-in defaults."""

    def peer(self, name: str) -> PeerSettings | None:
        return next((p for p in self.peers if p.name == name), None)

    def proxy(self, ae_title: str) -> ProxySettings | None:
        """The `[[proxies]]` entry that answers to a called AE title."""
        return next((p for p in self.proxies if p.ae_title == ae_title), None)

    @property
    def storage_dir(self) -> Path:
        return self.node.data_dir / "storage"

    @property
    def shared(self) -> bool:
        """Whether several daemons may share this database and data_dir (PostgreSQL; SQLite has one writer)."""
        return self.database_url.startswith("postgresql")

    @property
    def tmp_dir(self) -> Path:
        """Each node's own when several share the storage folder: their temporary files kept apart."""
        return self.node.data_dir / "tmp" / self.node_name if self.shared else self.node.data_dir / "tmp"

    @property
    def node_name(self) -> str:
        return self.node.name or socket.gethostname().split(".")[0] or "fabricatord"

    @property
    def database_url(self) -> str:
        return self.node.database or f"sqlite:///{self.node.data_dir / 'fabricatord.sqlite'}"

    def modality(self, code: str) -> ModalityOverride:
        return self.synth.modality.get(code.upper(), ModalityOverride())

    def acquisition(self, modality: str) -> tuple[str, float | None]:
        """(policy, seconds until a step of this modality is acquired; None: it waits for a
        modality's fetch or a user's `fabricatord acquire`)."""
        override = self.modality(modality)
        policy = override.acquisition or self.synth.acquisition
        if policy == "immediate":
            return policy, 0.0
        if policy == "delay":
            low, high = parse_duration_range(override.acquisition_delay or self.synth.acquisition_delay)
            return policy, random.uniform(low, high)
        return policy, None


SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "log": LogSettings,
    "dicom": DicomSettings,
    "hl7": Hl7Settings,
    "http": HttpSettings,
    "synth": SynthSettings,
    "fhir": FhirSettings,
    "tls": TlsSettings,
}
TABLE_ARRAYS: dict[str, type] = {"peers": PeerSettings, "routes": RouteSettings, "proxies": ProxySettings}

MODALITY_KEY = re.compile(r"^[A-Z]{2}$")
