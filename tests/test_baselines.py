"""The paper's baselines: their arithmetic on scripted logprobs, then end to end through the
proxy on the three simulator profiles (base, aligned, aligned-base share one tokenizer)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import httpx
import pytest
import yaml
from openai import OpenAI

from cli.stack import local_upstreams
from nudging_core.baselines import (
    BaselineMethod,
    Chosen,
    ensemble_choice,
    ensemble_round,
    proxy_tuning_choice,
    proxy_tuning_round,
)
from nudging_core.config import ConfigError, load_config, parse_config
from nudging_core.generation import Generation, GenerationRequest
from nudging_core.methods import METHODS
from nudging_core.nudging import NudgingParams
from nudging_core.types import Completion, GenerationStats, Role, Token
from nudging_core.upstream import UpstreamClient
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .scripted import ScriptedUpstream
from .seed_code import seed_module
from .servers import free_port, running

QUESTION = "Why do leaves change color in autumn?"
log = math.log


# ---------------------------------------------------------------------------------------------
# One position: which token


def test_ensemble_sums_probabilities_over_the_union() -> None:
    base = {" cat": log(0.5), " dog": log(0.3)}
    chat = {" dog": log(0.35), " bird": log(0.6)}
    # cat 0.5, dog 0.3 + 0.35 = 0.65, bird 0.6: the token both like wins over each one's top-1.
    assert ensemble_choice(base, chat) == " dog"


def test_ensemble_counts_a_missing_token_as_zero() -> None:
    assert ensemble_choice({" a": log(0.7)}, {" b": log(0.69)}) == " a"
    assert ensemble_choice({" a": log(0.4)}, {" b": log(0.41)}) == " b"


def test_ensemble_tie_goes_to_the_base_then_to_the_string() -> None:
    # Mirrored lists sum to exactly the same numbers.
    assert ensemble_choice({" x": log(0.5), " y": log(0.25)}, {" x": log(0.25), " y": log(0.5)}) == " x"
    assert ensemble_choice({}, {" b": log(0.5), " a": log(0.5)}) == " a"


def test_proxy_tuning_rescales_by_expert_over_anti_expert() -> None:
    base = {" Sure": log(0.1), " The": log(0.6), " I": log(0.3)}
    chat = {" Sure": log(0.7), " The": log(0.2), " I": log(0.1)}
    anti = {" Sure": log(0.05), " The": log(0.5), " I": log(0.45)}
    # Sure: 0.1 * 0.7 / 0.05 = 1.4; The: 0.6 * 0.2 / 0.5 = 0.24; I: 0.3 * 0.1 / 0.45 = 0.067.
    assert proxy_tuning_choice(base, chat, anti) == " Sure"


def test_proxy_tuning_only_considers_tokens_all_three_share() -> None:
    base = {" a": log(0.5), " b": log(0.4)}
    chat = {" a": log(0.1), " b": log(0.1), " c": log(0.8)}
    anti = {" a": log(0.5), " c": log(0.01)}
    # " c" would score highest but the base never listed it; " b" is missing from the anti-expert.
    assert proxy_tuning_choice(base, chat, anti) == " a"
    assert proxy_tuning_choice(base, {" z": 0.0}, anti) is None


# ---------------------------------------------------------------------------------------------
# One round: agreement, then the combined choice at the first disagreement


T = TypeVar("T")


def _by_role(base: T, nudging: T, nudging_base: T) -> list[tuple[Role, T]]:
    return [("base", base), ("nudging", nudging), ("nudging_base", nudging_base)]


def completion(tokens: list[tuple[str, dict[str, float]]], finish: str = "length") -> Completion:
    """Tokens as (sampled text, its top-k probabilities); logprobs from the probabilities."""
    made = []
    for text, probabilities in tokens:
        top = {key: log(p) for key, p in probabilities.items()}
        made.append(Token(text, top[text] if text in top else max(top.values()), max(top.values()), top))
    return Completion(tuple(made), finish)


def test_ensemble_round_keeps_agreement_then_one_combined_token() -> None:
    base = completion([(" The", {" The": 0.9}), (" sky", {" sky": 0.5, " sea": 0.3}), (" is", {" is": 0.9})])
    chat = completion(
        [(" The", {" The": 0.8}), (" sea", {" sea": 0.45, " sky": 0.1}), (" was", {" was": 0.9})]
    )
    decision = ensemble_round(base, chat)
    # sky 0.5 + 0.1 = 0.6 < sea 0.3 + 0.45 = 0.75: the nudger's token, and the round ends there.
    assert decision.chosen == (Chosen(" The", "base"), Chosen(" sea", "nudging"))
    assert decision.finished is None
    assert [(p.text, p.source, p.token_ends) for p in decision.pieces()] == [
        (" The", "base", (4,)),
        (" sea", "nudging", (4,)),
    ]


def test_ensemble_round_choice_equal_to_the_base_token_is_the_base() -> None:
    base = completion([(" sky", {" sky": 0.6, " sea": 0.3})])
    chat = completion([(" sea", {" sea": 0.4, " sky": 0.3})])
    assert ensemble_round(base, chat).chosen == (Chosen(" sky", "base"),)


def test_a_finished_chat_expert_supplies_its_whole_chunk() -> None:
    base = completion([("Hi", {"Hi": 0.9}), (" there", {" there": 0.5}), (" you", {" you": 0.5})])
    chat = completion([("Hi", {"Hi": 0.9}), ("!", {"!": 0.9}), ("", {"": 0.9})], finish="stop")
    for decision in (ensemble_round(base, chat), proxy_tuning_round(base, chat, base)):
        assert decision.chosen == (Chosen("Hi", "base"), Chosen("!", "nudging"))
        assert decision.finished == "nudging_model_stop"


def test_an_end_token_pick_after_agreement_is_dropped_and_the_generation_goes_on() -> None:
    # As the seed: the end token's empty text is appended, so the round keeps what was agreed.
    base = completion([(" Done", {" Done": 0.9}), ("", {"": 0.5, ".": 0.4})], finish="stop")
    chat = completion([(" Done", {" Done": 0.9}), (".", {".": 0.3, "": 0.3})])
    decision = ensemble_round(base, chat)  # end 0.8 > "." 0.7
    assert decision.chosen == (Chosen(" Done", "base"),)
    assert decision.finished is None
    assert decision.rule == "end_pick_dropped"


def test_an_end_token_pick_with_nothing_agreed_forces_the_first_base_token() -> None:
    base = completion([(" Hi", {" Hi": 0.4, "": 0.35})])
    chat = completion([(" Yo", {" Yo": 0.5, "": 0.45})])
    decision = ensemble_round(base, chat)  # end 0.8 > " Yo" 0.5 > " Hi" 0.4
    assert decision.chosen == (Chosen(" Hi", "base"),)
    assert (decision.finished, decision.rule) == (None, "forced_token")


def test_an_end_token_pick_with_an_empty_base_forces_the_chat_experts_token() -> None:
    base = completion([("", {"": 0.6})], finish="stop")
    chat = completion([(".", {".": 0.3}), (" Bye", {" Bye": 0.9})])
    anti = completion([(".", {".": 0.3}), (" Bye", {" Bye": 0.9})])
    for decision in (ensemble_round(base, chat), proxy_tuning_round(base, chat, anti)):
        assert decision.chosen == (Chosen(".", "nudging"),)
        assert (decision.finished, decision.rule) == (None, "forced_token")


def test_proxy_tuning_round_goes_on_while_all_three_agree_with_the_pick() -> None:
    step1 = {" The": 0.6, " A": 0.3}
    step2_base = {" sky": 0.5, " sea": 0.4}
    base = completion([(" The", step1), (" sky", step2_base), (" is", {" is": 0.9})])
    chat = completion([(" The", step1), (" sky", {" sky": 0.4, " sea": 0.6}), (" is", {" is": 0.9})])
    anti = completion([(" The", step1), (" sky", {" sky": 0.5, " sea": 0.1}), (" is", {" is": 0.9})])
    # Position 2: sky 0.5 * 0.4 / 0.5 = 0.4, sea 0.4 * 0.6 / 0.1 = 2.4 -> sea; all wrote sky, so stop.
    decision = proxy_tuning_round(base, chat, anti)
    assert decision.chosen == (Chosen(" The", "base"), Chosen(" sea", "nudging"))


def test_proxy_tuning_round_with_nothing_shared_takes_the_base_token_and_stops() -> None:
    base = completion([(" x", {" x": 0.9}), (" y", {" y": 0.9})])
    chat = completion([(" p", {" p": 0.9}), (" q", {" q": 0.9})])
    anti = completion([(" r", {" r": 0.9}), (" s", {" s": 0.9})])
    assert proxy_tuning_round(base, chat, anti).chosen == (Chosen(" x", "base"),)


def test_an_empty_base_chunk_takes_the_chat_experts_first_token() -> None:
    empty = Completion((), "stop")
    chat = completion([(" a", {" a": 0.9})])
    assert ensemble_round(empty, chat).chosen == (Chosen(" a", "nudging"),)
    assert proxy_tuning_round(empty, chat, chat).chosen == (Chosen(" a", "nudging"),)


def test_a_round_without_any_text_ends_the_generation() -> None:
    # The seed would ask again for ever; nothing in these chunks can be written.
    empty = Completion((), "stop")
    silent = completion([("", {"": 0.1})], finish="length")
    assert ensemble_round(empty, silent).finished == "empty_round"
    assert proxy_tuning_round(empty, silent, silent).finished == "empty_round"


# ---------------------------------------------------------------------------------------------
# Through the proxy, on the simulators


@dataclass
class Simulators:
    proxy: str
    base: str
    aligned: str
    aligned_base: str


@pytest.fixture(scope="module")
def simulators() -> Iterator[Simulators]:
    with ExitStack() as stack:
        urls = {
            profile: stack.enter_context(running(create_simulator(profile, time_scale=0, max_logprobs=100)))
            for profile in ("base", "aligned", "aligned-base")
        }
        aligned = {"url": urls["aligned"] + "/v1", "model": "aligned", "chat_template": "chatml"}
        base = {"url": urls["base"] + "/v1", "model": "base"}
        config = parse_config(
            {
                "models": [
                    {
                        "name": "proxy-tuning",
                        "method": "proxy_tuning",
                        "base": base,
                        "nudging": aligned,
                        "nudging_base": {"url": urls["aligned-base"] + "/v1", "model": "aligned-base"},
                    },
                    {"name": "ensemble", "method": "ensemble", "base": base, "nudging": aligned},
                ]
            }
        )
        proxy = stack.enter_context(running(create_proxy(config)))
        yield Simulators(proxy, urls["base"], urls["aligned"], urls["aligned-base"])


def chat(model: str, **extra: object) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "nudging": {"return_provenance": True},
        **extra,
    }


def streamed(response: httpx.Response) -> tuple[str, dict[str, object]]:
    text, report = "", dict[str, object]()
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
                report = choice.get("nudging") or report
    return text, report


@pytest.mark.parametrize("model", ["proxy-tuning", "ensemble"])
def test_baseline_through_the_proxy(simulators: Simulators, model: str) -> None:
    body = httpx.post(simulators.proxy + "/v1/chat/completions", json=chat(model, max_tokens=60), timeout=60)
    assert body.status_code == 200, body.text
    answer = body.json()
    choice = answer["choices"][0]
    report = choice["nudging"]
    assert "".join(span["text"] for span in report["spans"]) == choice["message"]["content"]
    assert {span["source"] for span in report["spans"]} == {"base", "nudging"}
    assert answer["usage"]["completion_tokens"] == sum(report["tokens"].values()) == 60
    assert choice["finish_reason"] == "length"
    roles = {"base", "nudging", "nudging_base"} if model == "proxy-tuning" else {"base", "nudging"}
    assert set(report["upstream_requests"]) == roles
    assert all(report["upstream_requests"][role] == report["rounds"] for role in roles)
    tokenized = httpx.post(simulators.base + "/tokenize", json={"prompt": f"{QUESTION}\n"}).json()["count"]
    assert answer["usage"]["prompt_tokens"] == tokenized
    with httpx.stream(
        "POST",
        simulators.proxy + "/v1/chat/completions",
        json=chat(model, max_tokens=60, stream=True),
        timeout=60,
    ) as response:
        text, streamed_report = streamed(response)
    assert text == choice["message"]["content"]
    assert streamed_report["spans"] == report["spans"]


@pytest.mark.parametrize("model", ["proxy-tuning", "ensemble"])
def test_baseline_applies_stop_strings_to_the_merged_text(simulators: Simulators, model: str) -> None:
    whole = httpx.post(
        simulators.proxy + "/v1/chat/completions", json=chat(model, max_tokens=60), timeout=60
    ).json()["choices"][0]["message"]["content"]
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    cut = httpx.post(
        simulators.proxy + "/v1/chat/completions", json=chat(model, max_tokens=60, stop=[stop]), timeout=60
    ).json()["choices"][0]
    assert cut["message"]["content"] == whole[: whole.index(stop)]
    assert cut["finish_reason"] == "stop"
    assert cut["nudging"]["stop_reason"] == "stop_string"


def test_proxy_tuning_config_needs_the_nudgers_base() -> None:
    with pytest.raises(ConfigError, match="nudging_base"):
        parse_config(
            {
                "models": [
                    {
                        "name": "pt",
                        "method": "proxy_tuning",
                        "base": {"url": "http://b/v1", "model": "b"},
                        "nudging": {"url": "http://n/v1", "model": "n", "chat_template": "chatml"},
                    }
                ]
            }
        )


def test_models_with_different_tokenizers_are_refused_with_the_reason(simulators: Simulators) -> None:
    # The scripted upstream counts characters where the simulator counts words.
    other = ScriptedUpstream("other")
    with running(other.app()) as other_url:
        config = parse_config(
            {
                "models": [
                    {
                        "name": "ensemble",
                        "method": "ensemble",
                        "base": {"url": simulators.base + "/v1", "model": "base"},
                        "nudging": {"url": other_url + "/v1", "model": "other", "chat_template": "chatml"},
                    }
                ]
            }
        )
        with running(create_proxy(config)) as proxy:
            answer = httpx.post(
                proxy + "/v1/chat/completions", json=chat("ensemble", max_tokens=10), timeout=60
            )
    assert answer.status_code == 502
    assert "must share one tokenizer" in answer.json()["error"]["message"]


def test_sim_stack_serves_the_baselines_on_three_simulator_processes(tmp_path: Path) -> None:
    ports = {role: free_port() for role in ("base", "aligned", "aligned-base", "proxy")}

    def upstream(profile: str) -> dict[str, str]:
        return {"url": f"http://127.0.0.1:{ports[profile]}/v1", "model": profile}

    aligned = {**upstream("aligned"), "chat_template": "chatml"}
    config = tmp_path / "stack.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "sim-proxy-tuning",
                        "method": "proxy_tuning",
                        "base": upstream("base"),
                        "nudging": aligned,
                        "nudging_base": upstream("aligned-base"),
                    },
                    {
                        "name": "sim-ensemble",
                        "method": "ensemble",
                        "base": upstream("base"),
                        "nudging": aligned,
                    },
                ]
            }
        )
    )
    assert {u.model for u in local_upstreams(load_config(config)).values()} == {
        "base",
        "aligned",
        "aligned-base",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "sim-stack",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(ports["proxy"]),
            "--time-scale",
            "0",
        ]
    )
    proxy = f"http://127.0.0.1:{ports['proxy']}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            with suppress(httpx.HTTPError):
                if httpx.get(proxy + "/ready").status_code == 200:
                    break
            time.sleep(0.2)
        for model in ("sim-proxy-tuning", "sim-ensemble"):
            answer = httpx.post(proxy + "/v1/chat/completions", json=chat(model, max_tokens=30), timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 30
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# Against the seed's own baseline functions, on the same upstreams over real HTTP

SCRIPTED_BASE_PROMPT, SCRIPTED_CHAT_PROMPT = "Q\n", "<user>Q<assistant>"
CHAT_ANSWER = [(" Done", 0.9), (".", 0.3), (" Bye", 0.9), (" for", 0.9), (" now", 0.9), (" and", 0.9),
               (" later", 0.9), ("!", 0.9)]


@dataclass
class Upstreams:
    urls: dict[Role, str]  # OpenAI base URLs
    models: dict[Role, str]


async def our_baseline(
    upstreams: Upstreams, method: BaselineMethod, base_prompt: str, chat_prompt: str, max_tokens: int,
    chunk_tokens: int = 16,
) -> tuple[str, GenerationStats]:
    clients: dict[Role, UpstreamClient] = {
        role: UpstreamClient(upstreams.urls[role], upstreams.models[role], role=role)
        for role in METHODS[method].roles
    }
    request = GenerationRequest(
        method=method, max_tokens=max_tokens, base_prompt=base_prompt, nudging_prompt=chat_prompt,
        params=NudgingParams(chunk_tokens=chunk_tokens),
    )
    generation = Generation(request, clients)
    try:
        text = "".join([piece.text async for piece in generation.pieces()])
    finally:
        for client in clients.values():
            await client.aclose()
    return text, generation.stats


def seed_baseline(
    seed: ModuleType, upstreams: Upstreams, method: BaselineMethod, base_prompt: str, chat_prompt: str,
    max_tokens: int, chunk_tokens: int = 16,
) -> str:
    def client(role: Role) -> OpenAI:
        return OpenAI(base_url=upstreams.urls[role], api_key="offline", max_retries=0)

    shared = {
        "base_model": upstreams.models["base"], "proxy_chat_model": upstreams.models["nudging"],
        "client_base": client("base"), "client_proxy_chat": client("nudging"),
        "max_token_total": max_tokens, "full_prefix_base": base_prompt, "full_prefix_proxy_chat": chat_prompt,
        "completion_token_num": chunk_tokens,
    }
    if method == "ensemble":
        return str(seed.completion_baseline_ensemble(**shared))
    return str(seed.completion_baseline_proxy_tuning(
        **shared, proxy_base_model=upstreams.models["nudging_base"], client_proxy_base=client("nudging_base"),
        full_prefix_proxy_base=base_prompt,
    ))


@pytest.fixture(scope="module")
def seed_utils(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return seed_module("utils", tmp_path_factory.mktemp("seed"))


@pytest.fixture(scope="module")
def end_token_trio() -> Iterator[Upstreams]:
    """A base that ends early where the chat expert goes on: the combined pick is the end
    token after agreement (round 1) and with nothing agreed (round 2)."""
    base, chat, anti = ScriptedUpstream("base"), ScriptedUpstream("chat"), ScriptedUpstream("anti")
    base.add("Q\n", [(" Done", 0.9), ("", 0.6)])
    base.add("Q\n Done.", [(" Bye", 0.9), ("", 0.6)])
    base.add("Q\n Done. Bye for", [(" now", 0.9)])
    chat.add(SCRIPTED_CHAT_PROMPT, CHAT_ANSWER)
    anti.add(SCRIPTED_BASE_PROMPT, CHAT_ANSWER)
    with ExitStack() as stack:
        urls: dict[Role, str] = {
            role: stack.enter_context(running(upstream.app())) + "/v1"
            for role, upstream in _by_role(base, chat, anti)
        }
        yield Upstreams(urls, {"base": "base", "nudging": "chat", "nudging_base": "anti"})


@pytest.mark.parametrize("method", ["ensemble", "proxy_tuning"])
async def test_a_combined_end_token_pick_goes_on_as_the_seed_does(
    end_token_trio: Upstreams, seed_utils: ModuleType, method: BaselineMethod
) -> None:
    prompts = (SCRIPTED_BASE_PROMPT, SCRIPTED_CHAT_PROMPT)
    text, stats = await our_baseline(end_token_trio, method, *prompts, max_tokens=100, chunk_tokens=4)
    # Round 1 keeps " Done" (the end pick is dropped), round 2 forces the chat expert's "."
    # (the base has nothing but its end token); the chat expert finally stops.
    assert text == " Done. Bye for now and later!"
    assert stats.stop_reason == "nudging_model_stop"
    assert stats.rules["end_pick_dropped"] >= 1 and stats.rules["forced_token"] >= 1
    assert text == seed_baseline(seed_utils, end_token_trio, method, *prompts, max_tokens=100, chunk_tokens=4)


@contextmanager
def simulator_upstreams() -> Iterator[Upstreams]:
    with ExitStack() as stack:
        urls: dict[Role, str] = {
            role: stack.enter_context(running(create_simulator(profile, time_scale=0, max_logprobs=100)))
            + "/v1"
            for role, profile in _by_role("base", "aligned", "aligned-base")
        }
        yield Upstreams(urls, {"base": "base", "nudging": "aligned", "nudging_base": "aligned-base"})


@pytest.fixture(scope="module")
def simulator_trio() -> Iterator[Upstreams]:
    with simulator_upstreams() as upstreams:
        yield upstreams


def seed_prompts(question: str) -> tuple[str, str]:
    """The seed's layouts of a reasoning question: plain for the base models, the chat
    template (chatml here) for the chat expert."""
    system = "Answer the question by walking through the reasoning steps."
    return (
        f"{system}\nQuestion: {question}\n",
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nQuestion: {question}<|im_end|>\n"
        "<|im_start|>assistant\n",
    )


def matches_the_seed(ours: str, stats: GenerationStats, theirs: str) -> bool:
    """Our text is the seed's; where our budget ended it, the seed's begins with it (the seed
    asks for whole chunks and overshoots its budget)."""
    return ours == theirs or (stats.stop_reason == "length" and theirs.startswith(ours))


ORACLE_QUESTIONS = (
    QUESTION,
    "How does a refrigerator keep food cold?",
    "What causes the tides in the ocean?",
    "Give me a brief answer: what is the capital of France?",
    "List three colors of the rainbow.",
)
ORACLE_BUDGET = 300


@pytest.mark.parametrize("method", ["ensemble", "proxy_tuning"])
@pytest.mark.parametrize("question", ORACLE_QUESTIONS)
async def test_the_baselines_write_the_seeds_text_on_the_simulators(
    simulator_trio: Upstreams, seed_utils: ModuleType, method: BaselineMethod, question: str
) -> None:
    base_prompt, chat_prompt = seed_prompts(question)
    text, stats = await our_baseline(simulator_trio, method, base_prompt, chat_prompt, ORACLE_BUDGET)
    theirs = seed_baseline(seed_utils, simulator_trio, method, base_prompt, chat_prompt, ORACLE_BUDGET)
    assert matches_the_seed(text, stats, theirs)
