"""The playground page (/playground) in a real browser: Debian's chromium driven by Playwright,
against the proxy on the simulator stack (configs/sim.yaml, its upstreams on test ports).

A missing chromium or Playwright fails these tests: a skip would hide a broken install in CI
(`.ci/run` installs both). NUDGING_SKIP_BROWSER=1 skips them where no browser can be installed.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from nudging_core.config import parse_config
from server.app import create_app as create_proxy
from server.playground import describe_models
from upstreams.simulator.app import create_app as create_simulator

from .servers import running

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
SIM_CONFIG = ROOT / "configs" / "sim.yaml"
ARTIFACTS = Path(os.environ.get("NUDGING_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
QUESTION = "Why do leaves change color in autumn?"
KEY = "playground-test-key"
# A laptop screen.
VIEWPORT = {"width": 1440, "height": 900}


def chromium_path() -> str:
    path = os.environ.get("NUDGING_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return path if Path(path).exists() else ""


@dataclass
class Stack:
    proxy: str
    simulators: dict[str, str]  # profile -> URL

    def open_requests(self) -> int:
        return sum(httpx.get(url + "/stats").json()["open_requests"] for url in self.simulators.values())

    def set_faults(self, profile: str, spec: str) -> None:
        httpx.post(self.simulators[profile] + "/faults", json={"faults": spec}).raise_for_status()


def sim_config(urls: dict[str, str], **server: Any) -> dict[str, Any]:
    """configs/sim.yaml with its simulators on the given URLs (profile -> URL)."""
    text = SIM_CONFIG.read_text()
    for port, profile in (("8001", "base"), ("8002", "aligned"), ("8003", "aligned-base")):
        text = text.replace(f"http://127.0.0.1:{port}/v1", urls[profile] + "/v1")
    data: dict[str, Any] = yaml.safe_load(text)
    data["server"].update(server)
    return data


@pytest.fixture(scope="module")
def simulators() -> Iterator[dict[str, str]]:
    with ExitStack() as stack:
        # Real-time latency: a 256-token answer streams for seconds, long enough to stop it.
        yield {profile: stack.enter_context(running(create_simulator(profile)))
               for profile in ("base", "aligned", "aligned-base")}


@pytest.fixture(scope="module")
def stack(simulators: dict[str, str]) -> Iterator[Stack]:
    config = parse_config(sim_config(simulators))
    assert config.server.playground, "configs/sim.yaml turns the playground on"
    with running(create_proxy(config)) as proxy:
        yield Stack(proxy, simulators)


@pytest.fixture(scope="module")
def keyed_stack(simulators: dict[str, str], monkeypatch_module: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch_module.setenv("PLAYGROUND_TEST_KEYS", KEY)
    config = parse_config(sim_config(simulators, api_keys_env="PLAYGROUND_TEST_KEYS"))
    with running(create_proxy(config)) as proxy:
        yield Stack(proxy, simulators)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if os.environ.get("NUDGING_SKIP_BROWSER") == "1":
        pytest.skip("NUDGING_SKIP_BROWSER=1")
    executable = chromium_path()
    if not executable:
        pytest.fail("chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed (it is in the dev extra: pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        # Chromium's sandbox needs user namespaces, which containers (and root) often lack.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


class Page:
    """A browser page on the playground, with every request it made."""

    def __init__(self, browser: Any, base_url: str, **context_options: Any) -> None:
        self.context = browser.new_context(viewport=VIEWPORT, **context_options)
        self.requests: list[Any] = []
        self.context.on("request", lambda request: self.requests.append(request))
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
        self.base_url = base_url

    def open(self) -> None:
        self.page.goto(self.base_url + "/playground")
        self.page.locator("#model option").first.wait_for(state="attached")

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        """Until a JavaScript expression is true. (Playwright's wait_for_function evaluates
        strings in the page, which the page's Content-Security-Policy forbids.)"""
        deadline = time.monotonic() + timeout
        while not self.page.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"not true after {timeout} s: {expression}\n{self.console}")
            time.sleep(0.05)

    def ask(self, question: str, *, model: str = "sim-nudged", max_tokens: int = 48,
            threshold: float | None = None) -> None:
        page = self.page
        page.select_option("#model", model)
        page.fill("#max-tokens", str(max_tokens))
        if threshold is not None:
            page.fill("#threshold", str(threshold))
        page.fill("#user", question)
        page.click("#run")

    def state(self, pane: str) -> str:
        return str(self.page.get_attribute(f"#pane-{pane}", "data-state"))

    def wait_until_settled(self, timeout: float = 60) -> None:
        self.wait_for("['base', 'aligned', 'nudged'].every(name => !['running', 'idle'].includes("
                      "document.querySelector('#pane-' + name).dataset.state))", timeout)

    def text(self, pane: str) -> str:
        return str(self.page.eval_on_selector(f"#pane-{pane} [data-output]",
                                              "e => [...e.querySelectorAll('.chunk, .seg')]"
                                              ".map(x => x.textContent).join('')"))

    def stat(self, pane: str, key: str) -> str:
        return str(self.page.text_content(f"#pane-{pane} [data-stat={key}]"))

    def layout(self) -> list[list[float]]:
        """Where the page's fixed parts are: controls, panes, their headers, outputs, stats."""
        return list(self.page.eval_on_selector_all(
            ".top, #notice, .pane, .pane > header, .status, [data-output], [data-stats], .legend",
            "els => els.map(e => { const r = e.getBoundingClientRect(); "
            "return [r.x, r.y, r.width, r.height]; })"))

    def api_bodies(self) -> dict[str, dict[str, Any]]:
        """The bodies the page posted to the API, by model."""
        bodies = {}
        for request in self.requests:
            if request.method == "POST" and request.url.endswith("/v1/chat/completions"):
                body = request.post_data_json
                bodies[body["model"]] = body
        return bodies

    def foreign_requests(self) -> list[str]:
        proxy = urlsplit(self.base_url).netloc
        return [request.url for request in self.requests if urlsplit(request.url).netloc != proxy]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Page]:
    opened = Page(browser, stack.proxy)
    yield opened
    opened.close()


