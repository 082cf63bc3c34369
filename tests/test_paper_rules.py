"""Strategy `paper`, rule by rule (DESIGN 3.1), plus the budget and stop strings (DESIGN 5).

Every test scripts the two upstreams, runs one generation and asserts the exact text and
the exact upstream requests, in order, that prove the rule: `pair.calls()` lists them as
("n" | "b", prompt after P_n | P_b, max_tokens).

The scripted upstreams answer in this process (`nudging_core.upstream.MemoryUpstream`, the
vLLM dialect's JSON parsed as a server's would be): no sockets, no uvicorn, which keeps the
module fast enough to run under mutation testing.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nudging_core.calls import derive_seed
from nudging_core.nudging import NudgingParams
from nudging_core.nudging.rules import Lookahead, clean_repetitions, repeated_suffix_length
from nudging_core.types import Role, SamplingParams
from nudging_core.upstream import MemoryUpstream, Upstream
from tests.harness import BASE_PROMPT as PB
from tests.harness import NUDGING_PROMPT as PN
from tests.harness import NudgingRun, run_nudging
from tests.scripted import ScriptedUpstream

# --- infrastructure ------------------------------------------------------------------------------

Tokens = list[tuple[str, float]]


def toks(text: str, p: float = 0.9) -> Tokens:
    """Tokens with top-1 probability `p`: split at "|" if present, else one token per word
    (a token is its leading spaces plus the word: " a b" -> [" a", " b"])."""
    parts = text.split("|") if "|" in text else re.findall(r" *[^ ]+| +", text)
    return [(part, p) for part in parts]


def n(suffix: str, max_tokens: int = 16) -> tuple[str, str, int]:
    """An expected nudger request: prompt P_n + suffix."""
    return ("n", suffix, max_tokens)


def b(suffix: str, max_tokens: int = 16) -> tuple[str, str, int]:
    """An expected base request: prompt P_b + suffix."""
    return ("b", suffix, max_tokens)


class Mount:
    """One scripted upstream in this process: records every completions request on arrival
    (in the pair's shared log), and can hold chosen prompts back for a while; a held request
    whose client leaves is abandoned and never reaches the upstream. The answer is written at
    once, whether or not the client reads it (as a server writes into its socket); with
    `event_delay`, each event of a streamed reply comes that many seconds after the previous."""

    def __init__(self, upstream: ScriptedUpstream, role: str, log: list[dict[str, Any]]) -> None:
        self.upstream = upstream
        self.role = role
        self.log = log
        self.delays: dict[tuple[str, bool], float] = {}
        self.event_delay = 0.0

    async def handle(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        entry = {"role": self.role, "body": request, "arrived": time.monotonic(),
                 "answered": None, "abandoned": False}
        self.log.append(entry)
        delay = self.delays.get((request["prompt"], bool(request.get("stream"))), 0.0)
        if delay:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                entry["abandoned"] = True
                raise
        payloads = self.upstream.answer(request, ROLES[self.role])
        written: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        async def write() -> None:
            paced = bool(self.event_delay and request.get("stream"))
            for payload in payloads:
                if paced:
                    await asyncio.sleep(self.event_delay)
                written.put_nowait(payload)
            if paced:
                await asyncio.sleep(self.event_delay)  # a server's closing `[DONE]` event
            entry["answered"] = time.monotonic()
            written.put_nowait(None)

        writer = asyncio.ensure_future(write())
        try:
            while (payload := await written.get()) is not None:
                yield payload
        finally:
            writer.cancel()

    def upstream_for(self) -> MemoryUpstream:
        return MemoryUpstream(self.handle, role=ROLES[self.role], model="scripted")


ROLES: dict[str, Role] = {"b": "base", "n": "nudging"}


class Hub:
    """What a module's pairs share (nothing, since the upstreams live in memory; kept so the
    modules that import it keep their fixtures)."""


class Scripted:
    """A scripted base/nudger pair, in this process."""

    def __init__(self, hub: Hub, url: str, key: str) -> None:
        self.base = ScriptedUpstream("base")
        self.nudger = ScriptedUpstream("nudger")
        self.log: list[dict[str, Any]] = []
        self.mounts = {"b": Mount(self.base, "b", self.log), "n": Mount(self.nudger, "n", self.log)}

    def upstreams(self) -> dict[Role, Upstream]:
        return {"base": self.mounts["b"].upstream_for(), "nudging": self.mounts["n"].upstream_for()}

    async def run(self, max_tokens: int = 200, stop: tuple[str, ...] = (), **params: Any) -> NudgingRun:
        self.log.clear()
        out = await run_nudging(self.upstreams(), max_tokens=max_tokens, stop=stop, **params)
        received = {"base": sum(e["role"] == "b" for e in self.log),
                    "nudging": sum(e["role"] == "n" for e in self.log)}
        if params.get("strategy") == "paper":
            assert out.stats.upstream_requests == received
        else:  # a request cancelled early may never reach the upstream
            for role, count in received.items():
                sent, cancelled = out.stats.upstream_requests[role], out.stats.cancelled_requests[role]
                assert sent - cancelled <= count <= sent
        return out

    async def run_seeded(self, seed: int, **params: Any) -> str:
        """A generation with `seed` (the harness has no sampling parameters); returns its text."""
        self.log.clear()
        out = await run_nudging(self.upstreams(), sampling=SamplingParams(seed=seed), **params)
        return out.text

    def delay(self, role: str, suffix: str, seconds: float, *, stream: bool = False) -> None:
        """Hold back the requests (streamed or not) for prompt P_b/P_n + suffix."""
        self.mounts[role].delays[((PB if role == "b" else PN) + suffix, stream)] = seconds

    def entries(self) -> list[dict[str, Any]]:
        return list(self.log)

    def calls(self) -> list[tuple[str, str, int]]:
        """Every completions request in arrival order: (role, prompt after P_b/P_n, max_tokens)."""
        result = []
        for entry in self.log:
            prefix = PB if entry["role"] == "b" else PN
            prompt = entry["body"]["prompt"]
            assert prompt.startswith(prefix), prompt
            result.append((entry["role"], prompt[len(prefix):], entry["body"]["max_tokens"]))
        return result


@pytest.fixture(scope="module")
def hub() -> Iterator[tuple[Hub, str, Iterator[int]]]:
    yield Hub(), "memory://", itertools.count()


@pytest.fixture
def pair(hub: tuple[Hub, str, Iterator[int]]) -> Scripted:
    app, url, keys = hub
    return Scripted(app, url, f"t{next(keys)}")


def runs(**params: Any) -> dict[str, Any]:
    return {"strategy": "paper", **params}


@pytest.fixture(params=["paper", "fast"])
def strategy(request: pytest.FixtureRequest) -> str:
    """The step-7 tests run on both strategies: `fast` judges the same chunks on its stream."""
    return str(request.param)


def expect_calls(pair: Scripted, strategy: str, *expected: Any) -> None:
    """The exact requests of `paper` (optionally only the last `-k`); `fast` sends its own
    (tests/test_fast_strategy.py checks them)."""
    if strategy != "paper":
        return
    *last, calls = expected
    assert pair.calls()[last[0]:] == calls if last else pair.calls() == calls


# --- scenarios shared with tests/test_fast_strategy.py ------------------------------------------
# Each scripts a pair consistently (a deterministic base: a request's reply never contradicts
# another's), so that `fast` must give the same text as `paper` when no step-7 guard fires.


def script_takeover_after_first_word(pair: Scripted) -> None:
    """L=4: " Sure! The sky is"; the base refuses at "Sure!", agrees at "The" (" sky" is a
    prefix of " sky"), continues " is blue" and is uncertain at "."; the nudger then stops."""
    pair.nudger.add(PN, toks(" Sure! The sky is"), eos=False)
    pair.base.add(PB + " Sure!", [(" Well", 0.2)], eos=False)
    pair.base.add(
        PB + " Sure! The",
        [(" sky", 0.8), (" is", 0.9), (" blue", 0.9), (".", 0.3), (" Next", 0.5)],
        eos=False,
    )
    pair.nudger.add(PN + " Sure! The sky is blue", [(".", 0.9), (" Bye", 0.9)], eos=True)


TAKEOVER_TEXT = " Sure! The sky is blue. Bye"


def script_chunks(pair: Scripted) -> None:
    """L=3; the base takes over at "The" and goes on confidently for 6 tokens."""
    pair.nudger.add(PN, toks(" Sure! The sky"), eos=False)
    pair.base.add(PB + " Sure!", [(" Well", 0.2)], eos=False)
    pair.base.add(PB + " Sure! The", toks(" sky is blue and calm today") + [(".", 0.1)], eos=False)
    pair.nudger.add(PN + " Sure! The sky is blue and calm today", [(".", 0.9)], eos=True)


CHUNKS_TEXT = " Sure! The sky is blue and calm today."


def script_no_takeover(pair: Scripted) -> None:
    """L=4 " The sky is bl": the base refuses at every boundary; "bl" is dropped."""
    pair.nudger.add(PN, toks(" The| sky| is| bl|ue"), eos=False)
    pair.base.add(PB + " The", [(" x", 0.1)], eos=False)
    pair.base.add(PB + " The sky", [(" y", 0.1)], eos=False)
    pair.base.add(PB + " The sky is", [(" z", 0.1)], eos=False)
    pair.nudger.add(PN + " The sky is", toks(" blue."), eos=True)


NO_TAKEOVER_TEXT = " The sky is blue."


def script_spaces_and_newlines(pair: Scripted) -> None:
    """L=5 " \\nDear all,\\nhi  there": space prefix " ", words "\\nDear", "all,\\nhi", "", "there"."""
    pair.nudger.add(PN, toks(" \n|Dear| all,|\nhi| | there"), eos=False)
    pair.base.add(PB + " \nDear", [(" x", 0.1)], eos=False)
    pair.base.add(PB + " \nDear all,\nhi ", [(" y", 0.1)], eos=False)
    pair.nudger.add(PN + " \nDear all,\nhi ", toks("there!"), eos=True)


SPACES_TEXT = " \nDear all,\nhi there!"


def script_one_word_rounds(pair: Scripted) -> None:
    """L=2: one word a round (no base call), then the nudger stops."""
    pair.nudger.add(PN, toks("  Hel|lo| wor|ld| again"), eos=False)
    pair.nudger.add(PN + "  Hello world", toks("!"), eos=True)


ONE_WORD_TEXT = "  Hello world!"


def script_empty_probe(pair: Scripted) -> None:
    """The base's probe at "Hi" has no token at all (it stops at once): empty text is a prefix
    of any word, so it takes over, and an empty probe means: next round."""
    pair.nudger.add(PN, toks(" Hi there"), eos=False)
    pair.base.add(PB + " Hi", [], eos=True)
    pair.nudger.add(PN + " Hi", toks(" you."), eos=True)


EMPTY_PROBE_TEXT = " Hi you."


def script_base_stops(pair: Scripted) -> None:
    """The base takes over at "The", says " sky is blue." and stops; the generation goes on."""
    pair.nudger.add(PN, toks(" Sure! The sky"), eos=False)
    pair.base.add(PB + " Sure!", [(" Well", 0.2)], eos=False)
    pair.base.add(PB + " Sure! The", toks(" sky is blue."), eos=True)
    pair.nudger.add(PN + " Sure! The sky is blue.", toks(" Bye"), eos=True)


BASE_STOPS_TEXT = " Sure! The sky is blue. Bye"


def script_single_token_probe(pair: Scripted) -> None:
    """The base takes over at "The" with one token and stops: the first chunk is empty."""
    pair.nudger.add(PN, toks(" Sure! The sky"), eos=False)
    pair.base.add(PB + " Sure!", [(" Well", 0.2)], eos=False)
    pair.base.add(PB + " Sure! The", [(" sky", 0.1)], eos=True)
    pair.nudger.add(PN + " Sure! The sky", toks(" is blue."), eos=True)


SINGLE_TOKEN_TEXT = " Sure! The sky is blue."


def script_repeated_words(pair: Scripted) -> None:
    """L=1, one word a round: " la" four times in a row."""
    pair.nudger.add(PN, toks(" la la la la la la"), eos=False)


def script_distinct_words(pair: Scripted) -> None:
    """L=1, one new word a round."""
    pair.nudger.add(PN, toks(" a b c d e f g h"), eos=False)


def script_budget_words(pair: Scripted) -> None:
    """Tokens " Sure!| The| sk|y is| blue": "y is" straddles the boundary before "is". The base
    refuses at "Sure!" and "The", takes over at "sky" with " is very blue", uncertain at "!"."""
    pair.nudger.add(PN, toks(" Sure!| The| sk|y is| blue"), eos=False)
    pair.base.add(PB + " Sure!", [(" x", 0.1)], eos=False)
    pair.base.add(PB + " Sure! The", [(" y", 0.1)], eos=False)
    pair.base.add(PB + " Sure! The sky", toks(" is very blue") + [("!", 0.1)], eos=False)
    pair.nudger.add(PN + " Sure! The sky is very blue", toks("!"), eos=True)


BUDGET_TEXT = " Sure! The sky is very blue!"


# --- step 1, 2: the lookahead; a nudger that stops ends the generation -----------------------------


async def test_round_lookahead_probes_continuation(pair: Scripted) -> None:
    script_takeover_after_first_word(pair)
    out = await pair.run(**runs(lookahead_tokens=4))
    assert out.text == TAKEOVER_TEXT
    assert pair.calls() == [n("", 4), b(" Sure!"), b(" Sure! The"), n(" Sure! The sky is blue", 4)]
    assert out.stats.rules == {"space_prefix": 1, "takeover_after_first_word": 1, "uncertain_token": 1,
                               "nudger_stop": 1}
    assert (out.stats.stop_reason, out.finish_reason, out.stats.rounds) == ("nudging_model_stop", "stop", 2)
    assert [(p.text, p.source) for p in out.pieces] == [
        (" Sure! The", "nudging"), (" sky", "base"), (" is blue", "base"), (". Bye", "nudging")]
    assert out.completion_tokens == 2 + 3 + 2
    assert all(not e["body"]["stream"] and e["body"]["logprobs"] == 1 for e in pair.entries())


async def test_nudger_stop_appends_whole_lookahead(pair: Scripted) -> None:
    # Several words, uncertain tokens, a trailing word: all of it is appended, no base call.
    pair.nudger.add(PN, [(" Hello", 0.9), (" wor", 0.1), ("ld", 0.2), ("  again", 0.9)], eos=True)
    out = await pair.run(**runs())
    assert out.text == " Hello world  again"
    assert pair.calls() == [n("")]
    assert out.stats.rules == {"nudger_stop": 1}
    assert (out.stats.stop_reason, out.finish_reason, out.completion_tokens) == (
        "nudging_model_stop",
        "stop",
        4,
    )


async def test_nudger_length_is_not_a_stop(pair: Scripted) -> None:
    # Same lookahead but cut by L (finish "length"): words are split and probed.
    pair.nudger.add(PN, [(" Hello", 0.9), (" wor", 0.1), ("ld", 0.2), ("  again", 0.9), ("!", 0.9)], eos=True)
    pair.base.add(PB + " Hello", [(" x", 0.1)], eos=False)
    pair.base.add(PB + " Hello world ", [(" y", 0.1)], eos=False)
    pair.nudger.add(PN + " Hello world ", toks(" again!"), eos=True)
    out = await pair.run(**runs(lookahead_tokens=4))
    assert out.text == " Hello world  again!"
    assert pair.calls() == [n("", 4), b(" Hello"), b(" Hello world "), n(" Hello world ", 4)]


# --- step 3: space prefix, split(" ") -----------------------------------------------------------


async def test_space_prefix_is_spaces_only(pair: Scripted) -> None:
    pair.nudger.add(PN, toks("  Hi| there| friend"), eos=False)
    pair.base.add(PB + "  Hi", [(" x", 0.1)], eos=False)
    pair.base.add(PB + "  Hi there", [(" y", 0.1)], eos=False)
    pair.nudger.add(PN + "  Hi there", toks("!"), eos=True)
    out = await pair.run(**runs(lookahead_tokens=3))
    assert out.text == "  Hi there!"
    assert pair.calls() == [n("", 3), b("  Hi"), b("  Hi there"), n("  Hi there", 3)]
    assert out.stats.rules == {"space_prefix": 1, "no_takeover": 1, "nudger_stop": 1}


async def test_newlines_stay_inside_words_and_double_spaces_give_empty_words(pair: Scripted) -> None:
    script_spaces_and_newlines(pair)
    out = await pair.run(**runs(lookahead_tokens=6))
    assert out.text == SPACES_TEXT
    # Words: "\nDear", "all,\nhi", "", "there": no probe before the empty word, and the probe
    # before "there" ends with the space that precedes the empty word.
    assert pair.calls() == [n("", 6), b(" \nDear"), b(" \nDear all,\nhi "), n(" \nDear all,\nhi ", 6)]
    assert out.stats.rules == {"space_prefix": 1, "newline_in_word": 1, "empty_word_skipped": 1,
                               "no_takeover": 1, "nudger_stop": 1}


async def test_leading_newline_is_not_a_space_prefix(pair: Scripted) -> None:
    pair.nudger.add(PN, toks("\nHi| there| you"), eos=False)
    pair.base.add(PB + "\nHi", [(" x", 0.1)], eos=False)
    pair.base.add(PB + "\nHi there", [(" q", 0.1)], eos=False)
    pair.nudger.add(PN + "\nHi there", toks("!"), eos=True)
    out = await pair.run(**runs(lookahead_tokens=3))
    assert out.text == "\nHi there!"
    assert pair.calls() == [n("", 3), b("\nHi"), b("\nHi there"), n("\nHi there", 3)]
    assert "space_prefix" not in out.stats.rules


async def test_double_space_first_boundary_and_takeover_after_it(pair: Scripted) -> None:
    # " one  two three": words "one", "", "two", "three"; the base agrees with "two".
    pair.nudger.add(PN, toks(" one| | two| three"), eos=False)
    pair.base.add(PB + " one ", [(" two", 0.1), (" and", 0.9), (" four", 0.2)], eos=False)
    pair.nudger.add(PN + " one  two and", toks("."), eos=True)
    out = await pair.run(**runs(lookahead_tokens=4))
    assert out.text == " one  two and."
    assert pair.calls() == [n("", 4), b(" one "), n(" one  two and", 4)]
    assert out.stats.rules["empty_word_skipped"] == 1
    assert out.stats.rules["takeover_after_first_word"] == 1


async def test_spaces_only_lookahead_is_one_word(pair: Scripted) -> None:
    pair.nudger.add(PN, toks("   |x"), eos=False)
    pair.nudger.add(PN + "   ", toks("x."), eos=True)
    out = await pair.run(**runs(lookahead_tokens=1))
    assert out.text == "   x."
    assert pair.calls() == [n("", 1), n("   ", 1)]
    assert out.stats.rules == {"space_prefix": 1, "one_word": 1, "nudger_stop": 1}


@pytest.mark.parametrize(
    ("text", "space_prefix", "words"),
    [
        ("  Hi there", "  ", ("Hi", "there")),
        ("  XX there", "  ", ("XX", "there")),
        ("\n Hi", "", ("\n", "Hi")),
        (" \tHi  you ", " ", ("\tHi", "", "you", "")),
        ("   ", "   ", ("",)),
        ("", "", ("",)),
    ],
)
def test_lookahead_split(text: str, space_prefix: str, words: tuple[str, ...]) -> None:
    lookahead = Lookahead.split(text)
    assert (lookahead.space_prefix, lookahead.words) == (space_prefix, words)
    assert lookahead.prefix(len(words)) == text


# --- step 4: one word, probes, takeover ---------------------------------------------------------


async def test_one_word_path_never_calls_the_base(pair: Scripted) -> None:
    script_one_word_rounds(pair)
    out = await pair.run(**runs(lookahead_tokens=2))
    assert out.text == ONE_WORD_TEXT
    assert pair.calls() == [n("", 2), n("  Hello", 2), n("  Hello world", 2)]
    assert out.stats.rules == {"space_prefix": 2, "one_word": 2, "nudger_stop": 1}
    assert out.completion_tokens == 5


async def test_first_word_always_accepted_and_probes_use_chunk_tokens(pair: Scripted) -> None:
    # The base is confident everywhere; it is never asked at P_b + out.
    pair.nudger.add(PN, toks(" Sure! The"), eos=False)
    pair.base.add(PB, toks(" No.", 0.99), eos=True)
    pair.base.add(PB + " Sure!", toks(" Yes indeed", 0.99) + [(".", 0.1)], eos=False)
    pair.nudger.add(PN + " Sure! Yes indeed", toks("."), eos=True)
    out = await pair.run(**runs(lookahead_tokens=2, chunk_tokens=3))
    assert out.text == " Sure! Yes indeed."
    assert pair.calls() == [n("", 2), b(" Sure!", 3), n(" Sure! Yes indeed", 2)]
    assert out.stats.rules["takeover"] == 1


@pytest.mark.parametrize(
    ("first", "takes_over"),
    [(" sky", True), (" sk", True), (" ", True), ("", True),
     (" skyline", False), ("sky", False), (" Sky", False), (" is", False)],
)
async def test_takeover_by_prefix(pair: Scripted, first: str, takes_over: bool) -> None:
    # Word "sky" after "The"; the base is uncertain (0.1), only the prefix rule can hold.
    pair.nudger.add(PN, toks(" The sky is"), eos=False)
    pair.base.add(PB + " The", [(first, 0.1), ("!", 0.1)], eos=False)
    pair.base.add(PB + " The sky", [(" z", 0.1)], eos=False)
    pair.nudger.add(PN + " The" + first, toks("."), eos=True)
    pair.nudger.add(PN + " The sky", toks("."), eos=True)
    out = await pair.run(**runs(lookahead_tokens=3))
    if takes_over:
        # The probe's first token is accepted although uncertain; the next one is not.
        assert out.text == " The" + first + "."
        assert pair.calls() == [n("", 3), b(" The"), n(" The" + first, 3)]
        assert out.stats.rules["takeover"] == 1
    else:
        assert out.text == " The sky."
        assert pair.calls() == [n("", 3), b(" The"), b(" The sky"), n(" The sky", 3)]
        assert "takeover" not in out.stats.rules


@pytest.mark.parametrize(
    ("probability", "threshold", "takes_over"),
    [(0.4, 0.4, True), (math.nextafter(0.4, 0.0), 0.4, False), (0.9, 0.4, True),
     (0.3, 0.3, True), (0.3, 0.4, False), (0.3, 0.25, True)],
)
async def test_takeover_by_confidence(pair: Scripted, probability: float, threshold: float,
                                      takes_over: bool) -> None:
    # " Well" is no prefix of " sky": only top-1 >= threshold can make the base take over.
    assert math.exp(math.log(probability)) == probability  # what the upstream reports, exactly
    pair.nudger.add(PN, toks(" The sky is"), eos=False)
    pair.base.add(PB + " The", [(" Well", probability), ("!", 0.01)], eos=False)
    pair.base.add(PB + " The sky", [(" z", 0.01)], eos=False)
    pair.nudger.add(PN + " The Well", toks("."), eos=True)
    pair.nudger.add(PN + " The sky", toks("."), eos=True)
    out = await pair.run(**runs(lookahead_tokens=3, threshold=threshold))
    if takes_over:
        assert out.text == " The Well."
        assert pair.calls() == [n("", 3), b(" The"), n(" The Well", 3)]
    else:
        assert out.text == " The sky."
        assert pair.calls() == [n("", 3), b(" The"), b(" The sky"), n(" The sky", 3)]


async def test_no_takeover_drops_last_cut_word(pair: Scripted) -> None:
    script_no_takeover(pair)
    out = await pair.run(**runs(lookahead_tokens=4))
    assert out.text == NO_TAKEOVER_TEXT
    assert pair.calls() == [n("", 4), b(" The"), b(" The sky"), b(" The sky is"), n(" The sky is", 4)]
    assert out.stats.rules == {"no_takeover": 1, "space_prefix": 1, "nudger_stop": 1}
    # " bl" was dropped: the nudging piece covers 3 tokens.
    assert out.pieces[0].text == " The sky is" and out.pieces[0].num_tokens == 3


async def test_takeover_at_last_boundary(pair: Scripted) -> None:
    pair.nudger.add(PN, toks(" The| sky| is| bl"), eos=False)
    pair.base.add(PB + " The", [(" x", 0.1)], eos=False)
    pair.base.add(PB + " The sky", [(" y", 0.1)], eos=False)
    pair.base.add(PB + " The sky is", [(" b", 0.1), ("lue", 0.9), (".", 0.1)], eos=False)
    pair.nudger.add(PN + " The sky is blue", toks("."), eos=True)
    out = await pair.run(**runs(lookahead_tokens=4))
    assert out.text == " The sky is blue."
    assert pair.calls() == [n("", 4), b(" The"), b(" The sky"), b(" The sky is"), n(" The sky is blue", 4)]
    assert out.stats.rules["takeover_after_first_word"] == 1


# --- step 5: repeated nudging words -------------------------------------------------------------


async def test_fourth_identical_nudging_words_end_without_appending(pair: Scripted) -> None:
    script_repeated_words(pair)
    out = await pair.run(**runs(lookahead_tokens=1))
    assert out.text == " la la la"
    assert pair.calls() == [n("", 1), n(" la", 1), n(" la la", 1), n(" la la la", 1)]
    assert (out.stats.stop_reason, out.finish_reason, out.stats.rounds) == (
        "repeated_nudging_words",
        "stop",
        4,
    )
    assert out.stats.rules["repeated_nudging_words"] == 1


async def test_three_identical_nudging_words_do_not_end(pair: Scripted) -> None:
    pair.nudger.add(PN, toks(" la la la end"), eos=False)
    pair.nudger.add(PN + " la la la end", toks("."), eos=True)
    out = await pair.run(**runs(lookahead_tokens=1))
    assert out.text == " la la la end."
    assert "repeated_nudging_words" not in out.stats.rules
    assert out.stats.stop_reason == "nudging_model_stop"


async def test_repetition_counter_reset_by_different_words(pair: Scripted) -> None:
    # la la la x la la la: never four in a row; then la a fourth time after x ends it.
    pair.nudger.add(PN, toks(" la la la x la la la la la"), eos=False)
    out = await pair.run(**runs(lookahead_tokens=1))
    assert out.text == " la la la x la la la"
    assert len(pair.calls()) == 8
    assert out.stats.stop_reason == "repeated_nudging_words"


async def test_repetition_starts_from_empty_words(pair: Scripted) -> None:
    # An empty lookahead equals the initial "": the third one is the fourth "identical set".
    pair.nudger.add(PN, [], eos=False)
    out = await pair.run(**runs(lookahead_tokens=1))
    assert out.text == ""
    assert pair.calls() == [n("", 1)] * 3
    assert out.stats.stop_reason == "repeated_nudging_words"


async def test_repetition_on_the_probing_path(pair: Scripted) -> None:
    # Nudging words " Hi" each round (the base refuses "there"); the fourth ends it, after its probe.
    pair.nudger.add(PN, toks(" Hi there"), eos=False)
    for k in range(1, 4):
        pair.nudger.add(PN + " Hi" * k, toks(" Hi there"), eos=False)
    for k in range(1, 5):
        pair.base.add(PB + " Hi" * k, [(" x", 0.1)], eos=False)
    out = await pair.run(**runs(lookahead_tokens=2))
    assert out.text == " Hi Hi Hi"
    assert pair.calls() == [n("", 2), b(" Hi"), n(" Hi", 2), b(" Hi Hi"), n(" Hi Hi", 2), b(" Hi Hi Hi"),
                            n(" Hi Hi Hi", 2), b(" Hi Hi Hi Hi")]
    assert out.stats.stop_reason == "repeated_nudging_words"
    assert out.stats.rules["no_takeover"] == 4


# --- step 6: empty probe ------------------------------------------------------------------------


async def test_empty_probe_goes_to_next_round(pair: Scripted) -> None:
    script_empty_probe(pair)
    out = await pair.run(**runs(lookahead_tokens=2))
    assert out.text == EMPTY_PROBE_TEXT
    assert pair.calls() == [n("", 2), b(" Hi"), n(" Hi", 2)]
    assert out.stats.rules["empty_probe"] == 1 and out.stats.rules["takeover"] == 1


async def test_probe_with_empty_first_token_text(pair: Scripted) -> None:
    # A first token with empty text (e.g. half a character) is a prefix of any word.
    pair.nudger.add(PN, toks(" Hi there"), eos=False)
    pair.base.add(PB + " Hi", [("", 0.1)], eos=True)
    pair.nudger.add(PN + " Hi", toks(" you."), eos=True)
    out = await pair.run(**runs(lookahead_tokens=2))
    assert out.text == " Hi you."
    assert pair.calls() == [n("", 2), b(" Hi"), n(" Hi", 2)]
    assert out.stats.rules["empty_probe"] == 1


# --- step 7: the base continuation ---------------------------------------------------------------


async def test_continuation_in_chunks_of_c_tokens(pair: Scripted, strategy: str) -> None:
    script_chunks(pair)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=3, chunk_tokens=2))
    assert out.text == CHUNKS_TEXT
    expect_calls(pair, strategy, [
        n("", 3), b(" Sure!", 2), b(" Sure! The", 2),
        b(" Sure! The sky is", 2), b(" Sure! The sky is blue and", 2),
        b(" Sure! The sky is blue and calm today", 2),
        n(" Sure! The sky is blue and calm today", 3),
    ])
    assert out.stats.rules["uncertain_token"] == 1
    pieces = [p.text for p in out.pieces if p.source == "base"]
    assert pieces == ([" sky", " is", " blue and", " calm today", ""] if strategy == "paper"
                      else [" sky", " is", " blue", " and", " calm", " today", ""])


async def test_single_token_probe_gives_empty_first_chunk(pair: Scripted, strategy: str) -> None:
    script_single_token_probe(pair)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=3))
    assert out.text == SINGLE_TOKEN_TEXT
    # The uncertain first token is accepted; the empty first chunk stops without a fetch.
    expect_calls(pair, strategy, [n("", 3), b(" Sure!"), b(" Sure! The"), n(" Sure! The sky", 3)])
    assert out.stats.rules["chunk_empty"] == 1


async def test_fetched_empty_chunk_stops(pair: Scripted, strategy: str) -> None:
    # The probe fills C=2 tokens; the fetched chunk is empty (finish "length", no token).
    pair.nudger.add(PN, toks(" Sure! The sky"), eos=False)
    pair.base.add(PB + " Sure!", [(" Well", 0.2)], eos=False)
    pair.base.add(PB + " Sure! The", toks(" sky is"), eos=False)
    pair.nudger.add(PN + " Sure! The sky is", toks(" blue."), eos=True)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=3, chunk_tokens=2))
    assert out.text == " Sure! The sky is blue."
    expect_calls(pair, strategy, [n("", 3), b(" Sure!", 2), b(" Sure! The", 2), b(" Sure! The sky is", 2),
                            n(" Sure! The sky is", 3)])
    assert out.stats.rules["chunk_empty"] == 1


async def test_probe_finish_reason_is_ignored(pair: Scripted) -> None:
    # The probe reports "stop" after " sky is", yet a chunk is fetched (and here it goes on).
    # (A base that contradicts itself: `fast`, which reads one stream, sees it stop.)
    strategy = "paper"
    pair.nudger.add(PN, toks(" Sure! The sky"), eos=False)
    pair.base.add(PB + " Sure!", [(" Well", 0.2)], eos=False)
    pair.base.add(PB + " Sure! The", toks(" sky is"), eos=True)
    pair.base.add(PB + " Sure! The sky is", toks(" blue."), eos=True)
    pair.nudger.add(PN + " Sure! The sky is blue.", toks(" Bye"), eos=True)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=3))
    assert out.text == " Sure! The sky is blue. Bye"
    expect_calls(pair, strategy, [n("", 3), b(" Sure!"), b(" Sure! The"), b(" Sure! The sky is"),
                            n(" Sure! The sky is blue.", 3)])
    assert out.stats.rules["base_stop"] == 1


async def test_base_stop_ends_the_continuation_not_the_generation(pair: Scripted, strategy: str) -> None:
    pair.nudger.add(PN, toks(" Sure! The sky"), eos=False)
    pair.base.add(PB + " Sure!", [(" Well", 0.2)], eos=False)
    pair.base.add(PB + " Sure! The", toks(" sky is blue."), eos=True)
    pair.nudger.add(PN + " Sure! The sky is blue.", toks(" Bye"), eos=True)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=3, chunk_tokens=2))
    assert out.text == " Sure! The sky is blue. Bye"
    expect_calls(pair, strategy, [n("", 3), b(" Sure!", 2), b(" Sure! The", 2), b(" Sure! The sky is", 2),
                            n(" Sure! The sky is blue.", 3)])
    assert out.stats.rules["base_stop"] == 1
    assert out.stats.stop_reason == "nudging_model_stop"


def script_threshold_edge(pair: Scripted) -> None:
    """The base continues " is" 0.9, " blue" exactly 0.4 (certain), " and" just below 0.4."""
    pair.nudger.add(PN, toks(" Sure! The sky"), eos=False)
    pair.base.add(PB + " Sure!", [(" Well", 0.2)], eos=False)
    pair.base.add(PB + " Sure! The", [(" sky", 0.9), (" is", 0.9), (" blue", 0.4),
                                      (" and", math.nextafter(0.4, 0.0)), (" calm", 0.9)], eos=False)
    pair.nudger.add(PN + " Sure! The sky is blue", toks("."), eos=True)


async def test_uncertain_token_in_fetched_chunk(pair: Scripted, strategy: str) -> None:
    # Top-1 exactly at the threshold is certain; just below is not.
    script_threshold_edge(pair)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=3, chunk_tokens=2))
    assert out.text == " Sure! The sky is blue."
    expect_calls(pair, strategy, [n("", 3), b(" Sure!", 2), b(" Sure! The", 2), b(" Sure! The sky is", 2),
                            n(" Sure! The sky is blue", 3)])


async def test_chunk_inside_acc_stops_first_chunk(pair: Scripted, strategy: str) -> None:
    # C=2: the probe is " la la"; the first chunk " la" is inside acc " la": stop.
    pair.nudger.add(PN, toks(" Sing la"), eos=False)
    pair.base.add(PB + " Sing", toks(" la la la la") + [(".", 0.1)], eos=False)
    pair.nudger.add(PN + " Sing la", toks("!"), eos=True)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=2, chunk_tokens=2))
    assert out.text == " Sing la!"
    expect_calls(pair, strategy, [n("", 2), b(" Sing", 2), n(" Sing la", 2)])
    assert out.stats.rules["chunk_repeats"] == 1


async def test_fetched_chunk_inside_acc_stops(pair: Scripted, strategy: str) -> None:
    # acc " sky a b a"; the next chunk " b a" is inside it: stop without adding.
    pair.nudger.add(PN, toks(" The sky"), eos=False)
    pair.base.add(PB + " The", toks(" sky a b a b a b"), eos=False)
    pair.nudger.add(PN + " The sky a b a", toks("."), eos=True)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=2, chunk_tokens=2))
    assert out.text == " The sky a b a."
    expect_calls(pair, strategy, [n("", 2), b(" The", 2), b(" The sky a", 2), b(" The sky a b a", 2),
                            n(" The sky a b a", 2)])
    assert out.stats.rules["chunk_repeats"] == 1


async def test_chunk_inside_acc_spanning_earlier_chunks_stops(pair: Scripted, strategy: str) -> None:
    # acc " sky a b c" after two chunks; the next chunk " a b" spans both of them: stop.
    pair.nudger.add(PN, toks(" The sky"), eos=False)
    pair.base.add(PB + " The", toks(" sky a b c a b x y"), eos=False)
    pair.nudger.add(PN + " The sky a b c", toks("."), eos=True)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=2, chunk_tokens=2))
    assert out.text == " The sky a b c."
    expect_calls(pair, strategy, [n("", 2), b(" The", 2), b(" The sky a", 2), b(" The sky a b c", 2),
                            n(" The sky a b c", 2)])
    assert out.stats.rules["chunk_repeats"] == 1


def script_copy(pair: Scripted, after_one: str) -> None:
    """Round 1 puts " one two three four five six" in `out` (no takeover, "seven" dropped); in
    round 2 the base takes over at "So" with " one", then `after_one`, then an uncertain "!"."""
    words = ["one", "two", "three", "four", "five", "six", "seven"]
    pair.nudger.add(PN, toks(" one two three four five six seven"), eos=False)
    for k in range(1, 7):
        pair.base.add(PB + "".join(" " + word for word in words[:k]), [(" x", 0.1)], eos=False)
    out1 = " one two three four five six"
    pair.nudger.add(PN + out1, toks(" So one"), eos=False)
    pair.base.add(PB + out1 + " So", [(" one", 0.9)] + toks(after_one) + [("!", 0.1)], eos=False)


async def test_copy_guard_more_than_five_pieces_in_output_stops(pair: Scripted, strategy: str) -> None:
    script_copy(pair, " two three four five six")  # 6 pieces by split(" "), all in `out`
    pair.nudger.add(PN + " one two three four five six So one", toks("."), eos=True)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=7))
    assert out.text == " one two three four five six So one."
    expect_calls(
        pair,
        strategy,
        -3,
        [
            n(" one two three four five six", 7),
            b(" one two three four five six So"),
            n(" one two three four five six So one", 7),
        ],
    )
    assert out.stats.rules["chunk_copies_output"] == 1
    assert "uncertain_token" not in out.stats.rules


async def test_copy_guard_five_pieces_do_not_stop(pair: Scripted, strategy: str) -> None:
    script_copy(pair, " two three four five")  # exactly 5 pieces: added
    pair.nudger.add(PN + " one two three four five six So one two three four five", toks("."), eos=True)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=7))
    assert out.text == " one two three four five six So one two three four five."
    assert "chunk_copies_output" not in out.stats.rules
    assert out.stats.rules["uncertain_token"] == 1


async def test_copy_guard_needs_the_text_in_output(pair: Scripted, strategy: str) -> None:
    script_copy(pair, " two three four five seven")  # 6 pieces, not in `out`: added
    pair.nudger.add(PN + " one two three four five six So one two three four five seven", toks("."), eos=True)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=7))
    assert out.text == " one two three four five six So one two three four five seven."
    assert "chunk_copies_output" not in out.stats.rules


async def test_copy_guard_sees_acc(pair: Scripted, strategy: str) -> None:
    # out = " a b c"; acc = " So d e f g"; the next chunk " a b c So d" spans both.
    pair.nudger.add(PN, toks(" a b c So"), eos=False)
    for prefix in (" a", " a b"):
        pair.base.add(PB + prefix, [(" z", 0.1)], eos=False)
    pair.base.add(
        PB + " a b c", [(" So", 0.1), (" d", 0.9), (" e", 0.9), (" f", 0.9), (" g", 0.9)], eos=False
    )
    pair.base.add(PB + " a b c So d e f g", toks(" a b c So d"), eos=False)
    pair.nudger.add(PN + " a b c So d e f g", toks("."), eos=True)
    out = await pair.run(**runs(strategy=strategy, lookahead_tokens=4, chunk_tokens=5))
    # " a b c So d" (6 pieces) occurs in out + acc = " a b c" + " So d e f g": stop without adding.
    assert out.text == " a b c So d e f g."
    expect_calls(
        pair,
        strategy,
        [
            n("", 4),
            b(" a", 5),
            b(" a b", 5),
            b(" a b c", 5),
            b(" a b c So d e f g", 5),
            n(" a b c So d e f g", 4),
        ],
    )
    assert out.stats.rules["chunk_copies_output"] == 1


# --- round limit --------------------------------------------------------------------------------


async def test_round_limit_param(pair: Scripted) -> None:
    script_distinct_words(pair)
    out = await pair.run(**runs(lookahead_tokens=1, max_rounds=3))
    assert out.text == " a b c"
    assert pair.calls() == [n("", 1), n(" a", 1), n(" a b", 1)]
    assert (out.stats.stop_reason, out.finish_reason, out.stats.rounds) == ("round_limit", "stop", 3)
    assert out.stats.rules["round_limit"] == 1


async def test_round_limit_counts_rounds_with_continuation(pair: Scripted) -> None:
    script_takeover_after_first_word(pair)
    out = await pair.run(**runs(lookahead_tokens=4, max_rounds=1))
    assert out.text == " Sure! The sky is blue"
    assert pair.calls() == [n("", 4), b(" Sure!"), b(" Sure! The")]
    assert out.stats.stop_reason == "round_limit"


async def test_default_round_limit_is_150(pair: Scripted) -> None:
    words = "".join(f" w{i}" for i in range(160))
    pair.nudger.add(PN, toks(words), eos=False)
    out = await pair.run(max_tokens=1000, **runs(lookahead_tokens=1))
    assert out.text == "".join(f" w{i}" for i in range(150))
    assert len(pair.calls()) == 150 and all(call[0] == "n" for call in pair.calls())
    assert (out.stats.stop_reason, out.finish_reason, out.stats.rounds) == ("round_limit", "stop", 150)


# --- step 8: clean-up ---------------------------------------------------------------------------


def has_repeated(s: str, length: int) -> bool:
    return length >= 30 and s[:-length].endswith(s[-length:])


def oracle_repeated_suffix_length(s: str) -> int:
    """The paper's binary search, written out again."""
    found = 0
    low, high = 0, len(s)
    while low <= high:
        mid = (low + high) // 2
        if has_repeated(s, mid):
            found = mid
            low = mid + 1
        else:
            high = mid - 1
    return found


