"""LoRA (peft), 4/8-bit loading and reward models given as PEFT adapters (common/lora.py, docs/lora.md).

Tiny models: a 2-layer Llama built from LlamaConfig (the architecture of most current LMs) and the tiny
2-layer GPT-2 of conftest.py, both with a byte-level BPE tokenizer trained on local text. The adapters are
given random B matrices where a test needs the adapter to change the model (peft starts B at 0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import DATA, DEVICE, HAS_DATA, needs_data, train_tokenizer, train_texts  # noqa: F401

import aggrevated  # noqa: E402
import d2lols  # noqa: E402
import lols  # noqa: E402
import ppo  # noqa: E402
import ppo_plus_plus  # noqa: E402
from common import runtime as rt  # noqa: E402
from common import guides  # noqa: E402
from common.errors import UsageError  # noqa: E402
from common.generation import forward_response, left_pad, right_pad, sample  # noqa: E402
from common.lora import AdapterView, LoraPolicy, ModelSetup, adapter_parameters  # noqa: E402
from test_guided import length_reward  # noqa: E402

SCRIPTS = {"ppo": ppo, "ppo_plus_plus": ppo_plus_plus, "aggrevated": aggrevated, "lols": lols, "d2lols": d2lols}
TASKS = ("imdb", "commongen", "tldr")


def build_tiny_llama(task: str, out: Path, seed: int = 0) -> Path:
    """Tokenizer + a random 2-layer LlamaForCausalLM (hidden 32, 2 heads), saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_texts(task), 400, out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=384,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    cache: dict = {}

    def make(task: str = "commongen") -> Path:
        if task not in cache:
            cache[task] = build_tiny_llama(task, tmp_path_factory.mktemp(f"tiny-llama-{task}"))
        return cache[task]

    return make


@pytest.fixture(params=["llama", "gpt2"])
def arch_model(request, llama, tiny_model):
    return llama("commongen") if request.param == "llama" else tiny_model("commongen")


def _setup(**kw) -> ModelSetup:
    return ModelSetup(**{"lora_r": 4, "lora_alpha": 8.0, **kw})


