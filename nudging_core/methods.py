"""The methods a model can serve, one row each: the upstream roles it needs, whether it forwards
the client's fields to its upstream (a passthrough), its generator of pieces, and the top-k
logprobs it asks for. Config validation, `Generation` and the service read this table;
adding a method is one row plus its generator.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from nudging_core.baselines import BaselineContext, generate_baseline
from nudging_core.calls import RoleCaller
from nudging_core.nudging import NudgingContext, NudgingParams, nudge
from nudging_core.passthrough import passthrough
from nudging_core.stopping import Budget
from nudging_core.types import GenerationStats, Piece, Role, Source

Method = Literal["nudging", "base_only", "nudging_only", "proxy_tuning", "ensemble"]


@dataclass(slots=True)
class MethodInput:
    """What a method's generator gets: one caller per role and the generation's settings."""

    callers: Mapping[Role, RoleCaller]
    base_prompt: str
    nudging_prompt: str
    params: NudgingParams
    budget: Budget
    stats: GenerationStats
    stop: tuple[str, ...] = ()
    prompt_token_ids: tuple[int, ...] | None = None  # a passthrough sends these instead
    passthrough_fields: dict[str, Any] = field(default_factory=dict)
    return_logprobs: bool = False
    # Set by a passthrough with `echo`: the upstream's own count of the answer's tokens.
    upstream_completion_tokens: int | None = None
    # Set by a passthrough: the upstream's `stop_reason` and `system_fingerprint`, returned as sent.
    upstream_stop_reason: str | int | None = None
    system_fingerprint: str | None = None


Generator = Callable[[MethodInput], AsyncGenerator[Piece, None]]


@dataclass(frozen=True, slots=True)
class MethodSpec:
    name: Method
    roles: tuple[Role, ...]  # the upstreams it needs, each its own config section
    forwards_fields: bool  # a passthrough: the client's other fields, stop and logprobs go upstream
    generator: Generator
    top_k: int  # logprobs per position it asks its upstreams for (0: none)
    prompt_role: Source = "base"  # whose upstream reports the prompt's tokens
    # Whether that upstream's usage gives the bare prompt's size; if not, it is counted apart.
    reports_prompt_tokens: bool = True
    # A combined method that returns logprobs: each token's from the model that wrote it.
    returns_logprobs: bool = False

    @property
    def combined(self) -> bool:
        """Writes with both models, so it renders the nudger's chat prompt itself."""
        return not self.forwards_fields


def _nudging(run: MethodInput) -> AsyncGenerator[Piece, None]:
    return nudge(NudgingContext(
        base=run.callers["base"], nudger=run.callers["nudging"], base_prompt=run.base_prompt,
        nudging_prompt=run.nudging_prompt, params=run.params, budget=run.budget, stats=run.stats,
    ))


def _baseline(method: Literal["proxy_tuning", "ensemble"]) -> Generator:
    def generate(run: MethodInput) -> AsyncGenerator[Piece, None]:
        spec = METHODS[method]
        return generate_baseline(BaselineContext(
            method=method, roles=spec.roles, top_k=spec.top_k, callers=run.callers,
            base_prompt=run.base_prompt, nudging_prompt=run.nudging_prompt,
            chunk_tokens=run.params.chunk_tokens, budget=run.budget, stats=run.stats,
        ))
    return generate


def _passthrough(role: Source) -> Generator:
    return lambda run: passthrough(run, role)


METHODS: Final[Mapping[Method, MethodSpec]] = {spec.name: spec for spec in (
    # top_k 1: the base's top-1 probability decides a takeover and a continuation's end.
    # Every base call of nudging extends the prompt, so none reports its bare size.
    MethodSpec("nudging", ("base", "nudging"), forwards_fields=False, generator=_nudging, top_k=1,
               reports_prompt_tokens=False, returns_logprobs=True),
    MethodSpec("base_only", ("base",), forwards_fields=True, generator=_passthrough("base"), top_k=0),
    MethodSpec("nudging_only", ("nudging",), forwards_fields=True, generator=_passthrough("nudging"),
               top_k=0, prompt_role="nudging"),
    # The baselines compare token strings: their upstreams must share one tokenizer. The paper
    # used top-100 for proxy tuning (vLLM then needs `--max-logprobs 100`), top-5 for the ensemble.
    MethodSpec("proxy_tuning", ("base", "nudging", "nudging_base"), forwards_fields=False,
               generator=_baseline("proxy_tuning"), top_k=100),
    MethodSpec("ensemble", ("base", "nudging"), forwards_fields=False, generator=_baseline("ensemble"),
               top_k=5),
)}
# The most logprobs per position any method asks for (an upstream's `--max-logprobs`).
MAX_TOP_K: Final = max(spec.top_k for spec in METHODS.values())
