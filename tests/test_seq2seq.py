"""Encoder-decoder policies (T5): the prompt in the encoder, the response from the decoder.

A tiny random 2-layer T5 (tests/_tiny.py: `build_tiny_t5`, the project's own byte-level tokenizer, pad distinct
from EOS, decoder start token = pad as in T5) stands in for the paper's CommonGen T5. The same properties the
causal tests check: sampling log-probs = training log-probs (with and without forced prefixes), EOS / pad rules,
the ratio 1 on the first minibatch, PPO++ with beta 0 = PPO, the critic on decoder states, guides of either kind,
resume, and every script on every task. A tiny BART (absolute positions, decoder start = EOS) checks what differs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from _tiny import DATA, build_tiny, build_tiny_t5, has_data  # noqa: F401  (also puts the repo on sys.path)
from conftest import DEVICE

import aggrevated  # noqa: E402
import d2lols  # noqa: E402
import lols  # noqa: E402
import ppo  # noqa: E402
import ppo_plus_plus  # noqa: E402
from common import guides, seq2seq  # noqa: E402
from common import runtime as rt  # noqa: E402
from common.generation import (ValueModel, forward_response, is_seq2seq, left_pad,  # noqa: E402
                               preallocated_cache, right_pad, sample)
from common.guides import HFGuide, guide_continue  # noqa: E402
from common.models import load_causal_lm, load_tokenizer  # noqa: E402
from common.seq2seq import decoder_start_id  # noqa: E402

TASKS = ("imdb", "commongen", "tldr")
SCRIPTS = {"ppo": ppo, "ppo_plus_plus": ppo_plus_plus, "aggrevated": aggrevated, "lols": lols, "d2lols": d2lols}
T_TEXT = " the"

pytestmark = pytest.mark.skipif(not all(has_data(t) for t in TASKS),
                                reason=f"local data folder {DATA} (imdb, common_gen, openai_summarize_tldr) is absent")


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """t5(task, kind) -> folder: 'plain' (random), 'eos' (ends often: ragged lengths), 'guideT' (writes T_TEXT
    with probability > 0.99); kind 'gpt2-...' builds the causal twin (same tokenizer)."""
    cache: dict = {}

    def make(task: str, kind: str = "plain") -> Path:
        if (task, kind) not in cache:
            out = tmp_path_factory.mktemp(f"t5-{task}-{kind}")
            if kind.startswith("gpt2"):
                cache[(task, kind)] = build_tiny(task, out, seed=1, favour=T_TEXT if kind == "gpt2-guideT" else None)
            else:
                favour = {"plain": None, "eos": 0, "guideT": T_TEXT}[kind]
                kw = {"favour_logit": 4.0} if kind == "eos" else {}
                cache[(task, kind)] = build_tiny_t5(task, out, seed=0 if kind != "guideT" else 1, favour=favour, **kw)
        return cache[(task, kind)]

    return make


def _queries(tok, n: int, task: str = "tldr") -> list[list[int]]:
    """n prompts of different lengths (3 .. 40 tokens) from the task's train text."""
    from _tiny import train_texts

    stream = tok(" ".join(train_texts(task, 60)), add_special_tokens=False)["input_ids"]
    lengths = [3 + (7 * i) % 38 for i in range(n)]
    out, pos = [], 0
    for k in lengths:
        out.append(stream[pos: pos + k])
        pos += k
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _args(mod, task: str, model: Path, out: Path, **kw):
    base = dict(task=task, policy_model=str(model), data_dir=str(DATA), output_dir=str(out), run_name="run",
                iterations=2, rollouts_per_iteration=4, minibatch_size=2, n_epochs=1, eval_samples=2,
                eval_interval=1000, prompt_tokens=48 if task == "tldr" else None, device="cpu")
    base.update(kw)
    return mod.Args(**base)


