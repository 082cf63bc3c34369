"""`nudging-proxy local-upstream`: options and start-up, without importing numpy or llama.cpp.

The proxy's command line lists this subcommand in every installation; the model's
dependencies (the `demo` extra) are imported only when the subcommand runs.
"""

from __future__ import annotations

import argparse
import faulthandler
from pathlib import Path

from ..cli import add_listen_arguments, add_serving_arguments, positive_int
from .defaults import DEFAULT_CTX
from .weights import BUNDLED, MissingModelError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nudging-proxy local-upstream``."""
    parser.add_argument("--gguf", required=True, metavar="PATH",
                        help="GGUF model file to serve; 'gemma' or 'smollm' name the models "
                             "of the demo extra (Gemma 3 270M base, SmolLM2-135M-Instruct)")
    add_listen_arguments(parser)
    parser.add_argument("--name", default=None,
                        help="model name to serve (default: the file name without .gguf)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="llama.cpp threads for generation and prompt evaluation (default: "
                             "half the cores, as a base and a nudger share the machine; threads "
                             "beyond the free cores slow llama.cpp down sharply)")
    parser.add_argument("--ctx", type=positive_int, default=DEFAULT_CTX,
                        help="context length in tokens (capped at the model's training length)")
    parser.add_argument("--no-self-test", dest="self_test", action="store_false",
                        help="start without first evaluating a test prompt in a child process "
                             "(the check that this llama.cpp build runs on this CPU)")
    add_serving_arguments(parser)


def resolve_gguf(value: str) -> Path:
    """A GGUF path, or a bundled model's file for the names 'gemma' and 'smollm'."""
    path = Path(value).expanduser()
    if not path.exists() and value in BUNDLED:
        return BUNDLED[value]()
    return path


def run(args: argparse.Namespace) -> None:
    # A crash inside llama.cpp then prints where it happened instead of dying silently.
    faulthandler.enable()
    try:
        from .app import serve
        from .generation import EngineError
        from .selftest import check_model
    except ImportError as error:
        raise SystemExit(f"local-upstream: {error.name} is not installed; install the demo extra "
                         "with pip install '.[demo]'") from None
    try:
        path = resolve_gguf(args.gguf)
        if args.self_test:
            check_model(path, n_ctx=args.ctx, n_threads=args.threads)
        serve(args.host, args.port, path, model_name=args.name, n_threads=args.threads,
              n_ctx=args.ctx, max_logprobs=args.max_logprobs, log_level=args.log_level)
    except (MissingModelError, EngineError) as error:
        raise SystemExit(f"local-upstream: {error}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m upstreams.local",
        description="Serve a GGUF model (llama.cpp) behind vLLM's completions API.",
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
