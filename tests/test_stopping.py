"""Budgets and stop strings on pieces (nudging_core/stopping.py, DESIGN 5), without upstreams."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nudging_core.stopping import Budget, StopFilter, split_piece
from nudging_core.types import Piece, Token, piece_from_prefix, piece_from_tokens


def piece(*tokens: str, source: str = "base") -> Piece:
    return piece_from_tokens([Token(t, 0.0, 0.0) for t in tokens], source)  # type: ignore[arg-type]


def texts(pieces: list[Piece]) -> list[str]:
    return [p.text for p in pieces]


# --- pieces ---------------------------------------------------------------------------------------


def test_piece_from_tokens_and_prefix() -> None:
    tokens = [Token(t, 0.0, 0.0) for t in (" Sure!", " The", " sk", "y is")]
    assert piece_from_tokens(tokens, "nudging") == Piece(" Sure! The sky is", "nudging", (6, 10, 13, 17))
    # Nudging words " Sure! The sky": the token "y is" is cut by the word boundary and counts once.
    assert piece_from_prefix(tokens, 14, "nudging") == Piece(" Sure! The sky", "nudging", (6, 10, 13, 14))
    assert piece_from_prefix(tokens, 10, "nudging") == Piece(" Sure! The", "nudging", (6, 10))
    assert piece_from_prefix(tokens, 0, "nudging") == Piece("", "nudging", ())
    with pytest.raises(ValueError):
        piece_from_prefix([], 1, "nudging")


def test_truncated_cuts_at_token_boundaries() -> None:
    whole = piece(" a", " bc", " d")
    assert whole.truncated(3) is whole and whole.truncated(9) is whole
    assert whole.truncated(2) == Piece(" a bc", "base", (2, 5))
    assert whole.truncated(1) == Piece(" a", "base", (2,))
    assert whole.truncated(0) == Piece("", "base", ())
    assert whole.truncated(-1) == Piece("", "base", ())


def test_split_piece_gives_a_straddling_token_to_one_side() -> None:
    hello = piece("Hello", " world")
    assert split_piece(hello, 7) == (Piece("Hello w", "base", (5, 7)), Piece("orld", "base", ()))
    assert split_piece(hello, 7, straddler_in_tail=True) == (Piece("Hello w", "base", (5,)),
                                                             Piece("orld", "base", (4,)))
    # At a token boundary both conventions agree.
    for in_tail in (False, True):
        assert split_piece(hello, 5, straddler_in_tail=in_tail) == (
            Piece("Hello", "base", (5,)), Piece(" world", "base", (6,)))
        assert split_piece(hello, 0, straddler_in_tail=in_tail) == (Piece("", "base", ()), hello)
        assert split_piece(hello, 11, straddler_in_tail=in_tail) == (hello, Piece("", "base", ()))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(alphabet="ab ", min_size=1, max_size=4), max_size=6), st.integers(0, 30), st.booleans()
)
def test_split_piece_keeps_text_and_counts_each_token_once(tokens: list[str], at: int, in_tail: bool) -> None:
    whole = piece(*tokens)
    at = min(at, len(whole.text))
    head, tail = split_piece(whole, at, straddler_in_tail=in_tail)
    assert head.text + tail.text == whole.text
    assert head.num_tokens + tail.num_tokens == whole.num_tokens
    assert all(0 <= end <= len(head.text) for end in head.token_ends)
    assert all(0 <= end <= len(tail.text) for end in tail.token_ends)


# --- budget -------------------------------------------------------------------------------------


def test_budget_is_exact() -> None:
    budget = Budget(3)
    assert (budget.remaining, budget.exhausted) == (3, False)
    assert budget.take(piece(" a", " b")) == piece(" a", " b")
    assert (budget.used, budget.remaining, budget.exhausted) == (2, 1, False)
    assert budget.take(piece(" c", " d")) == Piece(" c", "base", (2,))
    assert (budget.used, budget.remaining, budget.exhausted) == (3, 0, True)
    assert budget.take(piece(" e")) == Piece("", "base", ())
    assert budget.used == 3


def test_budget_counts_a_piece_without_text() -> None:
    # A token with empty text (half a character) still costs one token.
    budget = Budget(1)
    assert budget.take(piece("")).num_tokens == 1
    assert budget.exhausted


# --- stop strings -------------------------------------------------------------------------------


def feed_all(stop_filter: StopFilter, pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        out += stop_filter.feed(p)
        if stop_filter.matched is not None:
            break
    return out + stop_filter.flush()


def test_no_stop_strings_pass_pieces_through() -> None:
    stop_filter = StopFilter([])
    p = piece("Hello")
    assert stop_filter.feed(p) == [p]
    assert StopFilter([""]).feed(p) == [p]
    assert stop_filter.flush() == []


def test_text_that_may_start_a_stop_string_is_held_back() -> None:
    stop_filter = StopFilter(["END"])
    assert texts(stop_filter.feed(piece("Hello"))) == ["Hel"]
    assert texts(stop_filter.feed(piece(" EN"))) == ["lo", " "]  # pieces are cut, not merged
    assert texts(stop_filter.feed(piece("D!"))) == []
    assert stop_filter.matched == "END"
    assert stop_filter.feed(piece("more")) == [] and stop_filter.flush() == []


def test_held_text_is_flushed_at_the_end() -> None:
    stop_filter = StopFilter(["END"])
    assert texts(stop_filter.feed(piece("Hi E"))) == ["Hi"]
    assert texts(stop_filter.flush()) == [" E"]
    assert stop_filter.matched is None


@pytest.mark.parametrize(
    ("stops", "pieces", "visible", "tokens"),
    [
        # A nudging piece and a base piece: the stop string spans both.
        (["The sky"], [piece(" Sure!", " The", source="nudging"), piece(" sky", " is")], " Sure! ", 2),
        (["e! T"], [piece(" Sure!", " The", source="nudging"), piece(" sky")], " Sur", 1),
        # Over three pieces.
        (["abc"], [piece("xa"), piece("b"), piece("cy")], "x", 1),
        # The earliest match wins, whatever the order of the stop strings.
        # (" sky. Bye" is one token: its head " " counts once.)
        (["sky", "Bye"], [piece(" Sure!", " The"), piece(" sky. Bye")], " Sure! The ", 3),
        (["Bye", "sky"], [piece(" Sure!", " The"), piece(" sky. Bye")], " Sure! The ", 3),
        # At the very start: nothing is sent.
        (["Sure"], [piece("Sure!")], "", 0),
        # No match: everything, in the end.
        (["zzz"], [piece(" a", " b"), piece(" c")], " a b c", 3),
    ],
)
def test_stop_strings_across_pieces(stops: list[str], pieces: list[Piece], visible: str, tokens: int) -> None:
    out = feed_all(StopFilter(stops), pieces)
    assert "".join(texts(out)) == visible
    assert sum(p.num_tokens for p in out) == tokens
    assert all(p.text or p.num_tokens for p in out)


def test_sources_are_kept_when_pieces_are_cut() -> None:
    out = feed_all(StopFilter(["sky"]), [piece(" Sure! The", source="nudging"), piece(" blue sky")])
    assert [(p.text, p.source) for p in out] == [
        (" Sure! T", "nudging"),
        ("he", "nudging"),
        (" blue ", "base"),
    ]


@settings(max_examples=300, deadline=None)
@example(chunks=["ca", "a"], stops=["a", "caa"])
@given(
    st.lists(st.text(alphabet="abc ", max_size=5), min_size=1, max_size=6),
    st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=3),
)
def test_stop_filter_cuts_before_the_first_match(chunks: list[str], stops: list[str]) -> None:
    out = feed_all(StopFilter(stops), [piece(c) if c else Piece("", "base", ()) for c in chunks])
    # As vLLM does, generation stops as soon as some stop string has appeared (checked per
    # piece): a longer one that starts earlier but would only complete later never matches.
    expected = text = ""
    for chunk in chunks:
        text += chunk
        positions = [text.find(s) for s in stops if s in text]
        if positions:
            expected = text[: min(positions)]
            break
    else:
        expected = text
    assert "".join(texts(out)) == expected
