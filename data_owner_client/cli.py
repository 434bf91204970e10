"""`pema-client`: the data owner's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from data_owner_client.client import PemaClient, ServerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pema-client", description="Adapt a language model you cannot see, with PEMA."
    )
    parser.add_argument(
        "--server", default=None, help="server URL (default: the PEMA_SERVER environment variable)"
    )
    parser.add_argument(
        "--api-key", default=None, help="API key (default: the PEMA_API_KEY environment variable)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print the served model's description (GET /v1/model)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with PemaClient(args.server, args.api_key) as client:
            if args.command == "info":
                sys.stdout.write(json.dumps(client.model_info().model_dump(), indent=2) + "\n")
    except (ServerError, ValueError, OSError) as exc:
        raise SystemExit(f"pema-client: {exc}") from exc
