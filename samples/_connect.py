"""How the samples reach a server: the running one (its state file), a given url, or one
started inside the sample with ``--local``."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from genfill import Client


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--url", default=None, help="server url (default: the running server's state file)")
    group.add_argument("--token", default=None, help="server token (default: from the state file)")
    group.add_argument("--local", action="store_true", help="start a server inside this process")
    group.add_argument("--models-dir", action="append", default=[], help="with --local: a folder of models (repeatable)")


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[Client]:
    if not args.local:
        with Client(args.url, token=args.token) as client:
            yield client
        return
    from genfill_server.app import ServerConfig
    from genfill_server.background import BackgroundServer
    from genfill_server.engines import default_engines

    engines = default_engines(model_dirs=args.models_dir, hf_cache=False) if args.models_dir else None
    with BackgroundServer(ServerConfig(write_state_file=False), engines) as server:
        with Client(server.url, token=server.token) as client:
            yield client
