"""ppo.py and the shared foundation it stands on (common/generation.py, runtime.py, models.py).

Unit tests check the numbers of the algorithm (GAE, whitening, KL estimators, log-prob consistency between
sampling and training); the end-to-end tests run ppo.main in-process on tiny random models for 2 iterations.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ppo
from common.settings import check_choices
from common import runtime as rt
from common.errors import UsageError
from common import generation
from common.generation import (draw, filter_top_k_top_p, forward_response, left_pad, preallocated_cache, right_pad,
                               sample, used_columns)
from common.models import load_causal_lm, load_tokenizer
from conftest import DATA, DEVICE, REPO, needs_data, train_texts


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _load(path, device="cpu"):
    tok = load_tokenizer(str(path))
    return tok, load_causal_lm(str(path), tok, device)


def _policy_ref_critic(path, device="cpu"):
    """What ppo.py builds (rt.build_policy_ref_critic): policy, its frozen deep copy, a critic."""
    tok, policy = _load(path, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    return tok, policy, ref, rt.make_critic(str(path), tok, device)


def _queries(tok, task: str, lengths: list[int]) -> list[list[int]]:
    """Prompts of the given token lengths, cut from consecutive stretches of the task's text."""
    stream = tok(" ".join(train_texts(task, 60)), add_special_tokens=False)["input_ids"]
    out, pos = [], 0
    for n in lengths:
        assert pos + n <= len(stream)
        out.append(stream[pos: pos + n])
        pos += n
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_lines(run_dir: Path) -> list[dict]:
    return [r for r in _read_jsonl(run_dir / "metrics.jsonl") if "objective/reward" in r]


def _state(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(str(folder)).state_dict().items()}


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _args(task: str, model: Path, out: Path, **kw) -> ppo.Args:
    base = dict(task=task, policy_model=str(model), data_dir=str(DATA), output_dir=str(out), iterations=2,
                rollouts_per_iteration=4, minibatch_size=2, n_epochs=2, eval_samples=4, eval_interval=1,
                prompt_tokens=48 if task == "tldr" else None, run_name=task, device="cpu", keep_checkpoint=True)
    base.update(kw)
    return ppo.Args(**base)