# ---------------------------------------------------------------------------------------------------
# 1. loading: the kind comes from the config
# ---------------------------------------------------------------------------------------------------
def test_t5_is_loaded_as_seq2seq_with_dropout_off_and_a_decoder_critic(t5):
    path = t5("commongen")
    tok, policy, ref, critic = rt.build_policy_ref_critic(str(path), "cpu", 64 + 20)
    assert type(policy).__name__ == "T5ForConditionalGeneration" and is_seq2seq(policy) and is_seq2seq(ref)
    assert decoder_start_id(policy) == tok.pad_token_id != tok.eos_token_id
    assert all(m.p == 0.0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    assert all(m.p == 0.0 for m in critic.modules() if isinstance(m, torch.nn.Dropout))
    # the critic: the encoder-decoder backbone without LM head, and a value head on the decoder's states
    assert type(critic.backbone).__name__ == "T5Model" and is_seq2seq(critic)
    assert not any("lm_head" in n for n, _ in critic.named_parameters())
    gpt2 = rt.build_policy_ref_critic(str(t5("commongen", "gpt2")), "cpu", 64 + 20)[1]
    assert not is_seq2seq(gpt2)


# ---------------------------------------------------------------------------------------------------
# 2. sampling log-probs == training log-probs, EOS / pad rules, with and without forced prefixes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.device
@pytest.mark.parametrize("temperature,with_prefixes", [(1.0, False), (0.7, False), (1.0, True), (0.7, True)])
def test_t5_sample_logprobs_equal_training_forward(t5, temperature, with_prefixes):
    path = t5("tldr", "eos")
    tok = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tok, DEVICE)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    MIN, MAX = 4, 16
    queries = _queries(tok, 12)
    g = torch.Generator().manual_seed(1)
    vocab = [t for t in range(len(tok)) if t not in (eos, pad)]
    prefixes = ([[vocab[int(j)] for j in torch.randint(len(vocab), (int(n),), generator=g)]
                 for n in torch.randint(0, 8, (len(queries),), generator=g)] if with_prefixes else None)
    if with_prefixes:
        prefixes[0] = []
        prefixes[1] = [vocab[5]] * MAX  # fills the budget: nothing to sample
        assert len({len(p) for p in prefixes}) >= 4
    torch.manual_seed(0)
    out = sample(model, queries, prefixes=prefixes, max_new_tokens=MAX, min_new_tokens=MIN, eos_id=eos, pad_id=pad,
                 temperature=temperature)
    prefixes = prefixes or [[] for _ in queries]
    full = [p + t for p, t in zip(prefixes, out.tokens)]
    n = [len(f) for f in full]
    ended = [bool(t) and t[-1] == eos for t in out.tokens]
    assert sum(ended) >= 2 and len({k for k, e in zip(n, ended) if e}) >= 2, f"EOS at different positions: {n}"
    for p, t, lp, f in zip(prefixes, out.tokens, out.logprobs, full):
        assert len(lp) == len(t) and all(math.isfinite(x) and x <= 0 for x in lp)
        assert pad not in t and eos not in t[:-1], "pad is never sampled, nothing follows EOS"
        assert eos not in f[:MIN], "EOS is masked before min_new_tokens (the prefix counts)"
        assert len(f) == MAX or f[-1] == eos
    if with_prefixes:
        assert out.tokens[1] == [] and out.logprobs[1] == []

    qi, qm = left_pad(queries, pad, DEVICE)
    ri, rm = right_pad(full, pad, device=DEVICE)
    assert qm[:, 0].sum() < len(queries)  # the queries really are left-padded (the encoder gets them aligned)
    with torch.no_grad():
        lp, ent = forward_response(model, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=MIN,
                                   temperature=temperature, with_entropy=True)
    old = rt.right_pad_float([[0.0] * len(p) + l for p, l in zip(prefixes, out.logprobs)], ri.shape[1], DEVICE)
    learner = rm * (torch.arange(ri.shape[1], device=DEVICE)[None] >= torch.tensor([len(p) for p in prefixes],
                                                                                   device=DEVICE)[:, None])
    assert learner.sum() > 30
    diff = ((lp - old) * learner).abs()
    assert float(diff.max()) < 1e-5, f"max |logp_sample - logp_forward| = {float(diff.max()):.2e}"
    assert torch.all(lp[rm == 0] == 0) and torch.isfinite(ent).all()
    # the forward's EOS mask is what makes them agree: without it the positions before MIN differ
    with torch.no_grad():
        lp0, _ = forward_response(model, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=0,
                                  temperature=temperature)
    assert float(((lp0 - old) * learner)[:, :MIN].abs().sum(1).max()) > 1e-2