def oracle_clean(s: str) -> str:
    s = s.strip()
    while True:
        length = oracle_repeated_suffix_length(s)
        if not length:
            return s
        s = s[:-length]


def any_repeated_suffix(s: str) -> int:
    """The longest immediately repeated suffix of >= 30 characters, by brute force."""
    return max((k for k in range(30, len(s) // 2 + 1) if has_repeated(s, k)), default=0)


R = "Sure! The sky is blue and so is the sea."  # 40 characters
D = "0123456789abcdefghijklmnopqrstuvwxyz"
assert len(R) == 40


@pytest.mark.parametrize(
    ("text", "length", "cleaned"),
    [
        (R + R, 40, R),
        ("  " + R + R + "\n", 0, R),  # the search itself does not strip
        (R * 4, 80, R),  # 80 first, then 40 on what is left
        (D[:30] * 2, 30, D[:30]),  # 30 characters is enough
        (D[:29] * 2, 0, D[:29] * 2),  # 29 is not
        ("x" * 61, 30, "x" * 31),  # the first mid (30) holds, no larger one: 31 are left
        ("x" * 60, 30, "x" * 30),
        ("Q" + "x" * 120, 60, "Q" + "x" * 30),  # found at the last step, where low == high
        ("Q" + "x" * 122, 61, "Q" + "x" * 61),  # found after a first success at 61, low = 62
        ("", 0, ""),
    ],
)
def test_clean_repetitions_examples(text: str, length: int, cleaned: str) -> None:
    assert repeated_suffix_length(text) == length
    assert clean_repetitions(text) == cleaned


def test_binary_search_misses_a_repeat() -> None:
    text = "Hello there, this is a long preamble. " + R + R  # a 40-character repeat
    assert any_repeated_suffix(text) == 40
    assert repeated_suffix_length(text) == 0  # mid 59 fails, so the search only looks below
    assert clean_repetitions(text) == text.strip()
    # Three copies: a real repeat, missed, while two copies are found.
    assert repeated_suffix_length(" " + R * 3) == 0 and clean_repetitions(" " + R * 3) == R * 3
    assert any_repeated_suffix(R * 3) == 40


repeaty = st.builds(
    lambda head, unit, times, tail: head + unit * times + tail,
    st.text(alphabet="ab \n", max_size=40),
    st.text(alphabet="ab .", min_size=1, max_size=45),
    st.integers(min_value=1, max_value=5),
    st.text(alphabet="ab", max_size=3),
)


periodic = st.builds(
    lambda head, unit, length: head + (unit * 300)[:length],
    st.text(alphabet="QR ", max_size=3),
    st.text(alphabet="ab", min_size=1, max_size=6),
    st.integers(min_value=0, max_value=260),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(repeaty, periodic, st.text(alphabet="ab", max_size=200), st.text(max_size=80)))
def test_clean_repetitions_matches_the_papers_search(text: str) -> None:
    assert repeated_suffix_length(text) == oracle_repeated_suffix_length(text)
    assert clean_repetitions(text) == oracle_clean(text)


async def test_cleanup_through_the_generation(pair: Scripted) -> None:
    # Round 1: "Sure! The" + base " sky is blue and so is the sea."; round 2 the nudger says it
    # all again and stops: X + X + "\n", cleaned to X.
    pair.nudger.add(PN, toks("Sure! The sky"), eos=False)
    pair.base.add(PB + "Sure!", [(" x", 0.1)], eos=False)
    pair.base.add(PB + "Sure! The", toks(" sky is blue and so is the sea.") + [("\n", 0.1)], eos=False)
    pair.nudger.add(PN + R, toks(R + "\n"), eos=True)
    raw = await pair.run(**runs())
    assert raw.text == R + R + "\n"
    calls = pair.calls()
    out = await pair.run(**runs(cleanup=True))
    assert out.text == R
    assert pair.calls() == calls
    assert out.stats.rules["cleanup"] == 1
    assert out.completion_tokens == 2 + 8
    assert [(p.text, p.source) for p in out.pieces] == [("Sure! The", "nudging"), (" sky", "base"),
                                                        (" is blue and so is the sea.", "base")]


async def test_cleanup_strips_and_keeps_missed_repeats(pair: Scripted) -> None:
    pair.nudger.add(PN, toks("  " + R * 3 + " \n"), eos=True)
    out = await pair.run(**runs(lookahead_tokens=64, cleanup=True))
    assert out.text == R * 3
    assert out.stats.rules["cleanup"] == 1


async def test_cleanup_counts_the_token_cut_by_the_strip(pair: Scripted) -> None:
    # Regression (fixed in aba41e6): the strip cuts inside the first token "  Sure!"; the token
    # covers kept text, so it counts (it used to go to the dropped head: 27 for 28 tokens).
    pair.nudger.add(PN, toks("  " + R * 3 + " \n"), eos=True)
    out = await pair.run(**runs(lookahead_tokens=64, cleanup=True))
    assert out.text == R * 3
    assert out.completion_tokens == len(toks(R * 3)) == 28


def script_sky_twice(pair: Scripted, last: str) -> None:
    """ "Sure! The" + base " sky is blue" (uncertain "!"), then the nudger stops with `last`."""
    pair.nudger.add(PN, toks("Sure! The sky"), eos=False)
    pair.base.add(PB + "Sure!", [(" x", 0.1)], eos=False)
    pair.base.add(PB + "Sure! The", toks(" sky is blue") + [("!", 0.1)], eos=False)
    pair.nudger.add(PN + "Sure! The sky is blue", toks(last), eos=True)


async def test_cleanup_that_changes_nothing_does_not_fire(pair: Scripted) -> None:
    script_sky_twice(pair, "!")
    out = await pair.run(**runs(cleanup=True))
    assert out.text == "Sure! The sky is blue!"
    assert "cleanup" not in out.stats.rules
    assert len(out.pieces) == 4 and out.completion_tokens == 2 + 3 + 1


async def test_cleanup_drops_a_whitespace_only_first_piece(pair: Scripted) -> None:
    # Round 1 is the one word "\n", round 2 "Hi", then the nudger stops with " there.".
    pair.nudger.add(PN, toks("\n|Hi"), eos=False)
    pair.nudger.add(PN + "\nHi", toks(" there."), eos=True)
    out = await pair.run(**runs(lookahead_tokens=1, cleanup=True))
    assert out.text == "Hi there."
    assert [(p.text, p.num_tokens) for p in out.pieces] == [("Hi", 1), (" there.", 1)]
    assert out.completion_tokens == 2


async def test_cleanup_keeps_every_token_of_unchanged_text(pair: Scripted) -> None:
    # The last token has empty text (half a character at the end): it still counts.
    pair.nudger.add(PN, [("Hi", 0.9), (" there", 0.9), ("", 0.9)], eos=True)
    out = await pair.run(**runs(cleanup=True))
    assert out.text == "Hi there"
    assert out.completion_tokens == 3
    assert "cleanup" not in out.stats.rules


async def test_cleanup_cuts_inside_a_piece(pair: Scripted) -> None:
    # The last piece holds the end of the first copy and the whole second one.
    script_sky_twice(pair, " and so is the sea." + R + "\n")
    out = await pair.run(**runs(cleanup=True))
    assert out.text == R
    assert [(p.text, p.source) for p in out.pieces] == [
        ("Sure! The", "nudging"), (" sky", "base"), (" is blue", "base"), (" and so is the sea.", "nudging")]
    # The token "sea.Sure!" straddles the cut and counts (with the kept head) once.
    assert out.completion_tokens == 2 + 3 + 5


# --- budget (DESIGN 5) --------------------------------------------------------------------------

BUDGET_CALLS = [n("", 5), b(" Sure!"), b(" Sure! The"), b(" Sure! The sky")]


@pytest.mark.parametrize(
    ("max_tokens", "text", "finish_reason"),
    [
        (1, " Sure!", "length"),
        (3, " Sure! The sk", "length"),  # in the nudging words, at a token boundary
        (4, " Sure! The sky", "length"),  # "y is" cut by the word boundary counts once
        (5, " Sure! The sky is", "length"),  # the first accepted token uses it up
        (6, " Sure! The sky is very", "length"),  # mid-continuation
        (7, " Sure! The sky is very blue", "length"),
        (8, BUDGET_TEXT, "stop"),
        (200, BUDGET_TEXT, "stop"),
    ],
)
async def test_budget_is_exact(pair: Scripted, max_tokens: int, text: str, finish_reason: str) -> None:
    script_budget_words(pair)
    out = await pair.run(max_tokens=max_tokens, **runs(lookahead_tokens=5))
    assert out.text == text
    assert out.completion_tokens == min(max_tokens, 8)
    assert out.finish_reason == finish_reason
    assert sum(p.num_tokens for p in out.pieces) == out.completion_tokens
    if max_tokens <= 7:
        assert pair.calls() == BUDGET_CALLS
        assert out.stats.stop_reason == "length"
    else:
        assert pair.calls() == BUDGET_CALLS + [n(" Sure! The sky is very blue", 5)]


async def test_budget_binds_in_a_fetched_chunk(pair: Scripted) -> None:
    script_chunks(pair)
    # " Sure! The" is 2 tokens; " sky is" 2 (the probe), " blue and" 2, then " calm" of " calm today".
    out = await pair.run(max_tokens=7, **runs(lookahead_tokens=3, chunk_tokens=2))
    assert out.text == " Sure! The sky is blue and calm"
    assert (out.completion_tokens, out.finish_reason, out.stats.stop_reason) == (7, "length", "length")
    assert pair.calls() == [n("", 3), b(" Sure!", 2), b(" Sure! The", 2), b(" Sure! The sky is", 2),
                            b(" Sure! The sky is blue and", 2)]
    assert out.stats.rules["budget_in_continuation"] == 1


async def test_budget_used_up_at_a_chunk_end_fetches_nothing_more(pair: Scripted) -> None:
    script_chunks(pair)
    out = await pair.run(max_tokens=6, **runs(lookahead_tokens=3, chunk_tokens=2))
    assert out.text == " Sure! The sky is blue and"
    assert pair.calls() == [n("", 3), b(" Sure!", 2), b(" Sure! The", 2), b(" Sure! The sky is", 2)]
    assert (out.completion_tokens, out.finish_reason) == (6, "length")


async def test_budget_in_one_word_rounds(pair: Scripted) -> None:
    script_one_word_rounds(pair)
    out = await pair.run(max_tokens=3, **runs(lookahead_tokens=2))
    assert out.text == "  Hello wor"
    assert pair.calls() == [n("", 2), n("  Hello", 2)]
    assert (out.completion_tokens, out.finish_reason) == (3, "length")


@pytest.mark.parametrize(
    ("max_tokens", "text", "finish_reason", "stop_reason"),
    [(2, " one two", "length", "length"), (3, " one two three", "length", "length"),
     (4, " one two three four", "stop", "nudging_model_stop")],
)
async def test_budget_cuts_the_stopped_nudgers_lookahead(
        pair: Scripted, max_tokens: int, text: str, finish_reason: str, stop_reason: str) -> None:
    # Regression (fixed in aba41e6): a final lookahead cut by the budget ends with "length"
    # (it used to say "stop"); one that fits exactly is the nudger's stop.
    pair.nudger.add(PN, toks(" one two three four"), eos=True)
    out = await pair.run(max_tokens=max_tokens, **runs())
    assert (out.text, out.completion_tokens) == (text, max_tokens)
    assert (out.finish_reason, out.stats.stop_reason) == (finish_reason, stop_reason)
    assert pair.calls() == [n("")]


# --- stop strings (DESIGN 5) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "text", "calls"),
    [
        # Across the nudging piece " Sure! The" and the base piece " sky".
        (("The sky",), " Sure! ", 3),
        (("e! The s",), " Sur", 3),
        (("Sure! The",), " ", 3),
        (("blue. B",), " Sure! The sky is ", 4),  # base piece + next round's nudging piece
        (("Bye", "sky"), " Sure! The ", 3),  # the earliest match wins
        (("nowhere",), TAKEOVER_TEXT, 4),
    ],
)
async def test_stop_strings_across_pieces(
    pair: Scripted, stop: tuple[str, ...], text: str, calls: int
) -> None:
    script_takeover_after_first_word(pair)
    out = await pair.run(stop=stop, **runs(lookahead_tokens=4))
    assert out.text == text
    assert pair.calls() == [n("", 4), b(" Sure!"), b(" Sure! The"), n(" Sure! The sky is blue", 4)][:calls]
    assert out.finish_reason == "stop"
    if text != TAKEOVER_TEXT:
        assert out.stats.stop_reason == "stop_string"
    assert all("stop" not in e["body"] for e in pair.entries())  # applied by the proxy only


async def test_stop_string_token_count(pair: Scripted) -> None:
    script_takeover_after_first_word(pair)
    out = await pair.run(stop=("The sky",), **runs(lookahead_tokens=4))
    # " Sure!" and the head " " of " The" (a token cut by the stop string counts once).
    assert out.completion_tokens == 2


# --- seeds (DESIGN 5): every call's seed is derived from (seed, choice, round, role) -------------


async def test_seeds_are_derived_per_round_and_role(pair: Scripted) -> None:
    script_chunks(pair)
    text = await pair.run_seeded(7, strategy="paper", lookahead_tokens=3, chunk_tokens=2)
    assert text == CHUNKS_TEXT
    rounds = [1, 1, 1, 1, 1, 1, 2]
    roles = {"n": "nudging", "b": "base"}
    assert [(e["role"], e["body"]["seed"]) for e in pair.entries()] == [
        (e["role"], derive_seed(7, 0, r, roles[e["role"]]))
        for e, r in zip(pair.entries(), rounds, strict=True)
    ]


def test_defaults() -> None:
    # DESIGN 3: L = C = 16, at most 150 rounds, γ 0.4 (Llama-2), `fast` by default, no clean-up.
    assert NudgingParams() == NudgingParams(threshold=0.4, lookahead_tokens=16, chunk_tokens=16,
                                            max_rounds=150, strategy="fast", cleanup=False)
