"""Chat completions in Gemma's format: the prompt against Gemma-2's own chat template, replies
against HF transformers' greedy generation, the official openai client, and the 400s."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import pathlib

import httpx
import openai
import pytest
from hf_models import gemma_layout_tokenizer, hf_model, random_library_checkpoint, save_hf
from serve_cases import serving

from sparse_jax.data.tokenizer import Tokenizer
from sparse_jax.hf import import_checkpoint
from sparse_jax.serve import chat
from sparse_jax.serve.app import ServerSettings, create_app
from sparse_jax.serve.engine import Engine
from sparse_jax.serve.loading import load

jinja2 = pytest.importorskip("jinja2")
torch = pytest.importorskip("torch")  # the HF oracle of the replies
pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "serve_cli", pathlib.Path(__file__).resolve().parents[2] / "serve.py"
)
serve_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_cli)

# Gemma-2's chat template as its tokenizer_config.json ships it, transcribed.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
NAME = "gemma-tiny"
CONVERSATIONS = [
    [("user", "Who made the heaven and the earth?")],
    [
        ("user", "  In the beginning  \n"),
        ("assistant", "God created the heaven and the earth."),
        ("user", "And then?\n\nTell me more."),
    ],
    [("user", "Ångström, straße — “quotes” 東京 🙂")],
]


def render(messages) -> str:
    env = jinja2.Environment()
    template = env.from_string(GEMMA2_TEMPLATE)
    rendered = template.render(
        messages=[{"role": r, "content": c} for r, c in messages],
        bos_token="",
        add_generation_prompt=True,
    )
    return rendered


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(gemma_layout_tokenizer())


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_prompt_is_gemma_template_tokenized(tokenizer, index):
    """The rendered template through SentencePiece (which splits at the user-defined turn
    pieces itself), after bos, against the ids built turn by turn."""
    messages = CONVERSATIONS[index]
    want = [tokenizer.bos_id, *tokenizer.encode(render(messages))]
    assert chat.conversation_ids(tokenizer, messages) == want


def test_system_message_opens_the_first_user_turn(tokenizer):
    got = chat.conversation_ids(tokenizer, [("system", "Be brief."), ("user", " Hi ")])
    want = chat.conversation_ids(tokenizer, [("user", "Be brief.\n\nHi")])
    assert got == want


@pytest.mark.parametrize(
    "messages, match",
    [
        ([("assistant", "Hello")], "expected the user"),
        ([("user", "a"), ("user", "b")], "expected the assistant"),
        ([("user", "a"), ("system", "b"), ("user", "c")], "may only come first"),
        ([("user", "a"), ("assistant", "b")], "last message must be the user's"),
        ([("system", "a")], "no user message"),
        ([("tool", "a")], "must be one of"),
    ],
)
def test_role_rules(tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        chat.conversation_ids(tokenizer, messages)


@pytest.fixture(scope="module")
def library_checkpoint(tmp_path_factory):
    """A checkpoint whose tokenizer is the library's own (no turn markers)."""
    return random_library_checkpoint(tmp_path_factory.mktemp("library"))


def test_tokenizer_without_markers_has_no_chat_format(library_checkpoint):
    library_tokenizer = load(library_checkpoint).tokenizer
    assert library_tokenizer.turn_ids is None
    with pytest.raises(ValueError, match="no chat format"):
        chat.conversation_ids(library_tokenizer, [("user", "hi")])


# The server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = hf_model(seed=7, max_position_embeddings=128)
    import_checkpoint(save_hf(model, root / "hf"), root / "run")
    return model, root / "run"


@pytest.fixture(scope="module")
def served(imported):
    _, workdir = imported
    loaded = load(workdir)
    engine = Engine(loaded.config, loaded.params, slots=2).start(warmup=False)
    app = create_app(engine, loaded.tokenizer, ServerSettings(NAME, max_tokens_limit=32))
    with serving(app) as url:
        yield url, loaded