def _randomise_adapter(model, adapter: str, seed: int = 5, scale: float = 0.5):
    """Random B (and A) for `adapter`: the adapter then changes the model's outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, adapter):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _queries(tok, n: int = 6) -> list[list[int]]:
    texts = train_texts("commongen", 40)[:n]
    return [tok(t, add_special_tokens=False)["input_ids"][: 4 + 3 * i] for i, t in enumerate(texts)]


def _score(model, queries, out, tok, min_new_tokens=2, temperature=1.0):
    qi, qm = left_pad(queries, tok.pad_token_id)
    ri, rm = right_pad(out.tokens, tok.pad_token_id)
    lp, _ = forward_response(model, qi, qm, ri, rm, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                             min_new_tokens=min_new_tokens, temperature=temperature)
    return lp, rm


def _fresh_base(path: Path, tok):
    from common.models import load_causal_lm

    return load_causal_lm(str(path), tok, "cpu")


def length_reward(prompts, responses, references):
    return [1.0 + 0.05 * len(r) for r in responses]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train(path: Path) -> list[dict]:
    return [r for r in _jsonl(path / "metrics.jsonl") if "objective/reward" in r]


def _args(mod, task: str, model: Path, out: Path, **kw):
    base = dict(task=task, policy_model=str(model), data_dir=str(DATA), output_dir=str(out), run_name="run",
                iterations=2, rollouts_per_iteration=4, minibatch_size=4, n_epochs=1, eval_samples=2,
                eval_interval=1000, prompt_tokens=48 if task == "tldr" else None, device="cpu", lora_r=4,
                lora_alpha=8.0)
    if mod is d2lols:
        base["tau"] = 1
    if mod is lols:
        base["p_ppo_pp"] = 0.5
    base.update(kw)
    return mod.Args(**base)


class Spy:
    """Records what rt.build_policy_ref_critic, rt.make_critic and guides.build_guide return inside a script."""

    def __init__(self, mp):
        self.built, self.critics, self.guides = [], [], []
        real_build, real_critic, real_guide = rt.build_policy_ref_critic, rt.make_critic, guides.build_guide

        def build(*a, **k):
            out = real_build(*a, **k)
            self.built.append(out)
            return out

        def critic(*a, **k):
            out = real_critic(*a, **k)
            self.critics.append(out)
            return out

        def guide(*a, **k):
            out = real_guide(*a, **k)
            self.guides.append(out)
            return out

        mp.setattr(rt, "build_policy_ref_critic", build)
        mp.setattr(rt, "make_critic", critic)
        mp.setattr(guides, "build_guide", guide)


# ---------------------------------------------------------------------------------------------------
# sampling = training log-probs, KL 0 with the adapter untrained or off, the reference is the base
# ---------------------------------------------------------------------------------------------------
@pytest.mark.device
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lora_sample_logprobs_equal_training_forward(arch_model, temperature):
    tok, policy, ref, critic = rt.build_policy_ref_critic(str(arch_model), DEVICE, 64, setup=_setup())
    assert isinstance(policy, LoraPolicy) and isinstance(ref, AdapterView)
    _randomise_adapter(policy.lm, "default")
    queries = _queries(tok)
    torch.manual_seed(0)
    out = sample(policy, queries, max_new_tokens=10, min_new_tokens=2, eos_id=tok.eos_token_id,
                 pad_id=tok.pad_token_id, temperature=temperature, device=DEVICE)
    lp, rm = _score(policy, [q for q in queries], out, tok, temperature=temperature)
    sampled = rt.right_pad_float(out.logprobs, rm.shape[1], "cpu")
    assert rm.sum() > 20
    assert torch.allclose(lp.cpu() * rm, sampled * rm, atol=2e-5), (lp.cpu() - sampled).abs().max()
    # the adapter matters, and the reference (adapter off) is the start model exactly
    ref_lp, _ = _score(ref, queries, out, tok, temperature=temperature)
    base_lp, _ = _score(_fresh_base(arch_model, tok), queries, out, tok, temperature=temperature)
    assert torch.equal(ref_lp.cpu(), base_lp.cpu())
    assert ((lp - ref_lp).abs() * rm).max() > 1e-2


@pytest.mark.device
def test_kl_zero_with_untrained_adapter_and_adapter_off(arch_model):
    tok, policy, ref, _ = rt.build_policy_ref_critic(str(arch_model), DEVICE, 64, setup=_setup())
    queries = _queries(tok)
    torch.manual_seed(1)
    out = sample(policy, queries, max_new_tokens=8, min_new_tokens=2, eos_id=tok.eos_token_id,
                 pad_id=tok.pad_token_id, device=DEVICE)
    lp, rm = _score(policy, queries, out, tok)
    ref_lp, _ = _score(ref, queries, out, tok)
    assert torch.equal(lp * rm, ref_lp * rm), "an untrained adapter (B = 0) must leave the model as it was"
    _randomise_adapter(policy.lm, "default")
    with torch.no_grad():
        lp2, _ = _score(policy, queries, out, tok)
        ref_lp2, _ = _score(ref, queries, out, tok)
    assert torch.equal(ref_lp2, ref_lp), "the adapter-off reference changed when the adapter did"
    assert not torch.equal(lp2 * rm, ref_lp * rm)


def test_policy_and_critic_adapters_get_only_their_own_gradients(llama):
    tok, policy, ref, critic = rt.build_policy_ref_critic(str(llama()), "cpu", 64, setup=_setup())
    _randomise_adapter(policy.lm, "default")
    _randomise_adapter(policy.lm, "critic", seed=6)
    torch.nn.init.normal_(critic.head.weight)  # a zero head passes no gradient back to the adapter
    own_p, own_c = set(map(id, policy.parameters())), set(map(id, critic.parameters()))
    assert own_p and own_c and not own_p & own_c
    names = {id(p): n for n, p in policy.lm.named_parameters()}
    assert all(".default." in names[i] for i in own_p)
    assert all(".critic." in names[id(p)] for p in critic.adapter) and len(list(critic.head.parameters())) == 2
    queries = _queries(tok, 3)
    qi, qm = left_pad(queries, tok.pad_token_id)
    ri, rm = right_pad([[5, 6, 7], [8, 9], [10]], tok.pad_token_id)
    lp, _ = forward_response(policy, qi, qm, ri, rm, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, min_new_tokens=0)
    lp.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.grad is None for n, p in policy.lm.named_parameters() if "lora_" not in n)
    for p in policy.parameters():
        p.grad = None
    critic(qi, qm, ri, rm).sum().backward()
    assert all(p.grad is None for p in policy.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())
    # every adapter stays trainable whichever was on last (peft's set_adapter would have frozen the others)
    assert all(p.requires_grad for n, p in policy.lm.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------------------------------
# inside the scripts: base bit-identical, guide = frozen base, idle critic, PPO++ beta 0 = PPO, resume
# ---------------------------------------------------------------------------------------------------
@needs_data
def test_training_moves_only_adapters_and_heads(llama, tmp_path):
    path = llama()
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        opt = {}
        real_adamw = torch.optim.AdamW

        def adamw(params, **kw):
            params = list(params)
            opt["params"] = params
            return real_adamw(params, **kw)

        mp.setattr(torch.optim, "AdamW", adamw)
        mp.setattr(rt, "make_reward", lambda *a, **k: length_reward)  # CIDEr-D of a random model is often all 0
        ppo.main(_args(ppo, "commongen", path, tmp_path, lr=1e-2, iterations=2, merge_lora=True))
    tok, policy, ref, critic = spy.built[0]
    lm_names = {id(p): n for n, p in policy.lm.named_parameters()}
    assert opt["params"] and all("lora_" in lm_names[id(p)] for p in opt["params"] if id(p) in lm_names)
    head = set(map(id, critic.head.parameters()))
    assert {id(p) for p in opt["params"] if id(p) not in lm_names} == head
    fresh = _fresh_base(path, tok).state_dict()
    base = {n.replace(".base_layer", ""): p for n, p in policy.lm.state_dict().items() if "lora_" not in n}
    assert base.keys() == fresh.keys()
    assert all(torch.equal(base[k], fresh[k]) for k in fresh), "a base weight moved"
    assert any(p.abs().sum() > 0 for p in adapter_parameters(policy.lm, "default")[1::2]), "B stayed 0: no training"
    # saved: the adapter (+ tokenizer), the critic adapter in its sub-folder, and a merged copy equal to the policy
    run = tmp_path / "run"
    cfg = json.loads((run / "policy" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(path)
    assert (run / "policy" / "adapter_model.safetensors").is_file() and (run / "policy" / "tokenizer.json").is_file()
    assert (run / "policy" / "critic" / "adapter_config.json").is_file()
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(run / "policy"))
    merged = AutoModelForCausalLM.from_pretrained(str(run / "policy-merged"))
    queries = _queries(tok, 4)
    torch.manual_seed(2)
    out = sample(policy, queries, max_new_tokens=6, min_new_tokens=2, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    lp, rm = _score(policy, queries, out, tok)
    for m in (reloaded, merged):
        lp_m, _ = _score(m.eval(), queries, out, tok)
        assert torch.allclose(lp_m * rm, lp * rm, atol=1e-5)


@needs_data
def test_guide_samples_come_from_the_frozen_base(llama, tmp_path):
    """SPEC 5.1: with the policy's own start model as guide, after the adapter trained, the guide still
    samples what a fresh load of the base samples (same seed, the guide's own top-p), not the learner's."""
    path = llama()
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        mp.setattr(rt, "make_reward", lambda *a, **k: length_reward)  # CIDEr-D of a random model is often all 0
        ppo_plus_plus.main(_args(ppo_plus_plus, "commongen", path, tmp_path, lr=5e-2, beta=1.0, iterations=3))
    tok, policy, _, _ = spy.built[0]
    guide = spy.guides[0]
    assert isinstance(guide.model, AdapterView) and guide.model.adapter is None and guide.top_p < 1.0
    queries, kw = _queries(tok), dict(max_new_tokens=12, min_new_tokens=2, eos_id=tok.eos_token_id,
                                      pad_id=tok.pad_token_id, top_p=guide.top_p, device="cpu")

    def draw(model):
        torch.manual_seed(7)
        return sample(model, queries, **kw).tokens

    from_guide, from_base, from_learner = draw(guide.model), draw(_fresh_base(path, tok)), draw(policy)
    assert from_guide == from_base
    assert from_learner != from_guide, "the learner did not move away from its start: the check is empty"
    # and through the guide's own interface
    texts = [tok.decode(q) for q in queries]
    torch.manual_seed(8)
    a = guide.complete(texts, [""] * len(texts), [8] * len(texts))
    from common.guides import HFGuide

    torch.manual_seed(8)
    b = HFGuide(_fresh_base(path, tok), tok, top_p=guide.top_p, top_k=guide.top_k, min_new_tokens=guide.min_new_tokens,
                device="cpu").complete(texts, [""] * len(texts), [8] * len(texts))
    assert a == b


@needs_data
@pytest.mark.parametrize("algo", ["lols", "d2lols"])
def test_idle_critic_adapter_gets_no_update(llama, tmp_path, algo):
    """LOLS with p_ppo_pp 1 never uses V_psi; D2LOLS with tau 2 of 2 iterations never uses V_phi: that
    critic's adapter and head stay bit-identical while the other critic and the policy train."""
    mod = SCRIPTS[algo]
    extra = dict(p_ppo_pp=1.0) if algo == "lols" else dict(tau=2)
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        init, objs = {}, {}
        real = rt.make_critic

        def snap(*a, **k):
            c = real(*a, **k)
            name = k.get("name", "critic")
            objs[name], init[name] = c, {n: p.detach().clone() for n, p in c.named_parameters()}
            return c

        mp.setattr(rt, "make_critic", snap)
        mp.setattr(rt, "make_reward", lambda *a, **k: length_reward)  # a reward that varies: the critic learns
        mod.main(_args(mod, "commongen", llama(), tmp_path, lr=1e-2, iterations=2, beta=0.5, **extra))
    policy = spy.built[0][1]
    assert set(objs) == {"critic", "guide_critic"} and spy.built[0][3] is objs["critic"]
    idle, used = ("guide_critic", "critic") if algo == "lols" else ("critic", "guide_critic")
    now = {k: dict(c.named_parameters()) for k, c in objs.items()}
    assert now[idle].keys() == init[idle].keys() and any(n.startswith("adapter.") for n in now[idle])
    assert all(torch.equal(now[idle][n], init[idle][n]) for n in now[idle]), f"the idle critic {idle} moved"
    moved = [n for n in now[used] if not torch.equal(now[used][n], init[used][n])]
    assert any(n.startswith("head.") for n in moved) and any(n.startswith("adapter.") for n in moved), \
        f"the used critic {used} did not train its head and adapter: {moved}"
    assert all(p.requires_grad for n, p in policy.lm.named_parameters() if "lora_" in n)


@needs_data
@pytest.mark.device
def test_ppo_plus_plus_beta0_equals_ppo_with_lora(llama, tmp_path):
    path = llama()
    common = dict(iterations=2, rollouts_per_iteration=4, minibatch_size=2, n_epochs=2, eval_samples=4, eval_interval=1,
                  lr=1e-2, kl_coef=0.05, device=DEVICE, seed=3)
    ppo.main(_args(ppo, "commongen", path, tmp_path / "ppo", **common))
    ppo_plus_plus.main(_args(ppo_plus_plus, "commongen", path, tmp_path / "pp", beta=0.0, **common))
    a, b = _jsonl(tmp_path / "ppo" / "run" / "metrics.jsonl"), _jsonl(tmp_path / "pp" / "run" / "metrics.jsonl")
    assert len(a) == len(b) >= 5
    n = 0
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith("time/"):
                assert ra[k] == rb[k], f"step {ra['step']}: {k}: ppo {ra[k]!r} vs ppo++ {rb[k]!r}"
                n += 1
    assert n > 40
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "ppo" / "run" / "policy" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "pp" / "run" / "policy" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k), "the adapter did not train"


