"""Shared fixtures: a proxy in front of two scripted upstreams, over real sockets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest

from nudging_core.config import parse_config
from server.app import create_app

from .scripted import ScriptedUpstream
from .servers import running

USER = "Why is the sky blue?"
BASE_PROMPT = f"{USER}\n"
NUDGER_PROMPT = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"


def _script(base: ScriptedUpstream, nudger: ScriptedUpstream) -> None:
    nudger.add(
        NUDGER_PROMPT, [("Sure", 0.9), ("!", 0.9), (" The", 0.9), (" sky", 0.9), (" is", 0.9)], eos=False
    )
    base.add(BASE_PROMPT, [("Hmm", 0.1), (",", 0.9), (" well", 0.9)], eos=True)
    base.add(BASE_PROMPT + "Sure!", [(" Well", 0.2)], eos=False)
    base.add(
        BASE_PROMPT + "Sure! The",
        [(" sky", 0.8), (" is", 0.9), (" blue", 0.9), (" because", 0.9), (" of", 0.9), (".", 0.3)],
        eos=False,
    )
    nudger.add(
        NUDGER_PROMPT + "Sure! The sky is blue because of", [(" light", 0.9), (".", 0.9), (" Bye", 0.9)]
    )


@dataclass(frozen=True, slots=True)
class ScriptedPair:
    base: ScriptedUpstream
    nudger: ScriptedUpstream
    base_url: str
    nudger_url: str


@contextmanager
def scripted_pair() -> Iterator[ScriptedPair]:
    """The scripted base and nudger, answering the shared script, each on its own socket."""
    base, nudger = ScriptedUpstream("base"), ScriptedUpstream("nudger")
    _script(base, nudger)
    with running(base.app()) as base_url, running(nudger.app()) as nudger_url:
        yield ScriptedPair(base, nudger, base_url, nudger_url)


@pytest.fixture(scope="module")
def proxy() -> Iterator[str]:
    with ExitStack() as stack:
        pair = stack.enter_context(scripted_pair())
        base_url, nudger_url = pair.base_url, pair.nudger_url
        config = parse_config({"models": [
            {"name": "nudged", "base": {"url": base_url + "/v1", "model": "base"},
             "nudging": {"url": nudger_url + "/v1", "model": "nudger", "chat_template": "chatml"},
             "max_tokens_limit": 1000},
            {"name": "nudged-auto", "base": {"url": base_url + "/v1", "model": "base"},
             "nudging": {"url": nudger_url + "/v1", "model": "nudger", "chat_template": "auto"}},
            {"name": "ensemble", "method": "ensemble", "base": {"url": base_url + "/v1", "model": "base"},
             "nudging": {"url": nudger_url + "/v1", "model": "nudger", "chat_template": "chatml"}},
            {"name": "base-only", "method": "base_only", "base": {"url": base_url + "/v1", "model": "base"}},
            {"name": "aligned-only", "method": "nudging_only",
             "nudging": {"url": nudger_url + "/v1", "model": "nudger", "chat_template": "chatml"}},
        ]})
        yield stack.enter_context(running(create_app(config)))




def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # The real-vLLM suite's version and timings, whether or not output is captured (-s).
    from .real_vllm import summary_lines

    lines = summary_lines()
    if lines:
        terminalreporter.section("real vLLM")
        for line in lines:
            terminalreporter.write_line(line)
