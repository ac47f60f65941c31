"""Generation and the training-time forward pass, shared by all five scripts.

The one rule that makes PPO for language models correct (SPEC section 4): the log-probabilities the
loss uses are those of the distribution the tokens were sampled from. Sampling and training both go
through `policy_logits_to_logprobs` semantics:

- the learner samples with top_k = 0, top_p = 1 and the loss's temperature;
- the pad token can never be sampled (its logit is -inf), so pad never means a real token;
- EOS cannot be sampled before `min_new_tokens` response tokens (IMDB asks for exactly 48), and the
  training forward masks it the same way, so sampling and scoring use one distribution;
- prompts are left-padded with explicit position ids, responses right-padded after EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


_AUTOCAST = {"bf16": False}


def set_bf16(enabled: bool) -> None:
    """bf16 autocast for every forward pass of this module (sampling, training forward, critic): about 1.5x
    faster on CPUs with AVX-512 BF16 and on recent GPUs. The log-probs of sampling and of the training forward
    then agree to bf16 precision (ratio within ~1e-2 of 1 on the first minibatch) instead of ~1e-6."""
    _AUTOCAST["bf16"] = bool(enabled)


def _autocast(device) -> torch.autocast:
    """Autocast around one forward only: the cast weights are cached until the context exits, so it must
    never span an optimiser step."""
    device_type = torch.device(device).type if device is not None else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=_AUTOCAST["bf16"])


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, attention_mask)."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: list[list[int]], pad_id: int, width: int | None = None, device=None):
    """Right-pad token lists into (ids, mask); `width` defaults to the longest sequence."""
    width = width or max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:width]
        if s:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def used_columns(query_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[slice, slice]:
    """Column slices of a [left-padded query | right-padded response] batch that hold a real token in some
    row: the rows of a minibatch, cut from the whole iteration's batch, often need far fewer than its width.
    Positions count real tokens (`position_ids`), so dropping all-padding columns changes no result."""
    q_len = int(query_mask.sum(1).max()) if query_mask.numel() else 0
    r_len = int(response_mask.sum(1).max()) if response_mask.numel() else 0
    return slice(query_mask.shape[1] - max(1, q_len), None), slice(0, max(1, r_len))


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left padding does not shift them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class _MaskEosAndPad(LogitsProcessor):
    """Per row: EOS forbidden until the response (forced prefix included) has `min_new_tokens` tokens;
    pad forbidden always. The training forward applies exactly the same mask."""

    def __init__(self, start_width: int, prefix_lens: torch.Tensor, min_new_tokens: int, eos_id: int, pad_id: int):
        self.start_width, self.prefix_lens = start_width, prefix_lens
        self.min_new_tokens, self.eos_id, self.pad_id = min_new_tokens, eos_id, pad_id

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.pad_id] = -float("inf")
        response_pos = self.prefix_lens + (input_ids.shape[1] - self.start_width)
        too_short = response_pos < self.min_new_tokens
        scores[too_short, self.eos_id] = -float("inf")
        return scores


@dataclass
class Sampled:
    tokens: list[list[int]]
    """the sampled continuation of each row (EOS included when sampled, nothing after it)"""
    logprobs: list[list[float]]
    """log-probability of each sampled token under the sampling distribution"""


def position_limit(model) -> int | None:
    """How many positions the model's position embeddings cover (None when it does not say)."""
    cfg = model.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


@torch.no_grad()
def sample(model, queries: list[list[int]], *, max_new_tokens: int, min_new_tokens: int, eos_id: int,
           pad_id: int, prefixes: list[list[int]] | None = None, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, device=None) -> Sampled:
    """Sample continuations of `queries` (+ an optional forced prefix per row, which counts toward the
    response length) with HF `generate` and the KV cache.

    With top_k = 0 and top_p = 1 (the learner's settings) the returned log-probs are exactly those the
    training forward recomputes. A row whose forced prefix already fills `max_new_tokens` gets nothing.
    `generate` runs every row for the longest remaining budget, so rows whose prefixes differ a lot are
    sampled in separate groups where one call would run past the model's positions.
    """
    prefixes = prefixes or [[] for _ in queries]
    budgets = [max_new_tokens - len(p) for p in prefixes]
    limit = position_limit(model)
    groups, cur = [], []
    for i in sorted(range(len(queries)), key=lambda i: len(prefixes[i])):
        cand = cur + [i]
        need = max(len(queries[j]) + len(prefixes[j]) for j in cand) + max(budgets[j] for j in cand)
        if cur and limit and need > limit:
            groups.append(cur)
            cand = [i]
        cur = cand
    groups.append(cur)
    if len(groups) == 1:
        return _sample_group(model, queries, prefixes, budgets, min_new_tokens, eos_id, pad_id, temperature,
                             top_k, top_p, device)
    tokens, logprobs = [None] * len(queries), [None] * len(queries)
    for group in groups:
        out = _sample_group(model, [queries[i] for i in group], [prefixes[i] for i in group],
                            [budgets[i] for i in group], min_new_tokens, eos_id, pad_id, temperature, top_k,
                            top_p, device)
        for j, i in enumerate(group):
            tokens[i], logprobs[i] = out.tokens[j], out.logprobs[j]
    return Sampled(tokens, logprobs)


