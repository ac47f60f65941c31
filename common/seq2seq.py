"""Encoder-decoder models (T5, BART: `config.is_encoder_decoder`), imported only for such a policy, guide or reward
model. They take the same arguments as causal LMs in common/generation.py and give numbers of the same shapes: the
prompt goes to the encoder (run once per sampling call, rows aligned to the left with an attention mask), the
response is the decoder's output from its start token, and a forced prefix is teacher-forced into the decoder.
`common.generation.is_seq2seq` tells the kinds apart and sends `sample`, `forward_response` and `ValueModel` here.
"""

from __future__ import annotations

import torch

from common.generation import (Sampled, _autocast, _base, _cache_kwarg, _trimmed, draw, filter_top_k_top_p,
                               mask_pad_and_early_eos_, preallocated_cache, right_pad)


def decoder_start_id(model) -> int:
    """The token the decoder of an encoder-decoder model starts from (T5: pad; BART: EOS), from its config or
    generation config. It is an input only: pad is never sampled."""
    model = _base(model)
    model = getattr(model, "backbone", model)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        start = getattr(cfg, "decoder_start_token_id", None) if cfg is not None else None
        if start is not None:
            return int(start)
    raise ValueError(f"{type(model).__name__} names no decoder_start_token_id in its config")



def left_to_right_aligned(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch (ids, mask) with every row's real tokens moved to the front: encoders with absolute
    positions (BART) number the tokens from the first column. Padding moves behind the real tokens."""
    W = ids.shape[1]
    shift = (W - mask.sum(1, keepdim=True)) % max(1, W)
    index = (torch.arange(W, device=ids.device)[None] + shift) % max(1, W)
    return ids.gather(1, index), mask.gather(1, index)



def seq2seq_inputs(model, query_ids, query_mask, response_ids) -> dict:
    """The forward arguments of an encoder-decoder model for [left-padded query | right-padded response]: the
    query left-aligned with its mask into the encoder, the decoder start token + the response but its last token
    into the decoder (decoder position t reads y_<t)."""
    enc_ids, enc_mask = left_to_right_aligned(query_ids, query_mask)
    start = torch.full_like(response_ids[:, :1], decoder_start_id(model))
    return {"input_ids": enc_ids, "attention_mask": enc_mask,
            "decoder_input_ids": torch.cat([start, response_ids[:, :-1]], dim=1)}



def _encoder(model):
    """An encoder-decoder model's encoder; a LoRA view's (common.lora) runs with the view's adapter."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return inner.get_encoder()



@torch.no_grad()
def sample_seq2seq(model, queries, *, max_new_tokens: int, min_new_tokens: int, eos_id: int, pad_id: int,
                    prefixes, temperature: float, top_k: int, top_p: float, device) -> Sampled:
    """`sample` for an encoder-decoder model: the same distribution at every step, the same outputs.

    The encoder reads the prompts once (left-aligned rows, attention mask). Every decoder row starts from the
    decoder start token at position 0, so no decoder row is ever padded: the prefix every row has (the shortest
    forced prefix) goes in with the start token in one forward, and at each later step a row either takes its
    next forced prefix token (teacher forcing: its logits are not used) or samples one. The key-value cache is
    HF's EncoderDecoderCache (`preallocated_cache`): decoder self-attention written in place, the cross-attention
    keys and values computed from the encoder's states once. A row leaves the batch (encoder states, mask and
    cache) as soon as it ends."""
    prefixes = prefixes or [[] for _ in queries]
    rows = [i for i in range(len(queries)) if max_new_tokens - len(prefixes[i]) > 0]
    empty = torch.zeros((len(queries), 0))
    if not rows:
        return _trimmed(empty.long(), empty, prefixes, max_new_tokens, eos_id)
    enc_ids, enc_mask = right_pad([queries[i] for i in rows], pad_id, device=device)
    dev = enc_ids.device
    with _autocast(dev):
        encoded = _encoder(model)(input_ids=enc_ids, attention_mask=enc_mask)
    row_idx = torch.tensor(rows, device=dev)
    plen = torch.tensor([len(prefixes[i]) for i in rows], device=dev)  # forced tokens of each batch row
    forced = right_pad([prefixes[i] for i in rows], pad_id, width=max_new_tokens, device=dev)[0]
    common = int(plen.min())
    steps = max_new_tokens - common  # decoder positions common .. max_new_tokens - 1 score a response token
    out_tok = torch.full((len(queries), max_new_tokens), pad_id, dtype=torch.long, device=dev)
    out_lp = torch.zeros((len(queries), max_new_tokens), device=dev)
    cache = preallocated_cache(model, max_new_tokens)  # start token + all but the last response token
    kw = {_cache_kwarg(model): cache, "use_cache": True}
    inputs = torch.cat([torch.full((len(rows), 1), decoder_start_id(model), dtype=torch.long, device=dev),
                        forced[:, :common]], dim=1)
    for pos in range(common, common + steps):  # pos: the response position this step's logits score
        with _autocast(dev):
            logits = model(encoder_outputs=encoded, attention_mask=enc_mask, decoder_input_ids=inputs,
                           **kw).logits[:, -1]
        free = plen <= pos  # rows past their forced prefix: they sample
        new = forced[:, pos].clone()
        if bool(free.any()):
            at = free.nonzero().squeeze(-1)
            scores = mask_pad_and_early_eos_(logits[at].float() / temperature, torch.full_like(at, pos),
                                             min_new_tokens, eos_id, pad_id)
            logp = torch.log_softmax(filter_top_k_top_p(scores, top_k, top_p), dim=-1)
            drawn = draw(logp)
            new[at] = drawn
            out_tok[row_idx[at], pos - plen[at]] = drawn
            out_lp[row_idx[at], pos - plen[at]] = logp.gather(-1, drawn[:, None]).squeeze(-1)
        running = ~(free & (new == eos_id)) & (pos + 1 < max_new_tokens)
        if not running.all():
            if not running.any():
                break
            keep = running.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            encoded = type(encoded)(last_hidden_state=encoded.last_hidden_state[keep])
            row_idx, plen, forced, new, enc_mask = row_idx[keep], plen[keep], forced[keep], new[keep], enc_mask[keep]
        inputs = new[:, None]
    return _trimmed(out_tok, out_lp, prefixes, max_new_tokens, eos_id)