def hf_reply(model, tokenizer, messages, max_new_tokens):
    """HF's greedy reply to the same prompt ids, cut at <end_of_turn> or eos, as text."""
    ids = chat.conversation_ids(tokenizer, messages)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(chat.stop_ids(tokenizer)),
        ).numpy()[0, len(ids) :]
    tokens = [int(t) for t in out]
    stopped = bool(tokens) and tokens[-1] in chat.stop_ids(tokenizer)
    if stopped:
        tokens = tokens[:-1]
    context = tokenizer.decode(ids[-1:])
    text = tokenizer.decode(ids[-1:] + tokens)[len(context) :]
    return text, ("stop" if stopped else "length"), len(ids)


def test_openai_client_chat_whole_and_streamed(served, imported):
    url, loaded = served
    model, _ = imported
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Who made the heaven and the earth?"},
    ]
    pairs = [(m["role"], m["content"]) for m in messages]
    want, reason, prompt_tokens = hf_reply(model, loaded.tokenizer, pairs, 20)
    whole = client.chat.completions.create(
        model=NAME, messages=messages, max_completion_tokens=20, temperature=0
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == want
    assert whole.choices[0].finish_reason == reason
    assert whole.usage.prompt_tokens == prompt_tokens
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == want
    finished = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finished[-1] == reason and not any(finished[:-1])
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_content_parts_equal_a_string(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    kwargs = dict(model=NAME, max_tokens=6, temperature=0)
    text = client.chat.completions.create(
        messages=[{"role": "user", "content": "Let there be light"}], **kwargs
    )
    parts = client.chat.completions.create(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Let there "},
                    {"type": "text", "text": "be light"},
                ],
            }
        ],
        **kwargs,
    )
    assert parts.choices[0].message.content == text.choices[0].message.content


@pytest.mark.parametrize(
    "body, param, match",
    [
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "expected the user"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content", "content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "x": 1}]}]},
            "messages.0.content",
            "content",
        ),
        ({"logprobs": True}, "logprobs", "no log probabilities"),
        ({"tools": []}, "tools", "unknown field 'tools'"),
        ({"max_completion_tokens": 33}, "max_completion_tokens", "over this server's limit"),
        ({"model": "other"}, "model", "does not exist"),
        ({"messages": [{"role": "user", "content": "word " * 200}]}, "messages", "context"),
    ],
)
def test_bad_chat_requests(served, body, param, match):
    url, _ = served
    request = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], **body}
    response = httpx.post(f"{url}/v1/chat/completions", json=request, timeout=60)
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert match in error["message"], error


def test_chat_is_a_400_without_turn_markers(library_checkpoint):
    loaded = load(library_checkpoint)
    engine = Engine(loaded.config, loaded.params, slots=1)
    app = create_app(engine, loaded.tokenizer, ServerSettings("micro"))
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat format") as err:
            client.chat.completions.create(
                model="micro", messages=[{"role": "user", "content": "hi"}]
            )
        assert err.value.body["code"] == "chat_not_supported"


def test_serve_cli_chat(imported, library_checkpoint):
    model, workdir = imported
    tokenizer = load(workdir).tokenizer
    want, _, _ = hf_reply(model, tokenizer, [("system", "Be brief."), ("user", "Hello")], 8)
    out = io.StringIO()
    argv = ["--checkpoint", str(workdir), "--chat", "Hello", "--system", "Be brief."]
    with contextlib.redirect_stdout(out):
        assert serve_cli.main([*argv, "--max-tokens", "8"]) == 0
    assert out.getvalue() == want + "\n"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert serve_cli.main(["--checkpoint", str(library_checkpoint), "--chat", "hi"]) == 2
    assert "no chat format" in err.getvalue()
    with pytest.raises(SystemExit):
        serve_cli.parse_args(["--checkpoint", "x", "--prompt", "a", "--chat", "b"])
    with pytest.raises(SystemExit):
        serve_cli.parse_args(["--checkpoint", "x", "--prompt", "a", "--system", "b"])
