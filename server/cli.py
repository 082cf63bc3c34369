"""`nudging-proxy`: serve the proxy, run a simulated upstream, or run the simulator stack."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn

from upstreams.simulator import app as simulator

from .app import create_app
from .config import Config, ConfigError, load_config
from .stack import run_stack, simulator_launcher


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as error:
        sys.exit(f"nudging-proxy: {error}")


def serve(config: Config, host: str | None, port: int | None) -> None:
    uvicorn.run(
        create_app(config),
        host=host or config.server.host,
        port=port or config.server.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )


def _serve_with_banner(config: Config, args: argparse.Namespace) -> None:
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
    serve(config, host, port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nudging-proxy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the OpenAI-compatible proxy")
    serve_parser.add_argument("--config", required=True, help="YAML config file")
    serve_parser.add_argument("--host", help="overrides server.host")
    serve_parser.add_argument("--port", type=int, help="overrides server.port")

    simulate_parser = commands.add_parser("simulate", help="run a simulated vLLM-like upstream")
    simulator.add_arguments(simulate_parser)

    stack_parser = commands.add_parser(
        "sim-stack", help="start the simulated upstreams a config points at, then the proxy"
    )
    stack_parser.add_argument("--config", default="configs/sim.yaml", help="YAML config file")
    stack_parser.add_argument("--host", help="overrides server.host")
    stack_parser.add_argument("--port", type=int, help="overrides server.port")
    stack_parser.add_argument(
        "--time-scale", type=float, default=1.0, help="scale the simulators' latency (0 = none)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(_load(args.config), args.host, args.port)
    elif args.command == "simulate":
        simulator.run(args)
    elif args.command == "sim-stack":
        config = _load(args.config)
        run_stack(config, simulator_launcher(args.time_scale), lambda: _serve_with_banner(config, args))


if __name__ == "__main__":
    main()
