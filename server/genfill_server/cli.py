"""The ``genfill`` command: ``serve``, ``fill``, ``models``, ``schema``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from genfill import Client, ConnectError, GenfillError, __version__
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
    serve.add_argument(
        "--models-dir", action="append", type=Path, default=[],
        help="a diffusers model folder, a checkpoint, or a folder of those (repeatable); the HF cache is always searched",
    )
    serve.add_argument("--offload", action="store_true", help="model CPU offload, for GPUs too small for a whole pipeline")
    serve.add_argument(
        "--no-compile", action="store_true",
        help="don't compile the diffusion models for their native size at load (as GENFILL_COMPILE=0)",
    )
    serve.add_argument(
        "--default-engine", default=None,
        help="engine for requests naming no engine or model (default: classic, which needs no weights)",
    )
    serve.add_argument(
        "--remote", default="",
        help="cloud providers to switch on, comma-separated (openai, bfl, imagen): the context crop of each "
        "image filled with their models is sent to them. Off by default",
    )
    serve.add_argument(
        "--remote-config", type=Path, default=None,
        help="TOML file of the cloud providers' settings (default $GENFILL_REMOTE_CONFIG, else "
        "~/.config/genfill/remote.toml if it exists); a table with enabled = true switches its provider on",
    )
    serve.add_argument(
        "--ray", default=None, metavar="ADDRESS",
        help="run the engines on a Ray Serve pool: 'auto' starts one on this machine, else a cluster's address",
    )
    serve.add_argument("--replicas", type=int, default=1, help="with --ray: replicas per engine and model (default 1)")
    serve.add_argument(
        "--max-replicas", type=int, default=None,
        help="with --ray: autoscale each engine and model between --replicas and this many replicas",
    )
    serve.add_argument(
        "--models-per-replica", type=int, default=None, metavar="N",
        help="with --ray: one deployment per engine whose replicas each keep up to N of its models "
        "loaded, evicting the least recently used (for many checkpoints on few GPUs)",
    )
    serve.add_argument("--log-level", default="INFO")

    fill = commands.add_parser("fill", help="fill the selected part of an image")
    fill.add_argument("image", type=Path)
    fill.add_argument("--mask", type=Path, required=True, help="selection image: white fills, black keeps")
    fill.add_argument("--mode", default="fill", choices=[m.value for m in Mode if m is not Mode.EXPAND])
    _add_job_arguments(fill, "filled")

    expand = commands.add_parser("expand", help="grow an image's canvas and fill the new area (outpaint)")
    expand.add_argument("image", type=Path)
    for side in ("left", "right", "top", "bottom"):
        expand.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    _add_job_arguments(expand, "expanded")

    models = commands.add_parser(
        "models", help="list installed models (the running server's, else this machine's), or pull one"
    )
    models.add_argument("--models-dir", action="append", type=Path, default=[], help="also scan this folder (repeatable)")
    models.add_argument("--local", action="store_true", help="scan this machine even when a server runs")
    models_commands = models.add_subparsers(dest="models_command")
    pull = models_commands.add_parser("pull", help="download a diffusers model from the Hugging Face Hub into its cache")
    pull.add_argument("name", help="repo id, e.g. stable-diffusion-v1-5/stable-diffusion-inpainting")
    pull.add_argument("--tokenizer", action="store_true", help="only the tokenizer files (for single-file checkpoints)")
    commands.add_parser("schema", help="print the protocol's JSON schema")
    _add_plugin_parser(commands)
    return parser


def _add_job_arguments(command: argparse.ArgumentParser, suffix: str) -> None:
    command.add_argument("--prompt", default="")
    command.add_argument("--engine", default=None)
    command.add_argument("--model", default=None)
    command.add_argument("--variations", type=int, default=3)
    command.add_argument("--seed", type=int, default=None)
    command.add_argument("--steps", type=int, default=None)
    command.add_argument(
        "-o", "--output", type=Path, default=None,
        help=f"output file; variations get -1, -2... (default IMAGE-{suffix}.png)",
    )
    command.add_argument(
        "--local", action="store_true", help="run a server in this process instead of using a running one"
    )
    command.add_argument("--url", default=None)
    command.add_argument("--token", default=None)
    command.add_argument(
        "--timeout", type=float, default=None, help="seconds the job may take (default: the SDK's, 600)"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command in ("fill", "expand"):
        return _fill(args)
    if args.command == "models":
        if args.models_command == "pull":
            return _pull(args)
        return _models(args)
    if args.command == "plugin":
        return _plugin(args)
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
    # Serving never downloads: every load below is local_files_only, and this makes any
    # library call that would still try the Hub fail at once instead.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.no_compile:
        os.environ["GENFILL_COMPILE"] = "0"
    from .engines import default_engines

    try:
        remote = _remote_config(args)
        engines = default_engines(
            args.models_dir, default_engine=args.default_engine, offload=args.offload, remote=remote
        )
    except ValueError as exc:
        print(f"genfill: {exc}", file=sys.stderr)
        return 2
    pool = None
    if args.ray is not None:
        import importlib.util

        from .pool import PoolConfig

        if importlib.util.find_spec("ray") is None:
            print("genfill: --ray needs ray[serve]: pip install 'genfill[pool]'", file=sys.stderr)
            return 2

        autoscaling = None
        if args.max_replicas is not None:
            autoscaling = {"min_replicas": args.replicas, "max_replicas": args.max_replicas, "target_ongoing_requests": 2}
        try:
            pool = PoolConfig(
                address=args.ray, replicas=args.replicas, autoscaling=autoscaling, models_per_replica=args.models_per_replica
            )
        except ValueError as exc:
            print(f"genfill: {exc}", file=sys.stderr)
            return 2
    elif args.max_replicas is not None or args.replicas != 1 or args.models_per_replica is not None:
        print("genfill: --replicas, --max-replicas and --models-per-replica need --ray", file=sys.stderr)
        return 2
    config = ServerConfig(
        pool=pool,
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
        asyncio.run(_serve_until_signalled(config, engines))
    except OSError as exc:
        print(f"genfill: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _remote_config(args: argparse.Namespace) -> dict:
    """The cloud providers switched on and their settings; each is checked here, so a missing
    key or a bad setting stops ``serve`` with its message instead of leaving the provider out."""
    from .engines import discover_providers
    from .engines.remote import check_remote_config, load_remote_config

    path = args.remote_config
    if path is None and os.environ.get("GENFILL_REMOTE_CONFIG"):
        path = Path(os.environ["GENFILL_REMOTE_CONFIG"])
    if path is None:
        default = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "genfill" / "remote.toml"
        path = default if default.is_file() else None
    names = [name.strip() for name in args.remote.split(",") if name.strip()]
    remote = load_remote_config(path, names)
    check_remote_config(remote, known=discover_providers())
    for name in remote:
        logger.warning("cloud provider %s is on: images filled with its models leave this machine", name)
    return remote


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

    expanding = args.command == "expand"
    output = args.output or args.image.with_name(f"{args.image.stem}-{'expanded' if expanding else 'filled'}.png")
    options = {
        "engine": args.engine,
        "model": args.model,
        "variations": args.variations,
        "seed": args.seed,
        "steps": args.steps,
        "timeout_s": args.timeout,
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

            if expanding:
                margins = {side: getattr(args, side) for side in ("left", "right", "top", "bottom")}
                result = client.expand(args.image, prompt=args.prompt, on_progress=on_progress, **margins, **options)
            else:
                result = client.fill(
                    args.image, args.mask, args.prompt, mode=args.mode, on_progress=on_progress, **options
                )
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
    # What the engine accepted but could not honour (classic ignores the prompt).
    for warning in getattr(result, "warnings", None) or []:
        print(f"genfill: warning: {getattr(warning, 'message', warning)}", file=sys.stderr)
    return 0


def _models(args: argparse.Namespace) -> int:
    if not args.local and not args.models_dir:
        try:
            catalogue = Client().models()
        except ConnectError:
            catalogue = None  # no server runs: list what this machine has
        except GenfillError as exc:
            print(f"genfill: {exc}", file=sys.stderr)
            return 1
        if catalogue is not None:
            print(f"default engine: {catalogue['default_engine']}")
            for engine in catalogue["engines"]:
                print(f"engine {engine['name']}: {', '.join(engine['modes'])} - {engine['description']}")
                capabilities = engine.get("capabilities")
                if capabilities:
                    takes = ", ".join(capabilities["options"] + capabilities["reference_roles"]) or "no options"
                    prompt = "uses the prompt" if capabilities["prompt"] else "ignores the prompt"
                    print(f"  {prompt}; takes {takes}; runs on {capabilities['device_kind']}")
            for model in catalogue["models"]:
                where = f"; sends images to {model['host']}" if model.get("remote") else ""
                print(f"model {model['name']} ({model['architecture']}, {model['engine']}, from {model['source']}{where})")
            if not catalogue["models"]:
                print("no diffusion models installed")
            return 0
    from .registry import ModelRegistry, describe, hf_hub_cache

    registry = ModelRegistry(model_dirs=args.models_dir)
    lines = describe(registry)
    searched = [str(folder) for folder in args.models_dir] + [f"{hf_hub_cache()} (Hugging Face cache)"]
    lead = "models on this machine" if args.local or args.models_dir else "no server running; models on this machine"
    print(f"{lead} (searched {', '.join(searched)}):")
    for line in lines:
        print(f"  {line}")
    if not lines:
        print("  none: the classic engine still works; `genfill models pull ORG/NAME` downloads a diffusers model")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from .registry import PullError, pull

    try:
        path = pull(args.name, tokenizer_only=args.tokenizer)
    except PullError as exc:
        print(f"genfill: {exc}", file=sys.stderr)
        return 1
    print(f"{args.name} is in {path}")
    return 0


def _add_plugin_parser(commands) -> None:
    plugin = commands.add_parser("plugin", help="install the Krita or GIMP 3 plug-in")
    plugin_commands = plugin.add_subparsers(dest="plugin_command", required=True)
    install = plugin_commands.add_parser("install", help="copy a plug-in into the editor's per-user plug-in folder")
    install.add_argument("editor", choices=["krita", "gimp"])
    install.add_argument("--dest", type=Path, default=None, help="install into this folder instead (tests, packaging)")
    install.add_argument("--no-enable", action="store_true", help="Krita: do not switch the plug-in on in kritarc")
    zip_command = plugin_commands.add_parser("zip", help="build the Krita plug-in zip for Krita's 'Import Python Plugin from File'")
    zip_command.add_argument("-o", "--output", type=Path, default=Path("genfill_krita.zip"))


def _plugin(args: argparse.Namespace) -> int:
    from genfill_bridge import install

    try:
        if args.plugin_command == "zip":
            print(f"wrote {install.build_krita_zip(args.output)}")
            return 0
        installed = install.install(args.editor, args.dest, enable=not args.no_enable)
    except (OSError, ValueError) as exc:
        print(f"genfill: {exc}", file=sys.stderr)
        return 1
    print(f"installed the {args.editor} plug-in in {installed.folder}")
    if installed.enabled_in is not None:
        print(f"switched it on in {installed.enabled_in}; restart Krita, then Settings > Dockers > Generative Fill")
    elif args.editor == "krita":
        print("switch it on in Krita: Settings > Configure Krita > Python Plugin Manager, then restart Krita")
    else:
        print("restart GIMP, then Filters > Generative > Fill")
    return 0
