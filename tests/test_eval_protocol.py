"""Evaluation as the paper evaluates (common/runtime.py `evaluate`, `search`): greedy and beam search are
transformers' own `generate`, token for token, in a left-padded batch as one row at a time; the KL is scored
under the policy; the evaluation settings change no training number; the presets' evaluation settings; the
official code's moving guide (`--guide learner`); kept policies evaluated again (benchmarks/reproduce.py
--rescore, --keep-policy)."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny import build_tiny, build_tiny_t5, favour_token
from conftest import DATA, needs_data

import ppo
import ppo_plus_plus
from common import presets
from common import guides, resume
from common.start_eval import copied_start_eval
from common import runtime as rt
from common.errors import UsageError
from common.settings import finish_settings
from common.models import load_causal_lm, load_tokenizer
from common.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import reproduce  # noqa: E402


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """A tiny CommonGen learner whose EOS is likelier than by chance, so greedy and beam responses end at ragged
    lengths."""
    out = build_tiny("commongen", tmp_path_factory.mktemp("tiny-eval"), seed=3)
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(out))
    m = AutoModelForCausalLM.from_pretrained(str(out))
    favour_token(m, tok.eos_token_id, 0.5)
    m.save_pretrained(out)
    return out


def _queries(task, tok, n=6, prompt_tokens=32):
    val = task.load("validation", str(DATA), limit=n)
    return val, rt.encode_prompts(task, tok, val, prompt_tokens)


def _generate_one(model, q, tok, **kw):
    """transformers' generate on one unpadded prompt, cut as `search` cuts (after EOS, no padding)."""
    ids = torch.tensor([q])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         suppress_tokens=[tok.pad_token_id], **kw)
    row = out[0, 0 if model.config.is_encoder_decoder else ids.shape[1]:].tolist()
    row = row[1:] if model.config.is_encoder_decoder else row
    return row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row


@needs_data
@pytest.mark.parametrize("beams", [1, 5])
def test_search_is_generate_token_for_token_and_batch_equals_one_row_at_a_time(ragged, beams):
    task = get_task("commongen")
    tok = load_tokenizer(str(ragged))
    model = load_causal_lm(str(ragged), tok, torch.device("cpu"))
    _, q = _queries(task, tok)
    assert len({len(x) for x in q}) > 1  # prompts of several lengths: the batch is left-padded
    kw = dict(max_new_tokens=20, min_new_tokens=5)
    batch = rt.search(model, q, num_beams=beams, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, device="cpu",
                      **kw)
    alone = [rt.search(model, [x], num_beams=beams, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                       device="cpu", **kw)[0] for x in q]
    reference = [_generate_one(model, x, tok, num_beams=beams, **kw) for x in q]
    assert batch == alone == reference
    assert all(5 <= len(r) <= 20 for r in batch)
    assert len({len(r) for r in batch}) > 1  # ragged: some end with EOS before the budget
    assert any(r[-1] == tok.eos_token_id for r in batch)
    assert all(tok.pad_token_id not in r for r in batch)


@needs_data
def test_beam_search_of_an_encoder_decoder_model_is_generate(tmp_path):
    task = get_task("commongen")
    path = build_tiny_t5("commongen", tmp_path / "t5", favour=0, favour_logit=3.0)  # EOS (id 0) likely
    tok = load_tokenizer(str(path))
    model = load_causal_lm(str(path), tok, torch.device("cpu"))
    _, q = _queries(task, tok, n=4)
    got = rt.search(model, q, num_beams=3, max_new_tokens=12, min_new_tokens=2, eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id, device="cpu")
    assert got == [_generate_one(model, x, tok, num_beams=3, max_new_tokens=12, min_new_tokens=2) for x in q]


