"""Generation and the training-time forward pass, shared by all five scripts.

The one rule that makes PPO for language models correct (SPEC section 4): the log-probabilities the
loss uses are those of the distribution the tokens were sampled from. Sampling and training both go
through `policy_logits_to_logprobs` semantics:

- the learner samples with top_k = 0, top_p = 1 and the loss's temperature;
- the pad token can never be sampled (its logit is -inf), so pad never means a real token;
- EOS cannot be sampled before `min_new_tokens` response tokens (IMDB asks for exactly 48), and the
  training forward masks it the same way, so sampling and scoring use one distribution;
- prompts are left-padded with explicit position ids, responses right-padded after EOS.

Encoder-decoder models (T5, BART: `config.is_encoder_decoder`) take the same arguments and return the same
numbers' shapes (common/seq2seq.py, imported for such a model): the prompt goes to the encoder, the response is the
decoder's output. `is_seq2seq` tells the kinds apart; nothing else changes for the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


_AUTOCAST = {"bf16": False}
# a no-grad forward_response scores its rows in chunks whose fp32 logits stay near this size: over a whole batch
# (the reference forward of every iteration, IMDB's 32 x 48 x 8192: 48 MiB) they set the run's peak of memory
NO_GRAD_LOGITS_BYTES = 16 * 2**20


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


def mask_pad_and_early_eos_(scores: torch.Tensor, response_pos: torch.Tensor, min_new_tokens: int, eos_id: int,
                            pad_id: int) -> torch.Tensor:
    """The sampling masks, in place on logits [N, V] whose rows score a token at `response_pos` [N] of its
    response (forced prefix included): pad is never sampled, EOS not before `min_new_tokens`. `sample` and the
    packed training forward both use it; the padded forward adds the same masks as `response_logits_bias`."""
    scores[:, pad_id] = -float("inf")
    if min_new_tokens > 0:
        scores[response_pos < min_new_tokens, eos_id] = -float("inf")
    return scores


@dataclass
class Sampled:
    tokens: list[list[int]]
    """the sampled continuation of each row (EOS included when sampled, nothing after it)"""
    logprobs: list[list[float]]
    """log-probability of each sampled token under the sampling distribution"""


def position_limit(model) -> int | None:
    """How many positions the model's position embeddings cover (None when it does not say, e.g. T5's
    relative positions). An encoder-decoder model has this many on each side."""
    cfg = _base(model).config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def is_seq2seq(model) -> bool:
    """An encoder-decoder model (T5, BART, ...), read from its config; a `ValueModel` answers for its backbone."""
    model = _base(model)
    model = getattr(model, "backbone", model)
    return bool(getattr(model.config, "is_encoder_decoder", False))


def query_room(model, response_tokens: int) -> int | None:
    """How many prompt tokens fit beside `response_tokens` new tokens: a causal LM holds both in its positions,
    an encoder-decoder model holds the prompt in the encoder's and the decoder start token + response in the
    decoder's. None: no limit known."""
    limit = position_limit(model)
    if limit is None:
        return None
    return limit if is_seq2seq(model) else limit - response_tokens


