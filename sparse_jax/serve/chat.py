"""Gemma's chat format: a conversation as token ids, for tokenizers with Gemma's turn markers.

A conversation of user and assistant turns becomes::

    <bos><start_of_turn>user
    {text}<end_of_turn>
    <start_of_turn>model
    {text}<end_of_turn>
    ...
    <start_of_turn>model

exactly as Gemma's own chat template renders it (roles alternate from the user's, the assistant
is ``model``, each text is stripped of surrounding whitespace), with the markers inserted as
their ids and the text between them encoded on its own, as a tokenizer that splits at special
tokens encodes the rendered string. Gemma has no system role: system (and developer) messages,
which may only open the conversation, are put before the first user message with a blank line
between, as Gemma 3's template does. Generation stops at ``<end_of_turn>`` or eos
(:func:`stop_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sparse_jax.data.tokenizer import TURN_PIECES, Tokenizer

ROLES = {"user": "user", "assistant": "model"}
SYSTEM_ROLES = ("system", "developer")


def supports_chat(tokenizer: Tokenizer) -> bool:
    return tokenizer.turn_ids is not None


def no_chat_format(tokenizer: Tokenizer) -> str:
    """Why ``tokenizer`` cannot format chats (for the 400 and the CLI error)."""
    return (
        f"this model's tokenizer has no chat format: it lacks Gemma's turn markers "
        f"{' and '.join(TURN_PIECES)} (a checkpoint imported from Gemma-2 has them); use "
        "plain completions instead"
    )


def conversation_ids(tokenizer: Tokenizer, messages: Sequence[tuple[str, str]]) -> list[int]:
    """The prompt ids of a conversation, ending with the opened model turn.

    Args:
      tokenizer: a tokenizer with turn markers (:func:`supports_chat`).
      messages: (role, text) pairs; roles ``system``/``developer`` (leading only), then
        ``user`` and ``assistant`` alternating from ``user`` and ending with ``user``.

    Raises:
      ValueError: the tokenizer has no turn markers, or the roles break the rules above (the
        message names the position).
    """
    if tokenizer.turn_ids is None:
        raise ValueError(no_chat_format(tokenizer))
    start, end = tokenizer.turn_ids
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, (role, text) in enumerate(messages):
        if role in SYSTEM_ROLES:
            if turns:
                raise ValueError(
                    f"messages[{i}] is a {role} message after the conversation started: "
                    f"{' and '.join(SYSTEM_ROLES)} messages may only come first"
                )
            system.append(text)
            continue
        if role not in ROLES:
            raise ValueError(
                f"messages[{i}].role={role!r} must be one of {[*SYSTEM_ROLES, *ROLES]}"
            )
        want = "user" if len(turns) % 2 == 0 else "assistant"
        if role != want:
            raise ValueError(
                f"messages[{i}] is from the {role}, expected the {want}: after any system "
                "messages, turns alternate user, assistant, user, ..."
            )
        turns.append((role, text))
    if not turns:
        raise ValueError("messages hold no user message")
    if turns[-1][0] != "user":
        raise ValueError("the last message must be the user's: the model answers it")
    ids = [tokenizer.bos_id]
    for n, (role, text) in enumerate(turns):
        text = text.strip()
        if n == 0 and system:
            text = "\n\n".join([*system, text])
        ids += [start, *tokenizer.encode(f"{ROLES[role]}\n{text}"), end]
        ids += tokenizer.encode("\n")
    ids += [start, *tokenizer.encode("model\n")]
    return ids


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokens that end the model's turn: ``<end_of_turn>`` and eos."""
    if tokenizer.turn_ids is None:
        return (tokenizer.eos_id,)
    return (tokenizer.turn_ids[1], tokenizer.eos_id)