@needs_data
@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_evaluate_decodes_with_generate_scores_kl_under_the_policy_and_leaves_the_random_streams(ragged, decoding):
    from common.generation import decode, forward_response, left_pad, right_pad
    from common.rewards import CommonGenReward

    task = get_task("commongen")
    tok = load_tokenizer(str(ragged))
    policy = load_causal_lm(str(ragged), tok, torch.device("cpu"))
    ref = load_causal_lm(str(ragged), tok, torch.device("cpu"))
    with torch.no_grad():  # the policy moves away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    val, q = _queries(task, tok)
    settings = dataclasses.make_dataclass("S", [])()
    for k, v in dict(prompt_tokens=32, max_new_tokens=20, min_new_tokens=5, temperature=1.0,
                     eval_decoding=decoding, eval_num_beams=4).items():
        setattr(settings, k, v)
    reward = CommonGenReward([e.references for e in task.load("train", str(DATA), limit=50)])
    states = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    metrics, rows = rt.evaluate(policy, ref, tok, task, val, reward, settings, "cpu")
    assert torch.equal(states[0], torch.random.get_rng_state()) and states[1] == random.getstate()
    assert (states[2] == np.random.get_state()[1]).all()
    beams = 4 if decoding == "beam" else 1
    chosen = [_generate_one(policy, x, tok, num_beams=beams, max_new_tokens=20, min_new_tokens=5) for x in q]
    assert [r[1] for r in rows] == decode(tok, chosen)
    qi, qm = left_pad(q, tok.pad_token_id)
    ri, rm = right_pad(chosen, tok.pad_token_id)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, min_new_tokens=5)
    with torch.no_grad():
        lp = forward_response(policy, qi, qm, ri, rm, **kw)[0]
        ref_lp = forward_response(ref, qi, qm, ri, rm, **kw)[0]
    assert metrics["kl"] == pytest.approx(float(((lp - ref_lp) * rm).sum(1).mean()), rel=1e-5, abs=1e-6)
    assert abs(metrics["kl"]) > 1e-3
    assert metrics["prompts"] == len(val) and metrics["response_length"] == pytest.approx(rm.sum().item() / len(val))


def _ppo_args(model, out, name, **kw):
    base = dict(task="commongen", policy_model=str(model), data_dir=str(DATA), output_dir=str(out), run_name=name,
                iterations=2, rollouts_per_iteration=4, minibatch_size=2, n_epochs=1, eval_samples=2,
                eval_interval=1, lr=1e-3, device="cpu")
    return ppo.Args(**{**base, **kw})


