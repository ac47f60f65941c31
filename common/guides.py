"""The guide: a frozen black box that continues text (SPEC section 1). Text in (prompt + prefix),
continuation text out; nothing but its samples is ever used, and a model guide's weights never change.

Two kinds behind one interface:
- `HFGuide`: any causal LM (hub id or folder) with its own sampling settings (top-p 0.92 and friends),
  separate from the learner's;
- `CallableGuide`: a plain Python function `fn(prompts, prefixes) -> continuations`.

Our addition: simple rule-based guides (`RULE_GUIDES`) for the tasks where the embedded learner is weak,
so the paper's premise (a guide better than the learner) holds offline: CommonGen writes the concepts the
prefix has not used yet; TL;DR writes the post's title.

`guide_continue` is the one "continue from a forced prefix" helper for the guide side; the learner side is
`common.generation.sample(..., prefixes=...)`. A guide always receives the task's prompt text (without the
learner's chat template); an `HFGuide` whose tokenizer is set up for its own chat template (common.chat) puts
that template around it, and the learner's prefix continues the guide's assistant turn.
"""

from __future__ import annotations

import re
from typing import Callable, Protocol

import torch

from common.chat import task_ids, template_length, wrap
from common.generation import decode, position_limit, sample


class Guide(Protocol):
    def complete(self, prompts: list[str], prefixes: list[str], max_new_tokens: list[int]) -> list[str]:
        """Continuation text of each prompt + prefix; `max_new_tokens` is the budget left, in the learner's
        tokens (a hint: the caller truncates to it)."""


class CallableGuide:
    def __init__(self, fn: Callable[[list[str], list[str]], list[str]], name: str = "callable"):
        self.fn, self.name = fn, name

    def complete(self, prompts, prefixes, max_new_tokens):
        out = list(self.fn(list(prompts), list(prefixes)))
        if len(out) != len(prompts):
            raise ValueError(f"guide {self.name} returned {len(out)} continuations for {len(prompts)} prompts")
        return out


class HFGuide:
    """A frozen causal LM sampled with its own settings. Its parameters never receive gradients."""

    def __init__(self, model, tokenizer, *, top_p: float = 0.92, top_k: int = 0, temperature: float = 1.0,
                 min_new_tokens: int = 0, device=None, name: str = "hf"):
        self.model = model.eval().requires_grad_(False)
        self.tok, self.top_p, self.top_k, self.temperature = tokenizer, top_p, top_k, temperature
        self.min_new_tokens, self.device, self.name = min_new_tokens, device, name

    @torch.no_grad()
    def complete(self, prompts, prefixes, max_new_tokens):
        enc = lambda texts: [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
        queries, forced = enc(prompts), enc(prefixes)
        # the prefix counts toward the response in the guide's tokens too (its minimum length rule)
        total = max(len(f) + b for f, b in zip(forced, max_new_tokens))
        limit = position_limit(self.model)
        if limit:
            queries = [q[-max(1, limit - total - template_length(self.tok)):] for q in queries]
        # the guide's own chat template (when set up, common.chat) around its own prompt; a prefix continues
        # the assistant turn
        queries = [wrap(self.tok, q) for q in queries]
        out = sample(self.model, queries, prefixes=forced, max_new_tokens=total, min_new_tokens=self.min_new_tokens,
                     eos_id=self.tok.eos_token_id, pad_id=self.tok.pad_token_id, temperature=self.temperature,
                     top_k=self.top_k, top_p=self.top_p, device=self.device)
        return decode(self.tok, [t[:b] for t, b in zip(out.tokens, max_new_tokens)])


# ---------------------------------------------------------------------------------------------------
# rule-based guides (our addition; selectable with --guide rule)
# ---------------------------------------------------------------------------------------------------
def _concepts(prompt: str) -> list[str]:
    m = re.search(r"generate a sentence with:(.*)\.\s*$", prompt)
    return m.group(1).split() if m else []


def commongen_rule(prompts: list[str], prefixes: list[str]) -> list[str]:
    """The concepts the prefix has not used yet, in order, then a full stop."""
    out = []
    for p, x in zip(prompts, prefixes):
        used = set(re.findall(r"\w+", x.lower()))
        rest = [c for c in _concepts(p) if c.lower() not in used and c.lower()[:4] not in {u[:4] for u in used}]
        out.append((" " + " ".join(rest) if rest else "") + ".")
    return out


def tldr_rule(prompts: list[str], prefixes: list[str]) -> list[str]:
    """The post's title, minus as many words as the prefix already has."""
    out = []
    for p, x in zip(prompts, prefixes):
        m = re.search(r"^TITLE:(.*)$", p, flags=re.M)
        words = (m.group(1) if m else "").split()
        rest = words[len(x.split()):]
        out.append(" " + " ".join(rest) if rest else ".")
    return out


RULE_GUIDES = {"commongen": commongen_rule, "tldr": tldr_rule}


# ---------------------------------------------------------------------------------------------------
# guide side of roll-in / roll-out
# ---------------------------------------------------------------------------------------------------
def guide_continue(guide: Guide, tok, queries: list[list[int]], prefixes: list[list[int]], *,
                   max_new_tokens: int, min_new_tokens: int) -> list[list[int]]:
    """Continue each learner-tokenised prompt + prefix with the guide; returns the continuation in the
    learner's tokens, cut to the remaining budget. EOS is appended when the guide stopped on its own and
    the response is long enough to end (pad and EOS never appear inside)."""
    budgets = [max_new_tokens - len(p) for p in prefixes]
    # the guide gets the task's prompt text (the learner's chat template, if any, stripped: a guide has its own)
    texts = guide.complete(decode(tok, [task_ids(tok, q) for q in queries]), decode(tok, prefixes), budgets)
    special = {tok.pad_token_id, tok.eos_token_id}
    out = []
    for prefix, text, budget in zip(prefixes, texts, budgets):
        ids = [t for t in tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if t not in special]
        ids = ids[: max(0, budget)]
        if len(ids) < budget and len(prefix) + len(ids) >= max(1, min_new_tokens):
            ids = ids + [tok.eos_token_id]
        out.append(ids)
    return out
