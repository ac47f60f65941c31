"""Chat-template prompts for instruct models (`--chat-template on`, or auto with a tokenizer that has a template),
imported only when a template is on; the prompt format itself is common/chat.py's.

With the template on, the task's prompt is the user turn and the response is the assistant turn: a query is
`before + task prompt ids + after`, where `before` holds whatever the template puts ahead of the user's text
(e.g. a system turn and `<|im_start|>user\\n`) and `after` closes the user turn and opens the assistant's
(`<|im_end|>\\n<|im_start|>assistant\\n`, the generation prompt). The token that ends the assistant turn
(`<|im_end|>`) becomes the tokenizer's EOS (`common.chat.setup_chat`): the learner samples it, is rewarded on it,
and it is trained.
"""

from __future__ import annotations

from common.chat import ChatFormat
from common.errors import UsageError

_MARK = "RLGFCHATMARK"  # stands for the user's / the assistant's text while the template is rendered


def chat_format(tok) -> ChatFormat:
    """The template's ids around a user turn, and its end-of-turn token, read by rendering the template around
    a marker (pieces are tokenised apart, so the task text's ids are the same with or without the template)."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True,
                                       tokenize=False)
        turn = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}],
                                       tokenize=False)
    except Exception as e:  # a template that cannot render a plain user / assistant exchange
        raise UsageError(f"the tokenizer's chat template cannot render a user turn ({type(e).__name__}: "
                         f"{str(e)[:100]}): pass --chat-template off") from None
    if text.count(_MARK) != 1 or turn.count(_MARK) != 1:
        raise UsageError("the tokenizer's chat template does not show the user's text once: pass --chat-template off")
    before, after = text.split(_MARK)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    tail = enc(turn.split(_MARK)[1])
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    end = tail[0] if tail and tail[0] in special else tok.eos_token_id
    return ChatFormat(before=enc(before), after=enc(after), end_of_turn=end)