# ---------------------------------------------------------------------------------------------------
# 1. GAE
# ---------------------------------------------------------------------------------------------------
def test_gae_matches_hand_computed_example():
    gamma, lam = 0.9, 0.8
    # row 0 has 3 response tokens, row 1 has 2 (right-padded); the padded slot holds garbage that must
    # not leak into anything
    rewards = torch.tensor([[0.1, -0.4, 1.0], [0.3, 2.0, 9.0]])
    values = torch.tensor([[0.5, -0.2, 0.3], [0.2, 0.7, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)

    # by hand, V = 0 after the last token, delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}
    # row 0: delta = [0.1 + 0.9*-0.2 - 0.5, -0.4 + 0.9*0.3 + 0.2, 1.0 - 0.3] = [-0.58, 0.07, 0.7]
    #        A2 = 0.7; A1 = 0.07 + 0.72*0.7 = 0.574; A0 = -0.58 + 0.72*0.574 = -0.16672
    # row 1: delta = [0.3 + 0.9*0.7 - 0.2, 2.0 - 0.7] = [0.73, 1.3]
    #        A1 = 1.3; A0 = 0.73 + 0.72*1.3 = 1.666
    expected_adv = torch.tensor([[-0.16672, 0.574, 0.7], [1.666, 1.3, 0.0]])
    expected_ret = torch.tensor([[-0.16672 + 0.5, 0.574 - 0.2, 0.7 + 0.3], [1.666 + 0.2, 1.3 + 0.7, 0.0]])
    torch.testing.assert_close(adv, expected_adv, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, expected_ret, atol=1e-6, rtol=0)

    # the same by a plain loop over python floats, on a random batch of ragged rows
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 4]
    T = max(lengths)
    r, v = torch.randn(4, T, generator=g), torch.randn(4, T, generator=g)
    m = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    adv, ret = ppo.compute_gae(r, v, m, 0.99, 0.95)
    for i, n in enumerate(lengths):
        a_next, expected = 0.0, [0.0] * T
        for t in reversed(range(n)):
            v_next = float(v[i, t + 1]) if t + 1 < n else 0.0
            delta = float(r[i, t]) + 0.99 * v_next - float(v[i, t])
            a_next = delta + 0.99 * 0.95 * a_next
            expected[t] = a_next
        torch.testing.assert_close(adv[i], torch.tensor(expected), atol=1e-5, rtol=0)
        torch.testing.assert_close(ret[i, :n], adv[i, :n] + v[i, :n], atol=1e-6, rtol=0)
        assert torch.all(ret[i, n:] == 0)


# ---------------------------------------------------------------------------------------------------
# 2. whitening
# ---------------------------------------------------------------------------------------------------
def test_masked_whiten_uses_valid_tokens_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g) * 3 + 5
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.float)
    w = ppo.masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert abs(float(valid.mean())) < 1e-5
    assert abs(float(valid.var(unbiased=False)) - 1) < 1e-4
    assert torch.all(w[~mask.bool()] == 0)
    # by hand: the statistics of the 12 valid numbers
    xs = x[mask.bool()]
    torch.testing.assert_close(valid, (xs - xs.mean()) / xs.std(unbiased=False), atol=1e-5, rtol=0)
    # garbage in the padded positions changes nothing
    x2 = x.clone()
    x2[~mask.bool()] = torch.tensor([1e4, -7.0, 3e3, 0.5, -2e4, 42.0])
    torch.testing.assert_close(ppo.masked_whiten(x2, mask), w, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------
# 3. sampling log-probs == training-forward log-probs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.device
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_logprobs_equal_training_forward(tiny_model, temperature):
    tok, model = _load(tiny_model("tldr", eos_logit=4.6), DEVICE)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert pad != eos
    lengths = [3, 17, 9, 30, 5, 24, 12, 40, 7, 21]
    queries = _queries(tok, "tldr", lengths)
    MIN, MAX = 4, 16
    torch.manual_seed(0)
    out = sample(model, queries, max_new_tokens=MAX, min_new_tokens=MIN, eos_id=eos, pad_id=pad,
                 temperature=temperature)

    n = [len(t) for t in out.tokens]
    ended = [bool(t) and t[-1] == eos for t in out.tokens]
    assert sum(ended) >= 2 and min(n) < MAX, f"some rows must end early with EOS: {n}"
    assert len({k for k, e in zip(n, ended) if e}) >= 2, "EOS at different positions"
    for t, lp in zip(out.tokens, out.logprobs):
        assert len(lp) == len(t) and all(math.isfinite(x) and x <= 0 for x in lp)
        assert eos not in t[:-1], "nothing may follow EOS"
        assert pad not in t, "pad is never sampled"
        assert eos not in t[:MIN], "EOS is masked before min_new_tokens"
        assert len(t) == MAX or t[-1] == eos

    qi, qm = left_pad(queries, pad, DEVICE)
    ri, rm = right_pad(out.tokens, pad, device=DEVICE)
    assert qm[:, 0].sum() < len(queries)  # the batch really is left-padded
    with torch.no_grad():
        lp, ent = forward_response(model, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=MIN,
                                   temperature=temperature, with_entropy=True)
    old = rt.right_pad_float(out.logprobs, ri.shape[1], DEVICE)
    diff = ((lp - old) * rm).abs()
    assert float(diff.max()) < 1e-5, f"max |logp_sample - logp_forward| = {float(diff.max()):.2e}"
    assert torch.all(lp[rm == 0] == 0)
    assert torch.isfinite(ent).all() and torch.all(ent[rm.bool()] > 0)
    # the EOS log-probs (at different positions) are finite and part of the comparison
    eos_pos = (ri == eos) & rm.bool()
    assert eos_pos.sum() >= 2 and torch.isfinite(lp[eos_pos]).all()

    # the forward's EOS mask agrees with sampling: scoring without it changes the log-probs before MIN
    # (EOS is likely here), so the equality above depends on the mask being the same
    with torch.no_grad():
        lp0, _ = forward_response(model, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=0,
                                  temperature=temperature)
    assert float(((lp0 - old) * rm)[:, :MIN].abs().min()) > 1e-2
    assert float(((lp0 - old) * rm)[:, MIN:].abs().max()) < 1e-5


@pytest.mark.device
def test_preallocated_cache_samples_what_the_dynamic_cache_samples(tiny_model, monkeypatch):
    """`sample` writes keys and values into buffers of the final length: the same tokens and log-probs as HF's
    DynamicCache (which concatenates every step), rows leaving the batch included, and no growth past capacity."""
    from transformers import DynamicCache

    tok, model = _load(tiny_model("tldr", eos_logit=4.6), DEVICE)
    queries = _queries(tok, "tldr", [3, 17, 9, 30, 5, 24, 12, 40])
    kw = dict(max_new_tokens=16, min_new_tokens=2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    used = []

    def spy(model, capacity):
        used.append(preallocated_cache(model, capacity))
        return used[-1]

    monkeypatch.setattr(generation, "preallocated_cache", spy)
    torch.manual_seed(0)
    ours = sample(model, queries, **kw)
    layer = used[0].layers[0]
    assert type(layer).__name__ == "PreallocatedLayer" and layer.key_buffer.shape[2] == 40 + 16
    assert layer.length < 40 + 16, "the longest row ended before the budget: rows left the batch"
    monkeypatch.setattr(generation, "preallocated_cache", lambda model, capacity: DynamicCache(config=model.config))
    torch.manual_seed(0)
    plain = sample(model, queries, **kw)
    n = [len(t) for t in plain.tokens]
    assert len(set(n)) >= 3, f"rows of several lengths, so rows leave the batch at different steps: {n}"
    assert ours.tokens == plain.tokens
    assert max(abs(a - b) for x, y in zip(ours.logprobs, plain.logprobs) for a, b in zip(x, y)) < 1e-6

    cache = preallocated_cache(model, 4)
    k = torch.zeros(2, 1, 3, 8)
    cache.layers[0].update(k, k)
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.layers[0].update(k, k)


def test_draw_samples_the_given_distribution():
    """`draw` (inverse CDF, one uniform per row) against the probabilities it is given: frequencies over
    200k rows within 5 standard errors, never a token of probability 0, and the global seed reproduces it."""
    probs = torch.tensor([0.5, 0.0, 0.2, 0.15, 0.0, 0.1, 0.05])
    logp = probs.log().expand(200_000, -1)
    torch.manual_seed(0)
    got = draw(logp)
    freq = torch.bincount(got, minlength=len(probs)).double() / len(got)
    se = (probs.double() * (1 - probs.double()) / len(got)).sqrt()
    assert torch.all((freq - probs.double()).abs() <= 5 * se + 1e-12), f"frequencies {freq.tolist()}"
    assert freq[1] == 0 and freq[4] == 0
    torch.manual_seed(0)
    assert torch.equal(draw(logp[:100]), got[:100])
    # a single row over a large vocabulary whose mass sits on its last token (the end of the CDF)
    last = torch.full((1, 50_000), -float("inf"))
    last[0, -1] = 0.0
    assert int(draw(last)) == 49_999


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (20, 0.5), (0, 0.0), (1, 1.0)])
def test_top_k_top_p_filter_equals_transformers_warpers(top_k, top_p):
    """Our filter keeps exactly the tokens that HF's TopKLogitsWarper and TopPLogitsWarper keep."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(3)
    scores = torch.randn(16, 300) * 3
    scores[:, 7] = -float("inf")  # an already-masked token (pad) stays masked
    want = scores.clone()
    if top_k > 0:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1.0:
        want = TopPLogitsWarper(top_p)(None, want) if top_p > 0 else want.masked_fill(
            want < want.max(-1, keepdim=True).values, -float("inf"))  # HF refuses top_p = 0: keep the argmax
    got = filter_top_k_top_p(scores, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], scores[~torch.isinf(got)])


def test_sample_with_top_p_draws_from_the_nucleus_and_reports_its_logprobs(tiny_model):
    """The guide's settings (top-p, top-k, temperature): every sampled token lies in the nucleus that the
    same filter computes from a full forward pass, and its log-prob is that of the filtered distribution."""
    tok, model = _load(tiny_model("tldr", eos_logit=3.0))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, "tldr", [7, 15, 4, 11, 9, 13])
    torch.manual_seed(2)
    out = sample(model, queries, max_new_tokens=10, min_new_tokens=2, eos_id=eos, pad_id=pad, temperature=0.8,
                 top_k=40, top_p=0.6)
    assert len({len(t) for t in out.tokens}) >= 2, "rows of different lengths (some leave the batch early)"
    for q, t, lps in zip(queries, out.tokens, out.logprobs):
        ids = torch.tensor([q + t])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(q) - 1: len(q) + len(t) - 1].float() / 0.8
        logits[:, pad] = -float("inf")
        logits[:2, eos] = -float("inf")
        logp = torch.log_softmax(filter_top_k_top_p(logits, 40, 0.6), -1)
        chosen = logp.gather(-1, torch.tensor(t)[:, None]).squeeze(-1)
        assert torch.isfinite(chosen).all(), "a token outside the nucleus was sampled"
        torch.testing.assert_close(chosen, torch.tensor(lps), atol=1e-4, rtol=0)
        assert int(torch.isfinite(logp).sum(-1).min()) < 40, "the nucleus really cuts the vocabulary here"


def test_sample_with_forced_prefix_counts_toward_min_new_tokens(tiny_model):
    """The "continue from a forced prefix" helper: the prefix counts toward the response length and the
    EOS mask, and the generated part's log-probs equal the training forward over prefix + continuation."""
    tok, model = _load(tiny_model("tldr", eos_logit=4.6))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, "tldr", [6, 11, 4, 9, 14, 8])
    prefixes = [[], [40, 41], [50, 51, 52, 53, 54, 55], [60], [], [70, 71, 72]]
    MIN, MAX = 5, 12
    torch.manual_seed(1)
    out = sample(model, queries, prefixes=prefixes, max_new_tokens=MAX, min_new_tokens=MIN, eos_id=eos, pad_id=pad)
    full = [p + t for p, t in zip(prefixes, out.tokens)]
    for p, f in zip(prefixes, full):
        assert len(f) <= MAX
        assert eos not in f[:MIN]
        assert len(f) == MAX or f[-1] == eos
    assert any(f[-1] == eos for f in full)
    qi, qm = left_pad(queries, pad)
    ri, rm = right_pad(full, pad)
    lp, _ = forward_response(model, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=MIN)
    for i, (p, t) in enumerate(zip(prefixes, out.tokens)):
        got = lp[i, len(p): len(p) + len(t)]
        torch.testing.assert_close(got, torch.tensor(out.logprobs[i]), atol=1e-5, rtol=0)


