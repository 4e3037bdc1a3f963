"""``python -m sparse_jax.hf {import,export} SRC DST``: see :mod:`sparse_jax.hf`."""

from __future__ import annotations

import argparse
import sys
import time

from sparse_jax.hf.config import HF_DTYPES, ConversionError
from sparse_jax.hf.convert import (
    OVERRIDABLE,
    export_checkpoint,
    import_checkpoint,
    peak_rss_bytes,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sparse_jax.hf", description="Gemma-2 checkpoints from and to Hugging Face"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directory -> library workdir")
    imp.add_argument("hf_dir", help="config.json, *.safetensors and tokenizer.model")
    imp.add_argument("workdir", help="new workdir; the checkpoint goes to WORKDIR/checkpoints")
    imp.add_argument("--dtype", choices=sorted(HF_DTYPES), help="default: the config's dtype")
    imp.add_argument("--tokenizer", help="SentencePiece model (default: HF_DIR/tokenizer.model)")
    imp.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help=f"model config fields that do not change the weights: {', '.join(OVERRIDABLE)}",
    )
    exp = sub.add_parser("export", help="library checkpoint (dense) -> HF directory")
    exp.add_argument("workdir", help="workdir, checkpoints or step directory")
    exp.add_argument("hf_dir", help="new directory to write")
    exp.add_argument("--dtype", choices=sorted(HF_DTYPES), help="default: the params' dtype")
    exp.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "import":
            from tqdm import tqdm

            with tqdm(desc="tensors", unit="", disable=None) as bar:

                def progress(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                path = import_checkpoint(
                    args.hf_dir,
                    args.workdir,
                    param_dtype=args.dtype,
                    tokenizer=args.tokenizer,
                    overrides=args.set,
                    progress=progress,
                )
        else:
            path = export_checkpoint(
                args.workdir,
                args.hf_dir,
                dtype=args.dtype,
                max_shard_bytes=max(1, int(args.max_shard_gb * (1 << 30))),
            )
    except (ConversionError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(
        f"wrote {path} in {seconds:.1f} s (peak resident memory {peak_rss_bytes() / 2**30:.2f} GiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
