"""Admission control (nudging_core/admission.py) with its metrics: requests waiting and
requests turned away, by model."""

from __future__ import annotations

from nudging_core.admission import Admission, Ticket
from nudging_core.errors import APIError

from .metrics import Metrics


async def admit(metrics: Metrics, admission: Admission) -> Ticket:
    """`admission`'s ticket, counting the wait and a rejection; raises the 429 `APIError`."""
    queued = metrics.admission_queued.labels(admission.model)
    queued.inc()
    try:
        return await admission.admit()
    except APIError:
        metrics.admission_rejected.labels(admission.model).inc()
        raise
    finally:
        queued.dec()
