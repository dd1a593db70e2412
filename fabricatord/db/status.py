"""Counts for `/api/v1/status`: what the daemon holds, read in one short read transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, text

from fabricatord.db.engine import Database
from fabricatord.db.models import (
    Acquisition,
    FhirJob,
    Instance,
    Order,
    Patient,
    RouteJob,
    ScheduledStep,
    Study,
)


def reachable(database: Database) -> bool:
    """The database answers a query (for `/readyz`)."""
    try:
        with database.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:  # any failure is "not ready", and says nothing more here
        return False


def counts(database: Database) -> dict[str, Any]:
    with database.engine.connect() as connection:

        def count(column: Any) -> int:
            return int(connection.execute(select(func.count(column))).scalar_one())

        def by_state(state: Any) -> dict[str, int]:
            return {str(name): int(n) for name, n in connection.execute(select(state, func.count()).group_by(state))}

        return {
            "patients": count(Patient.id),
            "orders": count(Order.id),
            "worklist_steps": by_state(ScheduledStep.status),
            "studies": count(Study.id),
            "instances": count(Instance.id),
            "storage_bytes": int(connection.execute(select(func.coalesce(func.sum(Instance.size), 0))).scalar_one()),
            "acquisitions": by_state(Acquisition.state),
            "route_jobs": by_state(RouteJob.state),
            "fhir_jobs": by_state(FhirJob.state),
        }