@pytest.mark.device
def test_t5_forward_is_one_encoder_decoder_forward_of_each_row(t5):
    """forward_response = log softmax of the model's logits for encoder = the prompt alone, decoder = [start] +
    y[:-1], row by row without any padding: left padding of the batch and the response padding change nothing."""
    path = t5("tldr", "eos")
    tok = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tok, DEVICE)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, 6)
    torch.manual_seed(0)
    out = sample(model, queries, max_new_tokens=12, min_new_tokens=2, eos_id=eos, pad_id=pad)
    qi, qm = left_pad(queries, pad, DEVICE)
    ri, rm = right_pad(out.tokens, pad, device=DEVICE)
    with torch.no_grad():
        lp, _ = forward_response(model, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=2)
        start = decoder_start_id(model)
        for b, (q, y) in enumerate(zip(queries, out.tokens)):
            logits = model(input_ids=torch.tensor([q], device=DEVICE),
                           decoder_input_ids=torch.tensor([[start] + y[:-1]], device=DEVICE)).logits[0].float()
            logits[:, pad] = -float("inf")
            logits[:2, eos] = -float("inf")
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(y, device=DEVICE)[:, None]).squeeze(-1)
            torch.testing.assert_close(lp[b, : len(y)], want, atol=1e-5, rtol=0)


@pytest.mark.device
def test_t5_sampling_cache_is_hf_encoder_decoder_cache_and_matches_the_dynamic_one(t5, monkeypatch):
    from transformers import DynamicCache, EncoderDecoderCache

    path = t5("tldr", "eos")
    tok = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tok, DEVICE)
    queries = _queries(tok, 8)
    prefixes = [[], [7, 8], [9], [], [10, 11, 12], [], [13], []]
    kw = dict(prefixes=prefixes, max_new_tokens=14, min_new_tokens=2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    used, encoder_calls = [], []

    def spy(model, capacity):
        used.append(preallocated_cache(model, capacity))
        return used[-1]

    monkeypatch.setattr(seq2seq, "preallocated_cache", spy)  # sample_seq2seq's cache
    hook = model.get_encoder().register_forward_hook(lambda *a: encoder_calls.append(1))
    torch.manual_seed(0)
    ours = sample(model, queries, **kw)
    assert len(encoder_calls) == 1, "the encoder runs once per sampling call"
    assert isinstance(used[0], EncoderDecoderCache)
    layer = used[0].self_attention_cache.layers[0]
    assert type(layer).__name__ == "PreallocatedLayer" and layer.key_buffer.shape[2] == 14
    assert len(used[0].self_attention_cache.layers) == len(model.decoder.block)
    assert used[0].cross_attention_cache.layers[0].keys.shape[2] == max(len(q) for q in queries)
    monkeypatch.setattr(seq2seq, "preallocated_cache", lambda model, capacity: EncoderDecoderCache(
        DynamicCache(config=model.config), DynamicCache(config=model.config)))
    torch.manual_seed(0)
    plain = sample(model, queries, **kw)
    hook.remove()
    assert len({len(t) for t in plain.tokens}) >= 3, "rows must leave the batch at different steps"
    assert ours.tokens == plain.tokens
    assert max(abs(a - b) for x, y in zip(ours.logprobs, plain.logprobs) for a, b in zip(x, y)) < 1e-6


def test_t5_gradient_checkpointing_changes_no_number(t5):
    """--gradient-checkpointing puts the models in training mode: T5's attention then applies the dropout rate it
    keeps as a number (0.1 here), unless loading set it to 0 too. Same samples, log-probs, values, gradients."""
    path = str(t5("commongen"))
    q = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    got = []
    for checkpointing in (False, True):
        tok, policy, _, critic = rt.build_policy_ref_critic(path, "cpu", 64, gradient_checkpointing=checkpointing)
        assert policy.training == checkpointing
        torch.manual_seed(0)
        out = sample(policy, q, max_new_tokens=8, min_new_tokens=1, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        qi, qm = left_pad(q, tok.pad_token_id)
        ri, rm = right_pad(out.tokens, tok.pad_token_id)
        with torch.no_grad():
            torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(0))
        lp, _ = forward_response(policy, qi, qm, ri, rm, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                 min_new_tokens=1)
        v = critic(qi, qm, ri, rm)
        ((lp * rm).sum() + (v * rm).sum()).backward()
        grads = torch.cat([p.grad.flatten() for m in (policy, critic) for p in m.parameters() if p.grad is not None])
        got.append((out.tokens, lp.detach(), v.detach(), grads))
    assert got[0][0] == got[1][0]
    for a, b in zip(got[0][1:], got[1][1:]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# 3. the critic reads the decoder's states
# ---------------------------------------------------------------------------------------------------
@pytest.mark.device
def test_t5_critic_reads_decoder_states(t5):
    path = t5("tldr")
    tok = load_tokenizer(str(path))
    critic = rt.make_critic(str(path), tok, DEVICE)
    with torch.no_grad():
        torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(0))
    pad = tok.pad_token_id
    queries = _queries(tok, 4)
    responses = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]
    qi, qm = left_pad(queries, pad, DEVICE)
    ri, rm = right_pad(responses, pad, device=DEVICE)
    with torch.no_grad():
        v = critic(qi, qm, ri, rm)
        start = decoder_start_id(critic.backbone)
        for b, (q, y) in enumerate(zip(queries, responses)):
            dec = critic.backbone(input_ids=torch.tensor([q], device=DEVICE),
                                  decoder_input_ids=torch.tensor([[start] + y[:-1]], device=DEVICE)).last_hidden_state
            torch.testing.assert_close(v[b, : len(y)], critic.head(dec[0]).squeeze(-1), atol=1e-5, rtol=0)
        # V(x, y_<t): a later response token changes no earlier value; the prompt (encoder) changes all
        ri2 = ri.clone()
        ri2[0, 3] = 20
        v2 = critic(qi, qm, ri2, rm)
        assert torch.equal(v2[0, :4], v[0, :4]) and v2[0, 4] != v[0, 4]
        qi2 = qi.clone()
        qi2[0, -1] = 21
        assert (critic(qi2, qm, ri, rm)[0, :5] - v[0, :5]).abs().min() > 0
    assert isinstance(critic, ValueModel)