def test_sample_ignores_the_model_folders_generation_config(tiny_model, tmp_path):
    """SPEC 4.3: the learner samples from the distribution the loss scores. A model folder may carry a
    generation_config.json with logits processors (hub models do: repetition_penalty, no_repeat_ngram_size,
    bad_words_ids, min_length ...); `sample` must not apply them, or ratio != 1 and sampling is biased."""
    from transformers import GenerationConfig

    folder = tmp_path / "with-generation-config"
    shutil.copytree(tiny_model("tldr"), folder)
    tok = load_tokenizer(str(folder))
    GenerationConfig(repetition_penalty=2.0, no_repeat_ngram_size=1, bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(folder)
    model = load_causal_lm(str(folder), tok, "cpu")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, "tldr", [30, 12, 25, 40])
    torch.manual_seed(0)
    out = sample(model, queries, max_new_tokens=16, min_new_tokens=0, eos_id=eos, pad_id=pad)
    qi, qm = left_pad(queries, pad)
    ri, rm = right_pad(out.tokens, pad)
    with torch.no_grad():
        lp, _ = forward_response(model, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=0)
    old = rt.right_pad_float(out.logprobs, ri.shape[1], "cpu")
    diff = float(((lp - old) * rm).abs().max())
    assert diff < 1e-5, f"sampling applied the folder's generation_config: max |logp diff| = {diff:.3g}"


# ---------------------------------------------------------------------------------------------------
# 4. ratio == 1 on a minibatch of the first epoch
# ---------------------------------------------------------------------------------------------------
@pytest.mark.device
def test_ratio_is_one_on_first_minibatch(tiny_model):
    path = tiny_model("commongen", eos_logit=4.6)
    tok, policy, ref, critic = _policy_ref_critic(path, DEVICE)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # dropout is off in every model (the tiny config asks for GPT-2's default 0.1)
    for model in (policy, ref, critic):
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    lengths = [12, 3, 7, 15, 5, 9, 4, 11]
    queries = _queries(tok, "commongen", lengths)
    torch.manual_seed(3)
    out = sample(policy, queries, max_new_tokens=20, min_new_tokens=5, eos_id=eos, pad_id=pad)
    qi, qm = left_pad(queries, pad, DEVICE)
    ri, rm = right_pad(out.tokens, pad, device=DEVICE)
    old = rt.right_pad_float(out.logprobs, ri.shape[1], DEVICE)
    assert len({len(t) for t in out.tokens}) > 1

    # a minibatch whose rows all carry extra left padding (the full batch's width) in shuffled order
    short = sorted(range(len(lengths)), key=lambda i: lengths[i])[:4]
    mb = torch.tensor(short)[torch.randperm(4, generator=torch.Generator().manual_seed(0))]
    assert qm[mb][:, 0].sum() == 0 and qi.shape[1] == max(lengths)
    policy.train()  # as in a training step: the ratio must still be 1 (dropout off)
    new, _ = forward_response(policy, qi[mb], qm[mb], ri[mb], rm[mb], eos_id=eos, pad_id=pad, min_new_tokens=5,
                              with_entropy=True)
    assert new.requires_grad
    ratio = torch.exp((new - old[mb]) * rm[mb]).detach()
    assert float((ratio - 1).abs().max()) < 1e-5
    # the critic reads one value per response position, and the minibatch padding does not change it
    with torch.no_grad():
        v_all = critic(qi, qm, ri, rm)
        v_mb = critic(qi[mb], qm[mb], ri[mb], rm[mb])
    assert v_all.shape == ri.shape
    torch.testing.assert_close(v_mb, v_all[mb], atol=1e-5, rtol=0)


@pytest.mark.device
def test_used_columns_drop_only_padding_and_change_no_result(tiny_model):
    path = tiny_model("commongen", eos_logit=4.6)
    tok, policy, _, critic = _policy_ref_critic(path, DEVICE)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, "commongen", [12, 3, 7, 15, 5, 9])
    responses = [[5 + i] * n for i, n in enumerate([9, 2, 4, 20, 3, 6])]
    qi, qm = left_pad(queries, pad, DEVICE)
    ri, rm = right_pad(responses, pad, device=DEVICE)
    mb = torch.tensor([4, 1, 2])  # short queries and responses: most of the batch's width is their padding
    q, t = used_columns(qm[mb], rm[mb])
    assert qi[mb, q].shape[1] == 7 and ri[mb, t].shape[1] == 4  # the longest of each in the minibatch
    assert int(qm[mb, :q.start].sum()) == 0 and int(rm[mb, t.stop:].sum()) == 0
    with torch.no_grad():
        full, _ = forward_response(policy, qi[mb], qm[mb], ri[mb], rm[mb], eos_id=eos, pad_id=pad, min_new_tokens=5)
        cut, _ = forward_response(policy, qi[mb, q], qm[mb, q], ri[mb, t], rm[mb, t], eos_id=eos, pad_id=pad,
                                  min_new_tokens=5)
        torch.testing.assert_close(cut, full[:, t], atol=1e-5, rtol=0)
        torch.testing.assert_close(critic(qi[mb, q], qm[mb, q], ri[mb, t], rm[mb, t]),
                                   critic(qi[mb], qm[mb], ri[mb], rm[mb])[:, t], atol=1e-5, rtol=0)


@pytest.mark.device
@pytest.mark.parametrize("temperature,rows", [(1.0, 1), (0.7, 1), (1.0, 2), (0.7, 3)])
def test_packed_forward_equals_padded_forward(tiny_model, temperature, rows):
    """The rows' real tokens packed end to end in one, two or three rows give the padded batch's log-probs,
    entropies, values and gradients: no token attends across rows or to the filler after them, positions
    restart per row, the EOS mask counts response positions per row, the LM head reads the right positions."""
    path = tiny_model("commongen", eos_logit=4.6)
    tok, policy, _, critic = _policy_ref_critic(path, DEVICE)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, "commongen", [12, 3, 7, 15, 5, 9])
    # EOS ends the rows long enough to end (min_new_tokens 5); the short ones stop without it
    responses = [[5 + i] * (n - 1) + ([eos] if n > 5 else [40]) for i, n in enumerate([9, 2, 4, 20, 3, 6])]
    qi, qm = left_pad(queries, pad, DEVICE)
    ri, rm = right_pad(responses, pad, device=DEVICE)
    out = {}
    for pack in (False, rows):
        policy.zero_grad(), critic.zero_grad()
        lp, ent = forward_response(policy, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=5,
                                   temperature=temperature, with_entropy=True, pack=pack)
        v = critic(qi, qm, ri, rm, pack=pack)
        ((lp * rm).sum() + (v * rm).sum()).backward()
        grads = [p.grad.clone() for p in list(policy.parameters()) + list(critic.parameters()) if p.grad is not None]
        out[pack] = (lp, ent * rm, v * rm, grads)
    (lp0, e0, v0, g0), (lp1, e1, v1, g1) = out[False], out[rows]
    assert torch.isfinite(lp0).all()
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(e1, e0, atol=1e-4, rtol=0)
    torch.testing.assert_close(v1, v0, atol=1e-5, rtol=0)
    assert torch.all(lp1[rm == 0] == 0) and torch.all(v1[rm == 0] == 0)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    # the EOS mask really is applied per row: without it the early EOS log-probs differ
    lp_nomask, _ = forward_response(policy, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=0,
                                    temperature=temperature, pack=rows)
    assert float((lp_nomask - lp1).detach()[:, :5].abs().max()) > 1e-2


