"""Every Prometheus metric fabricatord exports, declared once.

Names are `fabricatord_*`; counters end in `_total`; durations are `_seconds` histograms.
Labels are bounded: a peer is labelled by its `[[peers]]` name, anything else as `other`.
With worker processes, each writes its values under PROMETHEUS_MULTIPROC_DIR (the parent sets it
before they import this) and `/metrics` adds them up: counters and histograms of every worker,
live or not, gauges as each one's `multiprocess_mode` says (set only by the first worker, they
report its most recent value).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# A `_created` series beside every counter doubles what Prometheus stores and names nothing
# anyone queries (`fabricatord_patients_created_created`); the process start time says the same.
disable_created_metrics()  # type: ignore[no-untyped-call]

INSTANCES_GENERATED = Counter(
    "fabricatord_instances_generated_total",
    "Synthetic instances generated, by modality.",
    ["modality"],
)
INSTANCES_STORED = Counter(
    "fabricatord_instances_stored_total",
    "Instances written to storage and indexed, by source (generated, received) and outcome "
    "(new, identical, kept, overwritten).",
    ["source", "outcome"],
)
STORED_BYTES = Counter(
    "fabricatord_stored_bytes_total",
    "Bytes of DICOM files written to storage.",
)
STORAGE_WRITE_SECONDS = Histogram(
    "fabricatord_storage_write_seconds",
    "Time to write one instance's temporary file in data_dir/tmp and fsync it.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
STORAGE_WRITE_FAILURES = Counter(
    "fabricatord_storage_write_failures_total",
    "Instances that could not be stored, by reason.",
    ["reason"],
)
STUDY_GENERATION_SECONDS = Histogram(
    "fabricatord_study_generation_seconds",
    "Time to generate and store one synthetic study, by modality.",
    ["modality"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
PATIENTS_CREATED = Counter(
    "fabricatord_patients_created_total",
    "Synthetic patients added to the registry.",
)
DIMSE_OPERATIONS = Counter(
    "fabricatord_dimse_operations_total",
    "DIMSE operations we answered as SCP, by service, calling peer ([[peers]] name or other) and outcome.",
    ["service", "peer", "status"],
)
ASSOCIATIONS_ACTIVE = Gauge(
    "fabricatord_associations_active",
    "Associations established with us and not yet ended.",
    multiprocess_mode="livesum",
)
ASSOCIATIONS = Counter(
    "fabricatord_associations_total",
    "Associations requested of us, by calling peer ([[peers]] name or other) and how they went "
    "(established, rejected, released, aborted).",
    ["peer", "result"],
)
DIMSE_SECONDS = Histogram(
    "fabricatord_dimse_seconds",
    "Time we took to answer a DIMSE request (for C-MOVE and C-GET, the whole retrieve), by service.",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RECEIVED_BYTES = Counter(
    "fabricatord_received_bytes_total",
    "Dataset bytes received by C-STORE.",
)
ASSOCIATIONS_REFUSED = Counter(
    "fabricatord_associations_refused_total",
    "Connections or associations we refused before any DIMSE, by reason (host, calling_ae, called_ae, "
    "calling_ae_unknown, application_context, protocol_version, max_associations).",
    ["reason"],
)
PROTOCOL_ERRORS = Counter(
    "fabricatord_protocol_errors_total",
    "Connections aborted, or presentation contexts left unanswered, for what a peer sent, by reason "
    "(unknown_pdu, pdu_too_long, undecodable_pdu, bad_context_id, message_too_large, "
    "unsolicited_response, unexpected_pdu, unknown_context, undecodable_message, exception), or "
    "requests answered with a failure before their service ran (wrong_context, "
    "unrecognized_operation, malformed).",
    ["reason"],
)
MWL_QUERIES = Counter(
    "fabricatord_mwl_queries_total",
    "Modality Worklist queries answered, by calling peer and result (hit: at least one item, miss: none).",
    ["peer", "result"],
)
SCU_OPERATIONS = Counter(
    "fabricatord_scu_operations_total",
    "DIMSE operations we sent as SCU, by service, peer name and status class.",
    ["service", "peer", "status"],
)
AUDIT_DROPPED = Counter(
    "fabricatord_audit_dropped_total",
    "Audit events not written: the backlog was full or the database refused them.",
)
HL7_MESSAGES = Counter(
    "fabricatord_hl7_messages_total",
    "HL7 messages answered, by message type (ORM^O01 …) and acknowledgment code (AA, AE, AR).",
    ["type", "ack"],
)
HL7_SECONDS = Histogram(
    "fabricatord_hl7_seconds",
    "Time from a frame's last byte to its ACK being handed to the connection (parse, commit, ACK).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
HL7_CONNECTIONS_ACTIVE = Gauge(
    "fabricatord_hl7_connections_active",
    "MLLP connections open now.",
    multiprocess_mode="livesum",
)
HL7_FRAMES_REFUSED = Counter(
    "fabricatord_hl7_frames_refused_total",
    "MLLP frames or connections refused before processing, by reason (oversized, too_many_connections, idle, "
    "unfinished: the connection closed inside a frame).",
    ["reason"],
)
ACQUISITIONS = Counter(
    "fabricatord_acquisitions_total",
    "Worklist steps the simulated modality performed, by modality and outcome (done, retry, failed).",
    ["modality", "outcome"],
)
ACQUISITION_SECONDS = Histogram(
    "fabricatord_acquisition_seconds",
    "Time to perform one step: MPPS, the study made and stored, MPPS again; by modality.",
    ["modality"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
ROUTE_JOBS = Gauge(
    "fabricatord_route_jobs",
    "Route jobs by state (pending, sending, done, failed, canceled), as of the last look.",
    ["state"],
    multiprocess_mode="livemostrecent",
)
ROUTE_QUEUE = Gauge(
    "fabricatord_route_queue_depth",
    "Route jobs waiting to be sent, by destination ([[peers]] name).",
    ["peer"],
    multiprocess_mode="livemostrecent",
)
ROUTE_OLDEST = Gauge(
    "fabricatord_route_oldest_pending_seconds",
    "Age of the oldest route job waiting to be sent, by destination; 0 when none waits.",
    ["peer"],
    multiprocess_mode="livemostrecent",
)
ROUTE_SEND_SECONDS = Histogram(
    "fabricatord_route_send_seconds",
    "Time to send one group of route jobs (one study to one peer), by destination.",
    ["peer"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
FHIR_EXPORTS = Counter(
    "fabricatord_fhir_exports_total",
    "Studies sent to a FHIR destination as a transaction Bundle, by destination and outcome (done, retry, failed).",
    ["destination", "outcome"],
)
FHIR_SEND_SECONDS = Histogram(
    "fabricatord_fhir_send_seconds",
    "Time to build and POST one study's Bundle, by destination.",
    ["destination"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
COMMITMENT_REQUESTS = Counter(
    "fabricatord_commitment_requests_total",
    "Storage Commitment requests (N-ACTION), by role (scp: a peer asked us; scu: we asked a peer), peer name "
    "and outcome (accepted, refused).",
    ["role", "peer", "outcome"],
)
COMMITMENT_REPORTS = Counter(
    "fabricatord_commitment_reports_total",
    "Storage Commitment reports (N-EVENT-REPORT), by role (scp: sent by us; scu: received), peer name and "
    "outcome (same_association, new_association, retry, failed; received: committed, failures, unknown).",
    ["role", "peer", "outcome"],
)
COMMITMENT_INSTANCES = Counter(
    "fabricatord_commitment_instances_total",
    "Instances in Storage Commitment reports, by role (scp: we reported; scu: a peer reported) and result "
    "(committed, failed).",
    ["role", "result"],
)
TLS_CERTIFICATE_EXPIRY = Gauge(
    "fabricatord_tls_certificate_expiry_seconds",
    "When the [tls] certificate expires, in seconds since the epoch (alert on it minus time()).",
    multiprocess_mode="livemostrecent",
)
TLS_HANDSHAKE_FAILURES = Counter(
    "fabricatord_tls_handshake_failures_total",
    "TLS connections closed before the handshake finished (no or a wrong client certificate, plain text "
    "on a TLS port), by listener (dicom, mllp, http).",
    ["listener"],
)
SENT_BYTES = Counter(
    "fabricatord_sent_bytes_total",
    "Bytes of stored files a peer took (C-STORE success or warning), by service (route, C-MOVE, "
    "C-GET) and peer ([[peers]] name; for C-GET the requestor's, or other).",
    ["service", "peer"],
)
CLEANUP_STUDIES = Counter(
    "fabricatord_cleanup_studies_deleted_total",
    "Studies cleanup deleted, by reason (age: past [dicom] retention; quota; free_space).",
    ["reason"],
)
CLEANUP_BYTES = Counter(
    "fabricatord_cleanup_bytes_deleted_total",
    "Bytes of stored files cleanup deleted, by reason.",
    ["reason"],
)
STORAGE_BYTES = Gauge(
    "fabricatord_storage_bytes",
    "Bytes of stored instances, as of the last look.",
    multiprocess_mode="livemostrecent",
)
PEER_UP = Gauge(
    "fabricatord_peer_up",
    "1 when the last C-ECHO to the [[peers]] entry succeeded, 0 when it did not.",
    ["peer"],
    multiprocess_mode="livemostrecent",
)
PEER_ECHO_SECONDS = Histogram(
    "fabricatord_peer_echo_seconds",
    "Round trip of the periodic C-ECHO to each [[peers]] entry, association included.",
    ["peer"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BUILD_INFO = Gauge(
    "fabricatord_build_info",
    "Always 1; the version label says which fabricatord runs.",
    ["version"],
    multiprocess_mode="max",
)


def exposition() -> tuple[bytes, str]:
    """The text `/metrics` answers: this process's metrics, or the whole daemon's when its
    worker processes write them under PROMETHEUS_MULTIPROC_DIR."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def forget_peer(name: str) -> None:
    """A peer no longer configured, or no longer echoed here, leaves `fabricatord_peer_up`. In
    multiprocess mode a series cannot be removed: it says NaN (no answer known) instead."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        PEER_UP.labels(name).set(float("nan"))
    else:
        PEER_UP.remove(name)