# ---------------------------------------------------------------------------------------------------
# 4. inside the scripts: ratio 1, PPO++ with beta 0 = PPO, resume
# ---------------------------------------------------------------------------------------------------
@pytest.mark.device
def test_t5_ratio_is_one_on_first_minibatch_inside_ppo(t5, tmp_path):
    """One minibatch, one epoch: the only update's ratio is 1 (sampling and training log-probs agree)."""
    args = _args(ppo, "commongen", t5("commongen", "eos"), tmp_path, rollouts_per_iteration=8, minibatch_size=8,
                 iterations=1, device=DEVICE)
    from test_guided import length_reward

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rt, "make_reward", lambda *a, **k: length_reward)  # CommonGen's CIDEr-D index: ~9 s
        ppo.main(args)
    line = [r for r in _jsonl(tmp_path / "run" / "metrics.jsonl") if "objective/reward" in r][0]
    assert abs(line["policy/ratio"] - 1.0) < 1e-5 and line["policy/approx_kl"] < 1e-10
    assert line["policy/clipfrac"] == 0.0


@pytest.mark.device
def test_t5_ppo_plus_plus_beta0_equals_ppo(t5, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model = t5("imdb")
    common = dict(task="imdb", policy_model=str(model), data_dir=str(DATA), iterations=2, rollouts_per_iteration=4,
                  minibatch_size=2, n_epochs=2, eval_samples=4, eval_interval=1, lr=1e-3, kl_coef=0.05,
                  device=DEVICE, run_name="run", seed=3)
    ppo.main(ppo.Args(output_dir=str(tmp_path / "ppo"), **common))
    ppo_plus_plus.main(ppo_plus_plus.Args(output_dir=str(tmp_path / "pp"), beta=0.0, **common))
    a, b = _jsonl(tmp_path / "ppo" / "run" / "metrics.jsonl"), _jsonl(tmp_path / "pp" / "run" / "metrics.jsonl")
    assert len(a) == len(b) >= 5
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith("time/"):
                assert ra[k] == rb[k], f"step {ra['step']}: {k} differs: ppo {ra[k]!r} vs ppo++ {rb[k]!r}"
    pa = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "ppo" / "run" / "policy")).state_dict()
    pb = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "pp" / "run" / "policy")).state_dict()
    init = AutoModelForSeq2SeqLM.from_pretrained(str(model)).state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa), "final policies differ"
    assert any(not torch.equal(pa[k], init[k]) for k in pa), "the policy did not train"