@needs_data
@pytest.mark.parametrize("algo", ["ppo", "lols"])
def test_resume_after_a_kill_continues_with_the_same_numbers(llama, tmp_path, algo):
    """Killed (Ctrl-C) in iteration 3 with the last checkpoint at 2, then --resume to 3 == 3 iterations in one
    go: adapters, heads (both of LOLS's critics) and optimiser state restored exactly."""
    mod = SCRIPTS[algo]
    kw = dict(lr=1e-2, lr_schedule="constant", eval_interval=1, iterations=3)
    mod.main(_args(mod, "commongen", llama(), tmp_path / "a", **kw))
    calls, real_sample = {"n": 0}, mod.sample

    def killed_in_iteration_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_sample(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mod, "sample", killed_in_iteration_3)
        with pytest.raises(SystemExit):
            mod.main(_args(mod, "commongen", llama(), tmp_path / "b", **kw))
    assert torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)["iteration"] == 2
    mod.main(_args(mod, "commongen", llama(), tmp_path / "b", resume=str(tmp_path / "b" / "run"), **kw))
    full, part = _train(tmp_path / "a" / "run"), _train(tmp_path / "b" / "run")
    assert [r["step"] for r in part] == [1, 2, 3]
    for x, y in zip(full, part):
        for k in x:
            if not k.startswith("time/"):
                assert x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])), f"step {x['step']}: {k}"
    ca, cb = torch.load(tmp_path / "a" / "run" / "critic.pt"), torch.load(tmp_path / "b" / "run" / "critic.pt")
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "run" / "policy" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "policy" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@needs_data
def test_separate_critic_and_gradient_checkpointing_with_lora(llama, tmp_path):
    """--critic separate: a full critic model, fully trained, beside the LoRA policy; with gradient
    checkpointing the numbers are those of the run without it."""
    from common.generation import ValueModel
    from common.lora import AdapterValueModel

    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        ppo.main(_args(ppo, "commongen", llama(), tmp_path / "a", critic="separate", lr=1e-2))
        ppo.main(_args(ppo, "commongen", llama(), tmp_path / "b", critic="separate", lr=1e-2,
                       gradient_checkpointing=True))
        ppo.main(_args(ppo, "commongen", llama(), tmp_path / "c", lr=1e-2, gradient_checkpointing=True))
    critic = spy.built[0][3]
    assert type(critic) is ValueModel and all(p.requires_grad for p in critic.parameters())
    assert isinstance(spy.built[2][3], AdapterValueModel)
    a, b = _train(tmp_path / "a" / "run"), _train(tmp_path / "b" / "run")
    for x, y in zip(a, b):
        for k in x:
            if not k.startswith("time/"):
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    assert len(_train(tmp_path / "c" / "run")) == 2