def replay(stack: Stack, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """The same request as the page's, not streamed."""
    whole = {key: value for key, value in body.items() if key not in ("stream", "stream_options")}
    response = httpx.post(stack.proxy + "/v1/chat/completions", json=whole, headers=headers, timeout=60)
    response.raise_for_status()
    choice: dict[str, Any] = response.json()["choices"][0]
    return choice


def test_run_streams_three_panes_and_marks_the_aligned_models_words(page: Page, stack: Stack) -> None:
    started = time.monotonic()
    page.open()
    before = page.layout()
    page.ask(QUESTION, threshold=0.4)
    page.wait_for("document.querySelector('#pane-nudged .chunk') !== null", 30)
    streaming = page.layout()
    page.wait_until_settled()
    ran = time.monotonic() - started
    # Nothing moves while the answers stream or when they end.
    assert before == streaming == page.layout()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(ARTIFACTS / "playground-sim.png"))
    assert [page.state(name) for name in ("base", "aligned", "nudged")] == ["done"] * 3, page.console

    bodies = page.api_bodies()
    assert set(bodies) == {"sim-nudged", "sim-base", "sim-aligned"}
    nudged_body = bodies["sim-nudged"]
    assert nudged_body["messages"] == [{"role": "user", "content": QUESTION}]
    assert nudged_body["stream"] is True and nudged_body["max_tokens"] == 48
    assert nudged_body["nudging"] == {"threshold": 0.4, "lookahead_tokens": 16, "return_provenance": True}

    # The marked spans are the provenance the API returns for the same (greedy) request.
    nudged = replay(stack, nudged_body)
    spans = nudged["nudging"]["spans"]
    assert {span["source"] for span in spans} == {"base", "nudging"}
    shown = page.page.eval_on_selector_all(
        "#pane-nudged .seg", "spans => spans.map(s => ({text: s.textContent, source: s.dataset.source}))")
    assert shown == spans
    assert page.text("nudged") == nudged["message"]["content"]
    # The highlighted text is exactly the aligned model's.
    marked = page.page.eval_on_selector_all(
        "#pane-nudged .seg", "spans => spans.filter(s => getComputedStyle(s).backgroundColor !== "
        "'rgba(0, 0, 0, 0)').map(s => s.textContent)")
    assert marked == [span["text"] for span in spans if span["source"] == "nudging"]
    report = nudged["nudging"]
    assert page.stat("nudged", "rounds") == str(report["rounds"])
    assert page.stat("nudged", "tokens") == f"{report['tokens']['base']} / {report['tokens']['nudging']}"
    assert page.stat("nudged", "ratio") == f"{100 * report['nudging_word_ratio']:.1f} %"
    assert page.stat("nudged", "requests") == str(sum(report["upstream_requests"].values()))
    for pane in ("base", "aligned", "nudged"):
        assert page.stat(pane, "ttft").endswith(" s") and page.stat(pane, "total").endswith(" s")

    # Marking the aligned model's words moves no text: every piece starts where it would
    # unmarked (split into spans, text may be shaped a fraction of a pixel apart).
    moved = page.page.eval_on_selector("#pane-nudged [data-output]", """output => {
        const at = (node, offset) => { const range = document.createRange();
            range.setStart(node, offset); range.setEnd(node, offset + 1);
            const r = range.getBoundingClientRect(); return [r.x, r.y]; };
        const starts = [];
        const walker = document.createTreeWalker(output, NodeFilter.SHOW_TEXT);
        let offset = 0;
        while (walker.nextNode()) {
            const node = walker.currentNode;
            if (node.length && node.data[0].trim()) starts.push([offset, at(node, 0)]);
            offset += node.length;
        }
        const nodes = [...output.childNodes];
        output.textContent = output.textContent;
        const plain = output.firstChild;
        const moved = starts.filter(([i, [x, y]]) => {
            const [px, py] = at(plain, i); return Math.abs(px - x) >= 1 || Math.abs(py - y) >= 1; });
        output.replaceChildren(...nodes);
        return [starts.length, moved]; }""")
    assert moved[0] > 2 and moved[1] == [], moved

    # The other panes show what their models write alone.
    assert page.text("base") == replay(stack, bodies["sim-base"])["message"]["content"]
    assert page.text("aligned") == replay(stack, bodies["sim-aligned"])["message"]["content"]
    # The base alone has its logprobs: tokens under γ are marked.
    assert page.page.locator("#pane-base .tok[data-top1]").count() > 0

    # Hovering an aligned word says its round; the rounds count up through the answer.
    rounds = page.page.eval_on_selector_all(
        "#pane-nudged .seg[data-source=nudging] .piece", "ps => ps.map(p => Number(p.dataset.round))")
    assert rounds[0] == 1 and rounds == sorted(rounds) and rounds[-1] <= report["rounds"]
    page.page.hover("#pane-nudged .seg[data-source=nudging] .piece >> nth=0")
    tip = page.page.locator("#tooltip")
    assert tip.is_visible() and "round 1" in tip.text_content() and "γ 0.40" in tip.text_content()

    assert page.foreign_requests() == []
    assert not [line for line in page.console if line.startswith(("error", "pageerror"))], page.console
    print(f"playground run: {ran:.1f} s; screenshot {ARTIFACTS / 'playground-sim.png'}")