def test_t5_resume_continues_with_the_same_numbers(t5, tmp_path):
    """2 iterations + --resume to 4 == 4 iterations in one go (LOLS: coins, both critics, optimiser)."""
    from test_guided import length_reward, one_token_guide

    kw = dict(seed=2, beta=0.5, p_ppo_pp=0.5, lr=1e-3, lr_schedule="constant")
    model = t5("commongen")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(guides, "build_guide", lambda *a, **k: one_token_guide())
        mp.setattr(rt, "make_reward", lambda *a, **k: length_reward)
        lols.main(_args(lols, "commongen", model, tmp_path, run_name="full", iterations=4, **kw))
        lols.main(_args(lols, "commongen", model, tmp_path, run_name="part", iterations=2, keep_checkpoint=True, **kw))
        lols.main(_args(lols, "commongen", model, tmp_path, run_name="part", iterations=4,
                        resume=str(tmp_path / "part"), **kw))
    full = [r for r in _jsonl(tmp_path / "full" / "metrics.jsonl") if "objective/reward" in r]
    part = [r for r in _jsonl(tmp_path / "part" / "metrics.jsonl") if "objective/reward" in r]
    assert [r["step"] for r in part] == [1, 2, 3, 4] and {r["guide/phase"] for r in full} == {0.0, 1.0}
    for a, b in zip(full, part):
        for k in a:
            if not k.startswith("time/"):
                assert a[k] == b[k], f"step {a['step']}: {k} {a[k]!r} (one go) vs {b[k]!r} (resumed)"
    ca, cb = torch.load(tmp_path / "full" / "critic.pt"), torch.load(tmp_path / "part" / "critic.pt")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


# ---------------------------------------------------------------------------------------------------
# 5. guides of either kind: T5 guide for a T5 learner, causal guide for a T5 learner, T5 guide for a causal one
# ---------------------------------------------------------------------------------------------------
def test_t5_guide_continues_the_forced_prefix_in_its_decoder(t5):
    """A T5 guide gets the prompt in its encoder and the prefix teacher-forced into its decoder: with a guide that
    always writes T, the continuation is T only, whatever the prefix, and the prefix's length counts toward its
    budget and its minimum length."""
    path = t5("commongen", "guideT")
    tok = load_tokenizer(str(path))
    T = tok(T_TEXT, add_special_tokens=False)["input_ids"][0]
    guide = HFGuide(load_causal_lm(str(path), tok, "cpu"), tok, top_p=0.92, min_new_tokens=0, name="t5-guide")
    queries = _queries(tok, 4, "commongen")
    prefixes = [[], [5, 6, 7], [8], [9, 10, 11, 12, 13, 14]]
    out = guide_continue(guide, tok, queries, prefixes, max_new_tokens=10, min_new_tokens=0)
    assert [len(o) for o in out] == [10 - len(p) for p in prefixes]
    assert all(t == T for o in out for t in o)


@pytest.mark.parametrize("learner,guide,algo", [("t5", "t5", "ppo_plus_plus"), ("t5", "gpt2", "aggrevated"),
                                                ("gpt2", "t5", "ppo_plus_plus"), ("t5", "t5", "lols")])
