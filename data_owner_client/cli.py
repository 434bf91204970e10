"""`pema-client`: the data owner's command line.

``pema-client train --server URL --data FILE --out DIR`` builds the external memory through the
server, then trains both PEMA stages locally; ``pema-client memory build`` and
``pema-client train --memory DIR`` split those steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import rich
import torch.distributed as dist
from rich.logging import RichHandler

from data_owner_client import options
from data_owner_client.adapter import KINDS, Adapter, AdapterConfig, load_adapter, load_adapters
from data_owner_client.client import PemaClient, ServerError
from data_owner_client.data import (
    TEMPLATES,
    DataError,
    Example,
    load_examples,
    resolve_template,
    split_dev,
)
from data_owner_client.devices import init_distributed, resolve_device
from data_owner_client.evaluate import evaluate, markdown_table
from data_owner_client.generate import GenerationConfig, Generator
from data_owner_client.knn import KnnConfig, KnnLM
from data_owner_client.memory import DTYPES, Memory, build_memory
from data_owner_client.memory.scheduled import OwnPredictions
from data_owner_client.options import Flag, flags
from data_owner_client.outputs import append_outputs, file_digest, resume, run_record
from data_owner_client.serve.settings import ServeSettings
from data_owner_client.served_model import ServedModel
from data_owner_client.train import train
from data_owner_client.train_config import TrainConfig
from shared.keys import KeysFile

log = logging.getLogger("pema-client")
TRAIN, DEV = "train", "dev"  # the two memories under a memory directory
# Errors a user can cause and fix (bad data, a foreign memory or adapter, a refusing server):
# printed as one line; --verbose shows the traceback.
USER_ERRORS = (ServerError, ValueError, OSError)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except the empty ones (None, False, []) that say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action) or ""


def _add_flag(group: argparse._ArgumentGroup, flag: Flag, **overrides: Any) -> None:
    """``flag`` in ``group``: a bool off by default as ``--x``, one on by default as
    ``--x/--no-x``; other types parsed as the field's."""
    kwargs: dict[str, Any] = {
        "dest": flag.dest,
        "default": None if flag.default is dataclasses.MISSING else flag.default,
        "help": flag.help,
    }
    if flag.type is bool:
        off = flag.default is False
        kwargs["action"] = "store_true" if off else argparse.BooleanOptionalAction
    else:
        kwargs |= {"type": flag.type, "choices": flag.choices, "metavar": flag.metavar}
    group.add_argument(flag.flag, **{**kwargs, **overrides})


