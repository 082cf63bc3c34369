"""The service: one request path for the server and the eval, without a web framework.

`plan(request, served, limits)` checks the request (every 400 before any upstream request),
then renders its prompts and returns one `ChoicePlan` per choice; `run(plans, streaming=...)`
yields the events of their generations, which the server only encodes (JSON or SSE).
"""

from .plan import AnyRequest, ChoicePlan, plan
from .run import ChoiceFinished, ChoiceRun, ErrorEvent, Event, PieceEvent, UsageEvent, run

__all__ = [
    "AnyRequest",
    "ChoiceFinished",
    "ChoicePlan",
    "ChoiceRun",
    "ErrorEvent",
    "Event",
    "PieceEvent",
    "UsageEvent",
    "plan",
    "run",
]
