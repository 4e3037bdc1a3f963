"""The OpenAI completions protocol as this server speaks it: request schemas, errors, bodies.

:func:`parse_completion_request` and :func:`parse_chat_request` turn raw body bytes into a
:class:`CompletionRequest` or :class:`ChatCompletionRequest`, or raise :class:`ApiError`
(malformed JSON at any nesting depth, a wrong type, an unknown field, a value out of range, a
value this server cannot serve), whose :meth:`~ApiError.body` is OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Every field of OpenAI's legacy completions
API is accepted; ``null`` means the field's default, as in OpenAI's API.

* Honoured: ``model``, ``prompt`` (a string, a list of token ids, or a list holding one of
  either), ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``,
  ``stream_options.include_usage`` and ``echo``; also ``top_k``, as vLLM accepts it.
* Accepted and ignored: ``user`` and ``stream_options.include_obfuscation`` (no obfuscation
  field is sent).
* Accepted only at their neutral value (:data:`NEUTRAL`), since this server returns one
  completion per request, samples without penalties or logit biases and returns no log
  probabilities: ``n``, ``best_of``, ``frequency_penalty``, ``presence_penalty``,
  ``logit_bias``, ``logprobs`` and ``suffix``. Any other value is a 400 naming the field.

Chat requests take ``messages`` (roles ``system``, ``developer``, ``user`` and ``assistant``;
content as a string or a list of text parts; ``name`` is ignored) and
``max_completion_tokens`` instead of ``prompt``, ``echo``, ``best_of`` and ``suffix``, with the
same sampling fields; ``logprobs`` must be false and ``top_logprobs`` null
(:data:`CHAT_NEUTRAL`); tools and other fields are unknown fields, a 400.

:func:`request_schema` is a body's JSON schema for the OpenAPI document;
:func:`completion_body`, :func:`chunk_body`, :func:`chat_completion_body` and
:func:`chat_chunk_body` build the response objects, whole or as server-sent-event chunks.
"""

from __future__ import annotations

import json
import reprlib
import time
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
MAX_STOP_STRINGS = 4
DEFAULT_MAX_TOKENS = 16
# Values quoted back in error messages stay short (and shallow: a deeply nested value would
# otherwise be repr'd recursively).
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlist, _QUOTE.maxdict = 2, 60, 60, 4, 4


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
        # A lone surrogate quoted from the request could not be encoded in the response.
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
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
    include_usage: bool | None = False
    include_obfuscation: bool | None = None


def _one_prompt(value: Any) -> Any:
    """A string or a list of token ids; a list holding one of either is unwrapped."""
    if isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
        if len(value) > 1:
            raise ValueError(
                f"a batch of {len(value)} prompts; this server completes one prompt per "
                "request: send each prompt in a request of its own"
            )
        value = value[0]
    if isinstance(value, str) and value:
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return value
    raise ValueError(
        "must be a non-empty string, a non-empty list of token ids, or a list holding one of those"
    )


_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 1},
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
            "maxItems": 1,
        },
    ]
}
Prompt = Annotated[str | list[int], BeforeValidator(_one_prompt), WithJsonSchema(_PROMPT_SCHEMA)]
_STOP_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "maxItems": MAX_STOP_STRINGS,
        },
        {"type": "null"},
    ]
}
Bias = Annotated[float, Field(ge=-100, le=100)]


class _Body(BaseModel):
    """A strict request object in which ``null`` means "not given", as in OpenAI's API."""

    model_config = _STRICT

    @pydantic.model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if v is not None}
        return value


class _Sampled(_Body):
    """The fields completions and chat completions share; defaults are OpenAI's."""

    model: str
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Bias] | None = None
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stop: Annotated[list[str] | None, WithJsonSchema(_STOP_SCHEMA)] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    top_k: int | None = Field(None, ge=1)

    @pydantic.field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str] | None:
        if isinstance(value, str):
            value = [value]
        if not (
            isinstance(value, list)
            and len(value) <= MAX_STOP_STRINGS
            and all(isinstance(s, str) and s for s in value)
        ):
            raise ValueError(
                f"must be a non-empty string or a list of up to {MAX_STOP_STRINGS} non-empty "
                "strings"
            )
        return value

    @property
    def token_limit(self) -> int | None:
        """The most tokens to generate that the request asks for, if it says."""
        return self.max_tokens