def test_stop_cancels_every_request(page: Page, stack: Stack) -> None:
    page.open()
    page.ask("Write a long story about a lighthouse keeper.", max_tokens=256)
    page.wait_for("document.querySelector('#pane-nudged .chunk') !== null", 30)
    assert page.state("nudged") == "running" and stack.open_requests() > 0
    page.page.keyboard.press("Escape")
    stopped = time.monotonic()
    while stack.open_requests() and time.monotonic() - stopped < 1.0:
        time.sleep(0.02)
    assert stack.open_requests() == 0, "the simulators still serve requests 1 s after Stop"
    print(f"Stop: no open upstream request after {time.monotonic() - stopped:.2f} s")
    page.wait_until_settled(timeout=5)
    assert page.state("nudged") == "stopped"
    assert page.page.is_disabled("#stop")
    assert page.foreign_requests() == []


def test_keyboard_runs_and_upstream_errors_show_in_their_panes(page: Page, stack: Stack) -> None:
    page.open()
    stack.set_faults("aligned", "http_503")
    try:
        page.page.fill("#max-tokens", "24")
        page.page.fill("#user", QUESTION)
        page.page.keyboard.press("Control+Enter")
        page.wait_until_settled()
    finally:
        stack.set_faults("aligned", "")
    assert page.state("base") == "done"
    for pane in ("aligned", "nudged"):
        assert page.state(pane) == "error"
        message = page.page.text_content(f"#pane-{pane} .error-box")
        assert "HTTP 503" in message and "nudging model's server failed" in message, message
    assert page.page.locator("#pane-base .error-box").count() == 0
    assert page.foreign_requests() == []


