"""The prompt format: the token ids around a task prompt in every query (`--chat-template auto|on|off`).

With the template off, a query carries the special tokens the tokenizer itself puts around a text, as
`tokenizer(text)` would: a leading BOS (Llama, Gemma) and, for an encoder-decoder model's encoder, the
trailing EOS (T5's `</s>`, BART's `<s> ... </s>`). A causal model's query never ends in EOS (its response
follows the query). Tokenizers that add nothing (GPT-2, SmolLM2, the embedded models) get the plain ids.

With a chat template on (instruct models; common/chat_template.py, imported only then) the task's prompt is the
user turn and the response the assistant turn, and the token that ends the assistant turn becomes the EOS.

The format travels with the tokenizer (`setup_chat`): `tok.prompt_format` is the one in use, `tok.chat_format` the
template's (None when off). Every place that encodes a prompt (sampling, the training forward, evaluation, the
reference NLL) uses the same ids through `common.tasks.encode_prompt`, and the guide side can strip the format
again (`task_ids`) to hand a guide the task's own text. Prompt truncation cuts the task text, never the format.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import UsageError

MODES = ("auto", "on", "off")
@dataclass(frozen=True)
class ChatFormat:
    before: list[int]
    """template ids ahead of the user's text"""
    after: list[int]
    """template ids after the user's text, the assistant turn's opening (generation prompt) included"""
    end_of_turn: int
    """the token that ends the assistant turn: the EOS in chat mode"""


def special_format(tok, encoder_decoder: bool = False) -> ChatFormat:
    """The special tokens the tokenizer adds around one text (read by encoding a text with and without them):
    all of those ahead of it; those after it only for an encoder-decoder model's encoder input."""
    probe = "a"
    bare = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe)["input_ids"]
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i: i + len(bare)] == bare), None)
    if not bare or start is None:  # a tokenizer whose specials change the text's own ids: add none
        return ChatFormat(before=[], after=[], end_of_turn=tok.eos_token_id)
    after = full[start + len(bare):] if encoder_decoder else []
    return ChatFormat(before=full[:start], after=after, end_of_turn=tok.eos_token_id)


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def setup_chat(tok, mode: str, encoder_decoder: bool = False) -> str:
    """Resolve `mode` (auto = on when the tokenizer has a chat template) and set the tokenizer up for it:
    `tok.chat_format` (None when off), `tok.prompt_format` (the template's when on, else the tokenizer's own
    special tokens: `special_format`) and, when on, the end-of-turn token as EOS. Returns 'on' or 'off'."""
    if mode not in MODES:
        raise UsageError(f"--chat-template must be auto, on or off, not {mode!r}")
    on = has_chat_template(tok) if mode == "auto" else mode == "on"
    if on and not has_chat_template(tok):
        raise UsageError("--chat-template on, but the tokenizer has no chat template: pass auto or off")
    tok.chat_format = None
    if on:  # the template's ids around a user turn and its end-of-turn token
        from common.chat_template import chat_format

        tok.chat_format = chat_format(tok)
    tok.prompt_format = tok.chat_format or special_format(tok, encoder_decoder)
    if on and tok.chat_format.end_of_turn != tok.eos_token_id:
        tok.eos_token = tok.convert_ids_to_tokens(tok.chat_format.end_of_turn)
    if tok.pad_token_id == tok.eos_token_id:
        raise UsageError(f"the pad token {tok.pad_token!r} is the end-of-turn token: the tokenizer needs a pad "
                         "token distinct from EOS")
    return "on" if on else "off"


def _format(tok) -> ChatFormat | None:
    return getattr(tok, "prompt_format", None) or getattr(tok, "chat_format", None)


def wrap(tok, ids: list[int]) -> list[int]:
    """Task prompt ids -> query ids (the template, or the tokenizer's special tokens, around them)."""
    fmt = _format(tok)
    return ids if fmt is None else fmt.before + ids + fmt.after


def template_length(tok) -> int:
    fmt = _format(tok)
    return 0 if fmt is None else len(fmt.before) + len(fmt.after)


def task_ids(tok, query: list[int]) -> list[int]:
    """The task prompt's ids inside a query made by `wrap` (the query itself when it added nothing)."""
    fmt = _format(tok)
    if fmt is None:
        return query
    nb, na = len(fmt.before), len(fmt.after)
    if query[:nb] != fmt.before or query[len(query) - na:] != fmt.after:
        raise ValueError("a query without the tokenizer's prompt format (chat template or special tokens) "
                         "reached it")
    return query[nb: len(query) - na]