def filter_top_k_top_p(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [B, V] with everything outside the top-k and outside the top-p nucleus set to -inf (the
    semantics of HF's TopKLogitsWarper and TopPLogitsWarper: ties at the k-th logit stay, and the nucleus is
    the smallest set of most likely tokens whose mass reaches top_p, at least one token). 0 / 1 turn off."""
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < _nucleus_floor(probs, top_p), -float("inf"))
    return scores


def _nucleus_floor(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest probability inside each row's top-p nucleus [B, 1]. Only the probabilities are sorted,
    never their indices: the 256 largest first (enough for a peaked distribution), the whole row only where
    those do not reach top_p; on the CPU NumPy's vectorised sort of the values is ~2x faster than
    torch.sort, which always sorts the indices too."""
    k = min(256, probs.shape[-1])
    top = torch.topk(probs, k, dim=-1).values  # descending
    if k < probs.shape[-1] and bool((top.sum(-1) < top_p).any()):
        if probs.device.type == "cpu":
            import numpy as np

            top = torch.from_numpy(np.ascontiguousarray(np.sort(probs.numpy(), axis=-1)[:, ::-1]))
        else:
            top = torch.sort(probs, dim=-1, descending=True).values
    mass_before = top.cumsum(-1) - top  # the mass of the tokens ranked above each one
    n_keep = (mass_before < top_p).sum(-1, keepdim=True).clamp(min=1)
    return top.gather(-1, n_keep - 1)


def draw(logprobs: torch.Tensor) -> torch.Tensor:
    """One token per row from log-probabilities [B, V], by inverting the cumulative distribution with one
    uniform number per row. The same distribution as torch.multinomial, whose exponential draw over the whole
    vocabulary costs a third of a CPU sampling step; the global torch generator makes it reproducible."""
    cdf = logprobs.exp().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


_PREALLOCATED_LAYER = None


def preallocated_cache(model, capacity: int):
    """A key-value cache for `sample`: HF's DynamicCache for this model, whose layers (where they are plain
    DynamicLayers) write each step's keys and values into buffers of the final length, `capacity` positions
    (prompt + new tokens), allocated once. DynamicCache concatenates the whole cache with the new token at every
    step: a copy of everything so far per step, and the old and the new cache alive at once (twice the cache's
    memory at the end). Same numbers (tested); TL;DR's sampling call takes 0.74 s with it, 0.80 s with DynamicCache
    (2-core CPU).

    An encoder-decoder model gets HF's EncoderDecoderCache: this preallocated cache for the decoder's
    self-attention (`capacity` decoder positions), a DynamicCache for the cross-attention, which the model fills
    once from the encoder's states at the first step and reuses after."""
    global _PREALLOCATED_LAYER
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if _PREALLOCATED_LAYER is None:
        class PreallocatedLayer(DynamicLayer):
            def __init__(self, capacity: int):
                super().__init__()
                self.capacity, self.length = capacity, 0

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    B, H, _, D = key_states.shape
                    self.device = key_states.device
                    self.key_buffer = key_states.new_empty((B, H, self.capacity, D))
                    self.value_buffer = value_states.new_empty((B, H, self.capacity, D))
                    self.is_initialized = True
                n, L = self.length, key_states.shape[-2]
                if n + L > self.capacity:
                    raise ValueError(f"the key-value cache holds {self.capacity} positions, {n + L} were asked")
                self.key_buffer[:, :, n:n + L] = key_states
                self.value_buffer[:, :, n:n + L] = value_states
                self.length = n + L
                self.keys, self.values = self.key_buffer[:, :, :n + L], self.value_buffer[:, :, :n + L]
                return self.keys, self.values

            def batch_select_indices(self, indices: torch.Tensor) -> None:
                if self.length > 0:
                    self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
                    self.keys = self.key_buffer[:, :, :self.length]
                    self.values = self.value_buffer[:, :, :self.length]

        _PREALLOCATED_LAYER = PreallocatedLayer
    seq2seq = is_seq2seq(model)
    base = _base(model)
    # the decoder's own config where the model has one (T5's decoder stack counts num_decoder_layers)
    config = base.get_decoder().config if seq2seq and hasattr(base, "get_decoder") else base.config
    cache = DynamicCache(config=config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):  # not sliding windows etc.
        cache.layers = [_PREALLOCATED_LAYER(capacity) for _ in cache.layers]
    if seq2seq:
        from transformers import EncoderDecoderCache

        return EncoderDecoderCache(cache, DynamicCache(config=config))
    return cache


def _cache_kwarg(model) -> str:
    """The forward argument that takes the key-value cache: `cache` in recent transformers 5 releases,
    `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample(model, queries: list[list[int]], *, max_new_tokens: int, min_new_tokens: int, eos_id: int,
           pad_id: int, prefixes: list[list[int]] | None = None, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, device=None) -> Sampled:
    """Sample continuations of `queries` (+ an optional forced prefix per row, which counts toward the
    response length) with the model's key-value cache.

    The distribution of every step: logits / temperature, pad at -inf, EOS at -inf while the response
    (prefix included) is shorter than `min_new_tokens`, then top-k / top-p. With top_k = 0 and top_p = 1
    (the learner's settings) the returned log-probs are exactly those the training forward recomputes.
    A row whose forced prefix already fills `max_new_tokens` gets nothing.

    Our own loop rather than HF `generate`, which runs every row until the longest ends and draws with
    torch.multinomial: here a row leaves the batch (and the cache) as soon as it ends, so a step costs only
    the rows still running, and each row stops at its own budget, so a long prefix never pushes another row
    past the model's positions. `device` defaults to the model's. An encoder-decoder model: `common.seq2seq.sample_seq2seq`.
    """
    if device is None:
        device = next(model.parameters()).device
    if is_seq2seq(model):
        from common.seq2seq import sample_seq2seq

        return sample_seq2seq(model, queries, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                               eos_id=eos_id, pad_id=pad_id, prefixes=prefixes, temperature=temperature, top_k=top_k,
                               top_p=top_p, device=device)
    prefixes = prefixes or [[] for _ in queries]
    tokens: list[list[int]] = [[] for _ in queries]
    logprobs: list[list[float]] = [[] for _ in queries]
    rows = [i for i in range(len(queries)) if max_new_tokens - len(prefixes[i]) > 0]
    if not rows:
        return Sampled(tokens, logprobs)
    ids, mask = left_pad([queries[i] + prefixes[i] for i in rows], pad_id, device)
    dev = ids.device
    row_idx = torch.tensor(rows, device=dev)  # which output row each batch row is
    done_len = torch.tensor([len(prefixes[i]) for i in rows], device=dev)  # response tokens so far, prefix included
    steps = max_new_tokens - int(done_len.min())
    out_tok = torch.full((len(queries), steps), pad_id, dtype=torch.long, device=dev)
    out_lp = torch.zeros((len(queries), steps), device=dev)
    cache = preallocated_cache(model, ids.shape[1] + steps)
    kw = {_cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    inputs, pos = ids, position_ids(mask)
    for step in range(steps):
        with _autocast(dev):
            logits = model(input_ids=inputs, attention_mask=mask, position_ids=pos, **kw).logits[:, -1]
        scores = mask_pad_and_early_eos_(logits.float() / temperature, done_len, min_new_tokens, eos_id, pad_id)
        logp = torch.log_softmax(filter_top_k_top_p(scores, top_k, top_p), dim=-1)
        new = draw(logp)
        out_tok[row_idx, step] = new
        out_lp[row_idx, step] = logp.gather(-1, new[:, None]).squeeze(-1)
        done_len = done_len + 1
        running = (new != eos_id) & (done_len < max_new_tokens)
        if not running.all():
            if not running.any():
                break
            keep = running.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            row_idx, done_len, new, mask = row_idx[keep], done_len[keep], new[keep], mask[keep]
        pos = mask.sum(1, keepdim=True)  # the new token's position counts the real tokens before it
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        inputs = new[:, None]
    return _trimmed(out_tok, out_lp, prefixes, max_new_tokens, eos_id)


def _trimmed(out_tok: torch.Tensor, out_lp: torch.Tensor, prefixes, max_new_tokens: int, eos_id: int) -> Sampled:
    """Each row's sampled tokens [N, steps] and log-probs cut to its budget and after its EOS."""
    steps = out_tok.shape[1]
    tok_rows, lp_rows = out_tok.tolist(), out_lp.tolist()
    tokens, logprobs = [], []
    for i in range(len(tok_rows)):
        n = max(0, min(steps, max_new_tokens - len(prefixes[i])))
        row = tok_rows[i][:n]
        if eos_id in row:
            n = row.index(eos_id) + 1
        tokens.append(tok_rows[i][:n])
        logprobs.append(lp_rows[i][:n])
    return Sampled(tokens, logprobs)


def response_logits_bias(T: int, vocab: int, min_new_tokens: int, eos_id: int, pad_id: int, device) -> torch.Tensor:
    """The sampling masks of `sample` as an additive bias for logits of response positions [T, V]
    (-inf on pad everywhere, on EOS before min_new_tokens): adding it broadcasts over the batch without
    cloning the [B, T, V] logits."""
    bias = torch.zeros((T, vocab), device=device)
    bias[:, pad_id] = -float("inf")
    if min_new_tokens > 0:
        bias[:min_new_tokens, eos_id] = -float("inf")
    return bias


# ---------------------------------------------------------------------------------------------------
# packed sequences: the rows' real tokens end to end in a few rows, positions restarting at 0 for each
# ---------------------------------------------------------------------------------------------------
_PACKING_WORKS: dict = {}


def _base(model):
    return getattr(model, "module", model)  # DDP wraps the model


def packing_works(model) -> bool:
    """Whether this model class reads packed rows correctly: with no attention mask and no cache, HF's mask
    builder (transformers.masking_utils) starts a new causal block wherever the position ids do not step by 1,
    in every row of the batch; and a causal LM's logits are its output embeddings applied to its last hidden
    state (so the LM head can run on the scored positions of several packed rows). Checked once per class and
    attention kernel on three short sequences in two packed rows against one by one; where it does not hold
    (a model that ignores the position ids, soft-capped or scaled logits) the rows are padded instead."""
    base = _base(model)
    key = (type(base), getattr(base.config, "_attn_implementation", None))
    if key not in _PACKING_WORKS:
        dev = next(base.parameters()).device
        vocab = base.get_input_embeddings().num_embeddings
        seqs = [torch.tensor(s, device=dev) % vocab for s in ([3, 5, 7], [11, 13], [17, 19, 23, 29])]

        def out(ids, pos=None):  # a causal LM's logits read as forward_response reads them, or a backbone's states
            o = base(input_ids=ids, position_ids=pos, use_cache=False, output_hidden_states=True)
            head = base.get_output_embeddings() if getattr(o, "logits", None) is not None else None
            return (head(o.hidden_states[-1]) if head is not None else o.last_hidden_state).float()

        with torch.no_grad():
            one = [out(s[None])[0] for s in seqs]
            ids = torch.stack([torch.cat([seqs[0], seqs[1]]), torch.cat([seqs[2], seqs[2][:1]])])
            pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]], device=dev)
            packed = out(ids, pos)
            reference = base(input_ids=seqs[2][None], use_cache=False)
            plain = (reference.logits if getattr(reference, "logits", None) is not None
                     else reference.last_hidden_state)[0].float()
        close = lambda a, b: bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4))  # noqa: E731
        _PACKING_WORKS[key] = (close(packed[0], torch.cat(one[:2])) and close(packed[1, :4], one[2])
                               and close(one[2], plain))
    return _PACKING_WORKS[key]