@needs_data
def test_reference_head_critic_with_lora_reads_the_frozen_base(llama, tmp_path):
    """--critic reference-head with a LoRA policy: the critic is a value head alone; the states it reads are the
    base model's with the adapter off (the reference), also after the adapter has trained; the run trains the
    head and the adapter and nothing of the base."""
    from transformers import AutoModelForCausalLM

    from common.generation import ReferenceHeadValue, forward_response, left_pad, right_pad
    from common.harness import Run
    from common.settings import finish_settings

    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        ppo.main(_args(ppo, "commongen", llama(), tmp_path / "a", critic="reference-head", lr=1e-2))
    tok, policy, ref, critic = spy.built[0]
    assert type(critic) is ReferenceHeadValue and critic.head.weight.abs().sum() > 0  # trained from its zero start
    train = _train(tmp_path / "a" / "run")
    assert len(train) == 2 and all(math.isfinite(r["value/explained_variance"]) for r in train)
    base = AutoModelForCausalLM.from_pretrained(str(llama()))
    trained = torch.load(tmp_path / "a" / "run" / "critic.pt", map_location="cpu")
    assert set(trained) == {"head.weight", "head.bias"}
    qi, qm = left_pad([[5, 6, 7, 8], [9, 10]], tok.pad_token_id)
    ri, rm = right_pad([[11, 12, 13], [14]], tok.pad_token_id)
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, min_new_tokens=0)
    with torch.no_grad():
        _, hidden = forward_response(ref, qi, qm, ri, rm, with_hidden=True, **kw)
        _, expected = forward_response(base, qi, qm, ri, rm, with_hidden=True, **kw)
        _, moved = forward_response(policy, qi, qm, ri, rm, with_hidden=True, **kw)
    assert torch.allclose(hidden, expected, atol=1e-5) and not torch.allclose(moved, expected, atol=1e-3)
    args = finish_settings(_args(ppo, "commongen", llama(), tmp_path / "b", critic="reference-head"), "ppo")
    with Run(args, "ppo") as run:  # no critic adapter or copy: the head is the critic's only parameters
        assert run.critic_reads_ref and sum(p.numel() for p in run.critic.parameters()) == run.ref.config.hidden_size + 1