def _sample_group(model, queries, prefixes, budgets, min_new_tokens, eos_id, pad_id, temperature, top_k, top_p,
                  device) -> Sampled:
    inputs = [q + p for q, p in zip(queries, prefixes)]
    ids, mask = left_pad(inputs, pad_id, device)
    steps = max(budgets)
    if steps <= 0:
        return Sampled([[] for _ in queries], [[] for _ in queries])
    prefix_lens = torch.tensor([len(p) for p in prefixes], device=ids.device)
    processors = LogitsProcessorList([_MaskEosAndPad(ids.shape[1], prefix_lens, min_new_tokens, eos_id, pad_id)])
    # a fresh config: nothing from the model folder's generation_config.json (repetition penalties, bad
    # words, ...) may change the distribution we sample from behind the loss's back
    # a static key-value cache: allocated once per call and written in place, where the default dynamic cache
    # concatenates every layer's keys and values at every step (on the CPU a quarter of the sampling time)
    config = GenerationConfig(do_sample=True, max_new_tokens=steps, min_new_tokens=0, temperature=temperature,
                              top_k=top_k, top_p=top_p, pad_token_id=pad_id, eos_token_id=eos_id,
                              bos_token_id=getattr(model.config, "bos_token_id", None), cache_implementation="static",
                              output_scores=True, return_dict_in_generate=True)
    saved, model.generation_config = model.generation_config, GenerationConfig()  # generate merges the model's
    try:                                                                           # defaults into ours otherwise
        with _autocast(ids.device):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                 logits_processor=processors)
    finally:
        model.generation_config = saved
    new = out.sequences[:, ids.shape[1]:]
    # out.scores: per step [B, V] after temperature / masks / top-k / top-p; one step at a time, so no
    # [B, steps, V] copy is ever made
    lp = torch.stack([torch.log_softmax(s.float(), dim=-1).gather(-1, new[:, j, None]).squeeze(-1)
                      for j, s in enumerate(out.scores)], dim=1)
    tokens, logprobs = [], []
    for i in range(len(queries)):
        row, lrow = new[i].tolist(), lp[i].tolist()
        n = budgets[i]
        if eos_id in row[:n]:
            n = row.index(eos_id) + 1
        n = max(0, n)
        tokens.append(row[:n])
        logprobs.append(lrow[:n])
    return Sampled(tokens, logprobs)


def response_logits_bias(T: int, vocab: int, min_new_tokens: int, eos_id: int, pad_id: int, device) -> torch.Tensor:
    """The sampling masks of `_MaskEosAndPad` as an additive bias for logits of response positions [T, V]
    (-inf on pad everywhere, on EOS before min_new_tokens): adding it broadcasts over the batch without
    cloning the [B, T, V] logits."""
    bias = torch.zeros((T, vocab), device=device)
    bias[:, pad_id] = -float("inf")
    if min_new_tokens > 0:
        bias[:min_new_tokens, eos_id] = -float("inf")
    return bias


def forward_response(model, query_ids, query_mask, response_ids, response_mask, *, eos_id: int, pad_id: int,
                     min_new_tokens: int, temperature: float = 1.0, with_entropy: bool = False):
    """Training-time forward over [left-padded query | right-padded response].

    Returns log pi(y_t | x, y_<t) for every response position [B, T] (logits shifted by one: the logit
    at the position before y_t scores y_t), and the per-token entropy when asked. Padding positions hold
    0 and must be masked by the caller.
    """
    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    P, T = query_ids.shape[1], response_ids.shape[1]
    with _autocast(ids.device):
        # the LM head only where a response token is scored (positions P-1 .. P+T-2): on long prompts most
        # of the head's work would otherwise be thrown away
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=T + 1).logits
    logits = logits[:, -(T + 1):-1]
    bias = response_logits_bias(T, logits.shape[-1], min_new_tokens, eos_id, pad_id, logits.device)
    # one [B, T, V] copy does temperature, masks and fp32 (bf16 logits promote) at once: the logits are the
    # largest tensors of the update
    logits = torch.add(bias, logits, alpha=1.0 / temperature)
    logp_all = torch.log_softmax(logits, dim=-1)
    safe_ids = response_ids.masked_fill(response_mask == 0, 0)
    logprobs = logp_all.gather(-1, safe_ids.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(response_mask.bool(), logprobs, torch.zeros_like(logprobs))
    if not with_entropy:
        return logprobs, None
    with torch.no_grad():  # logged, not trained: keep it out of the graph
        p = logp_all.exp()
        entropy = -(p * logp_all.masked_fill(p == 0, 0)).sum(-1)
    return logprobs, entropy


class ValueModel(torch.nn.Module):
    """A critic: a transformer backbone with a scalar head, read at every response position."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, query_ids, query_mask, response_ids, response_mask):
        """V(x, y_<t) for every response position t: the state before token t is read at the position
        of the previous token, like the logits. [B, T]"""
        ids = torch.cat([query_ids, response_ids], dim=1)
        mask = torch.cat([query_mask, response_mask], dim=1)
        with _autocast(ids.device):
            hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        P, T = query_ids.shape[1], response_ids.shape[1]
        return self.head(hidden[:, P - 1: P + T - 1].float()).squeeze(-1)


def decode(tokenizer, seqs: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(seqs, skip_special_tokens=True)