def packed_rows(lengths: list[int], n_rows: int) -> list[list[int]]:
    """The rows (their indices) in `n_rows` packed rows, longest first into the shortest packed row so far, so
    the longest packed row stays close to the mean."""
    import heapq

    heap, groups = [(0, g) for g in range(n_rows)], [[] for _ in range(n_rows)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        total, g = heapq.heappop(heap)
        groups[g].append(i)
        heapq.heappush(heap, (total + lengths[i], g))
    return [g for g in groups if g]


def packing_layout(mask: torch.Tensor, hidden_size: int) -> list[list[int]] | None:
    """The cheapest way to run the batch: None for the padded [B, W] batch, else the rows of each packed row.
    A batch of R rows of width W costs R * W * (1 + W / (6 * hidden)): the linear layers per position,
    attention per pair of positions at about 1/(6 * hidden) of a position's cost (SDPA computes every pair of a
    row, masked or not). One packed row of short uneven rows saves their padding but pays attention over all
    its tokens; a few packed rows of about equal length save both (CommonGen). Long rows stay padded: packing
    must save at least 5% (its bookkeeping is not free, and the model is a model)."""
    B, W = mask.shape
    lengths = mask.sum(1).tolist()
    r = 1.0 / (6 * hidden_size)
    best, best_cost = None, 0.95 * B * W * (1 + W * r)
    for k in sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, B}):
        if k > B:
            continue
        groups = packed_rows(lengths, k)
        width = max(sum(lengths[i] for i in g) for g in groups)
        cost = len(groups) * width * (1 + width * r)
        if cost < best_cost:
            best, best_cost = groups, cost
    return best