@pytest.mark.device
@pytest.mark.parametrize("pack", [False, True])
def test_forward_response_gradients_equal_log_softmax_then_gather(tiny_model, pack):
    """forward_response's log-probs, entropies and parameter gradients equal the textbook graph built from the
    model's full logits (masks as in sampling, temperature, `log_softmax`, `gather`): its own backward
    (`_TokenLogProbs`: onehot(y) - softmax, from the saved logits alone) is exact, masked entries included."""
    path = tiny_model("commongen", eos_logit=4.6)
    tok, policy, _, _ = _policy_ref_critic(path, DEVICE)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, "commongen", [12, 3, 7, 15])
    responses = [[5 + i] * (n - 1) + [eos] for i, n in enumerate([9, 6, 7, 12])]  # EOS at MIN or later
    qi, qm = left_pad(queries, pad, DEVICE)
    ri, rm = right_pad(responses, pad, device=DEVICE)
    MIN, temperature = 5, 0.7
    w = torch.randn(ri.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)  # any upstream gradient

    policy.zero_grad()
    lp, ent = forward_response(policy, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=MIN,
                               temperature=temperature, with_entropy=True, pack=pack)
    (lp * w * rm).sum().backward()
    ours = [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    policy.zero_grad()
    ids, mask = torch.cat([qi, ri], 1), torch.cat([qm, rm], 1)
    P, T = qi.shape[1], ri.shape[1]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = policy(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, P - 1:P + T - 1] / temperature
    banned = torch.zeros_like(logits, dtype=torch.bool)
    banned[:, :, pad] = True
    banned[:, :MIN, eos] = True
    logp_all = torch.log_softmax(logits.masked_fill(banned, -float("inf")), -1)
    ref_lp = torch.where(rm.bool(), logp_all.gather(-1, ri.masked_fill(rm == 0, 0)[..., None]).squeeze(-1), 0.0)
    ref_ent = -(logp_all.exp() * logp_all.masked_fill(banned, 0)).sum(-1) * rm
    (ref_lp * w).sum().backward()
    theirs = [p.grad.clone() for p in policy.parameters() if p.grad is not None]

    torch.testing.assert_close(lp * rm, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent * rm, ref_ent.detach(), atol=1e-4, rtol=0)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert float(sum(g.abs().sum() for g in ours)) > 0


@pytest.mark.device
@pytest.mark.parametrize("pack", [False, None])
def test_no_grad_forward_in_chunks_equals_one_pass(tiny_model, monkeypatch, pack):
    """Without gradients forward_response scores the rows in chunks of bounded logits, each without its
    all-padding columns: the same log-probs and entropies as one pass over the batch, zeros on padding."""
    import common.generation as gen

    path = tiny_model("commongen", eos_logit=4.6)
    tok, policy, _, _ = _policy_ref_critic(path, DEVICE)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    qi, qm = left_pad(_queries(tok, "commongen", [12, 3, 7, 15, 5, 9, 4]), pad, DEVICE)
    ri, rm = right_pad([[5 + i] * n for i, n in enumerate([9, 2, 4, 20, 3, 6, 1])], pad, device=DEVICE)
    kw = dict(eos_id=eos, pad_id=pad, min_new_tokens=2, temperature=0.7, with_entropy=True, pack=pack)
    calls = []
    real = gen.forward_response

    def counting(*a, **k):
        calls.append(a[3].shape)
        return real(*a, **k)

    monkeypatch.setattr(gen, "forward_response", counting)
    with torch.no_grad():
        monkeypatch.setattr(gen, "NO_GRAD_LOGITS_BYTES", 2**40)
        lp1, ent1 = gen.forward_response(policy, qi, qm, ri, rm, **kw)
        assert len(calls) == 1
        row_bytes = ri.shape[1] * policy.config.vocab_size * 4
        monkeypatch.setattr(gen, "NO_GRAD_LOGITS_BYTES", 3 * row_bytes)  # 3 chunks of 3, 3 and 1 rows
        lp3, ent3 = gen.forward_response(policy, qi, qm, ri, rm, **kw)
    assert [tuple(s) for s in calls[1:]] == [(7, 20), (3, 9), (3, 20), (1, 1)]  # the chunks drop padding columns
    torch.testing.assert_close(lp3, lp1, atol=1e-5, rtol=0)
    assert torch.all(lp3[rm == 0] == 0)
    torch.testing.assert_close(ent3 * rm, ent1 * rm, atol=1e-4, rtol=0)
    # with gradients the batch runs in one pass whatever the budget
    lp_g, _ = gen.forward_response(policy, qi, qm, ri, rm, **kw)
    assert len(calls) == 6 and lp_g.requires_grad


def test_packed_forward_under_ddp_matches_the_bare_model(tiny_model, monkeypatch):
    """Packed forwards read the LM head from the hidden states, outside DistributedDataParallel's own forward:
    DDP's gradient hooks must still see every gradient (one gloo process here), equal to the bare model's."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    path = tiny_model("commongen", eos_logit=4.6)
    tok, policy, _, _ = _policy_ref_critic(path)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    qi, qm = left_pad(_queries(tok, "commongen", [12, 3, 7, 15]), pad)
    ri, rm = right_pad([[5] * 9, [6] * 2, [7] * 4, [8] * 7], pad)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        grads, wrapped = [], DDP(policy)
        # twice under DDP: its second forward fails when the first backward's reduction did not finish
        for model in (policy, wrapped, wrapped):
            policy.zero_grad()
            lp, _ = forward_response(model, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=0, pack=2)
            (lp * rm).sum().backward()
            grads.append([p.grad.clone() for p in policy.parameters()])
    finally:
        dist.destroy_process_group()
    assert all(g.abs().sum() > 0 for g in grads[1][:1])  # the embedding (tied to the LM head) got its gradient
    for ddp_grads in grads[1:]:
        for a, b in zip(ddp_grads, grads[0]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packing_falls_back_to_padding_where_the_model_ignores_packed_positions(tiny_model):
    """A model whose attention does not split packed rows (here: one that drops the position ids) fails the
    one-time check, and forward_response pads instead: the result is still the padded batch's."""
    import common.generation as gen

    path = tiny_model("commongen", eos_logit=4.6)
    tok, policy, _, _ = _policy_ref_critic(path)

    class NoPositions(type(policy)):
        def forward(self, *args, position_ids=None, **kw):
            return super().forward(*args, **kw)

    blind = NoPositions(policy.config)
    blind.load_state_dict(policy.state_dict())
    blind.eval()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert gen.packing_works(policy) and not gen.packing_works(blind)
    queries = _queries(tok, "commongen", [3, 4, 2, 5])
    ri, rm = right_pad([[7, 8], [9], [10, 11, 12], [13]], pad)
    qi, qm = left_pad(queries, pad)
    with torch.no_grad():
        auto, _ = forward_response(blind, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=0)
        padded, _ = forward_response(blind, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=0, pack=False)
    torch.testing.assert_close(auto, padded, atol=0, rtol=0)


def test_packing_layout_packs_short_uneven_rows_into_even_rows_and_pads_long_uniform_ones():
    from common.generation import packed_rows, packing_layout

    lengths = [12 + (25 * i) // 15 for i in range(16)]  # CommonGen-like: 16 rows of 12-37 real tokens in 38 columns
    short = torch.zeros(16, 38, dtype=torch.long)
    for i, n in enumerate(lengths):
        short[i, :n] = 1
    groups = packing_layout(short, 256)
    assert groups is not None and sorted(i for g in groups for i in g) == list(range(16))
    totals = [sum(lengths[i] for i in g) for g in groups]
    assert 1 < len(groups) < 16 and max(totals) - min(totals) <= max(lengths)  # a few rows of about equal length
    # longest first into the shortest: [9, 8, 7, 3, 2, 1] in 2 rows -> 9+3+2+1 | 8+7 (15 each)
    assert sorted(sorted(g) for g in packed_rows([9, 8, 7, 3, 2, 1], 2)) == [[0, 3, 4, 5], [1, 2]]
    long = torch.ones(8, 300, dtype=torch.long)  # TL;DR-like: 8 rows of 230-300 tokens
    for i in range(1, 8):
        long[i, 300 - 10 * i:] = 0
    assert packing_layout(long, 256) is None


# ---------------------------------------------------------------------------------------------------
# 5. KL estimators
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_kl_zero_for_identical_models_and_k3_nonnegative(tiny_model):
    path = tiny_model("commongen", eos_logit=4.6)
    tok, policy, ref, _ = _policy_ref_critic(path)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, "commongen", [5, 9, 3, 12])
    torch.manual_seed(0)
    out = sample(policy, queries, max_new_tokens=12, min_new_tokens=2, eos_id=eos, pad_id=pad)
    qi, qm = left_pad(queries, pad)
    ri, rm = right_pad(out.tokens, pad)
    kw = dict(eos_id=eos, pad_id=pad, min_new_tokens=2)
    lp, _ = forward_response(policy, qi, qm, ri, rm, **kw)
    lp_ref, _ = forward_response(ref, qi, qm, ri, rm, **kw)
    for est in ("k1", "k3"):
        assert float(ppo.kl_per_token(lp, lp_ref, est).abs().max()) < 1e-6
    # also against the sampling log-probs (what ppo.py uses): ~0
    old = rt.right_pad_float(out.logprobs, ri.shape[1], "cpu")
    assert float((ppo.kl_per_token(old, lp_ref, "k1") * rm).abs().max()) < 1e-5

    # a different reference: k1 is the log-ratio, k3 = (r - 1) - log r >= 0 with r = p_ref / p
    other = copy.deepcopy(ref)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lp_other, _ = forward_response(other, qi, qm, ri, rm, **kw)
    k1 = ppo.kl_per_token(lp, lp_other, "k1")
    k3 = ppo.kl_per_token(lp, lp_other, "k3")
    torch.testing.assert_close(k1, lp - lp_other)
    assert torch.all(k3 >= 0)
    assert float((k3 * rm).sum()) > 1e-3
    r = torch.exp(lp_other - lp)
    torch.testing.assert_close(k3, (r - 1) - torch.log(r), atol=1e-5, rtol=1e-4)

    # both are unbiased: their expectation under p over the whole vocabulary is KL(p || p_ref)
    with torch.no_grad():
        ids = torch.cat([qi, ri], 1)
        mask = torch.cat([qm, rm], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = torch.log_softmax(policy(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -3], -1)
        logq = torch.log_softmax(other(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -3], -1)
    true_kl = (logp.exp() * (logp - logq)).sum(-1)
    for est in ("k1", "k3"):
        expect = (logp.exp() * ppo.kl_per_token(logp, logq, est)).sum(-1)
        torch.testing.assert_close(expect, true_kl, atol=1e-5, rtol=1e-4)
    with pytest.raises(UsageError, match="--kl-estimator must be k1 or k3"):  # Args' Literal, checked at once
        check_choices(ppo.Args(kl_estimator="k2"))


# ---------------------------------------------------------------------------------------------------
# 6 (+4 in the real loop). reward on the last real token, EOS trained; ratio 1 inside ppo.main
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captured(tiny_model, tmp_path_factory):
    """One ppo.main run on an EOS-happy model with a stub reward (row i of a batch scores 10 + i), recording
    what the loop hands to sample, kl_per_token, compute_gae and the training forward."""
    rec = {"sample": [], "kl": [], "gae": [], "train_fwd": [], "scores": []}
    real_sample, real_kl, real_gae, real_fwd = ppo.sample, ppo.kl_per_token, ppo.compute_gae, ppo.forward_response

    def stub_reward(task, reward_model, train, device, log=print, **kwargs):
        def fn(prompts, responses, references):
            s = [10.0 + i for i in range(len(responses))]
            rec["scores"].append(s)
            return s
        return fn

    def rec_sample(model, queries, **kw):
        out = real_sample(model, queries, **kw)
        rec["sample"].append((copy.deepcopy(queries), copy.deepcopy(out)))
        return out

    def host(t):  # a copy on the CPU (the run itself may be on RLGF_TEST_DEVICE)
        return t.detach().to("cpu", copy=True)

    def rec_kl(lp, ref_lp, est):
        rec["kl"].append((host(lp), host(ref_lp), est))
        return real_kl(lp, ref_lp, est)

    def rec_gae(rewards, values, mask, gamma, lam):
        rec["gae"].append((host(rewards), host(values), host(mask)))
        return real_gae(rewards, values, mask, gamma, lam)

    def rec_fwd(model, qi, qm, ri, rm, **kw):
        out = real_fwd(model, qi, qm, ri, rm, **kw)
        if kw.get("with_entropy"):
            rec["train_fwd"].append((host(qi), host(ri), host(rm), host(out[0])))
        return out

    out_dir = tmp_path_factory.mktemp("captured")
    args = _args("commongen", tiny_model("commongen", eos_logit=4.6), out_dir, rollouts_per_iteration=8,
                 minibatch_size=4, n_epochs=1, eval_samples=2, kl_coef=0.5, lr=1e-2, run_name="captured",
                 device=DEVICE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo.rt, "make_reward", stub_reward)
        mp.setattr(ppo, "sample", rec_sample)
        mp.setattr(ppo, "kl_per_token", rec_kl)
        mp.setattr(ppo, "compute_gae", rec_gae)
        mp.setattr(ppo, "forward_response", rec_fwd)
        ppo.main(args)
    rec["args"] = args
    return rec


@pytest.mark.device
@needs_data
def test_reward_sits_on_last_real_token_and_eos_is_trained(captured, tiny_model):
    tok = load_tokenizer(str(tiny_model("commongen", eos_logit=4.6)))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert eos != pad
    coef = captured["args"].kl_coef
    assert len(captured["sample"]) == len(captured["gae"]) == 2
    eos_lengths = set()
    for (queries, out), (rewards, values, mask), (lp, ref_lp, est) in zip(captured["sample"], captured["gae"], captured["kl"]):
        B, T = rewards.shape
        lengths = [len(t) for t in out.tokens]
        assert T == max(lengths)
        scores = torch.tensor([10.0 + i for i in range(B)])
        kl = ppo.kl_per_token(lp, ref_lp, est) * mask
        for i, t in enumerate(out.tokens):
            L = len(t)
            # the mask (policy and value mask alike in PPO) covers every response token, EOS included
            assert mask[i, :L].eq(1).all() and mask[i, L:].eq(0).all()
            if t[-1] == eos:
                eos_lengths.add(L)
                assert torch.isfinite(lp[i, L - 1]) and float(lp[i, L - 1]) < 0  # EOS's log-prob is real
            # the score sits exactly at the last real token (EOS when sampled), nowhere else
            torch.testing.assert_close(rewards[i, L - 1], scores[i] - coef * kl[i, L - 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(rewards[i, : L - 1], -coef * kl[i, : L - 1], atol=1e-6, rtol=0)
            assert torch.all(rewards[i, L:] == 0) and torch.all(values[i, L:] == 0)
    assert len(eos_lengths) >= 2, f"rows must end with EOS at different positions, got {eos_lengths}"
    # the second iteration has a policy != reference: the KL part of the reward is not trivially zero
    _, _, mask2 = captured["gae"][1]
    lp2, ref2, _ = captured["kl"][1]
    assert float(((lp2 - ref2) * mask2).abs().max()) > 1e-4


@pytest.mark.device
@needs_data
def test_ratio_is_one_on_first_minibatch_inside_ppo_main(captured, tiny_model):
    tok = load_tokenizer(str(tiny_model("commongen", eos_logit=4.6)))
    pad = tok.pad_token_id
    queries, out = captured["sample"][0]
    qi, _ = left_pad(queries, pad)
    ri, rm = right_pad(out.tokens, pad)
    old = rt.right_pad_float(out.logprobs, ri.shape[1], "cpu")
    q_mb, r_mb, m_mb, new = captured["train_fwd"][0]  # first minibatch, first epoch, before any step
    # the minibatch keeps only the columns its own rows use: no left padding of its queries and no response
    # column that is padding in every one of its rows
    assert q_mb.shape[1] <= qi.shape[1] and r_mb.shape[1] <= ri.shape[1] and 0 < len(q_mb) < len(qi)
    assert int(m_mb.sum(1).max()) == r_mb.shape[1] and bool((q_mb != pad).any(0).all())

    def source_rows(q_mb, r_mb):
        P, T = q_mb.shape[1], r_mb.shape[1]
        rows = []
        for j in range(len(q_mb)):
            match = [i for i in range(len(qi)) if torch.equal(qi[i, -P:], q_mb[j]) and torch.equal(ri[i, :T], r_mb[j])
                     and bool((qi[i, :-P] == pad).all()) and int(rm[i].sum()) <= T]
            assert match, "the minibatch rows come from the sampled batch"
            rows.append(match[0])
        return rows

    rows = source_rows(q_mb, r_mb)
    ratio = torch.exp((new - old[rows, :r_mb.shape[1]]) * m_mb)
    assert float((ratio - 1).abs().max()) < 1e-5
    # the second minibatch of the same iteration comes after an optimiser step (lr 1e-2): its ratio is not 1,
    # so the comparison above can fail
    q2, r2, m2, new2 = captured["train_fwd"][1]
    rows2 = source_rows(q2, r2)
    assert not set(rows2) & set(rows)
    assert float((torch.exp((new2 - old[rows2, :r2.shape[1]]) * m2) - 1).abs().max()) > 1e-4


# ---------------------------------------------------------------------------------------------------
# 8. end to end, per task
# ---------------------------------------------------------------------------------------------------
TRAIN_METRICS = ("objective/reward", "objective/kl", "objective/kl_coef", "objective/rlhf_reward", "objective/entropy",
                 "loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl", "policy/ratio",
                 "value/clipfrac", "value/explained_variance", "train/lr", "train/response_length",
                 "time/iteration", "time/generate", "time/forward", "time/reward", "time/update",
                 "time/tokens_per_second")


@pytest.fixture(scope="module")
def e2e(tiny_model, tmp_path_factory):
    """task -> (result of ppo.main, run folder); each run once per module."""
    cache = {}

    def run(task):
        if task not in cache:
            out = tmp_path_factory.mktemp(f"e2e-{task}")
            # a KL coefficient > 0 gives a learning signal even when every task reward is 0
            args = _args(task, tiny_model(task), out, lr_schedule="constant", lr=1e-3, kl_coef=0.01)
            cache[task] = (ppo.main(args), out / task, args)
        return cache[task]

    return run


@needs_data
@pytest.mark.parametrize("task", ["imdb", "commongen", "tldr"])
def test_end_to_end_two_iterations(e2e, tiny_model, task):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    result, run_dir, args = e2e(task)
    assert result is not None
    before, after = result
    assert set(before) == set(after) and {"reward", "kl", "output_perplexity", "response_length"} <= set(before)
    for m in (before, after):
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
    assert abs(before["kl"]) < 1e-4  # the first evaluation's policy is the reference

    # metrics.jsonl: one line of train metrics per iteration, with the fixed names, all finite
    lines = _train_lines(run_dir)
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        missing = set(TRAIN_METRICS) - set(r)
        assert not missing, f"missing metrics {missing}"
        bad = {k: v for k, v in r.items() if not math.isfinite(v)}
        assert not bad, f"non-finite metrics {bad}"
        assert r["train/response_length"] <= (48 if task == "imdb" else 20 if task == "commongen" else 50)
        assert r["time/tokens_per_second"] > 0
        assert r["train/lr"] == args.lr
    if task == "imdb":  # exactly 48 new tokens
        assert all(r["train/response_length"] == 48 for r in lines)
    eval_lines = [r for r in _read_jsonl(run_dir / "metrics.jsonl") if "eval/reward" in r]
    assert [r["step"] for r in eval_lines] == [0, 1, 2]
    eval_keys = {"eval/reward", "eval/kl", "eval/output_perplexity", "eval/response_length"} | {
        "imdb": {"eval/sentiment", "eval/reference_perplexity"},
        "commongen": {"eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/bleu", "eval/cider", "eval/coverage"},
        "tldr": {"eval/rouge1", "eval/rouge2", "eval/rougeL"}}[task]
    for r in eval_lines:
        assert eval_keys <= set(r), eval_keys - set(r)
    assert eval_lines[0]["eval/reward"] == before["reward"] and eval_lines[-1]["eval/reward"] == after["reward"]

    # TensorBoard: event files with the same scalars and the sample tables
    assert list(run_dir.glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {"objective/reward", "objective/kl", "loss/policy", "loss/value", "policy/clipfrac",
            "value/explained_variance", "time/tokens_per_second", "eval/reward"} <= scalars
    assert [e.step for e in ea.Scalars("objective/reward")] == [1, 2]
    texts = " ".join(ea.Tags()["tensors"])
    assert "train/samples" in texts and "eval/samples" in texts

    # the final policy loads on its own and has moved away from the initial weights
    policy = AutoModelForCausalLM.from_pretrained(str(run_dir / "policy"))
    assert (run_dir / "policy" / "tokenizer.json").is_file() or (run_dir / "policy" / "tokenizer_config.json").is_file()
    init = _state(tiny_model(task))
    final = policy.state_dict()
    assert set(init) == set(final)
    assert any(not torch.equal(init[k], final[k]) for k in init)
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "critic.pt").is_file()
    assert json.loads((run_dir / "args.json").read_text())["task"] == task
    saved = json.loads((run_dir / "eval.json").read_text())
    assert {k: saved[k] for k in ("initial", "final")} == {"initial": before, "final": after}
    # how the evaluations decoded and on how many prompts (the paper's preset for a given model: the task's decoding)
    assert saved["evaluation"]["periodic_prompts"] == saved["evaluation"]["final_prompts"] == before["prompts"]


# ---------------------------------------------------------------------------------------------------
# 9. determinism
# ---------------------------------------------------------------------------------------------------
@needs_data
def test_same_seed_same_numbers(e2e, tiny_model, tmp_path):
    _, run_a, args_a = e2e("commongen")
    args_b = _args("commongen", tiny_model("commongen"), tmp_path, lr_schedule="constant", lr=1e-3, kl_coef=0.01)
    assert args_b == ppo.Args(**{**args_a.__dict__, "output_dir": str(tmp_path)})
    ppo.main(args_b)
    run_b = tmp_path / "commongen"
    a, b = _read_jsonl(run_a / "metrics.jsonl"), _read_jsonl(run_b / "metrics.jsonl")
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if not k.startswith("time/"):
                assert _same(ra[k], rb[k]), f"step {ra['step']} {k}: {ra[k]} != {rb[k]}"
    sa, sb = _state(run_a / "policy"), _state(run_b / "policy")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ca, cb = torch.load(run_a / "critic.pt"), torch.load(run_b / "critic.pt")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)

    # and a different seed gives different numbers (the comparison above can fail)
    args_c = ppo.Args(**{**args_b.__dict__, "seed": 2, "run_name": "seed2", "iterations": 1, "eval_samples": 2})
    ppo.main(args_c)
    c = _train_lines(tmp_path / "seed2")[0]
    assert any(not _same(_train_lines(run_a)[0][k], c[k]) for k in ("objective/reward", "objective/kl", "loss/policy"))


def _checkpointed(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())


@pytest.mark.device
def test_gradient_checkpointing_keeps_less_and_changes_no_number(tiny_model):
    """--gradient-checkpointing: the trained models keep far fewer activations for the backward, give the same
    log-probs, values and gradients, and sample the same tokens with their key-value cache (no gradients: the
    layers run as usual)."""
    path = tiny_model("commongen", eos_logit=4.6)
    built = {gc: rt.build_policy_ref_critic(str(path), DEVICE, 64, gradient_checkpointing=gc) for gc in (False, True)}
    tok = built[False][0]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, "commongen", [12, 3, 7, 15])
    responses = [[5 + i] * (n - 1) + [eos] for i, n in enumerate([9, 6, 7, 12])]
    qi, qm = left_pad(queries, pad, DEVICE)
    ri, rm = right_pad(responses, pad, device=DEVICE)
    out = {}
    for gc, (_, policy, ref, critic) in built.items():
        assert _checkpointed(policy) == gc and _checkpointed(critic) == gc
        assert not _checkpointed(ref)  # the frozen reference never runs a backward
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            lp, _ = forward_response(policy, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=5, pack=False)
            v = critic(qi, qm, ri, rm, pack=False)
        ((lp * rm).sum() + (v * rm).sum()).backward()
        grads = [p.grad for p in list(policy.parameters()) + list(critic.parameters()) if p.grad is not None]
        torch.manual_seed(0)
        with torch.no_grad():
            s = sample(policy, queries, max_new_tokens=12, min_new_tokens=2, eos_id=eos, pad_id=pad)
        out[gc] = (lp, v, grads, sum(saved), s)
    (lp0, v0, g0, n0, s0), (lp1, v1, g1, n1, s1) = out[False], out[True]
    assert n1 < 0.6 * n0, f"saved for backward: {n1} elements with checkpointing, {n0} without"
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=0)
    torch.testing.assert_close(v1, v0, atol=1e-6, rtol=0)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert s1.tokens == s0.tokens and s1.logprobs == s0.logprobs


@needs_data
def test_gradients_zeroed_in_place_change_no_number(tiny_model, tmp_path, monkeypatch):
    """rt.zero_gradients keeps each gradient in one buffer for the whole run (zeroed in place) and trains exactly
    what fresh gradients every minibatch (`zero_grad(set_to_none=True)`) train: the same metrics and weights."""
    real = rt.zero_gradients
    buffers = {}

    def recording(trained, idle=()):
        real(trained, idle)
        for model in trained:
            for name, p in model.named_parameters():
                buffers.setdefault((id(model), name), set()).add(p.grad.data_ptr())

    def fresh(trained, idle=()):
        for model in list(trained) + list(idle):
            for p in model.parameters():
                p.grad = None

    runs = {}
    for label, fn in (("in place", recording), ("fresh", fresh)):
        monkeypatch.setattr(rt, "zero_gradients", fn)
        args = _args("commongen", tiny_model("commongen"), tmp_path / label.replace(" ", "_"), lr_schedule="constant",
                     lr=1e-3, kl_coef=0.01, eval_samples=2)
        ppo.main(args)
        runs[label] = Path(args.output_dir) / "commongen"
    assert buffers and all(len(ptrs) == 1 for ptrs in buffers.values())
    a, b = _read_jsonl(runs["in place"] / "metrics.jsonl"), _read_jsonl(runs["fresh"] / "metrics.jsonl")
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith("time/"):
                assert _same(ra[k], rb[k]), f"step {ra['step']} {k}: {ra[k]} != {rb[k]}"
    sa, sb = _state(runs["in place"] / "policy"), _state(runs["fresh"] / "policy")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@needs_data
def test_gradient_checkpointing_run_has_the_same_numbers(e2e, tiny_model, tmp_path, monkeypatch):
    """A whole ppo.main run with --gradient-checkpointing reports what the plain run reports, and every training
    forward of policy and critic really is checkpointed (evaluation in between included)."""
    _, run_a, args_a = e2e("imdb")  # its evaluation scores references with the policy (eval mode)
    calls = []
    real_enable = rt.enable_gradient_checkpointing

    def counting_enable(model, name):
        real_enable(model, name)
        for m in model.modules():
            if getattr(m, "gradient_checkpointing", False):
                def counted(*a, _f=m._gradient_checkpointing_func, **k):
                    calls.append(1)
                    return _f(*a, **k)
                m._gradient_checkpointing_func = counted

    monkeypatch.setattr(rt, "enable_gradient_checkpointing", counting_enable)
    ppo.main(ppo.Args(**{**args_a.__dict__, "output_dir": str(tmp_path), "gradient_checkpointing": True}))
    n_layer = 2  # the tiny model's
    micro_batches = args_a.iterations * args_a.n_epochs * (args_a.rollouts_per_iteration // args_a.minibatch_size)
    assert len(calls) == micro_batches * 2 * n_layer  # each micro-batch: policy and critic, every layer once
    a, b = _train_lines(run_a), _train_lines(tmp_path / "imdb")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith("time/"):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), f"step {ra['step']} {k}: {ra[k]} != {rb[k]}"

# ---------------------------------------------------------------------------------------------------
# 10. resume
# ---------------------------------------------------------------------------------------------------
@needs_data
def test_resume_continues_at_next_iteration_like_an_uninterrupted_run(e2e, tiny_model, tmp_path):
    _, run_a, args_a = e2e("commongen")  # 2 iterations, checkpoint every iteration (save_interval = eval_interval 1)
    assert torch.load(run_a / "checkpoint.pt", weights_only=False)["iteration"] == 2
    resumed = tmp_path / "resumed"
    shutil.copytree(run_a, resumed)
    ppo.main(ppo.Args(**{**args_a.__dict__, "iterations": 3, "resume": str(resumed)}))
    steps = [r["step"] for r in _train_lines(resumed)]
    assert steps == [1, 2, 3], steps
    assert torch.load(resumed / "checkpoint.pt", weights_only=False)["iteration"] == 3

    # an uninterrupted 3-iteration run gives the same numbers at iteration 3 and the same final weights
    straight = tmp_path / "straight"
    ppo.main(ppo.Args(**{**args_a.__dict__, "iterations": 3, "output_dir": str(straight)}))
    r3 = _train_lines(resumed)[-1]
    s3 = _train_lines(straight / "commongen")[-1]
    for k in r3:
        if not k.startswith("time/"):
            assert _same(r3[k], s3[k]), f"{k}: resumed {r3[k]} != uninterrupted {s3[k]}"
    sr, ss = _state(resumed / "policy"), _state(straight / "commongen" / "policy")
    assert all(torch.equal(sr[k], ss[k]) for k in sr)


@needs_data
def test_resume_after_interrupt_keeps_one_metrics_line_per_step(tiny_model, tmp_path):
    """Ctrl-C in iteration 4 with the last checkpoint at iteration 2, then --resume: the run redoes iteration
    3. TensorBoard drops the old events (purge_step); metrics.jsonl must not hold iteration 3 (or the eval of
    step 2) twice either."""
    args = _args("commongen", tiny_model("commongen"), tmp_path, iterations=4, eval_interval=2, save_interval=2,
                 n_epochs=1, kl_coef=0.01, lr=1e-3, run_name="interrupted")
    calls = {"n": 0}
    real_sample = ppo.sample

    def interrupting_sample(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_sample(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ppo, "sample", interrupting_sample)
        with pytest.raises(SystemExit) as e:
            ppo.main(args)
    assert e.value.code == 130
    run_dir = tmp_path / "interrupted"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["iteration"] == 2
    assert [r["step"] for r in _train_lines(run_dir)] == [1, 2, 3]

    ppo.main(ppo.Args(**{**args.__dict__, "resume": str(run_dir)}))
    lines = _read_jsonl(run_dir / "metrics.jsonl")
    train_steps = [r["step"] for r in lines if "objective/reward" in r]
    eval_steps = [r["step"] for r in lines if "eval/reward" in r]
    assert train_steps == [1, 2, 3, 4], f"train steps in metrics.jsonl after resume: {train_steps}"
    assert eval_steps == [0, 2, 4], f"eval steps in metrics.jsonl after resume: {eval_steps}"


# ---------------------------------------------------------------------------------------------------
# 11. torchrun, 2 processes on the CPU
# ---------------------------------------------------------------------------------------------------
def _env(**extra):
    env = dict(os.environ)
    env.update(RLGF_DATA_DIR=str(DATA), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


@needs_data
def test_torchrun_two_processes(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "ppo.py",
           "--task", "tldr", "--policy-model", str(tiny_model("tldr")), "--device", "cpu", "--prompt-tokens", "48",
           "--iterations", "2", "--rollouts-per-iteration", "4", "--minibatch-size", "2", "--n-epochs", "1",
           "--eval-samples", "2", "--final-eval-samples", "2", "--eval-interval", "1", "--output-dir", str(tmp_path),
           "--run-name", "ddp"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    AutoModelForCausalLM.from_pretrained(str(run_dir / "policy"))
    lines = _train_lines(run_dir)
    assert [r["step"] for r in lines] == [1, 2]  # rank 0 alone writes
    assert all(math.isfinite(v) for r in lines for v in r.values())
    init, final = _state(tiny_model("tldr")), _state(run_dir / "policy")
    assert any(not torch.equal(init[k], final[k]) for k in init)


# ---------------------------------------------------------------------------------------------------
# 12. one-line errors
# ---------------------------------------------------------------------------------------------------
def _cli(*argv, **env):
    return subprocess.run([sys.executable, "ppo.py", *argv], cwd=REPO, env=_env(**env), capture_output=True,
                          text=True, timeout=120)


def _assert_one_line_error(p, *words):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    for w in words:
        assert w in lines[0]


def test_cli_unknown_task_is_one_line():
    _assert_one_line_error(_cli("--task", "nope"), "nope", "imdb")


def test_cli_missing_data_is_one_line(tmp_path):
    (tmp_path / "imdb").mkdir()
    _assert_one_line_error(_cli("--task", "imdb", "--data-dir", str(tmp_path)), "train.jsonl")


def _usage_error(args: ppo.Args, match: str):
    with pytest.raises(UsageError, match=match):
        ppo.main.__wrapped__(args)


@pytest.mark.parametrize("kw,match", [
    (dict(rollouts_per_iteration=6, minibatch_size=4), "multiple of --minibatch-size"),
    (dict(rollouts_per_iteration=8, minibatch_size=4, micro_batch_size=3), "--micro-batch-size 3"),
    (dict(min_new_tokens=30, max_new_tokens=20), "exceeds"),
    (dict(lr_schedule="cosine"), "lr-schedule"),
])
def test_bad_settings_raise_usage_error(tmp_path, kw, match):
    _usage_error(ppo.Args(task="commongen", data_dir=str(tmp_path), output_dir=str(tmp_path / "runs"), **kw), match)


def test_batch_sizes_must_divide_over_processes():
    rt.check_batch_sizes(8, 4, 2, 2)
    with pytest.raises(UsageError, match="number of processes"):
        rt.check_batch_sizes(9, 3, 1, 2)
    with pytest.raises(UsageError, match="must divide"):
        rt.check_batch_sizes(8, 4, 4, 2)


def test_unknown_task_and_missing_data_in_process(tmp_path):
    _usage_error(ppo.Args(task="nope"), "unknown task")
    _usage_error(ppo.Args(task="tldr", data_dir=str(tmp_path / "absent")), "does not exist")
    _usage_error(ppo.Args(task="tldr", data_dir=str(tmp_path), output_dir=str(tmp_path / "runs"), iterations=1,
                          rollouts_per_iteration=2, minibatch_size=2), "missing data file")
    # and through the wrapper: exit status 2, one line on stderr
    with pytest.raises(SystemExit) as e:
        ppo.main(ppo.Args(task="nope"))
    assert e.value.code == 2


@needs_data
def test_model_path_that_does_not_exist(tmp_path):
    small = dict(data_dir=str(DATA), output_dir=str(tmp_path / "runs"), iterations=1, rollouts_per_iteration=2,
                 minibatch_size=2, eval_samples=2)
    _usage_error(ppo.Args(task="tldr", policy_model=str(tmp_path / "no" / "such" / "model"), **small), "does not exist")
    _usage_error(ppo.Args(task="tldr", policy_model="./no-such-model", **small), "does not exist")


@needs_data
def test_model_folder_without_a_model_is_one_line(tmp_path):
    """A folder that exists but holds no saved model/tokenizer (a typo'd run folder, say)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    p = _cli("--task", "tldr", "--policy-model", str(empty), "--iterations", "1", "--rollouts-per-iteration", "2",
             "--minibatch-size", "2", "--eval-samples", "2", "--output-dir", str(tmp_path / "runs"))
    _assert_one_line_error(p, str(empty))


@pytest.mark.parametrize("env", [{}, {"MALLOC_MMAP_THRESHOLD_": "1048576"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}])
def test_mmap_threshold_is_fixed_unless_the_user_set_one(monkeypatch, env):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(rt.sys, "platform", "linux")
    monkeypatch.setattr(rt.ctypes, "CDLL", lambda name: FakeLibc())
    for key in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rt.return_freed_memory()
    user_set = "MALLOC_MMAP_THRESHOLD_" in env or "mmap_threshold" in env.get("GLIBC_TUNABLES", "")
    assert calls == ([] if user_set else [(-3, 32 * 1024 * 1024)])


@needs_data
def test_bad_kl_estimator_fails_before_any_work(tiny_model, tmp_path):
    """A typo in --kl-estimator must be caught with the other settings, before models are loaded and a run
    folder is written (not after the initial evaluation, in the first iteration)."""
    args = _args("commongen", tiny_model("commongen"), tmp_path / "runs", kl_estimator="k2")
    _usage_error(args, "kl-estimator")
    assert not (tmp_path / "runs").exists()


def test_sample_with_prefixes_of_different_lengths_stays_inside_the_positions(tiny_model):
    """A long forced prefix next to an empty one: a batch run for the longest remaining budget would go past a
    small model's positions (the embedded TL;DR model: 256 + 50 of 320). `sample` stops every row at its own
    budget, so no position is ever past the limit; the log-probs still equal the training forward's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(tiny_model("tldr"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=40, n_embd=32, n_layer=2, n_head=2,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, "tldr", [20, 18, 20, 15])
    prefixes = [[], queries[0][:15], [], queries[2][:12]]
    MAX = 20  # 20 + 20 fits 40, but one call would need 35 + 20 positions
    out = sample(model, queries, prefixes=prefixes, max_new_tokens=MAX, min_new_tokens=0, eos_id=eos, pad_id=pad)
    full = [p + t for p, t in zip(prefixes, out.tokens)]
    assert all(len(f) <= MAX for f in full)
    qi, qm = left_pad(queries, pad)
    ri, rm = right_pad(full, pad)
    with torch.no_grad():
        lp, _ = forward_response(model, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=0)
    for i, (p, t) in enumerate(zip(prefixes, out.tokens)):
        torch.testing.assert_close(lp[i, len(p): len(p) + len(t)], torch.tensor(out.logprobs[i]), atol=1e-5, rtol=0)
