"""Strategy `fast` (DESIGN 3.2) against `paper` on the same scripted pairs.

Same decisions, fewer waits: the same text wherever no step-7 repetition guard fires; probes
sent concurrently as soon as the next word begins, the losers closed; the continuation streamed
(the winning probe's own stream) and closed at the first uncertain token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from nudging_core.calls import derive_seed
from tests import test_paper_rules
from tests.harness import BASE_PROMPT as PB
from tests.harness import NUDGING_PROMPT as PN
from tests.test_paper_rules import (
    BASE_STOPS_TEXT,
    BUDGET_TEXT,
    CHUNKS_TEXT,
    EMPTY_PROBE_TEXT,
    NO_TAKEOVER_TEXT,
    ONE_WORD_TEXT,
    SINGLE_TOKEN_TEXT,
    SPACES_TEXT,
    TAKEOVER_TEXT,
    Scripted,
    script_base_stops,
    script_budget_words,
    script_chunks,
    script_copy,
    script_distinct_words,
    script_empty_probe,
    script_no_takeover,
    script_one_word_rounds,
    script_repeated_words,
    script_single_token_probe,
    script_spaces_and_newlines,
    script_takeover_after_first_word,
    script_threshold_edge,
    toks,
)

# The shared scripted server and the per-test pair (see tests/test_paper_rules.py).
hub = test_paper_rules.hub
pair = test_paper_rules.pair

Script = Callable[[Scripted], None]

def scenario(name: str, script: Script, text: str | None, swaps: dict[str, str] | None = None,
             **params: Any) -> Any:
    """A run of `script` with `params`: the expected text (None: only compare the two), and the
    rules that fire differently ({paper's rule: fast's rule})."""
    return pytest.param(script, params, text, swaps or {}, id=name)


SCENARIOS = [
    scenario(
        "takeover_after_first_word", script_takeover_after_first_word, TAKEOVER_TEXT, lookahead_tokens=4
    ),
    scenario("chunks", script_chunks, CHUNKS_TEXT, lookahead_tokens=3, chunk_tokens=2),
    scenario("chunks_budget", script_chunks, None, lookahead_tokens=3, chunk_tokens=2, max_tokens=7),
    scenario("no_takeover", script_no_takeover, NO_TAKEOVER_TEXT, lookahead_tokens=4),
    scenario("spaces_and_newlines", script_spaces_and_newlines, SPACES_TEXT, lookahead_tokens=6),
    scenario("one_word", script_one_word_rounds, ONE_WORD_TEXT, lookahead_tokens=2),
    scenario("one_word_budget", script_one_word_rounds, None, lookahead_tokens=2, max_tokens=3),
    scenario("empty_probe", script_empty_probe, EMPTY_PROBE_TEXT, lookahead_tokens=2),
    scenario("base_stops", script_base_stops, BASE_STOPS_TEXT, lookahead_tokens=3),
    scenario("base_stops_in_chunk", script_base_stops, BASE_STOPS_TEXT, lookahead_tokens=3, chunk_tokens=2),
    scenario("single_token_probe", script_single_token_probe, SINGLE_TOKEN_TEXT, lookahead_tokens=3),
    scenario(
        "threshold_edge", script_threshold_edge, " Sure! The sky is blue.", lookahead_tokens=3, chunk_tokens=2
    ),
    scenario("distinct_words", script_distinct_words, " a b c d e", lookahead_tokens=1, max_rounds=5),
    scenario("repeated_words", script_repeated_words, " la la la", lookahead_tokens=1),
    scenario("round_limit", script_repeated_words, " la la", lookahead_tokens=1, max_rounds=2),
    scenario(
        "round_limit_continuation",
        script_takeover_after_first_word,
        " Sure! The sky is blue",
        lookahead_tokens=4,
        max_rounds=1,
    ),
    scenario(
        "stop_across_pieces",
        script_takeover_after_first_word,
        " Sure! ",
        lookahead_tokens=4,
        stop=("The sky",),
    ),
    scenario(
        "stop_in_next_round",
        script_takeover_after_first_word,
        " Sure! The sky is ",
        lookahead_tokens=4,
        stop=("blue. B",),
    ),
    scenario(
        "cleanup", script_takeover_after_first_word, TAKEOVER_TEXT.strip(), lookahead_tokens=4, cleanup=True
    ),
] + [
    # With 6 or 7 tokens, paper's probe holds the uncertain "!" within the budget; fast stops
    # at the budget first.
    scenario(
        f"budget_{max_tokens}",
        script_budget_words,
        None,
        {"uncertain_token": "budget_in_continuation"} if max_tokens in (6, 7) else None,
        lookahead_tokens=5,
        max_tokens=max_tokens,
    )
    for max_tokens in (1, 3, 4, 5, 6, 7, 8)
]


def spans(pieces: list[Any]) -> list[tuple[str, str]]:
    """The text by source, consecutive pieces of one source merged."""
    result: list[tuple[str, str]] = []
    for piece in pieces:
        if result and result[-1][0] == piece.source:
            result[-1] = (piece.source, result[-1][1] + piece.text)
        elif piece.text:
            result.append((piece.source, piece.text))
    return result


async def eventually(condition: Callable[[], Any], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def run(pair: Scripted, strategy: str, params: dict[str, Any]) -> Any:
    params = dict(params)
    max_tokens = params.pop("max_tokens", 200)
    stop = params.pop("stop", ())
    return await pair.run(max_tokens=max_tokens, stop=stop, strategy=strategy, **params)


@pytest.mark.parametrize(("script", "params", "text", "swaps"), SCENARIOS)
async def test_fast_gives_the_text_of_paper(pair: Scripted, script: Script, params: dict[str, Any],
                                           text: str | None, swaps: dict[str, str]) -> None:
    script(pair)
    paper = await run(pair, "paper", params)
    fast = await run(pair, "fast", params)
    if text is not None:
        assert paper.text == text
    assert fast.text == paper.text
    assert (fast.finish_reason, fast.completion_tokens, fast.stats.stop_reason, fast.stats.rounds) == (
        paper.finish_reason, paper.completion_tokens, paper.stats.stop_reason, paper.stats.rounds)
    assert spans(fast.pieces) == spans(paper.pieces)
    assert fast.stats.rules == {swaps.get(rule, rule): count for rule, count in paper.stats.rules.items()}
    # Every fast request is a stream with logprobs.
    assert all(e["body"]["stream"] and e["body"]["logprobs"] == 1 for e in pair.entries())


def script_fast_takeover(pair: Scripted) -> None:
    """As script_takeover_after_first_word, but the last lookahead is one word (no stray probe)."""
    pair.nudger.add(PN, toks(" Sure! The sky is"), eos=False)
    pair.base.add(PB + " Sure!", [(" Well", 0.2)], eos=False)
    pair.base.add(
        PB + " Sure! The",
        [(" sky", 0.8), (" is", 0.9), (" blue", 0.9), (".", 0.3), (" Next", 0.5)],
        eos=False,
    )
    pair.nudger.add(PN + " Sure! The sky is blue", toks("."), eos=True)


def requests(pair: Scripted) -> list[tuple[str, str, int, bool]]:
    """(role, prompt after P_b/P_n, max_tokens, stream) of every request, in arrival order."""
    return [(e["role"], e["body"]["prompt"][len(PB if e["role"] == "b" else PN):], e["body"]["max_tokens"],
             e["body"]["stream"]) for e in pair.entries()]


# Since c4a28d3 every fast probe is a stream for the rest of the budget (at most 256 tokens):
# its first token is the probe, and the winning probe's stream goes on as the continuation
# (DESIGN 3.2's "a probe can *be* the continuation"), so there is no separate continuation
# request. DESIGN 3.2's first two bullets (max_tokens=1 probes, then one continuation stream)
# describe the previous design.


async def test_fast_requests_and_cancelled_probes(pair: Scripted) -> None:
    script_fast_takeover(pair)
    pair.delay("b", " Sure! The sky", 5.0, stream=True)  # the probe after the winning boundary hangs
    out = await run(pair, "fast", {"lookahead_tokens": 4})
    assert out.text == " Sure! The sky is blue."
    sent = requests(pair)
    assert sent[0] == ("n", "", 4, True) and sent[-1] == ("n", " Sure! The sky is blue", 4, True)
    assert sorted(sent[1:-1]) == [("b", " Sure!", 200, True), ("b", " Sure! The", 200, True),
                                  ("b", " Sure! The sky", 200, True)]
    # The hanging probe was closed by the client: the upstream sees the disconnect.
    # (Base requests only: the nudger's last answer may still be on its way to being marked.)
    hanging = [e for e in pair.entries() if e["role"] == "b" and e["answered"] is None]
    assert [e["body"]["prompt"] for e in hanging] == [PB + " Sure! The sky"]
    await eventually(lambda: hanging[0]["abandoned"])
    # Cancelled: the losing probe at "Sure!", the hanging one, and the winner, closed at the
    # uncertain "." (before its " Next" and the end of the stream were read).
    assert out.stats.cancelled_requests == {"base": 3, "nudging": 0}
    assert out.stats.upstream_tokens["base"] == 1 + 4  # " Well"; " sky", " is", " blue", "."
    assert out.stats.rules == {"space_prefix": 1, "takeover_after_first_word": 1, "uncertain_token": 1,
                               "nudger_stop": 1}


async def test_fast_probes_are_concurrent(pair: Scripted) -> None:
    script_no_takeover(pair)
    pair.delay("b", " The", 0.3, stream=True)  # the first boundary's answer comes late
    out = await run(pair, "fast", {"lookahead_tokens": 4, "probe_window": 3})
    assert out.text == NO_TAKEOVER_TEXT
    probes = [e for e in pair.entries() if e["role"] == "b"]
    assert sorted(request for request in requests(pair) if request[0] == "b") == [
        ("b", " The", 200, True), ("b", " The sky", 200, True), ("b", " The sky is", 200, True)]
    first_answered = next(e["answered"] for e in probes if e["body"]["prompt"] == PB + " The")
    assert all(e["arrived"] < first_answered for e in probes)
    assert out.stats.cancelled_requests == {"base": 3, "nudging": 0}  # every loser is closed


@pytest.mark.parametrize("window", [1, 2])
async def test_fast_probe_window_bounds_the_probes_open_at_once(pair: Scripted, window: int) -> None:
    script_no_takeover(pair)
    pair.delay("b", " The", 0.3, stream=True)  # unbounded, every probe would be sent meanwhile
    out = await run(pair, "fast", {"lookahead_tokens": 4, "probe_window": window})
    assert out.text == NO_TAKEOVER_TEXT  # the same decisions
    probes = sorted((e for e in pair.entries() if e["role"] == "b"), key=lambda e: len(e["body"]["prompt"]))
    assert len(probes) == 3
    # The probe `window` boundaries further on is sent only once the first one has lost.
    for first, later in zip(probes, probes[window:], strict=False):
        assert later["arrived"] >= first["answered"]


async def test_paper_probes_are_sequential(pair: Scripted) -> None:
    script_no_takeover(pair)
    pair.delay("b", " The", 0.1)
    await run(pair, "paper", {"lookahead_tokens": 4})
    probes = [e for e in pair.entries() if e["role"] == "b"]
    assert all(later["arrived"] >= probes[0]["answered"] for later in probes[1:])


@pytest.mark.parametrize(("max_tokens", "asked", "text"), [
    (6, 16, " Sure! The sky is very"), (40, 40, BUDGET_TEXT)])
async def test_fast_probe_streams_ask_for_the_budget_or_one_chunk(pair: Scripted, max_tokens: int, asked: int,
                                                                  text: str) -> None:
    script_budget_words(pair)
    out = await run(pair, "fast", {"lookahead_tokens": 5, "max_tokens": max_tokens})
    assert out.text == text
    sent = requests(pair)
    assert sent[0] == ("n", "", 5, True)
    # Every boundary up to the winner at "sky" is probed for the tokens left, but for at least
    # a chunk's worth (C=16: the chunk rules judge the probe's first window whole), and the
    # winner is the continuation. The probe at "is" (launched when "blue" began) reaches the
    # upstream only if it was sent before "sky" won.
    probes = sorted(r for r in sent[1:] if r[0] == "b")
    assert probes[:3] == [("b", " Sure!", asked, True), ("b", " Sure! The", asked, True),
                          ("b", " Sure! The sky", asked, True)]
    assert probes[3:] in ([], [("b", " Sure! The sky is", asked, True)])


@pytest.mark.parametrize("strategy", ["paper", "fast"])
async def test_fast_stops_where_paper_chunk_repeats(pair: Scripted, strategy: str) -> None:
    # Guard (a): the first chunk " la" is inside acc " la": stop, the chunk dropped; `fast`
    # does not send " la" (it occurs in the output) and judges it as paper does.
    pair.nudger.add(PN, toks(" Sing la"), eos=False)
    pair.base.add(PB + " Sing", toks(" la la la la") + [(".", 0.1)], eos=False)
    pair.nudger.add(PN + " Sing la", toks("!"), eos=True)
    out = await run(pair, strategy, {"lookahead_tokens": 2, "chunk_tokens": 2})
    assert out.text == " Sing la!"
    assert out.stats.rules["chunk_repeats"] == 1


@pytest.mark.parametrize("strategy", ["paper", "fast"])
async def test_fast_stops_where_paper_chunk_copies_output(pair: Scripted, strategy: str) -> None:
    # Guard (c): " two three four five six" is already in `out`: stop without adding it.
    script_copy(pair, " two three four five six")
    pair.nudger.add(PN + " one two three four five six So one", toks("."), eos=True)
    out = await run(pair, strategy, {"lookahead_tokens": 7})
    assert out.text == " one two three four five six So one."
    assert out.stats.rules["chunk_copies_output"] == 1
    if strategy == "fast":
        # Held from " two" on, and decided at the uncertain "!": (a) could not fire.
        assert (out.stats.held_tokens, out.stats.held_token_delay) == (5, 5 + 4 + 3 + 2 + 1)


async def test_fast_nudger_stop_cancels_started_probes(pair: Scripted) -> None:
    # The nudger stops after two words; the probe begun at "there" is not needed.
    pair.nudger.add(PN, toks(" Hi there"), eos=True)
    pair.delay("b", " Hi", 5.0, stream=True)
    out = await run(pair, "fast", {})
    assert out.text == " Hi there"
    assert out.stats.stop_reason == "nudging_model_stop"
    probes = [e for e in pair.entries() if e["role"] == "b"]
    assert [e["answered"] for e in probes] in ([], [None])
    assert out.stats.upstream_requests["base"] == out.stats.cancelled_requests["base"]


async def test_fast_probe_with_empty_first_token_continues_like_paper(pair: Scripted) -> None:
    # Regression (fixed in aba41e6): a one-token probe whose token has empty text (half of a
    # multi-byte character, see types.Token) was taken as an empty probe, and `fast` started a
    # new round where `paper` lets the base continue.
    pair.nudger.add(PN, toks(" Hi there"), eos=False)
    pair.base.add(PB + " Hi", [("", 0.9), (" ☕", 0.9), ("!", 0.1)], eos=False)
    pair.nudger.add(PN + " Hi ☕", toks("."), eos=True)
    pair.nudger.add(PN + " Hi", toks(" there."), eos=True)
    paper = await run(pair, "paper", {"lookahead_tokens": 2})
    assert paper.text == " Hi ☕."
    fast = await run(pair, "fast", {"lookahead_tokens": 2})
    assert fast.text == paper.text


async def test_fast_probes_while_the_lookahead_streams(pair: Scripted) -> None:
    # The nudger sends one token every 50 ms: each boundary is probed as soon as the word
    # after it has begun, before the lookahead is complete.
    script_no_takeover(pair)
    pair.mounts["n"].event_delay = 0.05
    out = await run(pair, "fast", {"lookahead_tokens": 4, "probe_window": 3})
    assert out.text == NO_TAKEOVER_TEXT
    lookahead = pair.entries()[0]
    assert (lookahead["role"], lookahead["body"]["stream"]) == ("n", True)
    probes = [e for e in pair.entries() if e["role"] == "b"]
    assert [e["body"]["prompt"][len(PB):] for e in probes] == [" The", " The sky", " The sky is"]
    assert all(e["arrived"] < lookahead["answered"] for e in probes)
    # ... in order, each after the token that begins the next word (" sky" at ~100 ms, ...).
    assert probes[0]["arrived"] < probes[1]["arrived"] - 0.03 < probes[2]["arrived"] - 0.06


async def test_fast_seeds_are_derived_per_round_and_role(pair: Scripted) -> None:
    script_fast_takeover(pair)
    text = await pair.run_seeded(7, strategy="fast", lookahead_tokens=4)
    assert text == " Sure! The sky is blue."
    roles = {"n": "nudging", "b": "base"}
    entries = pair.entries()
    assert entries[-1]["body"]["prompt"] == PN + " Sure! The sky is blue"
    rounds = [1] * (len(entries) - 1) + [2]
    assert [e["body"]["seed"] for e in entries] == [
        derive_seed(7, 0, r, roles[e["role"]]) for e, r in zip(entries, rounds, strict=True)]


async def test_fast_long_continuation_is_streamed_in_parts_of_256(pair: Scripted) -> None:
    words = "".join(f" w{i}" for i in range(300))
    pair.nudger.add(PN, toks(" Go on"), eos=False)
    pair.base.add(PB + " Go", toks(words) + [(".", 0.1)], eos=False)
    pair.nudger.add(PN + " Go" + words, toks("!"), eos=True)
    out = await run(pair, "fast", {"lookahead_tokens": 2, "max_tokens": 1000})
    assert out.text == " Go" + words + "!"
    # The winning probe streams 256 tokens (w0..w255); a new stream goes on from there.
    first = "".join(f" w{i}" for i in range(256))
    assert [r for r in requests(pair) if r[0] == "b"] == [
        ("b", " Go", 256, True),
        ("b", " Go" + first, 256, True),
    ]


async def test_fast_probe_that_ends_at_once_is_empty_like_paper(pair: Scripted) -> None:
    script_empty_probe(pair)
    paper = await run(pair, "paper", {"lookahead_tokens": 2})
    fast = await run(pair, "fast", {"lookahead_tokens": 2})
    assert fast.text == paper.text == EMPTY_PROBE_TEXT
    assert fast.stats.rules["empty_probe"] == 1
    assert [r for r in requests(pair) if r[0] == "b"] == [("b", " Hi", 200, True)]


async def test_fast_stops_when_the_first_token_uses_up_the_budget(pair: Scripted) -> None:
    # The first accepted token uses up the budget; the base's next token is uncertain.
    pair.nudger.add(PN, toks(" Sure! The sky"), eos=False)
    pair.base.add(PB + " Sure!", [(" Well", 0.2)], eos=False)
    pair.base.add(PB + " Sure! The", [(" sky", 0.9), ("!", 0.1)], eos=False)
    paper = await run(pair, "paper", {"lookahead_tokens": 3, "max_tokens": 3})
    fast = await run(pair, "fast", {"lookahead_tokens": 3, "max_tokens": 3})
    assert fast.text == paper.text == " Sure! The sky"
    assert paper.stats.rules["budget_in_continuation"] == 1
    assert fast.stats.rules == paper.stats.rules