def _pack(query_ids, query_mask, response_ids, response_mask, groups: list[list[int]]):
    """(ids [R, L], positions [R, L], keep [K], response_pos [K]): the real tokens of each group of rows end to
    end in one of R rows, each row's positions from 0, filled up to the longest with tokens at position 0 that
    come after every real token (so nothing real attends to them). `keep` indexes the flattened [R * L]
    position whose output scores / values each real response token (the one before it), in the row-major
    order of response_mask; `response_pos` is that token's position in its response."""
    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1).bool()
    lengths = mask.sum(1).tolist()
    width = max(sum(lengths[i] for i in rows) for rows in groups)
    start = [0] * len(lengths)  # flat packed index of each row's first token
    for g, rows in enumerate(groups):
        offset = g * width
        for i in rows:
            start[i], offset = offset, offset + lengths[i]
    pos = position_ids(mask)
    dest = torch.tensor(start, device=ids.device)[:, None] + pos  # flat packed index of each real token
    flat_ids = torch.zeros(len(groups) * width, dtype=ids.dtype, device=ids.device)
    flat_pos = torch.zeros_like(flat_ids)
    flat_ids[dest[mask]] = ids[mask]
    flat_pos[dest[mask]] = pos[mask]
    real = response_mask.bool()
    P = query_ids.shape[1]
    keep = (dest[:, P:] - 1)[real]
    response_pos = torch.arange(response_ids.shape[1], device=ids.device).expand_as(real)[real]
    return flat_ids.view(len(groups), width), flat_pos.view(len(groups), width), keep, response_pos