class CompletionRequest(_Sampled):
    """The body of ``POST /v1/completions``; defaults are OpenAI's.

    ``max_tokens`` left out means :data:`DEFAULT_MAX_TOKENS` (OpenAI's 16), lowered to the
    server's limit if that is smaller. A token-id ``prompt`` is used as given (no BOS is
    added); a string gets the tokenizer's BOS.
    """

    prompt: Prompt
    best_of: int | None = Field(1, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None


class TextPart(BaseModel):
    """One part of a message's content given as a list of parts (text parts only)."""

    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One message of a chat: a role and its text (a string, or a list of text parts)."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampled):
    """The body of ``POST /v1/chat/completions``; defaults are OpenAI's.

    ``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``; with neither, the
    server's limit applies (OpenAI's chat API has no small default).
    """

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def token_limit(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


# What each field that this server cannot honour must be, and why.
_ONE_COMPLETION = "this server returns one completion per request"
_NO_PENALTIES = "this server samples without frequency or presence penalties"
NEUTRAL = {
    "n": (lambda v: v == 1, "1", _ONE_COMPLETION),
    "best_of": (lambda v: v == 1, "1", _ONE_COMPLETION),
    "frequency_penalty": (lambda v: v == 0, "0", _NO_PENALTIES),
    "presence_penalty": (lambda v: v == 0, "0", _NO_PENALTIES),
    "logit_bias": (
        lambda v: v is None or not any(v.values()),
        "null, {} or biases that are all 0",
        "this server samples without logit biases",
    ),
    "logprobs": (lambda v: v is None, "null", "this server returns no log probabilities"),
    "suffix": (
        lambda v: not v,
        "null or an empty string",
        "this server completes after the prompt only (no insertion before a suffix)",
    ),
}
CHAT_NEUTRAL = {
    **{k: NEUTRAL[k] for k in ("n", "frequency_penalty", "presence_penalty", "logit_bias")},
    "logprobs": (lambda v: not v, "false", "this server returns no log probabilities"),
    "top_logprobs": (
        lambda v: v is None,
        "null",
        "this server returns no log probabilities",
    ),
}


def _check_servable(req: _Sampled, neutral_values: dict[str, Any]) -> None:
    for name, (neutral, allowed, why) in neutral_values.items():
        value = getattr(req, name)
        if not neutral(value):
            raise ApiError(
                400,
                f"{name}={_QUOTE.repr(value)} is not supported: {why}; leave {name} out "
                f"or send {allowed}",
                param=name,
                code="unsupported_value",
            )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _describe(error: dict[str, Any], schema: type[BaseModel]) -> tuple[str, str]:
    """(field path, message) for one pydantic error; union branch names are left out."""
    head, *rest = error["loc"] or ("body",)
    nested = {"stream_options": StreamOptions, "messages": ChatMessage}
    if error["type"] == "extra_forbidden":
        field = ".".join(map(str, error["loc"]))
        if len(error["loc"]) > 1:
            schema = TextPart if "content" in error["loc"] else nested.get(head, StreamOptions)
        supported = ", ".join(schema.model_fields)
        return field, f"unknown field {field!r}; supported fields: {supported}"
    inner = {*StreamOptions.model_fields, *ChatMessage.model_fields, *TextPart.model_fields}
    kept = [str(x) for x in rest if isinstance(x, int) or x in inner]
    field = ".".join([str(head), *kept])
    if error["type"] == "missing":
        return field, f"{field} is required"
    message = error["msg"].removeprefix("Value error, ")
    return field, f"{field}: {message} (got {_QUOTE.repr(error.get('input'))})"


def _parse(body: bytes, schema: type[_Sampled], neutral: dict[str, Any]) -> Any:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(
            400, "the body nests arrays or objects too deeply to parse", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        req = schema.model_validate(data)
    except pydantic.ValidationError as err:
        described = [_describe(e, schema) for e in err.errors(include_url=False)]
        message = "; ".join(dict.fromkeys(m for _, m in described))
        raise ApiError(400, message, param=described[0][0]) from None
    _check_servable(req, neutral)
    return req


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Validates a ``/v1/completions`` request body.

    Raises:
      ApiError: 400 for a body that is not a JSON object, does not fit the schema, or asks for
        what this server cannot serve (see :data:`NEUTRAL`).
    """
    return _parse(body, CompletionRequest, NEUTRAL)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Validates a ``/v1/chat/completions`` request body (see :data:`CHAT_NEUTRAL`).

    Raises:
      ApiError: 400, as :func:`parse_completion_request`.
    """
    return _parse(body, ChatCompletionRequest, CHAT_NEUTRAL)


def _inline(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(definitions[node["$ref"].rsplit("/", 1)[-1]], definitions)
        return {k: _inline(v, definitions) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, definitions) for v in node]
    return node


def request_schema(schema_type: type[BaseModel] | None = None) -> dict[str, Any]:
    """The JSON schema of a request body (:class:`CompletionRequest` by default),
    self-contained (no ``$ref``)."""
    schema = (schema_type or CompletionRequest).model_json_schema()
    return _inline(schema, schema.pop("$defs", {}))


def _envelope(
    request_id: str, model: str, kind: str, choice: dict[str, Any], usage: dict[str, int] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, **choice, "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def completion_body(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict[str, int] | None,
) -> dict[str, Any]:
    """A ``text_completion`` object with one choice (also the shape of each stream chunk)."""
    choice = {"text": text, "finish_reason": finish_reason}
    return _envelope(request_id, model, "text_completion", choice, usage)


def chunk_body(
    request_id: str, model: str, text: str, finish_reason: str | None, with_usage: bool = False
) -> str:
    """One server-sent event carrying a completion chunk.

    With ``with_usage`` (a stream that ends with a usage chunk) it holds ``"usage": null``, as
    OpenAI's chunks do then.
    """
    body = completion_body(request_id, model, text, finish_reason, None)
    if with_usage:
        body["usage"] = None
    return sse(body)


def chat_completion_body(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: dict[str, int] | None,
) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice, the assistant's message."""
    message = {"role": "assistant", "content": text, "refusal": None}
    choice = {"message": message, "finish_reason": finish_reason}
    return _envelope(request_id, model, "chat.completion", choice, usage)


def chat_chunk_body(
    request_id: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None,
    with_usage: bool = False,
) -> str:
    """One server-sent event carrying a ``chat.completion.chunk`` with ``delta``."""
    choice = {"delta": delta, "finish_reason": finish_reason}
    body = _envelope(request_id, model, "chat.completion.chunk", choice, None)
    if with_usage:
        body["usage"] = None
    return sse(body)


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