# ---------------------------------------------------------------------------------------------------
# every script, every task, tiny LoRA, 2 iterations; the first minibatch's ratio is 1
# ---------------------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("algo", list(SCRIPTS))
def test_every_script_runs_two_iterations_with_lora(llama, tmp_path, algo, task):
    mod = SCRIPTS[algo]
    first, final = mod.main(_args(mod, task, llama(task), tmp_path, lr=1e-2, min_new_tokens=4, max_new_tokens=10))
    assert all(math.isfinite(v) for m in (first, final) for v in m.values())
    train = _train(tmp_path / "run")
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert all(math.isfinite(v) for v in r.values())
    # one epoch over one minibatch: the update's ratio is computed before the step, so it is 1
    assert train[0]["policy/ratio"] == pytest.approx(1.0, abs=1e-5) and train[0]["policy/clipfrac"] == 0.0
    assert (tmp_path / "run" / "policy" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------------
# flags: bad combinations and 4/8-bit without CUDA stop in one line, before anything is loaded
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(load_in_4bit=True, lora_r=4), "needs a CUDA GPU"),
    (dict(load_in_8bit=True, lora_r=4), "needs a CUDA GPU"),
    (dict(load_in_4bit=True, lora_r=0), "needs LoRA"),
    (dict(merge_lora=True, lora_r=0), "needs LoRA"),
    (dict(critic="adapter", lora_r=0), "needs LoRA"),
    (dict(critic="shared", lora_r=4), "--critic must be"),
    (dict(lora_r=-1), "--lora-r"),
    (dict(load_in_4bit=True, load_in_8bit=True, lora_r=4), "exclude each other"),
])
@pytest.mark.parametrize("algo", ["ppo", "lols"])
def test_bad_model_setup_stops_before_loading(tmp_path, monkeypatch, kw, match, algo):
    if "CUDA" in match and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    mod = SCRIPTS[algo]

    def no_loading(*a, **k):
        raise AssertionError("something was loaded before the settings were checked")

    monkeypatch.setattr(rt, "resolve_models", no_loading)
    monkeypatch.setattr(rt, "build_policy_ref_critic", no_loading)
    args = _args(mod, "commongen", tmp_path / "nowhere", tmp_path, **kw)
    with pytest.raises(UsageError, match=match) as e:
        mod.main.__wrapped__(args) if hasattr(mod.main, "__wrapped__") else mod.main(args)
    assert "\n" not in str(e.value)


