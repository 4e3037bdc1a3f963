"""Generate from a checkpoint: one prompt on the terminal, or an OpenAI-compatible HTTP server.

    python serve.py --checkpoint runs/tiny --prompt "In the beginning"   # stream one completion
    python serve.py --checkpoint runs/gemma --chat "Who are you?"        # one chat turn
    python serve.py --checkpoint runs/tiny --port 8000                   # serve on 127.0.0.1:8000

``--chat`` (with ``--system`` for a system message) formats one user turn in Gemma's chat
format and prints the model's reply; it needs a tokenizer with Gemma's turn markers, such as
a checkpoint imported with ``python -m sparse_jax.hf import``. The server answers ``POST
/v1/completions`` and ``POST /v1/chat/completions`` (streamed with ``"stream": true``), ``GET
/v1/models``, ``GET /v1/models/{id}`` and ``GET /health``, decoding concurrent requests together
in ``--slots`` batch rows. With ``--api-key`` (or the SPARSE_JAX_API_KEY environment variable)
the ``/v1`` routes need ``Authorization: Bearer <key>``. It listens on 127.0.0.1 unless
``--host`` says otherwise; ``--port 0`` takes any free port, and the banner says which. The
port is taken before the engine compiles (a line per compiled program), and the banner comes
once the server accepts connections. Options of the other mode, and bad values, are refused
(exit status 2) before anything is loaded or printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from pallas_kernels import IMPLEMENTATIONS, ImplementationUnavailableError
from sparse_jax.decode.sampling import Sampler
from sparse_jax.decode.step import DEFAULT_OPTIONS, PATHS
from sparse_jax.serve.loading import load
from sparse_jax.serve.textgen import TextGenerator
from sparse_jax.train.checkpoint import CheckpointError

API_KEY_ENV = "SPARSE_JAX_API_KEY"


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be an integer >= 1")
    return value


def _port(text: str) -> int:
    from sparse_jax.serve.listen import check_port

    try:
        return check_port(int(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or step directory")
    one = parser.add_argument_group("one prompt or chat turn")
    first = one.add_mutually_exclusive_group()
    first.add_argument("--prompt", help="generate one completion to stdout and exit")
    first.add_argument("--chat", help="answer one user message in the chat format and exit")
    one_only = [
        one.add_argument("--system", default=None, help="system message (with --chat)"),
        one.add_argument("--max-tokens", type=_count, default=64),
        one.add_argument("--temperature", type=float, default=0.0, help="0 means greedy"),
        one.add_argument("--top-k", type=int, default=None),
        one.add_argument("--top-p", type=float, default=None),
        one.add_argument("--seed", type=int, default=0),
        one.add_argument("--stop", action="append", default=[], help="stop string (repeatable)"),
    ]
    server = parser.add_argument_group("server (without --prompt)")
    server_only = [
        server.add_argument("--host", default="127.0.0.1"),
        server.add_argument("--port", type=_port, default=8000, help="0: any free port"),
        server.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV} if set"),
        server.add_argument("--model-name", default=None, help="model id (default: config name)"),
        server.add_argument("--slots", type=_count, default=8, help="requests decoded together"),
        server.add_argument("--max-queue", type=_count, default=256, help="most waiting"),
        server.add_argument("--prefill-group", type=_count, default=1, help="prefilled at once"),
        server.add_argument("--max-tokens-limit", type=_count, default=256, help="per request"),
        server.add_argument("--max-request-bytes", type=_count, default=1 << 20),
    ]
    decoding = parser.add_argument_group("decoding (both modes)")
    decoding.add_argument("--decode-path", choices=PATHS, default="auto")
    decoding.add_argument(
        "--kernels",
        choices=IMPLEMENTATIONS,
        default="auto",
        help="implementation of the sparse ops and products (auto: Pallas on TPU/GPU, the "
        "native kernels on CPU when built, else XLA)",
    )
    args = parser.parse_args(argv)
    # An option of the other mode would be silently ignored: refuse it instead.
    one_shot = args.prompt is not None or args.chat is not None
    ignored = server_only if one_shot else one_only
    for action in ignored:
        if getattr(args, action.dest) != action.default:
            mode = "the server (without --prompt or --chat)" if one_shot else "--prompt or --chat"
            parser.error(f"{action.option_strings[0]} applies only to {mode}")
    if args.system is not None and args.chat is None:
        parser.error("--system applies only to --chat")
    return args


def run_prompt(args: argparse.Namespace) -> int:
    sampler = Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    generator = TextGenerator(load(args.checkpoint))
    settings = dict(
        max_tokens=args.max_tokens,
        sampler=sampler,
        seed=args.seed,
        stop=args.stop,
        options=dataclasses.replace(
            DEFAULT_OPTIONS, path=args.decode_path, implementation=args.kernels
        ),
    )
    if args.chat is not None:
        messages = [("user", args.chat)]
        if args.system is not None:
            messages.insert(0, ("system", args.system))
        pieces = generator.stream_chat(messages, **settings)
    else:
        pieces = generator.stream(args.prompt, **settings)
    # The generator checks the prompt and every setting before its first piece: a request that
    # fails prints nothing but its error.
    first = next(pieces, "")
    print((args.prompt or "") + first, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


def api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key``, else from the environment; None when neither is given."""
    from sparse_jax.serve.app import check_api_key

    if args.api_key is not None:
        check_api_key(args.api_key, "--api-key")
        return args.api_key
    key = os.environ.get(API_KEY_ENV)
    if key is not None:
        check_api_key(key, f"${API_KEY_ENV}")
    return key


def run_server(args: argparse.Namespace) -> int:
    # The one-prompt path does not need the server's imports.
    from sparse_jax.serve.app import ServerSettings, create_app
    from sparse_jax.serve.engine import SERVING_OPTIONS, Engine
    from sparse_jax.serve.listen import bind, serve, url

    key = api_key(args)
    sock = bind(args.host, args.port)
    try:
        model = load(args.checkpoint)
        settings = ServerSettings(
            model_name=args.model_name or model.config.name,
            api_key=key,
            max_tokens_limit=args.max_tokens_limit,
            max_request_bytes=args.max_request_bytes,
        )
        engine = Engine(
            model.config,
            model.params,
            slots=args.slots,
            options=dataclasses.replace(
                SERVING_OPTIONS, path=args.decode_path, implementation=args.kernels
            ),
            max_queue=args.max_queue,
            max_prefill_group=args.prefill_group,
        )
        print(f"compiling for {args.slots} slots ...", file=sys.stderr, flush=True)
        engine.start(warmup=True)
        app = create_app(engine, model.tokenizer, settings)
        address = url(sock)
        banner = f"serving {settings.model_name!r} (step {model.step}) on {address}"
        if key is None:
            banner += (
                f"\nwarning: no API key (--api-key or ${API_KEY_ENV}): anyone who can reach "
                f"{address} can use it"
            )
        serve(app, sock, banner)
    finally:
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # force: absl configures the root logger when orbax is imported, which would make this a
    # no-op and hide the engine's progress lines.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.prompt is not None or args.chat is not None:
            return run_prompt(args)
        return run_server(args)
    except (CheckpointError, ValueError, ImplementationUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
