"""`pema-server`: serve a model; `pema-server hash-key`: make an API key; `pema-server prepare`:
convert the embedded model once."""

from __future__ import annotations

import argparse
import logging
import sys
import typing

from pydantic import ValidationError

from plm_owner_server.settings import EMBEDDED_MODEL, Settings

log = logging.getLogger("pema-server")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags stay None so ``PEMA_*`` variables still apply."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        help_text = f"{field.description} (default: {default}; env PEMA_{name.upper()})"
        kind = typing.get_origin(field.annotation)
        if field.annotation is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif kind is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(field.annotation), help=help_text)
        else:
            parser.add_argument(flag, metavar=name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pema-server",
        description="Serve a causal LM's context representations for offsite adaptation (PEMA). "
        f"Without --model it serves the embedded {EMBEDDED_MODEL}.",
    )
    _add_settings_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="{hash-key,prepare}")
    key = commands.add_parser("hash-key", help="make an API key and its line for the keys file")
    key.add_argument("--name", default=None, help="owner name written next to the hash")
    key.add_argument(
        "--stdin", action="store_true", help="hash a key read from standard input instead"
    )
    commands.add_parser("prepare", help="convert the embedded model into the cache and exit")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields}
    return Settings(**{k: v for k, v in given.items() if v is not None})


def _hash_key(args: argparse.Namespace) -> None:
    from plm_owner_server.auth import hash_key, new_key

    key = sys.stdin.readline().strip() if args.stdin else new_key()
    if not key:
        raise SystemExit("no key on standard input")
    if not args.stdin:
        sys.stderr.write(f"API key (give it to the client; it is not stored): {key}\n")
    line = hash_key(key) + (f" {args.name}" if args.name else "")
    sys.stdout.write(line + "\n")


def _prepare(settings: Settings) -> None:
    from plm_owner_server.embedded import ensure_embedded_model

    sys.stdout.write(f"{ensure_embedded_model(settings.cache_dir)}\n")


def _serve(settings: Settings) -> None:
    import uvicorn

    from plm_owner_server.app import api_keys, create_app
    from plm_owner_server.backend import load_backend

    api_keys(settings)  # a bad keys file, or none where one is needed, fails before loading
    # Loaded before uvicorn starts, so a bad model name is one clear line, not a lifespan trace.
    runner = load_backend(settings)
    uvicorn.run(
        create_app(settings, runner),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # plm_owner_server.access logs each request, with its id
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        timeout_graceful_shutdown=10,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(args)
    except ValidationError as exc:
        raise SystemExit(f"pema-server: invalid setting: {exc}") from exc
    try:
        if args.command == "hash-key":
            _hash_key(args)
        elif args.command == "prepare":
            _prepare(settings)
        else:
            _serve(settings)
    except (ValueError, RuntimeError, OSError) as exc:
        raise SystemExit(f"pema-server: {exc}") from exc