def test_load_in_4bit_error_is_one_line_on_the_command_line(tmp_path):
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(repo / "ppo.py"), "--task", "commongen", "--lora-r", "8", "--load-in-4bit",
                        "--output-dir", str(tmp_path)], capture_output=True, text=True, cwd=repo, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "CUDA" in lines[0], p.stderr
    assert not (tmp_path / "ppo-commongen").exists()


@needs_data
@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4-bit needs CUDA")
@pytest.mark.parametrize("bits", [4, 8])
def test_two_iterations_in_4_and_8_bit_on_cuda(llama, tmp_path, bits):
    flag = {"load_in_4bit": True} if bits == 4 else {"load_in_8bit": True}
    first, final = ppo.main(_args(ppo, "commongen", llama(), tmp_path, device="cuda", lr=1e-2, **flag))
    assert all(math.isfinite(v) for m in (first, final) for v in m.values())
    train = _train(tmp_path / "run")
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(v) for r in train for v in r.values())
    assert train[0]["policy/ratio"] == pytest.approx(1.0, abs=2e-2)  # bf16 compute
    assert (tmp_path / "run" / "policy" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------------
# reward models given as PEFT adapters
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_adapter(tmp_path_factory):
    """A tiny GPT-2 sequence classifier base (num_labels 1) and a LoRA SEQ_CLS adapter on it (random B and
    score head, so the adapter changes the score), both saved offline."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    root = tmp_path_factory.mktemp("rm")
    tok = train_tokenizer(train_texts("tldr"), 400, root / "base")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2ForSequenceClassification(cfg).save_pretrained(root / "base")
    base = GPT2ForSequenceClassification.from_pretrained(root / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type=TaskType.SEQ_CLS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "score" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def test_reward_model_adapter_scores_the_last_token(reward_adapter):
    from common.rewards import RewardModelReward
    from peft import PeftModel
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    base_dir, adapter_dir = reward_adapter
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["task_type"] == "SEQ_CLS"
    prompts = ["TITLE: my cat\nPOST: it sat on the mat\nTL;DR:", "POST: a dog ran\nTL;DR:", "TL;DR:"]
    responses = [" cat sat", " the dog ran in the park", " x"]
    got = RewardModelReward(str(adapter_dir), device="cpu")(prompts, responses)
    plain = RewardModelReward(str(base_dir), device="cpu")(prompts, responses)
    # by hand: base + adapter, each text alone (no padding), the score head at the last token
    tok = AutoTokenizer.from_pretrained(base_dir)
    m = PeftModel.from_pretrained(GPT2ForSequenceClassification.from_pretrained(base_dir), str(adapter_dir)).eval()
    want = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([tok(p.rstrip() + r)["input_ids"]])
            want.append(float(m(input_ids=ids).logits[0, 0]))
    assert got == pytest.approx(want, abs=1e-4)
    assert all(abs(a - b) > 1e-3 for a, b in zip(got, plain)), "the adapter did not change the score"


@needs_data
def test_tldr_run_with_a_reward_adapter(llama, reward_adapter, tmp_path):
    """--reward-model pointing at the adapter folder: TL;DR's reward is that model's score."""
    from common.rewards import RewardModelReward

    _, adapter_dir = reward_adapter
    ppo.main(_args(ppo, "tldr", llama("tldr"), tmp_path, reward_model=str(adapter_dir)))
    rows = _train(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["objective/reward"]) for r in rows)
    rm = RewardModelReward(str(adapter_dir), device="cpu")
    assert isinstance(rm(["TL;DR:"], [" x"])[0], float)


def test_reward_adapter_with_causal_lm_task_type_is_one_line_error(reward_adapter, tmp_path):
    import shutil

    from common.rewards import RewardModelReward

    _, adapter_dir = reward_adapter
    bad = tmp_path / "causal"
    shutil.copytree(adapter_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["task_type"] = "CAUSAL_LM"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="SEQ_CLS"):
        RewardModelReward(str(bad), device="cpu")


@needs_data
def test_torchrun_two_processes_with_lora(llama, tmp_path):
    """DDP over the adapter-only modules (policy, two critic adapters + heads), 2 processes on the CPU."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "lols.py",
           "--task", "commongen", "--policy-model", str(llama()), "--device", "cpu", "--iterations", "2",
           "--rollouts-per-iteration", "4", "--minibatch-size", "2", "--n-epochs", "1", "--eval-samples", "2",
           "--final-eval-samples", "2", "--eval-interval", "1", "--output-dir", str(tmp_path), "--run-name", "ddp",
           "--lora-r", "4",
           "--p-ppo-pp", "0.5", "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RLGF_DATA_DIR": str(DATA)}
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _train(tmp_path / "ddp")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(v) for r in rows for v in r.values())
    w = load_file(str(tmp_path / "ddp" / "policy" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k), "the adapter did not train"