def test_behind_the_api_key(browser: Any, keyed_stack: Stack) -> None:
    proxy = keyed_stack.proxy
    for path in ("/playground", "/playground/session", "/playground/playground.js"):
        refused = httpx.get(proxy + path)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic ")
    basic = "Basic " + base64.b64encode(f"me:{KEY}".encode()).decode()
    assert httpx.get(proxy + "/playground/session", headers={"Authorization": basic}).json()["api_key"] == KEY
    bearer = httpx.get(proxy + "/playground", headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200 and "text/html" in bearer.headers["content-type"]
    wrong = "Basic " + base64.b64encode(b"me:wrong").decode()
    assert httpx.get(proxy + "/playground", headers={"Authorization": wrong}).status_code == 401

    # The browser's login prompt (HTTP Basic, the key as password), then the page's API calls.
    opened = Page(browser, proxy, http_credentials={"username": "me", "password": KEY})
    try:
        opened.open()
        opened.ask(QUESTION, max_tokens=16)
        opened.wait_until_settled()
        assert [opened.state(name) for name in ("base", "aligned", "nudged")] == ["done"] * 3
        for request in opened.requests:
            if request.url.endswith("/v1/chat/completions"):
                assert request.headers["authorization"] == f"Bearer {KEY}"
    finally:
        opened.close()


def test_off_unless_configured(simulators: dict[str, str]) -> None:
    config = sim_config(simulators)
    del config["server"]["playground"]
    with running(create_proxy(parse_config(config))) as proxy:
        assert httpx.get(proxy + "/playground").status_code == 404
        assert httpx.get(proxy + "/playground/session").status_code == 404


def test_pairs_each_nudged_model_with_the_models_on_its_upstreams(simulators: dict[str, str]) -> None:
    data = sim_config(simulators)
    data["models"].append({
        "name": "lonely", "base": {"url": "http://10.0.0.1:9/v1", "model": "other"},
        "nudging": {"url": simulators["aligned"] + "/v1", "model": "aligned",
                    "chat_template": "llama-2-chat"},
    })
    described = {model["name"]: model for model in describe_models(parse_config(data))}
    assert set(described) == {"sim-nudged", "sim-nudged-paper", "lonely"}
    assert described["sim-nudged"]["base_only"] == "sim-base"
    assert described["sim-nudged"]["nudging_only"] == "sim-aligned"
    assert described["sim-nudged-paper"]["strategy"] == "paper"
    # Another base upstream, another chat template: nothing to compare with.
    assert described["lonely"]["base_only"] is None and described["lonely"]["nudging_only"] is None
    assert "10.0.0.1" not in str(described)


def test_a_pane_without_a_sibling_says_so(browser: Any, simulators: dict[str, str]) -> None:
    data = sim_config(simulators)
    data["models"] = [model for model in data["models"] if model["name"] not in ("sim-base",)]
    with running(create_proxy(parse_config(data))) as proxy:
        opened = Page(browser, proxy)
        try:
            opened.open()
            assert opened.state("base") == "off"
            assert "No base_only model" in opened.page.text_content("#pane-base [data-output]")
            opened.ask(QUESTION, max_tokens=16)
            opened.wait_for("['aligned', 'nudged'].every(n => document.querySelector('#pane-' + n)"
                            ".dataset.state === 'done')")
            assert opened.state("base") == "off"
            assert opened.api_bodies().keys() == {"sim-nudged", "sim-aligned"}
        finally:
            opened.close()


def test_assets_are_the_packages_own_files(stack: Stack) -> None:
    page = httpx.get(stack.proxy + "/playground")
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert linked and all(link.startswith("/playground/") for link in linked), linked
    for link in linked:
        asset = httpx.get(stack.proxy + link)
        assert asset.status_code == 200, link
        # No other host, no web font, no import: everything the page draws is in the package.
        text = asset.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a request
        assert not re.search(r"https?://|@import|@font-face|url\(", text), link


def test_an_error_after_text_shows_under_it(page: Page, stack: Stack) -> None:
    page.open()
    stack.set_faults("aligned", "kind=stream:stream_cut=6")
    try:
        page.ask(QUESTION, max_tokens=32)
        page.wait_until_settled()
    finally:
        stack.set_faults("aligned", "")
    assert page.state("base") == "done"
    assert page.state("aligned") == "error"
    assert page.text("aligned"), "the text before the failure stays"
    # Streamed after its first words: the stream's error event, under the text.
    message = page.page.text_content("#pane-aligned .error-box")
    assert message.startswith("upstream_error: The nudging model's server failed"), message
    # The nudged answer's first lookahead failed (and its retry): an HTTP error before any text.
    assert page.state("nudged") == "error"
    assert page.page.text_content("#pane-nudged .error-box").startswith("HTTP 502 · upstream_error")
    assert page.foreign_requests() == []


def test_run_again_while_running_replaces_the_answers(page: Page, stack: Stack) -> None:
    page.open()
    page.ask(QUESTION, max_tokens=64)
    page.wait_for("document.querySelector('#pane-nudged .chunk') !== null", 30)
    page.page.keyboard.press("Control+Enter")
    page.wait_until_settled()
    assert [page.state(name) for name in ("base", "aligned", "nudged")] == ["done"] * 3
    posts = [r for r in page.requests if r.method == "POST" and r.url.endswith("/v1/chat/completions")]
    assert len(posts) == 6
    # The second answers alone fill the panes.
    nudged = replay(stack, page.api_bodies()["sim-nudged"])
    assert page.text("nudged") == nudged["message"]["content"]
    deadline = time.monotonic() + 1
    while stack.open_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.open_requests() == 0
