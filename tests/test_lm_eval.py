"""lm-eval's `local-completions` model, run as its users run it (the `lm-eval` command, its
defaults, a task read from a local data file), against the proxy on the simulator stack.

With its default `tokenizer_backend=auto`, lm-eval probes the server's `/tokenizer_info` and
`/tokenize`, and uses them instead of downloading a tokenizer from the hub; it then sends
token-id prompts (`tokenized_requests=True`), batched up to `batch_size`. What it reports must be
what the proxy answers for the same requests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .servers import running

pytest.importorskip("lm_eval")

QUESTIONS = ["Why do leaves change color in autumn?", "How do bees make honey?",
             "What is photosynthesis?"]
CHOICES = ["Yes", "No", "Sure"]  # lm-eval puts its target delimiter, " ", before each
MAX_GEN_TOKS = 24


def proxy_for(model: dict[str, Any]) -> dict[str, Any]:
    # One model per proxy: lm-eval's tokenizer probes name no model.
    return {"models": [{"name": "m", **model}]}


@pytest.fixture(scope="module")
def proxies() -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        base, aligned = (stack.enter_context(running(create_simulator(profile, time_scale=0)))
                         for profile in ("base", "aligned"))
        pair = {"base": {"url": base + "/v1", "model": "base"},
                "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}}
        models: dict[str, dict[str, Any]] = {
            "nudging": pair, "base_only": {"method": "base_only", "base": pair["base"]}}
        servers = {method: stack.enter_context(running(create_proxy(parse_config(proxy_for(model)))))
                   for method, model in models.items()}
        yield {**servers, "base_upstream": base}


def write_task(directory: Path, name: str, body: dict[str, Any]) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in QUESTIONS))
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "doc_to_text": "{{question}}\n", **body}
    (directory / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML


def run_lm_eval(proxy: str, task: str, directory: Path) -> list[dict[str, Any]]:
    """`lm-eval run` with local-completions' defaults; the samples it logged."""
    output = directory / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(directory / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
         "--model_args", f"base_url={proxy}/v1/completions,model=m", "--batch_size", "2",
         "--tasks", task, "--include_path", str(directory), "--log_samples",
         "--output_path", str(output)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log[-3000:]
    assert "remote tokenizer" in log.lower(), log[-3000:]  # found ours, no hub download
    samples = list(output.rglob(f"samples_{task}_*.jsonl"))
    assert len(samples) == 1, log[-3000:]
    return [json.loads(line) for line in samples[0].read_text().splitlines()]


def test_generate_until_on_a_nudged_model_reports_the_proxy_s_answers(
        proxies: dict[str, str], tmp_path: Path) -> None:
    write_task(tmp_path, "sim_generate", {
        "output_type": "generate_until", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": MAX_GEN_TOKS},
        "metric_list": [{"metric": "exact_match"}],
    })
    samples = run_lm_eval(proxies["nudging"], "sim_generate", tmp_path)
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        prompt = sample["doc"]["question"] + "\n"
        direct = httpx.post(proxies["nudging"] + "/v1/completions", timeout=60, json={
            "model": "m", "prompt": prompt, "max_tokens": MAX_GEN_TOKS, "temperature": 0,
            "stop": ["\n\n"]}).json()
        answer = direct["choices"][0]["text"]
        assert answer.strip(), direct
        assert sample["resps"] == [[answer]], sample


def test_loglikelihood_on_a_passthrough_model_is_the_upstream_s(
        proxies: dict[str, str], tmp_path: Path) -> None:
    write_task(tmp_path, "sim_choice", {
        "output_type": "multiple_choice", "doc_to_target": 0, "doc_to_choice": CHOICES,
        "metric_list": [{"metric": "acc"}],
    })
    samples = run_lm_eval(proxies["base_only"], "sim_choice", tmp_path)
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        context = sample["doc"]["question"] + "\n"
        for choice, ((logprob, _greedy),) in zip(CHOICES, sample["resps"], strict=True):
            assert math.isfinite(float(logprob)) and float(logprob) < 0, sample
            assert float(logprob) == pytest.approx(
                continuation_logprob(proxies["base_upstream"], context, " " + choice))


def continuation_logprob(upstream: str, context: str, continuation: str) -> float:
    """The continuation's log-probability given the context, asked of the upstream itself
    (the sum lm-eval computes from its prompt logprobs)."""
    def tokens(text: str) -> list[int]:
        answer = httpx.post(upstream + "/tokenize", json={"prompt": text, "add_special_tokens": False})
        return list(answer.json()["tokens"])

    # lm-eval moves the context's trailing whitespace to the continuation before encoding.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids, whole = tokens(context), tokens(context + continuation)
    assert whole[:len(context_ids)] == context_ids
    body = httpx.post(upstream + "/v1/completions", timeout=60, json={
        "model": "base", "prompt": whole, "max_tokens": 1, "temperature": 0, "logprobs": 1,
        "echo": True}).json()
    return float(sum(body["choices"][0]["logprobs"]["token_logprobs"][len(context_ids):len(whole)]))
