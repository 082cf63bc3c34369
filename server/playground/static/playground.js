// The nudging playground: one question, three streamed answers (the base model alone, the
// aligned model alone, the nudged model), through the proxy's public API only:
//   POST /v1/chat/completions, stream: true, with the `nudging` extension's provenance
//   (and, for the base model alone, its logprobs), plus /playground/session, which says which
//   configured models share a nudged model's upstreams (the API cannot tell).
// No framework, no build step, no request to any other host.
"use strict";

(() => {
  const $ = (selector, root = document) => root.querySelector(selector);
  const PANES = ["base", "aligned", "nudged"];
  const STATS = [
    ["tokens", "tokens base / aligned"],
    ["ratio", "nudging word ratio"],
    ["rounds", "rounds"],
    ["requests", "upstream requests"],
    ["ttft", "time to first token"],
    ["total", "total time"],
  ];

  const ui = {
    form: $("#controls"),
    model: $("#model"),
    threshold: $("#threshold"),
    thresholdValue: $("#threshold-value"),
    lookahead: $("#lookahead"),
    maxTokens: $("#max-tokens"),
    system: $("#system"),
    user: $("#user"),
    run: $("#run"),
    stop: $("#stop"),
    notice: $("#notice"),
    tooltip: $("#tooltip"),
  };
  const panes = Object.fromEntries(PANES.map((name) => {
    const root = $(`#pane-${name}`);
    return [name, {
      name, root, output: $("[data-output]", root), status: $("[data-status]", root),
      modelName: $("[data-model]", root), stats: $("[data-stats]", root), run: null,
    }];
  }));

  let session = { models: [], api_key: null };
  let current = null;  // the model description the page runs
  let running = [];    // the runs of the last Run

  // --- set-up ----------------------------------------------------------------------------

  function notice(text, bad = false) {
    ui.notice.textContent = text;
    ui.notice.classList.toggle("bad", bad);
  }

  function buildStats(pane) {
    pane.stats.replaceChildren(...STATS.map(([key, label]) => {
      const item = document.createElement("div");
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = label;
      dd.dataset.stat = key;
      dd.textContent = "–";
      item.append(dt, dd);
      return item;
    }));
  }

  function setStat(pane, key, value, title = "") {
    const dd = $(`[data-stat="${key}"]`, pane.stats);
    dd.textContent = value;
    dd.title = title;
  }

  function setState(pane, state, label = state) {
    pane.root.dataset.state = state;
    pane.status.textContent = label;
  }

  function placeholder(pane, text) {
    const note = document.createElement("p");
    note.className = "placeholder";
    note.textContent = text;
    pane.output.replaceChildren(note);
  }

  function paneModel(name, model) {
    if (name === "nudged") return model.name;
    return name === "base" ? model.base_only : model.nudging_only;
  }

  function showModel(model) {
    current = model;
    ui.threshold.value = model.threshold;
    ui.thresholdValue.value = Number(model.threshold).toFixed(2);
    ui.lookahead.value = model.lookahead_tokens;
    ui.maxTokens.max = model.max_tokens_limit;
    ui.maxTokens.value = Math.min(model.default_max_tokens, model.max_tokens_limit);
    for (const pane of Object.values(panes)) {
      const served = paneModel(pane.name, model);
      const upstream = pane.name === "base" ? model.base_model : model.nudging_model;
      pane.modelName.textContent = served ? served : "";
      pane.modelName.title = served ? `model ${served}` : "";
      buildStats(pane);
      if (served) {
        setState(pane, "idle");
        placeholder(pane, pane.name === "nudged"
          ? `${model.base_model} nudged by ${model.nudging_model}, strategy ${model.strategy}.`
          : `${served}: ${upstream} alone, on the nudged model's ${pane.name === "base" ? "base" : "aligned"} upstream.`);
      } else {
        setState(pane, "off", "not configured");
        const method = pane.name === "base" ? "base_only" : "nudging_only";
        placeholder(pane, `No ${method} model is configured on the upstream of ${upstream}, so there is `
          + `nothing to compare with here. Add one to the config (method: ${method}, the same `
          + `${pane.name === "base" ? "base" : "nudging"} upstream) to fill this pane.`);
      }
    }
  }

  async function loadSession() {
    let response;
    try {
      response = await fetch("/playground/session", { headers: { Accept: "application/json" } });
    } catch (error) {
      notice(`The proxy did not answer: ${error.message}`, true);
      return;
    }
    if (!response.ok) {
      notice(`The playground session failed: HTTP ${response.status} ${await errorMessage(response)}`, true);
      return;
    }
    session = await response.json();
    ui.model.replaceChildren(...session.models.map((model) => {
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = model.name;
      return option;
    }));
    if (!session.models.length) {
      notice("No model of method nudging is configured.", true);
      ui.run.disabled = true;
      return;
    }
    showModel(session.models[0]);
    notice("Ready. Each pane is one streamed /v1/chat/completions request, all three at once.");
  }

  // --- a streamed request ----------------------------------------------------------------

  async function errorMessage(response) {
    const text = await response.text().catch(() => "");
    try {
      const error = JSON.parse(text).error;
      return [error.type, error.message].filter(Boolean).join(": ");
    } catch {
      return text.slice(0, 500);
    }
  }

  function headers() {
    const sent = { "Content-Type": "application/json", Accept: "text/event-stream" };
    if (session.api_key) sent.Authorization = `Bearer ${session.api_key}`;
    return sent;
  }

  // Calls onEvent(payload) per `data:` event of a server-sent event stream.
  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const lines = buffer.split(/\r?\n/);
      buffer = done ? "" : lines.pop();
      for (const line of lines) {
        if (line.startsWith("data:")) onEvent(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
      if (done) return;
    }
  }

  class Run {
    constructor(pane, body, gamma) {
      this.pane = pane;
      this.body = body;
      this.gamma = gamma;
      this.controller = new AbortController();
      this.chunks = [];         // the text of every content chunk, in order (one per piece)
      this.elements = [];       // the element each chunk was drawn in
      this.report = null;       // the choice's `nudging` extension
      this.finishReason = null;
      this.usage = null;
      this.sent = 0;
      this.firstToken = null;
      this.ended = false;
    }

    get text() { return this.chunks.join(""); }

    async start() {
      const pane = this.pane;
      pane.output.replaceChildren();
      setState(pane, "running", "waiting");
      this.sent = performance.now();
      this.ticker = setInterval(() => this.showTimes(), 100);
      try {
        const response = await fetch("/v1/chat/completions", {
          method: "POST", headers: headers(), body: JSON.stringify(this.body), signal: this.controller.signal,
        });
        if (!response.ok) {
          this.fail(`HTTP ${response.status} · ${await errorMessage(response)}`);
          return;
        }
        setState(pane, "running", "streaming");
        let finished = false;
        await readEvents(response, (data) => {
          if (data === "[DONE]") { finished = true; return; }
          this.onChunk(JSON.parse(data));
        });
        if (this.ended) return;
        if (!finished) this.fail("The stream ended without [DONE].");
        else this.finish();
      } catch (error) {
        if (this.ended) return;
        if (error.name === "AbortError") this.stopped();
        else this.fail(`The request failed: ${error.message}`);
      }
    }

    onChunk(chunk) {
      if (this.ended) return;
      if (chunk.error) {
        const error = chunk.error;
        this.fail([error.type, error.message].filter(Boolean).join(": "));
        return;
      }
      if (chunk.usage) this.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const text = choice.delta ? choice.delta.content : choice.text;
        // A text chunk's `nudging` names the model that wrote it; the last chunk's is the report.
        const source = choice.nudging && choice.nudging.source;
        if (text) this.addText(text, choice.logprobs, source);
        if (choice.finish_reason) this.finishReason = choice.finish_reason;
        if (choice.nudging && !source) this.report = choice.nudging;
      }
    }

    addText(text, logprobs, source) {
      const output = this.pane.output;
      const atBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 24;
      if (this.firstToken === null) {
        this.firstToken = performance.now();
        this.showTimes();
      }
      const element = document.createElement("span");
      element.className = "chunk";
      const tokens = logprobs && Array.isArray(logprobs.content) ? logprobs.content : null;
      if (tokens && tokens.map((token) => token.token).join("") === text) {
        for (const token of tokens) element.append(this.tokenElement(token));
      } else {
        element.textContent = text;
      }
      if (source) {
        // Marked as it streams; the report's spans redraw it, to the same marks, at the end.
        if (source === "nudging") this.liveRounds = (this.liveRounds || 0) + 1;
        element.dataset.source = source;
        element.dataset.tip = `${source === "nudging" ? "aligned" : "base"} model · round `
          + `${Math.max(this.liveRounds || 0, 1)}`;
      }
      this.chunks.push(text);
      this.elements.push(element);
      output.append(element);
      if (atBottom) output.scrollTop = output.scrollHeight;
    }

    // One token of the base model alone, with the top-1 probability its logprobs report.
    tokenElement(token) {
      const element = document.createElement("span");
      element.className = "tok";
      element.textContent = token.token;
      const top = (token.top_logprobs || []).reduce((best, t) => Math.max(best, t.logprob), -Infinity);
      if (Number.isFinite(top)) {
        const p = Math.exp(top);
        element.dataset.top1 = p.toFixed(4);
        if (p < this.gamma) element.classList.add("unsure");
        element.dataset.tip = `base model · top-1 probability ${p.toFixed(3)} ${p < this.gamma ? "<" : "≥"} γ `
          + `${this.gamma.toFixed(2)}\n${p < this.gamma ? "uncertain: nudging would ask the aligned model here"
            : "confident: nudging would keep the base model"}`;
      }
      return element;
    }

    showTimes() {
      const now = this.endedAt || performance.now();
      const pane = this.pane;
      setStat(pane, "ttft", this.firstToken === null ? "–" : seconds(this.firstToken - this.sent));
      setStat(pane, "total", seconds(now - this.sent));
    }

    end(state, label) {
      this.ended = true;
      this.endedAt = performance.now();
      clearInterval(this.ticker);
      this.showTimes();
      setState(this.pane, state, label);
      settle();
    }

    finish() {
      if (this.pane.name === "nudged" && this.report && this.report.spans) this.markProvenance();
      this.showReport();
      this.end("done", this.finishReason ? `done · ${this.finishReason}` : "done");
    }

    stopped() {
      this.end("stopped", "stopped");
    }

    fail(message) {
      const box = document.createElement("div");
      box.className = "error-box";
      box.setAttribute("role", "alert");
      box.textContent = message;
      this.pane.output.append(box);
      box.scrollIntoView({ block: "nearest" });
      this.end("error", "error");
    }

    showReport() {
      const pane = this.pane;
      const report = this.report;
      if (!report) return;
      const tokens = report.tokens || {};
      setStat(pane, "tokens", `${tokens.base ?? 0} / ${tokens.nudging ?? 0}`,
        this.usage ? `completion_tokens ${this.usage.completion_tokens}` : "");
      setStat(pane, "ratio", `${(100 * (report.nudging_word_ratio || 0)).toFixed(1)} %`);
      setStat(pane, "rounds", pane.name === "nudged" ? String(report.rounds) : "–",
        pane.name === "nudged" ? "" : "a single model: no rounds");
      const requests = report.upstream_requests || {};
      const total = Object.values(requests).reduce((sum, n) => sum + n, 0);
      setStat(pane, "requests", String(total),
        Object.entries(requests).map(([role, n]) => `${role} ${n}`).join(", "));
      if (report.stop_reason) pane.status.title = `stop reason: ${report.stop_reason}`;
    }

    // Redraws the nudged answer as the API's spans, the aligned model's marked. Each
    // streamed chunk is one piece of one source, and every round's aligned words come as
    // one piece, so a chunk's round is the number of aligned pieces up to it.
    markProvenance() {
      const spans = this.report.spans;
      if (spans.map((span) => span.text).join("") !== this.text) {
        notice("The nudged answer's spans do not add up to its streamed text; showing the spans.", true);
        this.chunks = spans.map((span) => span.text);
      }
      const sourceAt = [];  // [end offset, source] per span
      let end = 0;
      for (const span of spans) sourceAt.push([(end += span.text.length), span.source]);
      const source = (offset) => (sourceAt.find(([spanEnd]) => offset < spanEnd) || [0, "base"])[1];
      const chunks = [];
      let offset = 0;
      let round = 0;
      for (const text of this.chunks) {
        if (source(offset) === "nudging") round += 1;
        chunks.push({ start: offset, end: offset + text.length, text, round: Math.max(round, 1) });
        offset += text.length;
      }
      const gamma = this.gamma.toFixed(2);
      const nodes = [];
      let spanStart = 0;
      for (const span of spans) {
        const spanEnd = spanStart + span.text.length;
        const segment = document.createElement("span");
        segment.className = "seg";
        segment.dataset.source = span.source;
        for (const chunk of chunks) {
          const from = Math.max(chunk.start, spanStart);
          const to = Math.min(chunk.end, spanEnd);
          if (from >= to) continue;
          const piece = document.createElement("span");
          piece.className = "piece";
          piece.dataset.round = String(chunk.round);
          piece.textContent = chunk.text.slice(from - chunk.start, to - chunk.start);
          piece.dataset.tip = span.source === "nudging"
            ? `aligned model (${current.nudging_model}) · round ${chunk.round}\n`
              + `the base model did not take over here at γ ${gamma} (the API reports no top-1 `
              + "probabilities for a nudged answer)"
            : `base model (${current.base_model}) · round ${chunk.round}\n`
              + `took over after the aligned words; writes until a token falls below γ ${gamma} `
              + "(or a repetition guard ends it)";
          segment.append(piece);
        }
        nodes.push(segment);
        spanStart = spanEnd;
      }
      const output = this.pane.output;
      const scroll = output.scrollTop;
      output.replaceChildren(...nodes);
      output.scrollTop = scroll;
    }

    // Stop now: the pane says so at once (a new run may take it over before the aborted
    // fetch settles), and closing the connection makes the proxy cancel its upstream requests.
    cancel() {
      if (this.ended) return;
      this.controller.abort();
      this.stopped();
    }
  }

  function seconds(ms) {
    return `${(ms / 1000).toFixed(2)} s`;
  }

  // --- Run and Stop ----------------------------------------------------------------------

  function settle() {
    const busy = running.some((run) => !run.ended);
    ui.stop.disabled = !busy;
    document.body.dataset.running = busy ? "true" : "false";
    if (busy || !running.length) return;
    const failed = running.filter((run) => run.pane.root.dataset.state === "error").length;
    const stopped = running.some((run) => run.pane.root.dataset.state === "stopped");
    if (failed) notice(`${failed} of ${running.length} requests failed: the message is in the pane.`, true);
    else if (stopped) notice("Stopped: the requests were cancelled.");
    else notice("Done. Hover the nudged answer's words for their round, the base model's for its top-1 probability.");
  }

  function stop() {
    for (const run of running) if (!run.ended) run.cancel();
  }

  function readNumber(input, name) {
    const value = Number(input.value);
    if (!input.checkValidity() || !Number.isFinite(value)) {
      notice(`${name} must be a number from ${input.min} to ${input.max || "…"}.`, true);
      input.focus();
      return null;
    }
    return value;
  }

  function run() {
    if (!current) return;
    const user = ui.user.value;
    if (!user.trim()) {
      notice("Type a user message first.", true);
      ui.user.focus();
      return;
    }
    const gamma = readNumber(ui.threshold, "The threshold");
    const lookahead = readNumber(ui.lookahead, "Lookahead");
    const maxTokens = readNumber(ui.maxTokens, "Max tokens");
    if (gamma === null || lookahead === null || maxTokens === null) return;
    stop();
    const messages = [];
    if (ui.system.value.trim()) messages.push({ role: "system", content: ui.system.value });
    messages.push({ role: "user", content: user });
    const common = { messages, max_tokens: maxTokens, stream: true, stream_options: { include_usage: true } };
    const bodies = {
      nudged: { model: current.name, ...common,
        nudging: { threshold: gamma, lookahead_tokens: lookahead, return_provenance: true } },
      base: current.base_only && { model: current.base_only, ...common, logprobs: true, top_logprobs: 1,
        nudging: { return_provenance: true } },
      aligned: current.nudging_only && { model: current.nudging_only, ...common,
        nudging: { return_provenance: true } },
    };
    running = [];
    for (const pane of Object.values(panes)) {
      buildStats(pane);
      pane.status.title = "";
      if (!bodies[pane.name]) continue;
      const started = new Run(pane, bodies[pane.name], gamma);
      pane.run = started;
      running.push(started);
    }
    notice(`Running ${current.name} at γ ${gamma.toFixed(2)}, lookahead ${lookahead}, up to ${maxTokens} tokens.`);
    for (const started of running) started.start();
    settle();
  }

  // --- tooltips ----------------------------------------------------------------------------

  function showTip(event) {
    const target = event.target.closest("[data-tip]");
    if (!target) { ui.tooltip.hidden = true; return; }
    ui.tooltip.textContent = target.dataset.tip;
    ui.tooltip.hidden = false;
    const box = ui.tooltip.getBoundingClientRect();
    const x = Math.min(event.clientX + 12, window.innerWidth - box.width - 8);
    const y = event.clientY + 18 + box.height > window.innerHeight ? event.clientY - box.height - 10 : event.clientY + 18;
    ui.tooltip.style.left = `${Math.max(8, x)}px`;
    ui.tooltip.style.top = `${Math.max(8, y)}px`;
  }

  // --- wiring ------------------------------------------------------------------------------

  ui.form.addEventListener("submit", (event) => { event.preventDefault(); run(); });
  ui.stop.addEventListener("click", stop);
  ui.model.addEventListener("change", () => {
    const model = session.models.find((m) => m.name === ui.model.value);
    if (model) { stop(); showModel(model); }
  });
  ui.threshold.addEventListener("input", () => {
    ui.thresholdValue.value = Number(ui.threshold.value).toFixed(2);
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      run();
    } else if (event.key === "Escape") {
      ui.tooltip.hidden = true;
      stop();
    }
  });
  document.addEventListener("mousemove", showTip);
  document.addEventListener("mouseleave", () => { ui.tooltip.hidden = true; });
  for (const pane of Object.values(panes)) buildStats(pane);
  settle();
  loadSession();
})();
