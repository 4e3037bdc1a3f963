"""Generate from a checkpoint: one prompt on the terminal, or an OpenAI-compatible HTTP server.

    python serve.py --checkpoint runs/tiny --prompt "In the beginning"   # stream one completion
    python serve.py --checkpoint runs/tiny --port 8000                   # serve on 127.0.0.1:8000

The server answers ``POST /v1/completions`` (streamed with ``"stream": true``), ``GET
/v1/models`` and ``GET /health``, decoding concurrent requests together in ``--slots`` batch
rows. With ``--api-key`` (or the SPARSE_JAX_API_KEY environment variable) the ``/v1`` routes
need ``Authorization: Bearer <key>``. It listens on 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sparse_jax.checkpoint import CheckpointError
from sparse_jax.decode import DecodeOptions
from sparse_jax.loading import load
from sparse_jax.sampling import Sampler
from sparse_jax.textgen import TextGenerator

API_KEY_ENV = "SPARSE_JAX_API_KEY"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or step directory")
    one = parser.add_argument_group("one prompt")
    one.add_argument("--prompt", help="generate one completion to stdout and exit")
    one.add_argument("--max-tokens", type=int, default=64)
    one.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    one.add_argument("--top-k", type=int, default=None)
    one.add_argument("--top-p", type=float, default=None)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    server = parser.add_argument_group("server (without --prompt)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV} if set")
    server.add_argument("--model-name", default=None, help="model id (default: config name)")
    server.add_argument("--slots", type=int, default=8, help="requests decoded together")
    server.add_argument("--max-queue", type=int, default=256, help="requests waiting at most")
    server.add_argument("--prefill-group", type=int, default=1, help="prompts prefilled at once")
    server.add_argument("--max-tokens-limit", type=int, default=256, help="per request")
    server.add_argument("--max-request-bytes", type=int, default=1 << 20)
    server.add_argument("--decode-path", choices=("auto", "sparse", "masked"), default="auto")
    return parser.parse_args(argv)


def run_prompt(args: argparse.Namespace) -> int:
    generator = TextGenerator(load(args.checkpoint))
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    print(args.prompt, end="", flush=True)
    for piece in generator.stream(
        args.prompt,
        max_tokens=args.max_tokens,
        sampler=sampler,
        seed=args.seed,
        stop=args.stop,
    ):
        print(piece, end="", flush=True)
    print()
    return 0


def run_server(args: argparse.Namespace) -> int:
    import uvicorn  # the one-prompt path does not need the server's imports

    from sparse_jax.server.app import ServerSettings, create_app
    from sparse_jax.server.engine import Engine

    model = load(args.checkpoint)
    settings = ServerSettings(
        model_name=args.model_name or model.config.name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
    )
    engine = Engine(
        model.config,
        model.params,
        slots=args.slots,
        options=DecodeOptions(path=args.decode_path),
        max_queue=args.max_queue,
        max_prefill_group=args.prefill_group,
    )
    print(f"compiling for {args.slots} slots ...", file=sys.stderr, flush=True)
    engine.start(warmup=True)
    app = create_app(engine, model.tokenizer, settings)
    print(
        f"serving {settings.model_name!r} (step {model.step}) on http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.prompt is not None:
            return run_prompt(args)
        return run_server(args)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
