"""`make demo`: both parties on one machine, end to end, on the Bible style-transfer task.

1. Writes the task data (King James → World English Bible verses; test verses from held-out books).
2. The PLM owner: starts `pema-server` on the embedded SmolLM2 in the background.
3. The data owner: `pema-client train` (external memory through the server, then the sequence
   adapter), then `pema-client evaluate` (the PLM alone versus PEMA on the held-out verses).
4. Prints the table and stops the server.

Every step runs the same console commands a user would, printed before they run. A second run
reuses the finished memory. Sized for about 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FIELDS = ["--source-field", "kjv", "--target-field", "web"]
# Chosen on verses of the training books (never the test books): the sequence adapter (a small
# causal transformer over the representations of the whole verse, so it can attend to the source,
# with a pointer that copies the source's next token) gained most there; it stores the decoding
# that did best there (constant λ 0.7, no repeated 4-gram, beam search with 4 beams), and evaluate
# decodes the PLM alone with the same beams. Its validation loss is best after 3-5 epochs. See
# results/quality/README.md, "The demo".
TRAIN = ["--template", "modernize", "--adapter-kind", "sequence", "--stage2-epochs", "8"]
DECODE = ["--stop", "\\n", "--max-new-tokens", "96"]


def say(text: str) -> None:
    print(f"\n\033[1m{text}\033[0m", flush=True)  # noqa: T201


def run(*argv: str | Path) -> None:
    command = [str(a) for a in argv]
    print("$ " + shlex.join([Path(command[0]).name, *command[1:]]), flush=True)  # noqa: T201
    subprocess.run(command, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"pema-server exited ({server.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"pema-server did not answer within {timeout:.0f} s; see {log}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".demo", help="working folder")
    parser.add_argument("--train", type=int, default=1200, help="training verses")
    parser.add_argument("--test", type=int, default=96, help="held-out test verses")
    args = parser.parse_args(argv)
    work, started = args.work, time.monotonic()
    data, adapter, report = work / "data", work / "adapter", work / "report"
    work.mkdir(parents=True, exist_ok=True)

    say("1/4 task data: King James → World English Bible")
    run(sys.executable, ROOT / "demo" / "bible.py", "--out", data,
        "--train", str(args.train), "--test", str(args.test))  # fmt: skip

    say("2/4 PLM owner: pema-server on the embedded SmolLM2 (background)")
    url, log = f"http://127.0.0.1:{free_port()}", work / "server.log"
    port = url.rsplit(":", 1)[1]
    print(f"$ pema-server --port {port}  > {log}", flush=True)  # noqa: T201
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [BIN / "pema-server", "--port", port], stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_healthy(url, server, log, timeout=300)
        client = [BIN / "pema-client", "--server", url]
        say("3/4 data owner: external memory, then the sequence adapter")
        run(*client, "train", "--data", data / "train.jsonl", *FIELDS, *TRAIN, "--out", adapter)
        say("4/4 data owner: the PLM alone versus PEMA on verses of held-out books")
        run(*client, "evaluate", "--adapter", adapter, "--data", data / "test.jsonl", *FIELDS,
            *DECODE, "--report", report)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    minutes = (time.monotonic() - started) / 60
    say(f"done in {minutes:.1f} min: report in {report}, adapter in {adapter}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