def test_hf_guide_of_either_kind_is_sampled_and_frozen(t5, tmp_path, learner, guide, algo):
    from transformers import AutoModel

    from test_guided import SCRIPTS as GUIDED, analyse, phase_of, run_recorded, t_id

    learner_path = t5("imdb", "plain" if learner == "t5" else "gpt2")
    guide_path = t5("imdb", "guideT" if guide == "t5" else "gpt2-guideT")
    T = t_id(guide_path)
    assert t_id(learner_path) == T
    extra = dict(p_ppo_pp=0.5, iterations=4) if algo == "lols" else {}
    args = _args(GUIDED[algo], "imdb", learner_path, tmp_path, guide_model=str(guide_path), beta=1.0, lr=1e-3,
                 **extra)
    rec, _ = run_recorded(GUIDED[algo], args)
    g = rec.guide_objects[0]
    assert isinstance(g, HFGuide) and is_seq2seq(g.model) == (guide == "t5")
    on_disk = load_causal_lm(str(guide_path), load_tokenizer(str(guide_path)), "cpu").state_dict()
    assert all(torch.equal(g.model.state_dict()[k], on_disk[k]) for k in on_disk), "the guide's weights changed"
    init = AutoModel.from_pretrained(str(learner_path)).state_dict()
    trained = AutoModel.from_pretrained(str(tmp_path / "run" / "policy")).state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in init), "the learner did not train"
    guide_toks, learner_toks = [], []
    for it in rec.iters:
        ro = analyse(it, phase_of(algo, it))
        for (_, ltoks, _), (_, gtoks) in zip(ro.learner_tokens, ro.guide_tokens):
            guide_toks += gtoks
            learner_toks += ltoks
    assert len(guide_toks) > 20 and all(t == T for t in guide_toks), "guide samples do not come from the guide"
    assert len(learner_toks) > 20 and sum(t == T for t in learner_toks) < 0.2 * len(learner_toks)


# ---------------------------------------------------------------------------------------------------
# 6. every script on every task, two iterations, with a tiny T5
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("algo", list(SCRIPTS))
def test_t5_end_to_end_two_iterations(t5, tmp_path, algo, task):
    from transformers import AutoModelForSeq2SeqLM

    mod = SCRIPTS[algo]
    extra = {"tau": 1} if algo == "d2lols" else {"p_ppo_pp": 0.5} if algo == "lols" else {}
    if algo != "ppo":  # the T5 policy is its own guide (the default for a given policy), or the rule guide
        extra["guide"] = "rule" if task != "imdb" and algo in ("ppo_plus_plus", "lols") else "model"
    with pytest.MonkeyPatch.context() as mp:
        if task == "commongen":  # its CIDEr-D index over the train references takes ~9 s: covered by the causal tests
            from test_guided import length_reward

            mp.setattr(rt, "make_reward", lambda *a, **k: length_reward)
        first, final = mod.main(_args(mod, task, t5(task), tmp_path, eval_samples=2, **extra))
    for m in (first, final):
        assert m and all(math.isfinite(v) for v in m.values()), m
    if task == "imdb":
        assert "reference_perplexity" in final
    train = [r for r in _jsonl(tmp_path / "run" / "metrics.jsonl") if "objective/reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(v) for r in train for v in r.values())
    saved = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "run" / "policy"))
    assert type(saved).__name__ == "T5ForConditionalGeneration"


