"""The OpenAI completions protocol as this server speaks it: request schema, errors, bodies.

:func:`parse_completion_request` turns raw body bytes into a :class:`CompletionRequest` or
raises :class:`ApiError` (malformed JSON, a wrong type, an unknown field, a value out of
range), whose :meth:`~ApiError.body` is OpenAI's ``{"error": {"message", "type", "param",
"code"}}``. The supported fields are OpenAI's ``model``, ``prompt`` (one string),
``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``, ``stream_options``,
``n`` (1 only) and ``user``, plus ``top_k`` (as vLLM accepts it). :func:`completion_body` and
:func:`chunk_body` build the response objects, whole or as server-sent-event chunks.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_STOP_STRINGS = 4
DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error answered with ``status`` and an OpenAI-style JSON body.

    Args:
      status: HTTP status.
      message: what was wrong and what is allowed.
      kind: OpenAI's error ``type`` ("invalid_request_error", "authentication_error", ...).
      param: the request field at fault, if any.
      code: a short machine-readable code, if any.
    """

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status,
            message,
            kind,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``; defaults are OpenAI's.

    ``max_tokens`` left out means :data:`DEFAULT_MAX_TOKENS` (OpenAI's 16), lowered to the
    server's limit if that is smaller.
    """

    model_config = _STRICT
    model: str
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    stop: list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    @pydantic.field_validator("stop", mode="before")
    @classmethod
    def _one_or_more_stop_strings(cls, value: Any) -> list[str] | None:
        if isinstance(value, str):
            value = [value]
        if value is not None and (
            not isinstance(value, list)
            or not 1 <= len(value) <= MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in value)
        ):
            raise ValueError(
                f"must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} non-empty strings"
            )
        return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    """(field path, message) for one pydantic error; union branch names are left out."""
    head, *rest = error["loc"] or ("body",)
    if error["type"] == "extra_forbidden":
        field = ".".join(map(str, error["loc"]))
        schema = StreamOptions if len(error["loc"]) > 1 else CompletionRequest
        supported = ", ".join(schema.model_fields)
        return field, f"unknown field {field!r}; supported fields: {supported}"
    kept = [str(x) for x in rest if isinstance(x, int) or x in StreamOptions.model_fields]
    field = ".".join([str(head), *kept])
    if error["type"] == "missing":
        return field, f"{field} is required"
    message = error["msg"].removeprefix("Value error, ")
    return field, f"{field}: {message} (got {error.get('input')!r})"


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Validates a request body.

    Raises:
      ApiError: 400 for a body that is not a JSON object or does not fit the schema.
    """
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return CompletionRequest.model_validate(data)
    except pydantic.ValidationError as err:
        described = [_describe(e) for e in err.errors(include_url=False)]
        message = "; ".join(dict.fromkeys(m for _, m in described))
        raise ApiError(400, message, param=described[0][0]) from None


def completion_body(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict[str, int] | None,
) -> dict[str, Any]:
    """A ``text_completion`` object with one choice (also the shape of each stream chunk)."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def chunk_body(request_id: str, model: str, text: str, finish_reason: str | None) -> str:
    """One server-sent event carrying a completion chunk."""
    return sse(completion_body(request_id, model, text, finish_reason, None))


def sse(data: dict[str, Any] | str) -> str:
    """A server-sent event: ``data: <json>`` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
