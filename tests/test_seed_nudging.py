"""`paper` and `fast` against the paper's own `completion_with_nudging`, on the same upstreams.

The seed (tests/seed_code.py) runs its own nudging loop with its own OpenAI client against the
same servers as ours, over real HTTP; the seed always applies its clean-up, so ours runs with
`cleanup` on. Both must write the same text:
- on base models that loop (tests/test_fast_parity.py's models: repeated chunks, sentences
  copied from the output, long confident runs, stops in the middle of a chunk), and
- on the simulator pair, with the seed's own prompt layout, for the oracle questions,
  including one where the base loops confidently for thousands of tokens.
The seed only runs where its mirror is (see tests/seed_code.py).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from openai import OpenAI

from nudging_core.generation import Generation, GenerationRequest
from nudging_core.nudging import NudgingParams
from nudging_core.types import GenerationStats
from nudging_core.upstream import UpstreamClient
from upstreams.simulator.app import create_app as create_simulator

from .scripted import ScriptedUpstream
from .seed_code import seed_module
from .servers import running
from .test_baselines import ORACLE_QUESTIONS
from .test_fast_parity import Case, LoopingModel, case_from

STRATEGIES = ("paper", "fast")
SEED_SYSTEM = "Answer the question by walking through the reasoning steps."
LOOPING_QUESTION = "List three colors of the rainbow."  # the simulator's base loops on it


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return seed_module("utils", tmp_path_factory.mktemp("seed"))


@dataclass(frozen=True, slots=True)
class Upstreams:
    base: str  # OpenAI base URLs
    nudger: str
    base_model: str
    nudging_model: str


async def ours(upstreams: Upstreams, base_prompt: str, nudging_prompt: str, max_tokens: int,
               **params: Any) -> tuple[str, GenerationStats]:
    clients = {"base": UpstreamClient(upstreams.base, upstreams.base_model, role="base"),
               "nudging": UpstreamClient(upstreams.nudger, upstreams.nudging_model, role="nudging")}
    request = GenerationRequest(method="nudging", max_tokens=max_tokens, base_prompt=base_prompt,
                                nudging_prompt=nudging_prompt, params=NudgingParams(cleanup=True, **params))
    generation = Generation(request, clients)  # type: ignore[arg-type]
    try:
        text = "".join([piece.text async for piece in generation.pieces()])
    finally:
        for client in clients.values():
            await client.aclose()
    return text, generation.stats


def theirs(seed: ModuleType, upstreams: Upstreams, max_tokens: int, **kwargs: Any) -> dict[str, Any]:
    def client(url: str) -> OpenAI:
        return OpenAI(base_url=url, api_key="offline", max_retries=0)

    info: dict[str, Any] = seed.completion_with_nudging(
        base_model=upstreams.base_model, nudging_model=upstreams.nudging_model,
        client_base=client(upstreams.base), client_nudging=client(upstreams.nudger),
        max_token_total=max_tokens, **kwargs)
    return info


# --- base models that loop ---------------------------------------------------------------------

# The seed's layout with an empty system prompt and answer start, for a model it does not know.
LOOPING_PREFIX = "\nQ\n"
LOOPING_BUDGET = 3000  # never binds: the round limit ends every generation first


@pytest.fixture(scope="module")
def looping_pair() -> Iterator[tuple[Upstreams, ScriptedUpstream, ScriptedUpstream]]:
    base, nudger = ScriptedUpstream("base"), ScriptedUpstream("nudger")
    with ExitStack() as stack:
        urls = [stack.enter_context(running(upstream.app())) + "/v1" for upstream in (base, nudger)]
        yield Upstreams(urls[0], urls[1], "base", "nudger"), base, nudger


def answer_as(upstream: ScriptedUpstream, model: LoopingModel) -> None:
    def reply(prompt: str, max_tokens: int) -> tuple[list[tuple[str, float]], str]:
        assert prompt.startswith(LOOPING_PREFIX), prompt
        return model.reply(prompt[len(LOOPING_PREFIX):], max_tokens)
    upstream.reply = reply  # type: ignore[method-assign]


def seed_settings(case: Case) -> dict[str, Any]:
    params = case.params
    return {
        "system_prompt_base": "",
        "system_prompt_nudging": "",
        "question": "Q",
        "question_prompt": "",
        "answer_start_prompt_base": "",
        "answer_start_prompt_nudging": "",
        "completion_token_num": params["chunk_tokens"],
        "completion_token_num_nudging": params["lookahead_tokens"],
        "top_prob_thres": params["threshold"],
        "max_round": params["max_rounds"],
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ours_writes_the_seeds_text_on_looping_models(
    seed: ModuleType, looping_pair: tuple[Upstreams, ScriptedUpstream, ScriptedUpstream], strategy: str
) -> None:
    upstreams, base, nudger = looping_pair
    for index in range(40):
        case = case_from(random.Random(index))
        answer_as(base, case.base)
        answer_as(nudger, case.nudger)
        info = theirs(seed, upstreams, LOOPING_BUDGET, **seed_settings(case))
        assert info["full_prefix_base"] == info["full_prefix_nudging"] == LOOPING_PREFIX
        text, stats = asyncio.run(ours(upstreams, LOOPING_PREFIX, LOOPING_PREFIX, LOOPING_BUDGET,
                                       strategy=strategy, **case.params))
        assert stats.stop_reason != "length"
        assert text == info["raw_answer"], (index, case)


# --- the simulator pair, the seed's own prompts ----------------------------------------------


@pytest.fixture(scope="module")
def simulator_pair() -> Iterator[Upstreams]:
    with ExitStack() as stack:
        base, aligned = (stack.enter_context(running(create_simulator(profile, time_scale=0))) + "/v1"
                         for profile in ("base", "aligned"))
        yield Upstreams(base, aligned, "base", "aligned")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("question", (*ORACLE_QUESTIONS, LOOPING_QUESTION) if LOOPING_QUESTION
                         not in ORACLE_QUESTIONS else ORACLE_QUESTIONS)
def test_ours_writes_the_seeds_text_on_the_simulators(
    seed: ModuleType, simulator_pair: Upstreams, strategy: str, question: str
) -> None:
    settings = {"system_prompt_base": SEED_SYSTEM, "system_prompt_nudging": SEED_SYSTEM, "question": question,
                "top_prob_thres": 0.3}
    budget = 4000  # the looping question: the chunk guards, not the budget, end the base
    info = theirs(seed, simulator_pair, budget, **settings)
    text, stats = asyncio.run(
        ours(
            simulator_pair,
            info["full_prefix_base"],
            info["full_prefix_nudging"],
            budget,
            strategy=strategy,
            threshold=0.3,
        )
    )
    assert stats.stop_reason != "length"
    assert text == info["raw_answer"]


def test_the_seeds_prompt_layout_is_the_plain_one(seed: ModuleType) -> None:
    # For a model it has no template for, the seed writes "{system}\n{question}\n{answer start}".
    assert (
        seed.apply_instruct_template("aligned", "S", "Question: Q", "Answer: ") == "S\nQuestion: Q\nAnswer: "
    )
    assert Path(seed.__file__ or "").name.endswith("utils.py")