# ---------------------------------------------------------------------------------------------------
# 7. LoRA on a T5: seq2seq adapters, the adapter-off base as reference and guide
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["ppo", "lols"])
def test_t5_with_lora_trains_only_adapters_with_ratio_one(t5, tmp_path, algo):
    """--lora-r on a T5 policy: peft's seq2seq adapter, the first minibatch's ratio 1, KL 0 before training (the
    reference is the adapter-off base), the base weights unchanged, the adapter saved; LOLS with its guide being
    the policy's own start model (the adapter-off base) and two critic adapters."""
    from test_guided import length_reward

    mod = SCRIPTS[algo]
    model = t5("commongen")
    extra = {"p_ppo_pp": 0.5, "seed": 2, "guide": "model"} if algo == "lols" else {}
    with pytest.MonkeyPatch.context() as mp:
        built = []
        real = rt.build_policy_ref_critic
        mp.setattr(rt, "build_policy_ref_critic", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
        mp.setattr(rt, "make_reward", lambda *a, **k: length_reward)
        mod.main(_args(mod, "commongen", model, tmp_path, lora_r=4, lora_alpha=8.0, lr=1e-2, minibatch_size=4,
                       merge_lora=algo == "ppo", **extra))
    train = [r for r in _jsonl(tmp_path / "run" / "metrics.jsonl") if "objective/reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["policy/ratio"] == pytest.approx(1.0, abs=1e-5) and abs(train[0]["objective/kl"]) < 1e-5
    if algo == "lols":
        assert {r["guide/phase"] for r in train} == {0.0, 1.0}
    policy = built[0][1]
    fresh = load_causal_lm(str(model), load_tokenizer(str(model)), "cpu").state_dict()
    base = {n.replace(".base_layer", ""): p for n, p in policy.lm.state_dict().items() if "lora_" not in n}
    assert all(torch.equal(base[k], fresh[k]) for k in fresh), "a base weight moved"
    cfg = json.loads((tmp_path / "run" / "policy" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM"
    if algo == "ppo":  # the merged copy is a plain T5 folder
        from transformers import AutoModelForSeq2SeqLM

        assert type(AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "run" / "policy-merged"))).__name__ == \
            "T5ForConditionalGeneration"


# ---------------------------------------------------------------------------------------------------
# 8. BART: absolute positions on each side, decoder start = EOS, a tokenizer that adds <s> ... </s>
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bart(tmp_path_factory) -> Path:
    from _tiny import build_tiny_bart

    return build_tiny_bart("commongen", tmp_path_factory.mktemp("bart"))


def test_bart_logprobs_equal_the_training_forward_and_each_row_alone(bart):
    """Sampling log-probs = the training forward's = the model's own log-softmax for each row run alone, without
    padding: BART numbers the encoder's tokens from the first column, so a left-padded prompt would be read at
    other positions; the decoder starts from EOS."""
    from common.tasks import encode_prompt, get_task

    tok, policy, _, critic = rt.build_policy_ref_critic(str(bart), "cpu", 48 + 12)
    assert type(policy).__name__ == "BartForConditionalGeneration" and decoder_start_id(policy) == tok.eos_token_id
    assert all(m.p == 0.0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    assert type(critic.backbone).__name__ == "BartModel"
    eos, pad, bos = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
    task = get_task("commongen")
    from _tiny import train_texts

    queries = [encode_prompt(task, tok, " ".join(t.split()[:n]), 48)
               for t, n in zip(train_texts("commongen", 6), (2, 9, 4, 14, 6, 11))]
    assert all(q[0] == bos and q[-1] == eos for q in queries) and len({len(q) for q in queries}) == 6
    torch.manual_seed(0)
    out = sample(policy, queries, max_new_tokens=12, min_new_tokens=2, eos_id=eos, pad_id=pad)
    qi, qm = left_pad(queries, pad)
    ri, rm = right_pad(out.tokens, pad)
    with torch.no_grad():
        lp, _ = forward_response(policy, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=2)
        for b, (q, y) in enumerate(zip(queries, out.tokens)):
            assert abs(sum(out.logprobs[b]) - float(lp[b, : len(y)].sum())) < 1e-4
            logits = policy(input_ids=torch.tensor([q]), decoder_input_ids=torch.tensor([[eos] + y[:-1]])).logits[0]
            logits[:, pad] = -float("inf")
            logits[:2, eos] = -float("inf")
            want = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(y)[:, None]).squeeze(-1)
            torch.testing.assert_close(lp[b, : len(y)], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("algo", ["ppo", "ppo_plus_plus"])
def test_bart_inside_the_scripts_ratio_one_and_its_own_guide(bart, tmp_path, algo):
    """One minibatch, one epoch: ratio 1; PPO++ with the BART start model as its guide; the policy saves as BART."""
    from transformers import AutoModelForSeq2SeqLM

    from test_guided import length_reward

    mod = SCRIPTS[algo]
    extra = {"guide": "model"} if algo == "ppo_plus_plus" else {}
    args = _args(mod, "commongen", bart, tmp_path, iterations=1, rollouts_per_iteration=4, minibatch_size=4, **extra)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rt, "make_reward", lambda *a, **k: length_reward)  # CommonGen's CIDEr-D index: ~9 s
        first, final = mod.main(args)
    assert all(math.isfinite(v) for v in {**first, **final}.values())
    line = [r for r in _jsonl(tmp_path / "run" / "metrics.jsonl") if "objective/reward" in r][0]
    assert abs(line["policy/ratio"] - 1.0) < 1e-5 and line["policy/approx_kl"] < 1e-10
    if algo == "ppo_plus_plus":
        assert line["guide/guide_tokens"] > 0
    saved = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "run" / "policy"))
    assert type(saved).__name__ == "BartForConditionalGeneration"
