"""The service: one request path for the server and the eval, without a web framework.

`plan(request, served, limits)` checks the request (every 400 before any upstream request),
then renders its prompts and returns one `ChoicePlan` per choice (or in two steps, `check`
then `render_plans`, with admission between them); `run(plans, streaming=...)`
yields the events of their generations, which the server only encodes (JSON or SSE).
"""

from .plan import AnyRequest, ChoicePlan, check, plan, render_plans
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
    "check",
    "plan",
    "render_plans",
    "run",
]
