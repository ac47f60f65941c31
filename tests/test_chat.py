"""--chat-template (common/chat.py): the task's prompt as the user turn, the response as the assistant turn.

A tiny random Llama with a byte-level BPE tokenizer that carries a ChatML template (system turn, like SmolLM2's)
and the end-of-turn token `<|im_end|>` next to the tokenizer's own EOS `<|endoftext|>`, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ppo
from common import runtime as rt
from common.chat import setup_chat, task_ids, wrap
from common.errors import UsageError
from common.generation import forward_response, left_pad, right_pad, sample
from common.guides import CallableGuide, HFGuide, guide_continue
from common.models import load_causal_lm, load_tokenizer
from common.tasks import encode_prompt, get_task
from conftest import DATA, needs_data, train_texts, train_tokenizer

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PROMPT = "generate a sentence with: dog frisbee catch throw."


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-chat-llama")
    tok = train_tokenizer(train_texts("commongen"), 400, out)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _tok(path, mode="auto"):
    tok = load_tokenizer(str(path))
    return tok, setup_chat(tok, mode)


def test_chat_prompt_is_the_user_turn_and_truncation_cuts_the_task_text(chat_model):
    tok, mode = _tok(chat_model)
    assert mode == "on"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end != tok.pad_token_id  # the end-of-turn token is the EOS
    task = get_task("commongen")
    q = encode_prompt(task, tok, PROMPT, 64)
    hf = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    assert q == list(hf["input_ids"] if hasattr(hf, "keys") else hf)
    assert tok.decode(task_ids(tok, q)) == PROMPT
    # a prompt over the limit: the task text is cut (its end kept, the task's rule), the template stays whole
    plain = tok(PROMPT, add_special_tokens=False)["input_ids"]
    cut = encode_prompt(task, tok, PROMPT, 5)
    assert task_ids(tok, cut) == plain[-5:] and cut == wrap(tok, plain[-5:])
    assert len(cut) == len(q) - len(plain) + 5


def test_chat_off_gives_the_plain_ids(chat_model, tiny_model):
    task = get_task("commongen")
    tok, mode = _tok(chat_model, "off")
    assert mode == "off" and tok.eos_token == "<|endoftext|>"
    plain = tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert encode_prompt(task, tok, PROMPT, 64) == plain and encode_prompt(task, tok, PROMPT, 5) == plain[-5:]
    # auto without a template is off; on without one is a one-line error
    tok2, mode2 = _tok(tiny_model("commongen"), "auto")
    assert mode2 == "off" and encode_prompt(task, tok2, PROMPT, 64) == tok2(PROMPT, add_special_tokens=False)["input_ids"]
    with pytest.raises(UsageError, match="no chat template"):
        setup_chat(load_tokenizer(str(tiny_model("commongen"))), "on")
    with pytest.raises(UsageError, match="auto, on or off"):
        setup_chat(tok2, "yes")


def test_chat_sampling_logprobs_equal_training_forward(chat_model):
    tok, _ = _tok(chat_model)
    model = load_causal_lm(str(chat_model), tok, "cpu")
    task = get_task("commongen")
    prompts = [" ".join(t.split()[:n]) for t, n in zip(train_texts("commongen", 6), (3, 9, 5, 12, 2, 7))]
    queries = [encode_prompt(task, tok, p, 32) for p in prompts]
    torch.manual_seed(0)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    out = sample(model, queries, max_new_tokens=12, min_new_tokens=2, eos_id=eos, pad_id=pad)
    qi, qm = left_pad(queries, pad)
    ri, rm = right_pad(out.tokens, pad)
    with torch.no_grad():
        lp, _ = forward_response(model, qi, qm, ri, rm, eos_id=eos, pad_id=pad, min_new_tokens=2)
    old = rt.right_pad_float(out.logprobs, ri.shape[1], "cpu")
    assert float(((lp - old) * rm).abs().max()) < 1e-5
    assert all(pad not in t for t in out.tokens)


class _Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, model, queries, **kw):
        self.calls.append((queries, kw))
        return self.fn(model, queries, **kw)


def test_guide_gets_the_task_text_and_keeps_its_own_template(chat_model, monkeypatch):
    import common.guides as guides

    task = get_task("commongen")
    tok, _ = _tok(chat_model)  # the learner, chat template on
    queries = [encode_prompt(task, tok, PROMPT, 5), encode_prompt(task, tok, PROMPT, 64)]
    prefixes = [tok(" a dog", add_special_tokens=False)["input_ids"], []]
    texts = [tok.decode(task_ids(tok, q)) for q in queries]
    # a callable guide gets the task's text, without the learner's template
    seen = []
    guide_continue(CallableGuide(lambda p, x: seen.append((p, x)) or [" ok."] * len(p)), tok, queries, prefixes,
                   max_new_tokens=8, min_new_tokens=1)
    assert seen == [(texts, [" a dog", ""])]
    # a model guide puts its own template around that text; the prefix continues its assistant turn
    rec = _Recorder(guides.sample)
    monkeypatch.setattr(guides, "sample", rec)
    for mode, templated in (("auto", True), ("off", False)):
        g = guides.build_guide("model", task, str(chat_model), None, "cpu", top_p=0.92, top_k=0, temperature=1.0,
                               min_new_tokens=1, chat_template=mode)
        assert isinstance(g, HFGuide)
        first = len(rec.calls)
        guide_continue(g, tok, queries, prefixes, max_new_tokens=8, min_new_tokens=1)
        gq, kw = rec.calls[first]  # the first round asks for every row (a later one continues unfinished rows)
        plain = [g.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        assert gq == ([wrap(g.tok, p) for p in plain] if templated else plain)
        assert (g.tok.chat_format is not None) == templated
        assert kw["prefixes"] == [g.tok(" a dog", add_special_tokens=False)["input_ids"], []]
        assert kw["eos_id"] == g.tok.convert_tokens_to_ids("<|im_end|>" if templated else "<|endoftext|>")


@needs_data
def test_ppo_main_samples_trains_and_evaluates_on_templated_prompts(chat_model, tmp_path, monkeypatch):
    rec_train, rec_eval, fwd = _Recorder(ppo.sample), _Recorder(rt.sample), []
    real_fwd = ppo.forward_response

    def rec_fwd(model, qi, qm, ri, rm, **kw):
        if kw.get("with_entropy"):
            fwd.append((qi.clone(), qm.clone(), kw["eos_id"]))
        return real_fwd(model, qi, qm, ri, rm, **kw)

    monkeypatch.setattr(ppo, "sample", rec_train)
    monkeypatch.setattr(rt, "sample", rec_eval)
    monkeypatch.setattr(ppo, "forward_response", rec_fwd)
    args = ppo.Args(task="commongen", policy_model=str(chat_model), data_dir=str(DATA), output_dir=str(tmp_path),
                    run_name="chat", iterations=1, rollouts_per_iteration=4, minibatch_size=4, n_epochs=1,
                    eval_samples=2, eval_interval=1, max_new_tokens=6, device="cpu",
                    eval_decoding="sample")  # the evaluation's queries are recorded from its sampling calls
    ppo.main(args)
    tok, _ = _tok(chat_model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((tmp_path / "chat" / "args.json").read_text())["chat_template"] == "on"
    (queries, kw), = rec_train.calls
    assert kw["eos_id"] == im_end and kw["pad_id"] == tok.pad_token_id
    assert all(q == wrap(tok, task_ids(tok, q)) for q in queries)
    # the training forward scores the very same query ids, with the same EOS
    qi, qm, eos = fwd[0]
    assert eos == im_end
    assert sorted(qi[i][qm[i].bool()].tolist() for i in range(len(qi))) == sorted(queries)
    for q, kw in rec_eval.calls:  # evaluation: the same template
        assert kw["eos_id"] == im_end and all(x == wrap(tok, task_ids(tok, x)) for x in q)


@needs_data
def test_few_shot_guide_puts_solved_train_examples_in_its_own_template(chat_model, tmp_path, monkeypatch):
    """`--guide-model smollm2-commongen-2shot`: the alias's model with training examples as earlier turns of its
    chat template; the weights are the alias's own (linked), the learner's prompts stay as they were."""
    import shutil

    from common import embedded

    monkeypatch.setenv("RLGF_CACHE_DIR", str(tmp_path))
    shutil.copytree(chat_model, tmp_path / "smollm2")  # stands in for the converted SmolLM2
    (tmp_path / "smollm2" / "DONE").write_text("ok\n")
    folder = Path(embedded.resolve_model_alias("smollm2-commongen-2shot", log=lambda *a: None, data_dir=str(DATA)))
    assert folder == tmp_path / "smollm2-commongen-2shot"
    info = json.loads((folder / "info.json").read_text())
    train = get_task("commongen").load("train", str(DATA))
    shots = [train[i] for i in info["few_shot"]["train_rows"]]
    assert len(shots) == 2
    gtok, mode = _tok(folder)
    assert mode == "on"
    before = gtok.decode(gtok.chat_format.before)
    for e in shots:  # each example: its prompt as a user turn, its first reference as the assistant's answer
        assert f"<|im_start|>user\n{e.prompt}<|im_end|>\n<|im_start|>assistant\n{e.references[0].strip()}<|im_end|>" in before
    assert before.startswith("<|im_start|>system\n") and before.endswith("<|im_start|>user\n")
    tok, _ = _tok(chat_model)
    assert gtok.chat_format.after == tok.chat_format.after and gtok.eos_token_id == tok.eos_token_id
    # same weights as the base model
    base, fs = load_causal_lm(str(chat_model), tok, "cpu"), load_causal_lm(str(folder), gtok, "cpu")
    ids = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, fs(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------------
# the tokenizer's own special tokens with the template off: a BOS ahead (Llama, Gemma), T5's / BART's EOS
# after an encoder's input
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def specials_models(tmp_path_factory) -> dict:
    """A tiny Llama and a tiny T5 sharing a tokenizer whose post-processor writes `<s> text <|endoftext|>`, as
    T5 (EOS) and Llama (BOS) tokenizers add their special tokens; `<s>` is a BOS of its own."""
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("specials")
    tok = train_tokenizer(train_texts("commongen"), 400, out / "tok")
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A <|endoftext|>", special_tokens=[("<s>", tok.bos_token_id), ("<|endoftext|>", tok.eos_token_id)])
    torch.manual_seed(0)
    models = {"causal": LlamaForCausalLM(LlamaConfig(
                  vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)),
              "seq2seq": T5ForConditionalGeneration(T5Config(
                  vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  decoder_start_token_id=tok.pad_token_id))}
    for kind, model in models.items():
        tok.save_pretrained(out / kind)
        model.save_pretrained(out / kind)
    return {kind: out / kind for kind in models}


def test_plain_prompts_carry_the_tokenizers_own_special_tokens(specials_models):
    task = get_task("commongen")
    for kind, path in specials_models.items():
        tok = load_tokenizer(str(path))
        bos, eos = tok.bos_token_id, tok.eos_token_id
        plain = tok(PROMPT, add_special_tokens=False)["input_ids"]
        assert tok(PROMPT)["input_ids"] == [bos] + plain + [eos]  # the saved tokenizer adds both
        assert setup_chat(tok, "auto", encoder_decoder=kind == "seq2seq") == "off"
        end = [eos] if kind == "seq2seq" else []  # an encoder's input ends in EOS; a causal query never does
        assert encode_prompt(task, tok, PROMPT, 64) == [bos] + plain + end
        cut = encode_prompt(task, tok, PROMPT, 5)  # the task text is cut, the special tokens stay
        assert cut == [bos] + plain[-5:] + end and task_ids(tok, cut) == plain[-5:]
        assert rt.template_length(tok) == 1 + len(end)
    # tokenizers that add nothing (GPT-2, SmolLM2, the embedded models: test_chat_off_gives_the_plain_ids) are
    # untouched


@needs_data
@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_scripts_sample_and_train_on_queries_with_the_special_tokens(specials_models, kind, tmp_path, monkeypatch):
    """ppo.py on a model whose tokenizer adds `<s> ... </s>`: every sampled and evaluated query carries them
    (the EOS only for the T5 encoder), the training forward scores those same ids (ratio 1 on the only
    minibatch), and a guide gets the task's text without them."""
    from test_guided import length_reward

    path = specials_models[kind]
    rec_train, rec_eval = _Recorder(ppo.sample), _Recorder(rt.sample)
    monkeypatch.setattr(ppo, "sample", rec_train)
    monkeypatch.setattr(rt, "sample", rec_eval)
    monkeypatch.setattr(rt, "make_reward", lambda *a, **k: length_reward)  # CommonGen's CIDEr-D index: ~9 s
    args = ppo.Args(task="commongen", policy_model=str(path), data_dir=str(DATA), output_dir=str(tmp_path),
                    run_name="sp", iterations=1, rollouts_per_iteration=4, minibatch_size=4, n_epochs=1,
                    eval_samples=2, eval_interval=1, max_new_tokens=6, device="cpu",
                    eval_decoding="sample")  # the evaluation's queries are recorded from its sampling calls
    ppo.main(args)
    tok = load_tokenizer(str(path))
    setup_chat(tok, "off", encoder_decoder=kind == "seq2seq")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    queries = [q for calls in (rec_train.calls, rec_eval.calls) for qs, _ in calls for q in qs]
    assert len(queries) == 4 + 2 * 2
    assert all(q[0] == bos and q == wrap(tok, task_ids(tok, q)) for q in queries)
    assert all((q[-1] == eos) == (kind == "seq2seq") for q in queries)
    line = [r for r in map(json.loads, (tmp_path / "sp" / "metrics.jsonl").read_text().splitlines())
            if "objective/reward" in r][0]
    assert abs(line["policy/ratio"] - 1.0) < 1e-5 and line["policy/approx_kl"] < 1e-10
    # a guide is handed the task's own text
    seen = []
    guide_continue(CallableGuide(lambda p, x: seen.append(p) or [" ok."] * len(p)), tok, queries[:2], [[], []],
                   max_new_tokens=6, min_new_tokens=1)
    assert seen == [[tok.decode(task_ids(tok, q)) for q in queries[:2]]] and "<s>" not in "".join(seen[0])
