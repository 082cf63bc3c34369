"""Command-line options both upstream servers take alike."""

from __future__ import annotations

import argparse

from .openai_api import DEFAULT_MAX_LOGPROBS


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")


def add_serving_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that end both servers' lists (their order is the order of ``--help``)."""
    parser.add_argument("--max-logprobs", type=positive_int, default=DEFAULT_MAX_LOGPROBS,
                        help="largest logprobs value a request may ask for")
    parser.add_argument("--log-level", default="warning",
                        choices=("critical", "error", "warning", "info", "debug"))
