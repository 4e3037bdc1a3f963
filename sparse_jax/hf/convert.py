"""Import a Hugging Face Gemma-2 checkpoint into the library's format, and export one back.

:func:`import_checkpoint` reads ``config.json``, the ``*.safetensors`` files (one, or shards
listed by ``model.safetensors.index.json``) and ``tokenizer.model``. It checks every tensor's
presence, shape and dtype before reading any, then reads the tensors one at a time
(``safetensors.safe_open``). Each becomes a leaf of the unstacked parameter tree (``layers_0``,
``layers_1``, ...: no copy into a stack), which Orbax writes without a copy of its own, so the
host holds one copy of the model and the tensor being read. The result is a step-0 checkpoint
under ``<workdir>/checkpoints`` that :func:`sparse_jax.load`, ``serve.py`` and the notebook
read as they read a trained one. It holds parameters only (no optimizer or data state), so
``train.py`` refuses to resume it rather than start from its weights by accident.

:func:`export_checkpoint` writes a dense checkpoint as ``config.json``, ``model.safetensors``
(or shards of at most ``max_shard_bytes`` with an index, as ``save_pretrained`` writes them)
and ``tokenizer.model``, into a new directory that appears complete or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from sparse_jax.data.tokenizer import FILENAME as TOKENIZER_FILE
from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.hf.config import ConversionError, config_from_hf, config_to_hf
from sparse_jax.hf.tensors import EMBEDDING_NAME, LM_HEAD_NAME, Tensor, tensors
from sparse_jax.model.config import ModelConfig, override
from sparse_jax.train.checkpoint import Checkpointer, tokenizer_to_json

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SOURCE = "huggingface"
# safetensors' dtype names -> numpy dtypes the library stores weights in.
FLOAT_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DEFAULT_SHARD_BYTES = 2 << 30


# ModelConfig fields an import may set: they change how the model runs, not what its weights
# compute.
OVERRIDABLE = ("name", "max_seq_len", "dtype", "param_dtype", "remat_policy")


def apply_overrides(cfg: ModelConfig, overrides: Sequence[str]) -> ModelConfig:
    """``cfg`` with ``field=value`` overrides of :data:`OVERRIDABLE` fields.

    Raises:
      ConversionError: a field that would change the model the checkpoint describes (Spark
        kinds included), or a bad value.
    """
    for item in overrides:
        field = item.split("=", 1)[0].strip()
        if field in ("ffn_kind", "attn_kind"):
            raise ConversionError(
                f"{item!r}: a Gemma-2 checkpoint imports as the dense model it is; turning its "
                "weights into a Spark model is a research question (how to initialize the "
                "predictors and the wider FFN), not a conversion"
            )
        if field not in OVERRIDABLE:
            raise ConversionError(
                f"{item!r}: {field} is fixed by the checkpoint's config.json; an import may set "
                f"only {list(OVERRIDABLE)}"
            )
    try:
        return override(cfg, list(overrides))
    except ValueError as err:
        raise ConversionError(str(err)) from None


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path} is not readable JSON: {err}") from None


def tensor_files(hf_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it.

    Raises:
      ConversionError: no safetensors file, several without an index, or an index naming a
        file that is missing.
    """
    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index} has no weight_map")
        out = {name: hf_dir / file for name, file in weight_map.items()}
        missing = sorted({p.name for p in out.values() if not p.is_file()})
        if missing:
            raise ConversionError(f"{index} lists shard(s) that are missing: {missing}")
        return out
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir} holds no *.safetensors file")
    if len(files) > 1:
        raise ConversionError(
            f"{hf_dir} holds {len(files)} safetensors files and no {INDEX_FILE} that says "
            "which tensor is where"
        )
    with _open(files[0]) as f:
        return dict.fromkeys(f.keys(), files[0])


@contextlib.contextmanager
def _open(path: pathlib.Path) -> Iterator[Any]:
    try:
        handle = safetensors.safe_open(str(path), framework="numpy")
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ConversionError(f"{path.name} is not a readable safetensors file: {err}") from None
    with handle as f:
        yield f


def _plan(cfg: ModelConfig, where: dict[str, pathlib.Path]) -> list[Tensor]:
    """The tensors to read; raises naming a missing or extra one."""
    wanted = tensors(cfg)
    names = {t.name for t in wanted}
    missing = [t.name for t in wanted if t.name not in where]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConversionError(f"the checkpoint lacks tensor {missing[0]!r}{more}")
    extra = sorted(set(where) - names - {LM_HEAD_NAME})
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise ConversionError(
            f"the checkpoint holds tensor {extra[0]!r}{more}, which Gemma-2 of this config has not"
        )
    return wanted