def _layout(model, query_mask, response_mask, pack) -> list[list[int]] | None:
    """`pack`: None = the cheapest layout the model supports, False = padded, True = packed (the cheapest packed
    layout), an int k = exactly k packed rows."""
    if pack is False:
        return None
    mask = torch.cat([query_mask, response_mask], dim=1)
    lengths = mask.sum(1).tolist()
    if pack is not None and pack is not True:
        return packed_rows(lengths, int(pack))
    if pack is None and (mask.shape[0] == 1 or not packing_works(model)):
        return None
    cfg = _base(model).config
    groups = packing_layout(mask, getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 768)
    return groups if groups is not None or pack is None else packed_rows(lengths, 1)


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits)[y] for each row of fp32 logits [N, V] (the sampling masks already set: -inf), and the
    row's entropy when asked (logged only: no gradient flows through it).

    Autograd's `log_softmax` then `gather` keeps the [N, V] log-probs for the backward and builds two more [N, V]
    tensors there (the gather's zero-filled gradient, then the log_softmax's); this keeps the logits alone and
    builds one: d log p(y) / d logits = onehot(y) - softmax(logits). The logits are the largest activation of the
    training forward (IMDB's 784 scored positions x 8192: 24 MiB; 50257 wide at GPT-2's vocabulary)."""

    @staticmethod
    def forward(ctx, logits, ids, with_entropy: bool):
        logp = torch.log_softmax(logits, dim=-1)  # the forward's one [N, V] temporary
        picked = logp.gather(-1, ids[:, None]).squeeze(-1)
        if with_entropy:  # entr(0) = 0: masked tokens add nothing
            entropy = torch.special.entr(logp.exp_(), out=logp).sum(-1)
        else:
            entropy = picked.new_empty(0)
        del logp
        ctx.save_for_backward(logits, ids)
        ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        logits, ids = ctx.saved_tensors
        grad_logits = torch.softmax(logits, dim=-1).mul_(-grad[:, None])  # -g softmax(logits): 0 where masked
        grad_logits.scatter_add_(-1, ids[:, None], grad[:, None])  # + g at the scored token
        return grad_logits, None, None


def forward_response(model, query_ids, query_mask, response_ids, response_mask, *, eos_id: int, pad_id: int,
                     min_new_tokens: int, temperature: float = 1.0, with_entropy: bool = False,
                     pack: bool | int | None = None, with_hidden: bool = False):
    """Training-time forward over [left-padded query | right-padded response].

    Returns log pi(y_t | x, y_<t) for every response position [B, T] (logits shifted by one: the logit
    at the position before y_t scores y_t), and the per-token entropy when asked. Padding positions hold
    0 and must be masked by the caller.

    `pack`: run the rows' real tokens in a few packed rows instead of the padded batch (same numbers, no
    padding computed); None picks the cheaper layout (`packing_layout`) where the model supports packing
    (`packing_works`), False pads, True packs, an int k packs into exactly k rows. An encoder-decoder model is
    never packed: the prompt goes to the encoder, the response to the decoder (`seq2seq_inputs`). Without gradients the rows
    are scored in chunks of about NO_GRAD_LOGITS_BYTES of logits, each without its all-padding columns.
    `with_hidden` (not with `with_entropy`): the second output is instead the model's last hidden state at the
    position that scores each response token (the state before it; [B, T, H], fp32, 0 at padding): what a
    `ReferenceHeadValue` critic reads.
    """
    if with_hidden and with_entropy:
        raise ValueError("forward_response: with_hidden or with_entropy, not both (both are the second output)")
    B, T = response_ids.shape
    seq2seq = is_seq2seq(model)
    logit_bytes = B * T * (getattr(_base(model).config, "vocab_size", 0) or 0) * 4
    if not torch.is_grad_enabled() and B > 1 and logit_bytes > NO_GRAD_LOGITS_BYTES:
        chunks = -(-logit_bytes // NO_GRAD_LOGITS_BYTES)
        rows = -(-B // min(chunks, B))
        lps, ents = [], []
        for s in range(0, B, rows):
            q, t = used_columns(query_mask[s:s + rows], response_mask[s:s + rows])
            lp, ent = forward_response(model, query_ids[s:s + rows, q], query_mask[s:s + rows, q],
                                       response_ids[s:s + rows, t], response_mask[s:s + rows, t], eos_id=eos_id,
                                       pad_id=pad_id, min_new_tokens=min_new_tokens, temperature=temperature,
                                       with_entropy=with_entropy, pack=pack, with_hidden=with_hidden)
            lps.append(F.pad(lp, (0, T - lp.shape[1])))
            ents.append(None if ent is None else F.pad(ent, (0, 0) * (ent.dim() - 2) + (0, T - ent.shape[1])))
        return torch.cat(lps), (torch.cat(ents) if with_entropy or with_hidden else None)
    groups = None if seq2seq else _layout(model, query_mask, response_mask, pack)
    if groups is not None:
        ids, pos, keep, t_pos = _pack(query_ids, query_mask, response_ids, response_mask, groups)
        with _autocast(ids.device):
            # the LM head only where a real response token is scored: on the last hidden state of those
            # positions (the model's own head computes one position per row, unused)
            hidden = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1,
                           output_hidden_states=True).hidden_states[-1]
            logits = _base(model).get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[keep])
        if with_hidden:
            states = hidden.reshape(-1, hidden.shape[-1])[keep].float()
            states = states.new_zeros((B, T, states.shape[-1])).masked_scatter(response_mask.bool()[..., None], states)
        # fp32 and temperature, then the sampling masks in place: the LM head's backward does not need its
        # output, so in fp32 no copy is made at all
        logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        with torch.no_grad():  # constant -inf entries: their gradient is 0, as _TokenLogProbs' backward gives them
            mask_pad_and_early_eos_(logits, t_pos, min_new_tokens, eos_id, pad_id)
        real = response_mask.bool()
        picked, ent = _TokenLogProbs.apply(logits, response_ids[real], with_entropy)
        del logits
        logprobs = torch.zeros((B, T), dtype=picked.dtype, device=picked.device).masked_scatter(real, picked)
        if with_hidden:
            return logprobs, states
        if not with_entropy:
            return logprobs, None
        entropy = torch.zeros((B, T), dtype=ent.dtype, device=ent.device).masked_scatter(real, ent)
        return logprobs, entropy
    if seq2seq:
        # one encoder + decoder forward: the prompt in the encoder, [start] + y[:-1] in the decoder, whose
        # position t scores y_t (padding after a row's end is only ever read by later, unscored positions)
        from common.seq2seq import seq2seq_inputs

        with _autocast(query_ids.device):
            out = model(**seq2seq_inputs(model, query_ids, query_mask, response_ids), use_cache=False,
                        **({"output_hidden_states": True} if with_hidden else {}))
        logits = out.logits
        if with_hidden:
            states = out.decoder_hidden_states[-1].float() * response_mask[..., None]
        del out  # the logits' copy below frees these
    else:
        ids = torch.cat([query_ids, response_ids], dim=1)
        mask = torch.cat([query_mask, response_mask], dim=1)
        P = query_ids.shape[1]
        scored = torch.arange(P - 1, P + T - 1, device=ids.device)  # the position before each response token
        with _autocast(ids.device):
            # the LM head only where a response token is scored: on long prompts most of its work would otherwise
            # be thrown away (and slicing its output would cost a [B, T + 1, V] zero-filled copy in backward)
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                        logits_to_keep=scored, **({"output_hidden_states": True} if with_hidden else {}))
        logits = out.logits
        if with_hidden:
            states = out.hidden_states[-1][:, P - 1: P + T - 1].float() * response_mask[..., None]
        del out  # the logits' copy below frees these
    bias = response_logits_bias(T, logits.shape[-1], min_new_tokens, eos_id, pad_id, logits.device)
    # one [B, T, V] copy does temperature, masks and fp32 (bf16 logits promote) at once: the logits are the
    # largest tensors of the update
    logits = torch.add(bias, logits, alpha=1.0 / temperature)
    safe_ids = response_ids.masked_fill(response_mask == 0, 0)
    V = logits.shape[-1]
    picked, ent = _TokenLogProbs.apply(logits.view(-1, V), safe_ids.reshape(-1), with_entropy)
    del logits
    logprobs = torch.where(response_mask.bool(), picked.view(B, T), torch.zeros_like(picked).view(B, T))
    if with_hidden:
        return logprobs, states
    if not with_entropy:
        return logprobs, None
    return logprobs, ent.view(B, T)  # entr(0) = 0: masked tokens add nothing


class ReferenceHeadValue(torch.nn.Module):
    """`--critic reference-head`: a critic that is only a scalar head on the frozen reference model's last hidden
    states, which line 3's reference forward computes anyway (`forward_response(..., with_hidden=True)`): no
    forward or backward of a model of its own. Zero-initialised like ValueModel's head."""

    reads_reference = True  # its forward needs `hidden`

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, query_ids, query_mask, response_ids, response_mask, hidden=None):
        """V(x, y_<t) = head(h_ref) for every response position t; `hidden`: the reference's [B, T, H] states."""
        if hidden is None:
            raise ValueError("a reference-head critic reads the reference's hidden states: pass hidden=")
        return self.head(hidden.float()).squeeze(-1)