def _add_config_flags(
    group: argparse._ArgumentGroup,
    config: type,
    only: tuple[str, ...] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """A flag per :func:`~data_owner_client.options.option` field of ``config`` (``only``
    these, none of ``skip``), with the field's default."""
    for flag in flags(config):
        if (only is None or flag.name in only) and flag.name not in skip:
            _add_flag(group, flag)


# ---- flags -------------------------------------------------------------------------------------


def _connection_flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("server")
    # SUPPRESS: an absent flag leaves the value given before the command (or None) in place.
    group.add_argument("--server", default=argparse.SUPPRESS, help="server URL ($PEMA_SERVER)")
    group.add_argument("--api-key", default=argparse.SUPPRESS, help="API key ($PEMA_API_KEY)")
    group.add_argument(
        "--ca-cert",
        default=argparse.SUPPRESS,
        help="CA certificate (PEM) to trust for an https server, e.g. its self-signed one "
        "($PEMA_CA_CERT)",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


DATA_FORMATS = (
    ".jsonl, .json, .csv, .tsv, a saved datasets directory[:SPLIT] or hf:NAME[:CONFIG][@SPLIT]"
)
TEMPLATE_HELP = (
    f"prompt template: one of {', '.join(TEMPLATES)}, or a string containing {{source}} "
    "(write \\n for a newline)"
)


def _input_flags(group: argparse._ArgumentGroup, data_help: str, template_default: str | None):
    """--data, its fields, --template and --limit (training and decoding read data alike)."""
    group.add_argument("--data", help=f"{data_help}: {DATA_FORMATS}")
    group.add_argument("--source-field", default="source", help="field holding the input text")
    group.add_argument("--target-field", default="target", help="field holding the target text")
    template_help = (
        TEMPLATE_HELP if template_default else TEMPLATE_HELP + "; default: the adapter's"
    )
    group.add_argument("--template", default=template_default, help=template_help)
    group.add_argument("--limit", type=int, help="use only the first N examples")


def _data_flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("data and memory")
    _input_flags(group, "training pairs", "plain")
    group.add_argument("--dev-data", help="validation pairs (same format and fields as --data)")
    group.add_argument(
        "--dev-fraction",
        type=float,
        default=0.1,
        help="hold out this fraction of --data for validation when --dev-data is not given",
    )
    group.add_argument(
        "--context",
        choices=("teacher", "generated", "scheduled"),
        default="teacher",
        help="memory keys from the gold prefix (teacher forcing), from the model's own greedy "
        "continuation (the paper's variant; slower), or from the gold prefix with some tokens "
        "replaced by --sampling-adapter's predictions (scheduled sampling; two passes)",
    )
    group.add_argument(
        "--sampling-adapter",
        type=Path,
        metavar="DIR",
        help="--context scheduled: the adapter whose predictions replace target tokens (mixed "
        "with the PLM as it stores; train the new adapter with --init DIR)",
    )
    group.add_argument(
        "--sampling-rate",
        type=float,
        default=0.25,
        help="--context scheduled: the chance that a target token is read as the prediction",
    )
    group.add_argument(
        "--sampling-seed", type=int, default=0, help="--context scheduled: seed of the draws"
    )
    group.add_argument(
        "--memory-dtype", choices=tuple(DTYPES), default="float16", help="dtype of stored keys"
    )
    group.add_argument(
        "--memory-batch-size", type=int, default=32, help="examples per server request"
    )
    group.add_argument(
        "--shard-examples", type=int, default=512, help="examples per memory shard file"
    )
    group.add_argument(
        "--requests-in-flight",
        type=int,
        default=4,
        help="requests at the server at once (1: one at a time, bit-reproducible against an "
        "otherwise idle server; more: faster, and the server may batch them together, which "
        "changes the last bits of some keys)",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="replace a memory of another build in place"
    )
    return parser


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    adapter = parser.add_argument_group("adapter (defaults per kind)")
    adapter.add_argument(
        "--adapter-kind",
        choices=tuple(KINDS),
        default="pema",
        help="pema: the paper's adapter (two stages); residual: a low-rank correction added to "
        "the normalised representation; sequence: a small causal transformer over the whole "
        "prompt + target, which can attend to the source",
    )
    for per_kind in _adapter_flags().values():
        flag = next(iter(per_kind.values()))
        _add_flag(adapter, flag, default=None, help=_kind_help(flag.help, per_kind))
    optimisation = parser.add_argument_group("optimisation")
    train_options = _train_options()
    for flag in flags(TrainConfig):
        kinds = train_options.get(flag.name)
        _add_flag(
            optimisation, flag, **({"help": f"{'/'.join(kinds)}: {flag.help}"} if kinds else {})
        )


def _adapter_flags() -> dict[str, dict[str, Flag]]:
    """Each adapter setting's flag, per kind that has it (their defaults may differ)."""
    settings: dict[str, dict[str, Flag]] = {}
    for kind in KINDS.values():
        for flag in flags(kind.config):
            settings.setdefault(flag.name, {})[kind.name] = flag
    return settings


def _kind_help(help: str, per_kind: dict[str, Flag]) -> str:
    """``help`` with the kinds it applies to (unless all) and its default per kind."""
    defaults = {kind: _shown(flag.default) for kind, flag in per_kind.items()}
    if len(set(defaults.values())) == 1:
        default = f"(default: {next(iter(defaults.values()))})"
    else:
        default = f"(default per kind: {'; '.join(f'{k}: {v}' for k, v in defaults.items())})"
    kinds = "" if len(per_kind) == len(KINDS) else f"{', '.join(per_kind)}: "
    return f"{kinds}{help} {default}"


def _shown(value: Any) -> str:
    """A default as help shows it: 1 for 1.0, on/off for bools."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _train_options() -> dict[str, list[str]]:
    """The TrainConfig fields that only some kinds read, and those kinds."""
    options: dict[str, list[str]] = {}
    for kind in KINDS.values():
        for name in kind.train_options:
            options.setdefault(name, []).append(kind.name)
    return options


MIXING = ("lambda_max", "lambda_min", "schedule", "gu_horizon")  # default: the adapter's


def _decode_flags(adapter_required: bool) -> argparse.ArgumentParser:
    """Flags of `generate` and `evaluate`: the adapter, Gradual Unrolling and decoding."""
    parser = argparse.ArgumentParser(add_help=False)
    mixing = parser.add_argument_group("adapter and Gradual Unrolling (default: the adapter's)")
    mixing.add_argument(
        "--adapter",
        type=Path,
        nargs="+",
        required=adapter_required,
        metavar="DIR",
        help="adapter directory from pema-client train; several of one kind decode as an "
        "ensemble, the mean of their outputs"
        + ("" if adapter_required else " (without it: the PLM alone)"),
    )
    _add_config_flags(mixing, GenerationConfig, only=MIXING)
    decoding = parser.add_argument_group("decoding")
    _add_config_flags(decoding, GenerationConfig, skip=MIXING)
    decoding.add_argument(
        "--stop",
        action="append",
        default=[],
        help="end an output where this text appears (not kept; write \\n for a newline); "
        "repeat for several",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pema-client", description="Adapt a language model you cannot see, with PEMA."
    )
    parser.add_argument("--server", help="server URL, also accepted after the command")
    parser.add_argument("--api-key", help="API key, also accepted after the command")
    parser.add_argument("--ca-cert", help="CA certificate, also accepted after the command")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    connection, data = _connection_flags(), _data_flags()
    formatter = _HelpFormatter

    commands.add_parser(
        "info",
        parents=[connection],
        formatter_class=formatter,
        help="print the served model's description (GET /v1/model)",
    )

    memory = commands.add_parser("memory", help="external memory commands (build)")
    memory_commands = memory.add_subparsers(dest="memory_command", required=True, metavar="ACTION")
    build = memory_commands.add_parser(
        "build",
        parents=[connection, data],
        formatter_class=formatter,
        help="build the train and dev memories of a dataset into OUT/train and OUT/dev",
    )
    build.add_argument("--out", required=True, type=Path, help="memory directory")

    trainer = commands.add_parser(
        "train",
        parents=[connection, data],
        formatter_class=formatter,
        help="build the memory (unless --memory), then train the adapter into OUT",
    )
    trainer.add_argument("--out", required=True, type=Path, help="adapter directory")
    trainer.add_argument(
        "--memory",
        type=Path,
        help="train on this memory directory (from `pema-client memory build`) instead of "
        "building one from --data into OUT/memory",
    )
    _add_train_flags(trainer)

    generate = commands.add_parser(
        "generate",
        parents=[connection, _decode_flags(adapter_required=False)],
        formatter_class=formatter,
        help="decode prompts with the PLM and the adapter mixed by Gradual Unrolling",
    )
    inputs = generate.add_argument_group("inputs and outputs")
    inputs.add_argument(
        "--prompt", action="append", help="a source text to answer (repeat for several)"
    )
    _input_flags(inputs, "inputs (a target field, when present, is kept as the reference)", None)
    inputs.add_argument(
        "--output",
        type=Path,
        help="JSONL file of the outputs of --data (default: stdout); run again, the same run "
        "continues after the outputs already written",
    )
    inputs.add_argument(
        "--overwrite", action="store_true", help="start --output again instead of continuing it"
    )
    knn = generate.add_argument_group(
        "kNN-LM baseline (instead of an adapter; λ defaults to 0.25, constant)"
    )
    knn.add_argument(
        "--knn",
        type=Path,
        metavar="MEMORY",
        help="mix the PLM with k-nearest-neighbour retrieval over this memory (a memory "
        "directory, or the folder of `pema-client memory build --out` whose train/ it uses)",
    )
    _add_config_flags(knn, KnnConfig)

    evaluate = commands.add_parser(
        "evaluate",
        parents=[connection, _decode_flags(adapter_required=True)],
        formatter_class=formatter,
        help="score the PLM alone and PEMA on the same inputs with sacreBLEU",
    )
    inputs = evaluate.add_argument_group("inputs and report")
    _input_flags(inputs, "evaluation pairs", None)
    inputs.add_argument(
        "--report",
        type=Path,
        help="directory for report.json, report.md and both predictions files "
        "(default: ADAPTER/evaluation); run again, the same evaluation continues where it stopped",
    )
    inputs.add_argument(
        "--overwrite", action="store_true", help="start the predictions again instead"
    )
    serve = commands.add_parser(
        "serve",
        parents=[connection],
        formatter_class=formatter,
        help="serve the adapters (and the PLM alone) behind an OpenAI-compatible API",
    )
    _settings_flags(serve.add_argument_group("service (each also read from $PEMA_SERVE_<NAME>)"))
    return parser


def _settings_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per ServeSettings field; unset flags stay None so ``PEMA_SERVE_*`` apply."""
    for name, info in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help = info.description or ""
        if info.annotation is bool:
            group.add_argument(flag, action="store_true", default=None, help=help)
        elif name == "adapter":
            group.add_argument(flag, action="append", metavar="NAME=DIR", help=help)
        else:
            choices = typing.get_args(info.annotation) if name == "hidden_dtype" else None
            group.add_argument(flag, metavar=name.upper(), choices=choices, help=help)


# ---- commands ----------------------------------------------------------------------------------


def _template(args: argparse.Namespace) -> str:
    return resolve_template(args.template.replace("\\n", "\n"))


def build_memories(
    args: argparse.Namespace, client: PemaClient, served: ServedModel, out: Path
) -> tuple[Memory, Memory]:
    """The train and dev memories of ``--data`` in ``out/train`` and ``out/dev``."""
    if not args.data:
        raise DataError("no data: pass --data FILE (or --memory DIR to train on a built memory)")
    template = _template(args)  # a bad one fails before a large file is read
    fields = {"source_field": args.source_field, "target_field": args.target_field}
    examples = load_examples(args.data, **fields, limit=args.limit)
    if args.dev_data:
        train_set, dev_set = examples, load_examples(args.dev_data, **fields)
    else:
        train_set, dev_set = split_dev(examples, args.dev_fraction)
    if not dev_set:
        raise DataError("no validation examples: pass --dev-data, or a --dev-fraction above 0")
    log.info("memory: %d train and %d dev examples", len(train_set), len(dev_set))

    resample = _resampler(args, served)

    def build(name: str, part: list[Example]) -> Memory:
        return build_memory(
            client,
            served.tokenizer,
            part,
            out / name,
            template=template,
            context=args.context,
            dtype=args.memory_dtype,
            batch_size=args.memory_batch_size,
            shard_examples=args.shard_examples,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            requests_in_flight=args.requests_in_flight,
            resample=resample,
        )

    return build(TRAIN, train_set), build(DEV, dev_set)


def _resampler(args: argparse.Namespace, served: ServedModel) -> OwnPredictions | None:
    """Scheduled sampling's predictions (``--context scheduled``), or None."""
    if args.context != "scheduled":
        if args.sampling_adapter is not None:
            raise DataError("--sampling-adapter is for --context scheduled; pass that too")
        return None
    if args.sampling_adapter is None:
        raise DataError(
            "--context scheduled reads some target tokens as an adapter's predictions: pass "
            "--sampling-adapter DIR (an adapter trained on the teacher-forced memory)"
        )
    if not 0.0 < args.sampling_rate <= 1.0:
        raise DataError(f"--sampling-rate must be in (0, 1], got {args.sampling_rate}")
    assert served.head is not None  # fetched with need_head for this context
    adapter, config = load_adapter(
        args.sampling_adapter, fingerprint=served.info.fingerprint, head=served.head
    )
    return OwnPredictions.of(
        adapter,
        config,
        served.head,
        served.info.eos_token_ids,
        args.sampling_rate,
        args.sampling_seed,
    )


def open_memories(folder: Path, fingerprint: str) -> tuple[Memory, Memory]:
    """A built memory directory's train and dev memories, checked against the served model."""
    memories = Memory.open(folder / TRAIN), Memory.open(folder / DEV)
    for memory in memories:
        memory.check_fingerprint(fingerprint)
    return memories


def _memory_command(args: argparse.Namespace, client: PemaClient) -> None:
    # Scheduled sampling mixes the PLM's distribution with the adapter's: the head.
    served = ServedModel.fetch(client, need_head=args.context == "scheduled")
    train_memory, dev_memory = build_memories(args, client, served, args.out)
    log.info(
        "memory %s: %d train pairs, %d dev pairs, target/source length ratio %.3f",
        args.out,
        len(train_memory),
        len(dev_memory),
        train_memory.manifest.length_ratio,
    )


def _warn_unused_flags(args: argparse.Namespace) -> None:
    """Say which given adapter and optimisation flags the chosen kind does not read."""
    kind = args.adapter_kind
    for per_kind in _adapter_flags().values():
        flag = next(iter(per_kind.values()))
        if getattr(args, flag.dest) is not None and kind not in per_kind:
            _warn_unused(flag.flag, list(per_kind), kind)
    train_options = _train_options()
    for flag in flags(TrainConfig):
        kinds = train_options.get(flag.name, [kind])
        if getattr(args, flag.dest) != flag.default and kind not in kinds:
            _warn_unused(flag.flag, kinds, kind)


def _warn_unused(flag: str, kinds: list[str], kind: str) -> None:
    log.warning("%s applies to the %s kind(s), not %s: ignored", flag, "/".join(kinds), kind)


def _train_command(args: argparse.Namespace, client: PemaClient) -> None:
    if args.memory and args.data:
        raise DataError("pass either --data (build the memory) or --memory DIR (use a built one)")
    train_config = _train_config(args)  # bad settings are refused before the memory build
    world = init_distributed()
    served = ServedModel.fetch(client) if world.main else None
    memory_dir = args.memory or args.out / "memory"
    if served is not None and args.memory is None:
        build_memories(args, client, served, memory_dir)
    if world.size > 1:
        dist.barrier()  # the other ranks read the cache and the memory once rank 0 wrote them
    if served is None:
        served = ServedModel.fetch(client)
    assert served.head is not None  # fetch() refuses a server that does not share it
    train_memory, dev_memory = open_memories(memory_dir, served.info.fingerprint)
    manifest = train_memory.manifest
    _warn_unused_flags(args)
    kind = KINDS[args.adapter_kind]
    adapter_config = kind.config(
        hidden_size=served.info.hidden_size,
        vocab_size=served.info.vocab_size,
        fingerprint=served.info.fingerprint,
        model_id=served.info.model_id,
        template=manifest.template,
        length_ratio=manifest.length_ratio,
        **options.values(kind.config, args, given=True),
    )
    result = train(
        adapter_config,
        train_memory,
        dev_memory,
        served.head,
        args.out,
        train_config,
        progress=not args.no_progress,
    )
    if world.main:
        log.info(
            "adapter written to %s: %d steps, validation accuracy %.4f, validation loss %.4f",
            result.out_dir,
            result.steps,
            result.val_accuracy,
            result.stage2_val_loss,
        )


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**options.values(TrainConfig, args))


def _decoder(
    args: argparse.Namespace, client: PemaClient
) -> tuple[ServedModel, GenerationConfig, str, Adapter | None, AdapterConfig | None]:
    """The served model, decoding settings, template and adapter of `generate` and `evaluate`."""
    served = ServedModel.fetch(client)
    adapter = adapter_config = None
    if args.adapter is not None:
        adapter, adapter_config = load_adapters(
            args.adapter, fingerprint=served.info.fingerprint, head=served.head
        )
    if args.template is not None:
        template = _template(args)
    else:
        template = adapter_config.template if adapter_config is not None else TEMPLATES["plain"]
    stop = tuple(stop.replace("\\n", "\n") for stop in args.stop)
    config = GenerationConfig(**options.values(GenerationConfig, args), stop=stop)
    return served, config, template, adapter, adapter_config


def _knn_memory(path: Path) -> Path:
    """``--knn``: a memory, or a `memory build` folder whose train/ is the memory."""
    return path / "train" if (path / "train").is_dir() else path


def _knn(
    args: argparse.Namespace, served: ServedModel, config: GenerationConfig
) -> tuple[KnnLM, str]:
    """The kNN-LM over ``--knn`` (a memory, or a `memory build` folder's train/) and the
    memory's prompt template."""
    if args.adapter is not None:
        raise DataError("pass either --adapter (PEMA) or --knn (the kNN-LM baseline), not both")
    path = _knn_memory(args.knn)
    memory = Memory.open(path)
    memory.check_fingerprint(served.info.fingerprint)
    assert served.head is not None  # ServedModel.fetch refuses a server without its head
    knn_config = KnnConfig(**options.values(KnnConfig, args))
    log.info("kNN-LM over %d pairs of %s (k = %d)", len(memory), path, knn_config.k)
    knn = KnnLM.from_memory(memory, served.head, knn_config, resolve_device(config.device))
    return knn, memory.manifest.template


def _inputs(args: argparse.Namespace, require_target: bool) -> list[Example]:
    return load_examples(
        args.data,
        args.source_field,
        args.target_field,
        limit=args.limit,
        require_target=require_target,
    )


def _generate_command(args: argparse.Namespace, client: PemaClient) -> None:
    if bool(args.prompt) == bool(args.data):
        raise DataError("pass either --prompt TEXT or --data FILE")
    served, config, template, adapter, adapter_config = _decoder(args, client)
    knn = None
    if args.knn is not None:
        knn, memory_template = _knn(args, served, config)
        template = template if args.template is not None else memory_template
    generator = Generator(client, served, config, template, adapter, adapter_config, knn)
    if args.prompt:
        for output in generator.generate([Example(p, None) for p in args.prompt]):
            sys.stdout.write(output.prediction + "\n")
        return
    examples = _inputs(args, require_target=False)
    start = 0
    if args.output:
        memory = None if args.knn is None else file_digest(_knn_memory(args.knn) / "manifest.json")
        record = run_record(generator, examples, knn=memory)
        start = resume(args.output, record, len(examples), generator.batch_size, args.overwrite)
        if start:
            log.info("%s: continuing after %d finished outputs", args.output, start)
    outputs = generator.generate(examples, progress=not args.no_progress, start=start)
    if not args.output:
        for output in outputs:
            sys.stdout.write(json.dumps(output.to_dict(), ensure_ascii=False) + "\n")
        return
    append_outputs(args.output, outputs)
    log.info("%d outputs written to %s", len(examples), args.output)


def _evaluate_command(args: argparse.Namespace, client: PemaClient) -> None:
    if not args.data:
        raise DataError("pass --data FILE with sources and references")
    served, config, template, adapter, adapter_config = _decoder(args, client)
    assert adapter is not None and adapter_config is not None  # --adapter is required
    if args.report is None and len(args.adapter) > 1:
        raise DataError("an ensemble has no folder of its own: pass --report RDIR")
    report_dir = args.report or args.adapter[0] / "evaluation"
    report = evaluate(
        client,
        served,
        _inputs(args, require_target=True),
        adapter,
        adapter_config,
        config,
        template,
        report_dir,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    sys.stdout.write(markdown_table(report))
    log.info("report written to %s", report_dir)


def _serve_command(args: argparse.Namespace, client: PemaClient) -> None:
    import uvicorn

    from data_owner_client.serve.app import create_app
    from data_owner_client.serve.models import serving_models

    given = {name: getattr(args, name) for name in ServeSettings.model_fields}
    settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    settings.check_exposure()
    keys = KeysFile.read(settings.api_keys_file) if settings.api_keys_file else None
    if keys is not None and keys.quotas:
        log.warning("tokens_per_minute in %s is not enforced by serve", settings.api_keys_file)
    client.retries = 1  # a PLM server that is away answers requests with 503 soon, not late
    models = serving_models(settings, client, ServedModel.fetch(client))
    uvicorn.run(
        create_app(models, keys),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )


def _info_command(args: argparse.Namespace, client: PemaClient) -> None:
    sys.stdout.write(json.dumps(client.model_info().model_dump(), indent=2) + "\n")


COMMANDS: dict[str, Callable[[argparse.Namespace, PemaClient], None]] = {
    "info": _info_command,
    "memory": _memory_command,
    "train": _train_command,
    "generate": _generate_command,
    "evaluate": _evaluate_command,
    "serve": _serve_command,
}


def connect(args: argparse.Namespace) -> PemaClient:
    """The client for ``--server``/``--api-key``/``--ca-cert`` (tests replace this to serve
    in-process)."""
    return PemaClient(args.server, args.api_key, ca_cert=args.ca_cert)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    rich.reconfigure(stderr=True)  # logs and progress bars; stdout carries only results
    handler = RichHandler(show_path=False, show_time=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(level if args.verbose else logging.WARNING)  # per request
    try:
        with connect(args) as client:
            COMMANDS[args.command](args, client)
    except httpx.TransportError as exc:
        message = f"cannot reach the server ({exc}); is pema-server running at that URL?"
        raise SystemExit(f"pema-client: {message}") from exc
    except USER_ERRORS as exc:
        if args.verbose:
            raise
        raise SystemExit(f"pema-client: {exc}") from exc