def _check_tensor(handle: Any, name: str, shape: tuple[int, ...], file: str) -> None:
    try:
        view = handle.get_slice(name)
    except Exception as err:
        raise ConversionError(f"{file} does not hold tensor {name!r} ({err})") from None
    found = tuple(view.get_shape())
    if found != shape:
        raise ConversionError(f"tensor {name!r} in {file} has shape {found}, expected {shape}")
    if view.get_dtype() not in FLOAT_DTYPES:
        raise ConversionError(
            f"tensor {name!r} in {file} has dtype {view.get_dtype()}, expected one of "
            f"{sorted(FLOAT_DTYPES)}"
        )


def _tree_path(t: Tensor) -> tuple[str, ...]:
    """Where ``t`` goes in the unstacked parameter tree (``layers_0`` ... as leaves)."""
    return t.path if t.layer is None else (f"layers_{t.layer}", *t.path[1:])


def _put(params: dict[str, Any], path: tuple[str, ...], value: np.ndarray) -> None:
    node = params
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _read(path: pathlib.Path, name: str) -> np.ndarray:
    """One tensor, from a handle opened for it alone: the file's pages that were mapped to read
    it are unmapped again at once, so the process holds the tensor and nothing more."""
    with _open(path) as f:
        return f.get_tensor(name)


def _check_workdir(workdir: pathlib.Path) -> pathlib.Path:
    target = workdir / "checkpoints"
    if target.exists() and any(target.iterdir()):
        raise ConversionError(
            f"{target} already holds checkpoints; import into a new workdir (nothing was "
            "overwritten)"
        )
    if workdir.exists() and not workdir.is_dir():
        raise ConversionError(f"{workdir} is a file, not a directory")
    return target


def import_checkpoint(
    hf_dir: str | os.PathLike[str],
    workdir: str | os.PathLike[str],
    *,
    param_dtype: str | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> pathlib.Path:
    """Converts a Hugging Face ``Gemma2ForCausalLM`` directory into a library checkpoint.

    Args:
      hf_dir: directory with ``config.json``, ``*.safetensors`` and ``tokenizer.model``.
      workdir: where to write; ``<workdir>/checkpoints`` must be empty or absent.
      param_dtype: dtype to store the weights in; default: the config's ``dtype``.
      tokenizer: SentencePiece model to use instead of ``<hf_dir>/tokenizer.model``.
      overrides: ``field=value`` settings of the imported ``ModelConfig`` that leave what the
        weights compute unchanged (:data:`OVERRIDABLE`, e.g. ``max_seq_len=2048``).
      progress: called with (tensors read, tensors in all) after each tensor.

    Returns:
      The step directory written.

    Raises:
      ConversionError: anything about the input that the library cannot read or represent
        (the message names the file, tensor or field); nothing is written then.
    """
    hf_dir = pathlib.Path(hf_dir).absolute()
    workdir = pathlib.Path(workdir).absolute()
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory")
    if not (hf_dir / CONFIG_FILE).is_file():
        raise ConversionError(f"{hf_dir} has no {CONFIG_FILE}")
    hf_config = _read_json(hf_dir / CONFIG_FILE)
    cfg = config_from_hf(hf_config, param_dtype=param_dtype, name=hf_dir.name or "gemma2")
    cfg = apply_overrides(dataclasses.replace(cfg, scan_layers=False), overrides)
    token_path = pathlib.Path(tokenizer) if tokenizer is not None else hf_dir / TOKENIZER_FILE
    try:
        tok = Tokenizer.load(token_path)
    except (OSError, ValueError) as err:
        raise ConversionError(f"tokenizer: {err}") from None
    if tok.vocab_size > cfg.vocab_size:
        raise ConversionError(
            f"the tokenizer has {tok.vocab_size} pieces but the model's vocab_size is "
            f"{cfg.vocab_size}"
        )
    target = _check_workdir(workdir)
    where = tensor_files(hf_dir)
    plan = _plan(cfg, where)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_open(f)) for f in sorted(set(where.values()))}
        for t in plan:
            _check_tensor(handles[where[t.name]], t.name, t.hf_shape, where[t.name].name)
        if LM_HEAD_NAME in where:
            embedding = next(t for t in plan if t.name == EMBEDDING_NAME)
            _check_tensor(
                handles[where[LM_HEAD_NAME]],
                LM_HEAD_NAME,
                embedding.hf_shape,
                where[LM_HEAD_NAME].name,
            )
    # The checks above read headers only. Each tensor becomes its own leaf (the unstacked
    # tree), so no array is copied into a stack, and Orbax writes the leaves in place.
    dtype = NUMPY_DTYPES[cfg.param_dtype]
    params: dict[str, Any] = {}
    for n, t in enumerate(plan, 1):
        value = _read(where[t.name], t.name).reshape(t.shape)
        _put(params, _tree_path(t), value.astype(dtype, copy=False))
        del value
        if progress is not None:
            progress(n, len(plan))
    if LM_HEAD_NAME in where:
        # A tied model may carry its output projection too; it must be the embedding.
        head = _read(where[LM_HEAD_NAME], LM_HEAD_NAME)
        same = np.array_equal(head, params["embedder"]["embedding"].astype(head.dtype, copy=False))
        del head
        if not same:
            raise ConversionError(
                f"{LM_HEAD_NAME} differs from {EMBEDDING_NAME}: an untied output projection "
                "cannot be represented (the library ties it to the embedding)"
            )
    meta = {
        "model_config": cfg.to_dict(),
        "tokenizer": tokenizer_to_json(tok),
        "params_only": True,
        "source": {"format": SOURCE, "name": hf_dir.name, "config": hf_config},
    }
    with Checkpointer(target, keep=1, async_save=False, numpy_in_place=True) as ckpt:
        ckpt.save(0, {"params": params}, {}, meta)
    return target / "0"