class ValueModel(torch.nn.Module):
    """A critic: a transformer backbone with a scalar head, read at every response position. An encoder-decoder
    backbone (T5Model: no LM head) reads the prompt in its encoder and the head reads its decoder's states."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    reads_reference = False  # `hidden` (the reference's states, for ReferenceHeadValue) is not read

    def forward(self, query_ids, query_mask, response_ids, response_mask, hidden=None,
                pack: bool | int | None = None):
        """V(x, y_<t) for every response position t: the state before token t is read at the position
        of the previous token, like the logits. [B, T]. `pack` as in `forward_response`."""
        B, T = response_ids.shape
        if is_seq2seq(self.backbone):  # decoder position t reads [start] + y_<t: the state before token t
            # a whole seq2seq LM as backbone (a LoRA critic adapter on the policy's base) has no head-less output:
            # its decoder's last hidden states are read (its LM head runs too, unused)
            from common.seq2seq import seq2seq_inputs

            whole_lm = self.backbone.get_output_embeddings() is not None
            with _autocast(query_ids.device):
                out = self.backbone(**seq2seq_inputs(self.backbone, query_ids, query_mask, response_ids),
                                    use_cache=False, output_hidden_states=whole_lm)
            hidden = out.decoder_hidden_states[-1] if whole_lm else out.last_hidden_state
            return self.head(hidden.float()).squeeze(-1)
        # a whole causal LM as backbone (a LoRA critic adapter on an FSDP-sharded base, which runs only through
        # its root): its last hidden states, the LM head on one position only
        whole = {"output_hidden_states": True, "logits_to_keep": 1} if self.backbone.get_output_embeddings() else {}

        def last_hidden(out):
            return out.hidden_states[-1] if whole else out.last_hidden_state

        groups = _layout(self.backbone, query_mask, response_mask, pack)
        if groups is not None:
            ids, pos, keep, _ = _pack(query_ids, query_mask, response_ids, response_mask, groups)
            with _autocast(ids.device):
                hidden = last_hidden(self.backbone(input_ids=ids, position_ids=pos, use_cache=False, **whole))
            v = self.head(hidden.reshape(-1, hidden.shape[-1])[keep].float()).squeeze(-1)
            return torch.zeros((B, T), dtype=v.dtype, device=v.device).masked_scatter(response_mask.bool(), v)
        ids = torch.cat([query_ids, response_ids], dim=1)
        mask = torch.cat([query_mask, response_mask], dim=1)
        with _autocast(ids.device):
            hidden = last_hidden(self.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                                               use_cache=False, **whole))
        P = query_ids.shape[1]
        return self.head(hidden[:, P - 1: P + T - 1].float()).squeeze(-1)


def decode(tokenizer, seqs: list[list[int]]) -> list[str]:
    return tokenizer.batch_decode(seqs, skip_special_tokens=True)