def _lines(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _training(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in _lines(run_dir)
            if "objective/reward" in r]


@needs_data
def test_evaluation_settings_change_no_training_number_and_say_what_they_used(ragged, tmp_path):
    """Beam evaluation on 2 periodic and 3 final prompts against today's sampled evaluation on 2: the same
    training rows, number for number; eval.json and metrics.jsonl say which decoding and how many prompts."""
    first, final = ppo.main(_ppo_args(ragged, tmp_path, "beam", eval_decoding="beam", eval_num_beams=3,
                                      final_eval_samples=3))
    ppo.main(_ppo_args(ragged, tmp_path, "sample", eval_decoding="sample"))
    assert _training(tmp_path / "beam") == _training(tmp_path / "sample")
    saved = json.loads((tmp_path / "beam" / "eval.json").read_text())
    assert saved["evaluation"] == {"decoding": "beam", "num_beams": 3, "min_new_tokens": 5, "max_new_tokens": 20,
                                   "periodic_prompts": 2, "final_prompts": 3}
    assert saved["initial"] == first and saved["final"] == final and first["prompts"] == final["prompts"] == 3
    lines = _lines(tmp_path / "beam")
    assert [(r["step"], r["eval/prompts"]) for r in lines if "eval/reward" in r] == [(0, 2), (1, 2), (2, 2)]
    assert [(r["step"], r["final_eval/prompts"]) for r in lines if "final_eval/reward" in r] == [(0, 3), (2, 3)]
    assert abs(first["kl"]) < 1e-4  # before training the policy is the reference
    sampled = json.loads((tmp_path / "sample" / "eval.json").read_text())["evaluation"]
    assert sampled["decoding"] == "sample" and sampled["periodic_prompts"] == sampled["final_prompts"] == 2


@needs_data
def test_start_eval_from_copies_the_start_evaluations_and_changes_no_training_number(ragged, tmp_path, monkeypatch):
    """--start-eval-from: a run copies another run's step-0 evaluations (periodic and final prompts) instead of
    evaluating its start; its training rows, later evaluations and eval.json's numbers are the other run's, number
    for number (evaluate restores the random streams), and eval.json says where the start's came from. Settings
    that decide the start's evaluation, a folder without a start evaluation: one-line errors before any model."""
    kw = dict(eval_decoding="beam", eval_num_beams=3, final_eval_samples=3)
    first, final = ppo.main(_ppo_args(ragged, tmp_path, "a", **kw))
    made = []
    real = rt.evaluate
    monkeypatch.setattr(rt, "evaluate", lambda *a, **k: made.append(k["step"]) or real(*a, **k))
    first_b, final_b = ppo.main(_ppo_args(ragged, tmp_path, "b", start_eval_from=str(tmp_path / "a"), **kw))
    assert 0 not in made and made  # the start was not evaluated; the later evaluations were
    assert first_b == first and final_b == final
    assert _training(tmp_path / "b") == _training(tmp_path / "a")
    drop_time = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert drop_time(_lines(tmp_path / "b")) == drop_time(_lines(tmp_path / "a"))
    saved_a, saved_b = (json.loads((tmp_path / r / "eval.json").read_text()) for r in "ab")
    assert saved_b["evaluation"] == {**saved_a["evaluation"], "start_copied_from": str(tmp_path / "a")}
    assert (saved_b["initial"], saved_b["final"]) == (saved_a["initial"], saved_a["final"])
    for change, words in ((dict(eval_num_beams=2), ["(--eval-num-beams 3, not 2)"]),
                          (dict(final_eval_samples=4), ["(--final-eval-samples 3, not 4)"])):
        with pytest.raises(UsageError) as e:
            finish_settings(_ppo_args(ragged, tmp_path, "c", start_eval_from=str(tmp_path / "a"),
                                      **{**kw, **change}), "ppo")
        assert all(w in str(e.value) for w in words), str(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "args.json").write_text((tmp_path / "a" / "args.json").read_text())
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    for src, words in ((tmp_path / "nowhere", ["cannot read"]), (tmp_path / "empty", ["no evaluation at step 0"])):
        with pytest.raises(UsageError) as e:
            finish_settings(_ppo_args(ragged, tmp_path, "c", start_eval_from=str(src), **kw), "ppo")
        assert all(w in str(e.value) for w in words), str(e.value)
    half = tmp_path / "half"  # stopped after the start's periodic evaluation, before the final prompts'
    half.mkdir()
    (half / "args.json").write_text((tmp_path / "a" / "args.json").read_text())
    (half / "metrics.jsonl").write_text("".join(l + "\n" for l in (tmp_path / "a" / "metrics.jsonl").read_text()
                                                .splitlines() if "final_eval/" not in l))
    with pytest.raises(UsageError, match="no evaluation on the final prompts"):
        copied_start_eval(finish_settings(_ppo_args(ragged, tmp_path, "c", start_eval_from=str(half), **kw),
                                             "ppo"), None, final_differs=True)


@pytest.mark.whole_final_split
def test_presets_evaluate_as_the_paper_except_the_embedded_one(monkeypatch):
    monkeypatch.setattr(presets, "_hub_unreachable", lambda ids: [])
    fill = lambda task, preset: presets.fill_presets(ppo.Args(task=task), task, preset)  # noqa: E731
    for preset in ("paper", "smollm2"):
        cg, tl, im = fill("commongen", preset), fill("tldr", preset), fill("imdb", preset)
        assert (cg.eval_decoding, cg.eval_num_beams, cg.final_eval_samples) == ("beam", 5, 0)
        assert (tl.eval_decoding, tl.final_eval_samples) == ("greedy", 0)
        assert (im.eval_decoding, im.final_eval_samples) == ("sample", 0)
    for task in ("imdb", "commongen", "tldr"):  # the embedded defaults evaluate as they always have
        e = fill(task, "embedded")
        assert (e.eval_decoding, e.final_eval_samples) == ("sample", None)
    # a flag given wins over the preset
    given = presets.fill_presets(ppo.Args(task="commongen", eval_decoding="greedy", final_eval_samples=50),
                                 "commongen", "paper")
    assert (given.eval_decoding, given.final_eval_samples) == ("greedy", 50)


@needs_data
def test_final_eval_set_is_the_whole_split_for_0_and_the_periodic_one_for_none():
    task = get_task("commongen")
    val = task.load("validation", str(DATA), limit=4)
    args = lambda n: dataclasses.replace(ppo.Args(task="commongen"), eval_samples=4, final_eval_samples=n)  # noqa
    assert rt.final_eval_set(task, str(DATA), args(None), val) is val
    assert rt.final_eval_set(task, str(DATA), args(4), val) is val
    assert len(rt.final_eval_set(task, str(DATA), args(7), val)) == 7
    assert len(rt.final_eval_set(task, str(DATA), args(0), val)) == len(task.load("validation", str(DATA)))


@pytest.mark.parametrize("change, words", [
    (dict(eval_decoding="nucleus"), ["--eval-decoding", "sample, greedy or beam"]),
    (dict(eval_num_beams=0), ["--eval-num-beams", "at least 1"]),
    (dict(final_eval_samples=-1), ["--final-eval-samples", "0 or more"]),
])
def test_bad_evaluation_settings_are_one_line_errors(change, words):
    args = dataclasses.replace(presets.fill_presets(ppo.Args(task="commongen"), "commongen", "embedded"),
                               min_new_tokens=5, max_new_tokens=20, micro_batch_size=16, **change)
    with pytest.raises(UsageError) as e:
        rt.check_settings(args, 1)
    assert all(w in str(e.value) for w in words)


def test_a_resumed_run_from_before_these_settings_keeps_evaluating_as_it_did(tmp_path, monkeypatch):
    old = {k: v for k, v in dataclasses.asdict(ppo.Args(task="commongen", eval_samples=100)).items()
           if k not in ("eval_decoding", "eval_num_beams", "final_eval_samples")}
    (tmp_path / "args.json").write_text(json.dumps({"script": "ppo", **old}))
    monkeypatch.setattr(rt, "_CLI_GIVEN", set())
    args = resume.resume_settings(ppo.Args(resume=str(tmp_path)), "ppo")
    assert (args.eval_decoding, args.final_eval_samples, args.eval_samples) == ("sample", 100, 100)


# ---------------------------------------------------------------------------------------------------
# --guide learner: the official code's moving guide
# ---------------------------------------------------------------------------------------------------
@needs_data
def test_the_learner_guide_samples_the_current_weights(tmp_path):
    task = get_task("commongen")
    path = build_tiny("commongen", tmp_path / "m", seed=5)
    tok = load_tokenizer(str(path))
    policy = load_causal_lm(str(path), tok, torch.device("cpu"))
    guide = guides.build_guide("learner", task, None, None, "cpu", top_p=0.92, top_k=0, temperature=1.0,
                               min_new_tokens=2, policy=policy)
    assert guide.model is policy and guide.top_p == 0.92
    assert all(p.requires_grad for p in policy.parameters())  # still trained: the guide freezes nothing
    prompts = [e.prompt for e in task.load("validation", str(DATA), limit=4)]
    favoured = tok(" the", add_special_tokens=False)["input_ids"]
    assert len(favoured) == 1
    torch.manual_seed(0)
    before = guide.complete(prompts, [""] * 4, [10] * 4)
    assert not all(set(tok(t, add_special_tokens=False)["input_ids"]) <= set(favoured) for t, _ in before)
    favour_token(policy, favoured[0], 14.0)  # the learner's weights change: now it (nearly) always writes " the"
    torch.manual_seed(0)
    after = guide.complete(prompts, [""] * 4, [10] * 4)
    assert all(text == " the" * 10 for text, _ in after), after
    # a frozen model guide of the same start model does not follow the learner
    frozen = guides.build_guide("model", task, str(path), None, "cpu", top_p=0.92, top_k=0, temperature=1.0,
                                min_new_tokens=2, policy=policy)
    torch.manual_seed(0)
    assert frozen.complete(prompts, [""] * 4, [10] * 4) == before


def test_learner_guide_settings_are_checked():
    args = dataclasses.replace(presets.fill_presets(ppo_plus_plus.Args(task="commongen"), "commongen", "embedded"),
                               min_new_tokens=5, max_new_tokens=20, micro_batch_size=16, guide="learner")
    rt.check_settings(args, 1)
    with pytest.raises(UsageError, match="--guide-model is not used with --guide learner"):
        rt.check_settings(dataclasses.replace(args, guide_model="some/folder"), 1)
    with pytest.raises(UsageError, match="--guide learner does not run under --fsdp"):
        rt.check_settings(dataclasses.replace(args, fsdp=True), 1)


@needs_data
def test_ppo_plus_plus_runs_with_the_learner_guide(ragged, tmp_path):
    args = ppo_plus_plus.Args(task="commongen", policy_model=str(ragged), data_dir=str(DATA), output_dir=str(tmp_path),
                              run_name="moving", iterations=1, rollouts_per_iteration=4, minibatch_size=2,
                              n_epochs=1, eval_samples=2, device="cpu", guide="learner", beta=1.0)
    ppo_plus_plus.main(args)
    train = [r for r in _lines(tmp_path / "moving") if "objective/reward" in r]
    assert train[0]["guide/mix_fraction"] > 0 and json.loads((tmp_path / "moving" / "args.json").read_text())[
        "guide"] == "learner"


# ---------------------------------------------------------------------------------------------------
# kept policies, evaluated again without training (benchmarks/reproduce.py --keep-policy, --rescore)
# ---------------------------------------------------------------------------------------------------
def test_prune_keeps_the_policy_only_when_asked(tmp_path):
    for keep in (False, True):
        d = tmp_path / f"run-{keep}"
        (d / "policy").mkdir(parents=True)
        for name in ("args.json", "eval.json", "metrics.jsonl", "critic.pt", "checkpoint.pt", "events.out.x",
                     "rescore-greedy-3.json"):
            (d / name).write_text("{}")
        (d / "policy-merged").mkdir()
        reproduce.prune_run(d, keep_policy=keep)
        assert sorted(p.name for p in d.iterdir()) == sorted(
            ["args.json", "eval.json", "metrics.jsonl", "rescore-greedy-3.json"] + (["policy"] if keep else []))


@needs_data
@pytest.mark.parametrize("lora", [False, True])
def test_rescore_evaluates_a_kept_policy_as_the_run_would(ragged, tmp_path, lora):
    """A finished run (full fine-tuning, or LoRA: only the adapter kept) re-scored greedily on 3 prompts gives what
    the run itself computes with --eval-decoding greedy --final-eval-samples 3."""
    extra = dict(lora_r=4, lora_alpha=8.0, lr=1e-2) if lora else {}
    _, final = ppo.main(_ppo_args(ragged, tmp_path, "run", eval_decoding="greedy", final_eval_samples=3, **extra))
    run_dir = tmp_path / "run"
    assert (run_dir / "policy" / ("adapter_config.json" if lora else "config.json")).is_file()
    out = reproduce.rescore_run(run_dir, "greedy", 5, 3)
    assert out["evaluation"]["decoding"] == "greedy" and out["evaluation"]["final_prompts"] == 3
    for k in ("reward", "cider", "response_length"):
        assert out["final"][k] == pytest.approx(final[k], abs=1e-6), k
    assert out["final"]["kl"] == pytest.approx(final["kl"], abs=1e-3)
    assert abs(out["initial"]["kl"]) < 1e-4
    assert json.loads((run_dir / "rescore-greedy-3.json").read_text()) == json.loads(json.dumps(out))