def _layer_leaf(params: dict[str, Any], t: Tensor) -> Any:
    if t.layer is None:
        node = params
        for key in t.path:
            node = node[key]
        return node
    if "layers" in params:
        node = params["layers"]
        for key in t.path[1:]:
            node = node[key]
        return node[t.layer]
    node = params[f"layers_{t.layer}"]
    for key in t.path[1:]:
        node = node[key]
    return node


def export_checkpoint(
    workdir: str | os.PathLike[str],
    hf_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> pathlib.Path:
    """Writes a dense library checkpoint as a Hugging Face ``Gemma2ForCausalLM`` directory.

    Args:
      workdir: what :func:`sparse_jax.load` accepts (workdir, checkpoints or step directory).
      hf_dir: a new (or empty) directory to write.
      dtype: dtype of the written tensors; default: the checkpoint's ``param_dtype``.
      max_shard_bytes: the largest safetensors file; more bytes go into numbered shards with
        ``model.safetensors.index.json``.

    Returns:
      ``hf_dir``.

    Raises:
      ConversionError: a Spark checkpoint, or ``hf_dir`` exists and is not empty.
      CheckpointError: ``workdir`` is not a readable checkpoint.
    """
    from sparse_jax.serve.loading import load  # the loader imports the model; keep this light

    out = pathlib.Path(hf_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} exists and is not an empty directory; nothing was written")
    if max_shard_bytes < 1:
        raise ConversionError(f"max_shard_bytes={max_shard_bytes} must be >= 1")
    model = load(workdir)
    cfg = model.config
    tok = model.tokenizer
    special = {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id}
    hf_config = config_to_hf(cfg, special)
    if dtype is not None:
        if dtype not in NUMPY_DTYPES:
            raise ConversionError(f"dtype={dtype!r} must be one of {sorted(NUMPY_DTYPES)}")
        hf_config["dtype"] = dtype
    out_dtype = NUMPY_DTYPES[hf_config["dtype"]]
    shards: list[list[Tensor]] = [[]]
    size = 0
    plan = tensors(cfg)
    for t in plan:
        nbytes = int(np.prod(t.hf_shape)) * np.dtype(out_dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            file = (
                SINGLE_FILE
                if len(shards) == 1
                else (f"model-{n:05d}-of-{len(shards):05d}.safetensors")
            )
            arrays = {
                t.name: np.asarray(_layer_leaf(model.params, t))
                .astype(out_dtype, copy=False)
                .reshape(t.hf_shape)
                for t in shard
            }
            safetensors.numpy.save_file(arrays, str(tmp / file), metadata={"format": "pt"})
            del arrays
            weight_map.update(dict.fromkeys((t.name for t in shard), file))
        if len(shards) > 1:
            total = sum(int(np.prod(t.hf_shape)) * np.dtype(out_dtype).itemsize for t in plan)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        tok.save(tmp)
        # mkdtemp and safetensors make owner-only files; give them the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        for path in tmp.iterdir():
            path.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux and macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
