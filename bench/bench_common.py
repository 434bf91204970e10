"""What the benchmarks share: a `pema-server` subprocess, timing, and the machine's description."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers

from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings

DATA = Path(__file__).resolve().parents[2] / "shared/data/wmt22/train.jsonl"  # ../shared/data
READY_TIMEOUT_S = 300.0
SERVER_CMD = ("import sys; from plm_owner_server.cli import main; sys.exit(main())",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    """Poll ``/v1/health`` until the server answers; fail clearly if it dies or is too slow."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"pema-server exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"pema-server not ready at {url} after {READY_TIMEOUT_S:.0f} s (log: {log})")


@contextlib.contextmanager
def running_server(
    threads: int,
    log: Path,
    model: str | None = None,
    flags: Sequence[str] = (),
    cpus: set[int] | None = None,
) -> Iterator[str]:
    """A `pema-server` subprocess with ``threads`` torch threads (on ``cpus`` only, if given),
    serving ``model`` (default: its own setting, the embedded SmolLM2 unless PEMA_MODEL says
    otherwise) with extra ``flags``; yields its base URL."""
    port = free_port()
    argv = [sys.executable, "-c", *SERVER_CMD, "--port", str(port), "--log-level", "warning"]
    argv += ["--model", model] if model else []
    argv += list(flags)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def left_padded(
    prompts: list[list[int]], pad: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one batch for ``generate``: ids and attention mask, padded on the left so
    that every prompt ends where decoding starts."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine(threads: int) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def run_and_report(
    args: Any,
    measure: Callable[[ModelRunner, str, Path], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    settings: str,
) -> None:
    """Load the model here and in a server subprocess (``args.threads`` torch threads each), run
    ``measure(runner, url, tmp)``, print the machine, ``settings`` and the table; ``args.json``."""
    torch.set_num_threads(args.threads)
    server_cpus = None
    if getattr(args, "split_cores", False):  # the server on one core, this process on the rest
        cores = sorted(os.sched_getaffinity(0))
        server_cpus = {cores[0]}
        os.sched_setaffinity(0, cores[1:])
    started = time.perf_counter()
    runner = ModelRunner.load(Settings())
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(args.threads, Path(tmp) / "log", cpus=server_cpus) as url,
    ):
        results = measure(runner, url, Path(tmp))
    results["machine"] = m = machine(args.threads)
    results["wall_s"] = time.perf_counter() - started
    header = (
        f"model {runner.model_id} ({runner.dtype}), {m['cpus']} CPUs ({m['cpu']}), torch "
        f"{m['torch']}, transformers {m['transformers']}, {args.threads} torch threads in the "
        f"bench and in the server; {settings}, {results['wall_s']:.0f} s"
    )
    publish(results, header, table(results), args.json)


def publish(results: dict[str, Any], header: str, table: str, path: Path | None) -> None:
    """Print a run's header and table; also write its results to ``path`` as JSON."""
    print(header + "\n")
    print(table)
    if path is not None:
        path.write_text(json.dumps(results, indent=2, default=str))


def decoding_parser(doc: str, new_tokens: int, new_tokens_help: str) -> argparse.ArgumentParser:
    """The flags of the decoding benches: --quick, --repeats, --new-tokens, --threads, --data,
    --json."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, 8 tokens")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats")
    parser.add_argument("--new-tokens", type=int, default=new_tokens, help=new_tokens_help)
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of this process and of the server (default: torch's)",
    )
    parser.add_argument("--data", type=Path, default=DATA, help="WMT22-style JSONL (en, du)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser
