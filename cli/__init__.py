"""`nudging-proxy`: serve the proxy, run a simulated upstream or the simulator stack, or evaluate.

The umbrella command: the one package that imports the server, the eval and the upstreams
(each of which imports only `nudging_core`, and the eval also the server's app)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from fastapi import FastAPI

from cli.serving import exit_after_shutdown, serve
from cli.stack import Launcher, local_launcher, run_stack, simulator_launcher
from nudging_core.config import Config, ConfigError, load_config
from nudging_eval import cli as evaluation
from server.app import create_app
from upstreams.local import cli as local_upstream
from upstreams.simulator import app as simulator


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as error:
        sys.exit(f"nudging-proxy: {error}")


def _serve_with_banner(config: Config, args: argparse.Namespace, app: FastAPI) -> None:
    host = args.host or config.server.host
    port = args.port or config.server.port
    model = config.models[0].name
    print(
        f"\nnudging-proxy on http://{host}:{port}/v1 (models: {', '.join(m.name for m in config.models)})\n"
        f"try: curl -N http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' "
        f"""-d '{{"model": "{model}", "stream": true, "messages": [{{"role": "user", """
        f""""content": "Why is the sky blue?"}}]}}'\n""",
        flush=True,
    )
    serve(config, host, port, app=app)


def _run_stack(config: Config, launch: Launcher, args: argparse.Namespace, startup_timeout: float) -> None:
    app = create_app(config)
    run_stack(config, launch, lambda: _serve_with_banner(config, args, app),
              report_down=app.state.registry.report_down, startup_timeout=startup_timeout)


def _proxy_arguments(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument("--config", required=default_config is None, default=default_config,
                        help="YAML config file")
    parser.add_argument("--host", help="overrides server.host")
    parser.add_argument("--port", type=int, help="overrides server.port")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nudging-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serving = commands.add_parser("serve", help="run the OpenAI-compatible proxy")
    _proxy_arguments(serving, None)
    serving.add_argument("--workers", type=_positive, help="worker processes; overrides server.workers")

    demo = commands.add_parser(
        "demo", help="start the bundled CPU models (Gemma 3 270M nudged by SmolLM2-135M), then the proxy"
    )
    _proxy_arguments(demo, "configs/demo.yaml")
    demo.add_argument("--threads", type=int, help="llama.cpp threads per model (default: cores / 2)")

    sim_stack = commands.add_parser(
        "sim-stack", help="start the simulated upstreams a config points at, then the proxy"
    )
    _proxy_arguments(sim_stack, "configs/sim.yaml")
    sim_stack.add_argument("--time-scale", type=float, default=1.0,
                           help="scale the simulators' latency (0 = none)")

    evaluation.add_arguments(
        commands.add_parser("eval", help="run one of the paper's experiments over a dataset and report it")
    )
    simulator.add_arguments(commands.add_parser("simulate", help="run a simulated vLLM-like upstream"))
    local_upstream.add_arguments(
        commands.add_parser("local-upstream", help="serve a GGUF model with llama.cpp on CPU")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        signal.signal(signal.SIGTERM, exit_after_shutdown)
        signal.signal(signal.SIGINT, exit_after_shutdown)
        serve(_load(args.config), args.host, args.port, args.workers)
    elif args.command == "simulate":
        simulator.run(args)
    elif args.command == "local-upstream":
        local_upstream.run(args)
    elif args.command == "eval":
        evaluation.run(args)
    elif args.command == "demo":
        _run_stack(_load(args.config), local_launcher(args.threads), args, startup_timeout=300)
    elif args.command == "sim-stack":
        _run_stack(_load(args.config), simulator_launcher(args.time_scale), args, startup_timeout=60)
