"""The database: models, engine, migrations and one store class per aggregate (layer 2)."""

from fabricatord.db.engine import Database, DatabaseNewerThanCode, dispose_all, is_busy, open_database
from fabricatord.db.index import IndexEntry, InstanceIndex, StoredInstance, StudySummary
from fabricatord.db.patients import PatientRecord, PatientRegistry
from fabricatord.db.sequences import Sequences

__all__ = [
    "Database",
    "DatabaseNewerThanCode",
    "IndexEntry",
    "InstanceIndex",
    "PatientRecord",
    "PatientRegistry",
    "Sequences",
    "StoredInstance",
    "StudySummary",
    "dispose_all",
    "is_busy",
    "open_database",
]
