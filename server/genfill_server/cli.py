"""The ``genfill`` command: ``serve``, ``fill``, ``models``, ``schema``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from genfill import Client, GenfillError, __version__
from genfill.protocol import Limits, Mode, json_schema

from .app import LOOPBACK_HOSTS, GenfillServer, ServerConfig

logger = logging.getLogger("genfill.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfill", description="Local, open generative fill.")
    parser.add_argument("--version", action="version", version=f"genfill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (0 picks a free one; default 7860)")
    serve.add_argument("--state-file", type=Path, default=None, help="where to write url and token")
    serve.add_argument("--device", default="cpu", help="comma-separated devices, one worker each (cpu, cuda:0, ...)")
    serve.add_argument("--token", default=None, help="fixed token for a server other machines use (default: random per launch)")
    serve.add_argument("--allow-origin", action="append", default=[], help="an Origin to accept (repeatable)")
    serve.add_argument("--allow-host", action="append", default=[], help="a Host header to accept, as name:port (repeatable)")
    serve.add_argument("--max-image-pixels", type=int, default=Limits().max_image_pixels)
    serve.add_argument("--log-level", default="INFO")

    fill = commands.add_parser("fill", help="fill the selected part of an image")
    fill.add_argument("image", type=Path)
    fill.add_argument("--mask", type=Path, required=True, help="selection image: white fills, black keeps")
    fill.add_argument("--prompt", default="")
    fill.add_argument("--mode", default="fill", choices=[m.value for m in Mode if m is not Mode.EXPAND])
    fill.add_argument("--engine", default=None)
    fill.add_argument("--model", default=None)
    fill.add_argument("--variations", type=int, default=3)
    fill.add_argument("--seed", type=int, default=None)
    fill.add_argument("--steps", type=int, default=None)
    fill.add_argument("-o", "--output", type=Path, default=None, help="output file; variations get -1, -2... (default IMAGE-filled.png)")
    fill.add_argument("--local", action="store_true", help="run a server in this process instead of using a running one")
    fill.add_argument("--url", default=None)
    fill.add_argument("--token", default=None)

    commands.add_parser("models", help="list engines and models of the running server")
    commands.add_parser("schema", help="print the protocol's JSON schema")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "fill":
        return _fill(args)
    if args.command == "models":
        return _models()
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in LOOPBACK_HOSTS:
        logger.warning(
            "binding %s: other machines can reach this server. Every connection still needs the token; "
            "put a TLS reverse proxy in front of it on any network you do not trust.",
            args.host,
        )
    from .engines import default_engines

    config = ServerConfig(
        host=args.host,
        port=args.port,
        token=args.token,
        state_file=args.state_file,
        limits=Limits(max_image_pixels=args.max_image_pixels),
        allowed_origins=tuple(args.allow_origin),
        allowed_hosts=tuple(host.lower() for host in args.allow_host),
        devices=tuple(device.strip() for device in args.device.split(",") if device.strip()),
    )
    try:
        asyncio.run(_serve_until_signalled(config, default_engines()))
    except OSError as exc:
        print(f"genfill: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signalled(config: ServerConfig, engines) -> None:
    server = GenfillServer(config, engines)
    await server.start()
    print(f"genfill {__version__} serving on {server.url} (engines: {', '.join(engines.specs)})", flush=True)
    if server._state_path is not None:
        print(f"url and token written to {server._state_path}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except NotImplementedError:  # pragma: no cover - Windows event loops
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))
    await stop.wait()
    print("genfill: shutting down", flush=True)
    await server.stop("server shutting down")


def _fill(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    output = args.output or args.image.with_name(f"{args.image.stem}-filled.png")
    options = {
        "mode": args.mode,
        "engine": args.engine,
        "model": args.model,
        "variations": args.variations,
        "seed": args.seed,
        "steps": args.steps,
    }
    background = None
    try:
        if args.local:
            from .background import BackgroundServer

            background = BackgroundServer()
            background.start()
            client = Client(background.url, token=background.token)
        else:
            client = Client(args.url, token=args.token)
        with client, Progress(transient=True) as bar:
            task = bar.add_task("filling", total=None)

            def on_progress(event) -> None:
                if event.kind == "accepted":
                    bar.update(task, description=f"queued ({event.queue_position} ahead)")
                elif event.kind == "progress":
                    bar.update(task, description="filling", completed=event.step, total=event.total)

            result = client.fill(args.image, args.mask, args.prompt, on_progress=on_progress, **options)
    except (GenfillError, ValueError) as exc:
        print(f"genfill: {exc}", file=sys.stderr)
        return 1
    finally:
        if background is not None:
            background.stop()
    paths = []
    for index in range(len(result.arrays)):
        path = output if index == 0 else output.with_name(f"{output.stem}-{index}{output.suffix}")
        result.composite(index).save(path)
        paths.append(str(path))
    print(f"wrote {', '.join(paths)} (seeds {', '.join(map(str, result.seeds))}, {result.seconds:.2f} s)")
    return 0


def _models() -> int:
    try:
        catalogue = Client().models()
    except GenfillError as exc:
        print(f"genfill: {exc}", file=sys.stderr)
        return 1
    print(f"default engine: {catalogue['default_engine']}")
    for engine in catalogue["engines"]:
        print(f"engine {engine['name']}: {', '.join(engine['modes'])} - {engine['description']}")
    for model in catalogue["models"]:
        print(f"model {model['name']} ({model['architecture']}, {model['engine']}, from {model['source']})")
    if not catalogue["models"]:
        print("no diffusion models installed")
    return 0
