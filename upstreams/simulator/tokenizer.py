"""The simulator's tokenizer, shared by all three profiles.

A regular expression splits text into tokens:

* ``"\\n"`` is always a token of its own, so line structure survives any split;
* a run of two or more spaces is one token (``"  "``), so double spaces are visible;
* a word (ASCII letters, digits and the apostrophe) carries its single leading space
  (``" word"``), like the byte-pair tokenizers of real models;
* any other non-space character (punctuation, any non-ASCII character) is a token,
  again with its optional leading space (``" !"``, ``"é"``);
* any remaining whitespace character (a lone space before a newline, a tab, ...) is a token.

Every character matches one of the alternatives, so any unicode text tokenizes without error
and ``"".join(tokenize(text)) == text``. Matching is greedy from the left and a token's extent
depends only on the character right after it, so appending text can change only the last token
of a text. The model uses :func:`can_follow` to emit only tokens that keep the earlier tokens
intact, which makes its output re-tokenize stably.

Token ids (vLLM's ``/tokenize`` and ``/detokenize``) need no vocabulary: a token's id is its
UTF-8 bytes read as one big-endian number behind a leading 0x01 byte (so ``""`` is 1 and no two
tokens share an id). Every text has ids and they turn back into it; a long token's id is a
large number (beyond 64 bits from eight bytes on).

What the server reports is finer for characters outside the Basic Multilingual Plane (emoji):
a byte-level BPE model writes such a character as several byte tokens, and vLLM 0.32 sends ""
for each one that does not complete it and the whole token's text on the one that does.
:func:`pieces` gives those reported tokens; the model itself works on whole tokens.
"""

from __future__ import annotations

import re
from typing import Final

TOKEN_PATTERN: Final = re.compile(r"\n|  +| ?[A-Za-z0-9']+| ?[^\sA-Za-z0-9']|\s")

_WORD_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789'")


def tokenize(text: str) -> list[str]:
    """Split `text` into token strings; joining them gives `text` back."""
    return TOKEN_PATTERN.findall(text)


def count_tokens(text: str) -> int:
    """How many tokens the server reports for `text` (split characters count their pieces)."""
    return len(reported_tokens(text))


def pieces(token: str) -> list[str]:
    """The tokens the server reports for one model token: ``["", "", " 💖"]`` for ``" 💖"``.

    Each character outside the BMP takes three byte tokens (as SmolLM2's tokenizer writes
    most emoji); the ones before the last have no text of their own.
    """
    split_chars = sum(1 for char in token if ord(char) > 0xFFFF)
    return [""] * (2 * split_chars) + [token]


def reported_tokens(text: str) -> list[str]:
    """`text` as the server's tokenizer reports it: :func:`tokenize`, with split characters."""
    return [piece for token in tokenize(text) for piece in pieces(token)]


_ID_MARK: Final = b"\x01"


def token_id(token: str) -> int:
    """The id of a reported token (see the module's docstring)."""
    return int.from_bytes(_ID_MARK + token.encode("utf-8"), "big")


def token_text(token: int) -> str | None:
    """The token an id stands for, or None if no token has that id."""
    if token < 1:
        return None
    data = token.to_bytes((token.bit_length() + 7) // 8, "big")
    if not data.startswith(_ID_MARK):
        return None
    try:
        return data[1:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def is_word_char(char: str) -> bool:
    return char in _WORD_CHARS


def is_space_token(token: str) -> bool:
    """Tokens made only of spaces carry no content; the model matches text without them."""
    return token != "" and token.strip(" ") == ""


def can_follow(previous: str, token: str) -> bool:
    """Whether `token` written after the token `previous` leaves both tokens unchanged."""
    if previous == "":
        return True
    return tokenize(previous + token) == [previous, token]


def normal_form(token: str) -> str | None:
    """The form under which the model compares tokens, or None for space-only tokens.

    Case and the leading space are ignored, so "However, the" and "The" refer to the same
    content word and "end.  Next" reads like "end. Next"; newlines and punctuation count.
    """
    if is_space_token(token):
        return None
    if token.startswith(" "):
        token = token[1:]
    return token.lower()
