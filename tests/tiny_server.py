"""``python -m tests.tiny_server --port P [--arch llama]``: a real uvicorn `pema-server` app over
a tiny model (the same seeded weights every time, so a restarted server serves the same model)."""

from __future__ import annotations

import argparse

import uvicorn

from plm_owner_server.app import create_app
from plm_owner_server.runner import ModelRunner
from plm_owner_server.settings import Settings
from tests.tiny_models import tiny_model, tiny_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--arch", default="llama")
    args = parser.parse_args()
    runner = ModelRunner(tiny_model(args.arch), tiny_tokenizer(), model_id=f"tiny-{args.arch}")
    app = create_app(Settings(port=args.port), runner=runner)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
