"""The four guided scripts (ppo_plus_plus.py, aggrevated.py, lols.py, d2lols.py) against the roll-in / roll-out
table of the README and its list of the official code's defects (Where we differ from the official code).

Every test runs a script's `main` in-process on tiny random models (tests/_tiny.py) and watches it
through the module-level names it calls (`sample`, `guide_continue`, `forward_response`, `compute_gae`,
`masked_whiten`) plus the hooks `common.guides.build_guide` and `common.runtime`'s (`make_critic`, `make_reward`,
`RunLogger.scalars`). Masks are read from behaviour, not from variable names: the tokens that get the
policy loss are those where d loss / d log pi(y_t) != 0, the tokens that train the critic are those
where d loss / d V(s_t) != 0 (captured with tensor hooks in the training forwards).

Guides: a CallableGuide that can only write one token T (" the", checked to be ONE token repeated),
or an HF guide model whose output is T with probability > 0.99 (so top-p 0.92 always picks T), while
the random learner writes T with probability ~1/400.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny import DATA, build_tiny, build_tiny_t5, favour_token, has_data  # noqa: F401  (also puts the repo on sys.path)
from conftest import DEVICE  # noqa: E402

import aggrevated  # noqa: E402
import d2lols  # noqa: E402
import lols  # noqa: E402
import ppo  # noqa: E402
import ppo_plus_plus  # noqa: E402
from common import runtime as rt  # noqa: E402
from common import guides  # noqa: E402
from common.generation import decode  # noqa: E402
from common.guides import CallableGuide, HFGuide  # noqa: E402
from common.models import load_tokenizer  # noqa: E402

TASKS = ("imdb", "commongen", "tldr")
SCRIPTS = {"ppo_plus_plus": ppo_plus_plus, "aggrevated": aggrevated, "lols": lols, "d2lols": d2lols}
T_TEXT = " the"  # the one token of the one-token guides

pytestmark = pytest.mark.skipif(not all(has_data(t) for t in TASKS),
                                reason=f"local data folder {DATA} (imdb, common_gen, openai_summarize_tldr) is absent")


# ---------------------------------------------------------------------------------------------------
# fixtures: isolated cache, one CPU thread (2 shared cores: tiny matmuls are ~5x faster), tiny models
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("RLGF_CACHE_DIR", str(tmp_path_factory.mktemp("rlgf-cache-guided")))
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    mp.delenv("RLGF_DATA_DIR", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(task, kind) -> folder: kind 'plain' (random learner), 'eos' (learner that ends often, for
    ragged lengths), 'guideT' (HF guide that always writes T_TEXT); 't5-eos': a tiny T5 learner that ends often."""
    cache: dict = {}

    def make(task: str, kind: str = "plain") -> Path:
        if (task, kind) not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{task}-{kind}")
            if kind == "t5-eos":
                cache[(task, kind)] = build_tiny_t5(task, out, favour=0, favour_logit=4.0)  # EOS is id 0
                return cache[(task, kind)]
            path = build_tiny(task, out, seed=0 if kind != "guideT" else 1,
                              favour=T_TEXT if kind == "guideT" else None)
            if kind == "eos":
                from transformers import AutoModelForCausalLM

                tok = load_tokenizer(str(path))
                m = AutoModelForCausalLM.from_pretrained(str(path))
                favour_token(m, tok.eos_token_id, 5.5)  # P(EOS) ~ 0.4 per step once allowed
                m.save_pretrained(path)
            cache[(task, kind)] = path
        return cache[(task, kind)]

    return make


def t_id(path: Path) -> int:
    """The id of T_TEXT, checked to be one token that repeats as itself."""
    tok = load_tokenizer(str(path))
    ids = tok(T_TEXT * 7, add_special_tokens=False)["input_ids"]
    assert len(ids) == 7 and len(set(ids)) == 1, f"{T_TEXT!r} is not one token in this tokenizer: {ids}"
    return ids[0]


def one_token_guide(min_words: int = 1, max_words: int = 24):
    """A CallableGuide writing only T_TEXT, a prompt-dependent number of times (deterministic)."""
    def fn(prompts, prefixes):
        return [T_TEXT * (min_words + zlib.crc32(p.encode()) % (max_words - min_words + 1)) for p in prompts]

    return CallableGuide(fn, name="one-token")


def length_reward(prompts, responses, references):
    """Deterministic, never zero, depends on the response (so it must land on the right token)."""
    return [1.0 + 0.01 * len(r) for r in responses]


def script_args(mod, task: str, model: Path, out: Path, **kw):
    base = dict(task=task, policy_model=str(model), data_dir=str(DATA), output_dir=str(out), run_name="run",
                iterations=2, rollouts_per_iteration=4, minibatch_size=2, n_epochs=1, eval_samples=2,
                eval_interval=1000, prompt_tokens=48 if task == "tldr" else None, device="cpu")
    base.update(kw)
    return mod.Args(**base)


# ---------------------------------------------------------------------------------------------------
# the recorder: what each iteration sampled, which tokens got which loss, which critic was used
# ---------------------------------------------------------------------------------------------------
@dataclass
class Iteration:
    samples: list = field(default_factory=list)   # (queries, prefixes, Sampled) of the script's learner sampling
    guides: list = field(default_factory=list)    # (queries, prefixes, continuations) of guide_continue
    ref: dict | None = None                       # the no-grad forward: qi, qm, ri, rm, logprobs
    gae: list = field(default_factory=list)       # (rewards, values, mask)
    whiten: list = field(default_factory=list)    # masks given to masked_whiten
    train: list = field(default_factory=list)     # training forwards: qi, ri, grad of log pi
    critic_calls: list = field(default_factory=list)  # tag, grad (training) or out (no grad), qi, ri
    metrics: dict = field(default_factory=dict)
    critic_params: dict = field(default_factory=dict)  # tag -> flat parameters after the iteration


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


class Recorder:
    def __init__(self, mod, mp: pytest.MonkeyPatch, guide=None, reward=length_reward):
        self.iters: list[Iteration] = []
        self.cur = Iteration()
        self.critics: list = []          # in creation order
        self.critic_init: list = []
        self.guide_objects: list = []
        self._patch(mod, mp, guide, reward)

    def _patch(self, mod, mp, guide, reward):
        rec = self
        real_build_guide, real_make_critic = guides.build_guide, rt.make_critic
        real_sample, real_guide_continue = mod.sample, mod.guide_continue
        real_forward, real_gae, real_whiten = mod.forward_response, mod.compute_gae, mod.masked_whiten
        real_scalars = rt.RunLogger.scalars

        def build_guide(*a, **k):
            g = guide if guide is not None else real_build_guide(*a, **k)
            rec.guide_objects.append(g)
            return g

        def make_critic(*a, **k):
            c = real_make_critic(*a, **k)
            tag = len(rec.critics)
            rec.critics.append(c)
            rec.critic_init.append(_flat(c))

            def hook(module, inputs, out):
                qi, qm, ri, rm = inputs
                entry = dict(tag=tag, qi=qi.detach().clone(), ri=ri.detach().clone(), grad=None,
                             training=out.requires_grad, out=out.detach().clone())
                rec.cur.critic_calls.append(entry)
                if out.requires_grad:
                    out.register_hook(lambda g, e=entry: e.__setitem__("grad", g.detach().clone()))

            c.register_forward_hook(hook)
            return c

        def sample(model, queries, **kw):
            out = real_sample(model, queries, **kw)
            prefixes = kw.get("prefixes")
            rec.cur.samples.append(([list(q) for q in queries], None if prefixes is None else [list(p) for p in prefixes], out))
            return out

        def guide_continue(g, tok, queries, prefixes, **kw):
            out = real_guide_continue(g, tok, queries, prefixes, **kw)
            rec.cur.guides.append(([list(q) for q in queries], [list(p) for p in prefixes], [list(o) for o in out]))
            return out

        def forward_response(model, qi, qm, ri, rm, **kw):
            lp, ent = real_forward(model, qi, qm, ri, rm, **kw)
            if lp.requires_grad:
                entry = dict(qi=qi.detach().clone(), ri=ri.detach().clone(), rm=rm.detach().clone(), grad=None)
                rec.cur.train.append(entry)
                lp.register_hook(lambda g, e=entry: e.__setitem__("grad", g.detach().clone()))
            elif rec.cur.ref is None:
                rec.cur.ref = dict(qi=qi.clone(), qm=qm.clone(), ri=ri.clone(), rm=rm.clone(), logprobs=lp.clone())
            return lp, ent

        def compute_gae(rewards, values, mask, *a, **k):
            rec.cur.gae.append((rewards.detach().clone(), values.detach().clone(), mask.detach().clone()))
            return real_gae(rewards, values, mask, *a, **k)

        def masked_whiten(x, mask, *a, **k):
            rec.cur.whiten.append(mask.detach().clone())
            return real_whiten(x, mask, *a, **k)

        def scalars(self, metrics, step):
            if "objective/reward" in metrics:
                rec.cur.metrics = dict(metrics, step=step)
                rec.cur.critic_params = {i: _flat(c) for i, c in enumerate(rec.critics)}
                rec.iters.append(rec.cur)
                rec.cur = Iteration()
            return real_scalars(self, metrics, step)

        mp.setattr(guides, "build_guide", build_guide)
        mp.setattr(rt, "make_critic", make_critic)
        if reward is not None:
            mp.setattr(rt, "make_reward", lambda *a, **k: reward)
        mp.setattr(rt.RunLogger, "scalars", scalars)
        for name, fn in [("sample", sample), ("guide_continue", guide_continue), ("forward_response", forward_response),
                         ("compute_gae", compute_gae), ("masked_whiten", masked_whiten)]:
            mp.setattr(mod, name, fn)


def run_recorded(mod, args, guide=None, reward=length_reward):
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mod, mp, guide=guide, reward=reward)
        result = mod.main(args)
    return rec, result


# ---------------------------------------------------------------------------------------------------
# analysis of one recorded iteration: switch points, token provenance, expected masks (SPEC section 2)
# ---------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    phase: str                 # "ppo++" or "aggrevated"
    ks: list                   # switch point per row
    roll_in: list              # the full roll-in of each row (guide's for PPO++, learner's for AggreVaTeD)
    coins: list                # PPO++: rows the guide rolled in for; AggreVaTeD: rows with k > 0
    learner_tokens: list       # per row: (positions, tokens, logprobs) the learner sampled
    guide_tokens: list         # per row: (positions, tokens) the guide wrote
    ri: torch.Tensor
    rm: torch.Tensor
    learner: torch.Tensor      # [B, T] mask of the learner's tokens
    policy_mask: torch.Tensor  # expected
    value_mask: torch.Tensor   # expected
    old_logprobs: torch.Tensor


def phase_of(algo: str, it: Iteration) -> str:
    if algo == "ppo_plus_plus":
        return "ppo++"
    if algo == "aggrevated":
        return "aggrevated"
    return "ppo++" if it.metrics["guide/phase"] == 1.0 else "aggrevated"


def analyse(it: Iteration, phase: str) -> Rollout:
    assert len(it.samples) == 1, f"one learner sampling call per iteration, got {len(it.samples)}"
    assert it.ref is not None, "no reference forward recorded"
    queries, prefixes, out = it.samples[0]
    B = len(queries)
    if phase == "ppo++":
        # guide roll-in for the coin's rows (from the prompt alone), learner roll-out from x + y_in[:k]
        assert prefixes is not None and len(prefixes) == B, "PPO++: the learner must continue from forced prefixes"
        assert len(it.guides) <= 1
        gq, gp, gout = it.guides[0] if it.guides else ([], [], [])
        assert all(p == [] for p in gp), "PPO++: the guide rolls in from the prompt alone"
        coins, j = [], 0
        for b in range(B):
            if j < len(gq) and gq[j] == queries[b]:
                coins.append(b)
                j += 1
        assert j == len(gq), "PPO++: guide roll-ins for prompts that are not in the batch"
        ks, roll_in, learner_tokens, guide_tokens = [], [[] for _ in range(B)], [], []
        for b in range(B):
            k = len(prefixes[b])
            if b in coins:
                y_in = gout[coins.index(b)]
                roll_in[b] = y_in
                assert prefixes[b] == y_in[:k], "PPO++: the forced prefix is not the guide's roll-in"
            else:
                assert k == 0, "PPO++: a forced prefix without a guide roll-in"
            ks.append(k)
            learner_tokens.append((list(range(k, k + len(out.tokens[b]))), out.tokens[b], out.logprobs[b]))
            guide_tokens.append((list(range(k)), prefixes[b]))
        seqs = [p + y for p, y in zip(prefixes, out.tokens)]
    else:
        # learner roll-in (from the prompt alone), guide roll-out from x + y_in[:k]
        assert prefixes is None or all(p == [] for p in prefixes), "AggreVaTeD: the learner rolls in from the prompt"
        assert len(it.guides) == 1, "AggreVaTeD: one guide roll-out call for the whole batch"
        gq, gp, gout = it.guides[0]
        assert gq == queries, "AggreVaTeD: the guide must roll out every row"
        ks = [len(p) for p in gp]
        roll_in = [list(t) for t in out.tokens]
        coins = [b for b in range(B) if ks[b] > 0]
        learner_tokens, guide_tokens = [], []
        for b in range(B):
            k = ks[b]
            assert gp[b] == out.tokens[b][:k], "AggreVaTeD: the guide's prefix is not the learner's roll-in"
            learner_tokens.append((list(range(k)), out.tokens[b][:k], out.logprobs[b][:k]))
            guide_tokens.append((list(range(k, k + len(gout[b]))), gout[b]))
        seqs = [p + y for p, y in zip(gp, gout)]

    ref = it.ref
    ri, rm = ref["ri"], ref["rm"].float()
    assert ri.shape[0] == B
    for b in range(B):
        n = int(rm[b].sum())
        assert ri[b, :n].tolist() == seqs[b] and n == len(seqs[b]), f"row {b}: trained sequence != y_in[:k] + y_out"
        assert rm[b, n:].sum() == 0
        q = ref["qi"][b][ref["qm"][b].bool()].tolist()
        assert q == queries[b], f"row {b}: the prompt of the trained row is not the sampled one"
    T = ri.shape[1]
    pos = torch.arange(T)[None]
    k_t = torch.tensor(ks)[:, None]
    if phase == "ppo++":
        learner = rm * (pos >= k_t).float()
        policy_mask, value_mask = learner, learner
    else:
        learner = rm * (pos < k_t).float()
        policy_mask, value_mask = learner, rm - learner
    old = torch.zeros(B, T)
    for b, (ps, _, lps) in enumerate(learner_tokens):
        for p, lp in zip(ps, lps):
            old[b, p] = lp
    return Rollout(phase, ks, roll_in, coins, learner_tokens, guide_tokens, ri, rm, learner, policy_mask,
                   value_mask, old)


def _row_index(ro: Rollout, qi_full: torch.Tensor) -> dict:
    keys = {}
    for b in range(ro.ri.shape[0]):
        key = (tuple(qi_full[b].tolist()), tuple(ro.ri[b].tolist()))
        assert key not in keys, "duplicate rows: cannot map minibatch rows back"
        keys[key] = b
    return keys


def grads_to_full(ro: Rollout, it: Iteration, entries: list) -> torch.Tensor:
    """Scatter the gradients of the first forward of each row (first epoch) into a [B, T] tensor."""
    keys = _row_index(ro, it.ref["qi"])
    full = torch.full(ro.ri.shape, float("nan"))
    for e in entries:
        assert e["grad"] is not None, "a training forward that received no gradient"
        for r in range(e["ri"].shape[0]):
            b = keys[(tuple(e["qi"][r].tolist()), tuple(e["ri"][r].tolist()))]
            if torch.isnan(full[b, 0]):
                full[b] = e["grad"][r]
    assert not torch.isnan(full).any(), "some rows were never trained"
    return full


def score_of(tok, ro: Rollout) -> list[float]:
    seqs = [ro.ri[b, : int(ro.rm[b].sum())].tolist() for b in range(ro.ri.shape[0])]
    return length_reward(None, decode(tok, seqs), None)


# ---------------------------------------------------------------------------------------------------
# 1. PPO++ with beta = 0 is PPO, bit for bit
# ---------------------------------------------------------------------------------------------------
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.device
def test_ppo_plus_plus_beta0_equals_ppo(models, tmp_path):
    from transformers import AutoModelForCausalLM

    model = models("imdb")
    common = dict(task="imdb", policy_model=str(model), data_dir=str(DATA), iterations=2, rollouts_per_iteration=4,
                  minibatch_size=2, n_epochs=2, eval_samples=4, eval_interval=1, lr=1e-3, kl_coef=0.05,
                  device=DEVICE, run_name="run", seed=3)
    ppo.main(ppo.Args(output_dir=str(tmp_path / "ppo"), **common))
    ppo_plus_plus.main(ppo_plus_plus.Args(output_dir=str(tmp_path / "pp"), beta=0.0, **common))
    a, b = _jsonl(tmp_path / "ppo" / "run" / "metrics.jsonl"), _jsonl(tmp_path / "pp" / "run" / "metrics.jsonl")
    assert len(a) == len(b) and len(a) >= 5  # 3 evaluations + 2 iterations
    n_compared = 0
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        shared = [k for k in ra if not k.startswith("time/")]
        assert all(k in rb for k in shared), f"ppo++ does not log {[k for k in shared if k not in rb]}"
        for k in shared:
            assert ra[k] == rb[k], f"step {ra['step']}: {k} differs: ppo {ra[k]!r} vs ppo++ {rb[k]!r}"
            n_compared += 1
        if "objective/reward" in rb:
            assert rb["guide/mix_fraction"] == 0.0 and rb["guide/guide_tokens"] == 0.0
    assert n_compared > 40
    pa = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ppo" / "run" / "policy")).state_dict()
    pb = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pp" / "run" / "policy")).state_dict()
    init = AutoModelForCausalLM.from_pretrained(str(model)).state_dict()
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa), "final policies differ"
    assert any(not torch.equal(pa[k], init[k]) for k in pa), "the policy did not train: the comparison is empty"
    ca = torch.load(tmp_path / "ppo" / "run" / "critic.pt")
    cb = torch.load(tmp_path / "pp" / "run" / "critic.pt")
    assert all(torch.equal(ca[k], cb[k]) for k in ca), "final critics differ"


# ---------------------------------------------------------------------------------------------------
# 2, 3: token provenance, loss masks and the KL penalty, with a one-token guide
# ---------------------------------------------------------------------------------------------------
GUIDED_SETTINGS = {
    "ppo_plus_plus": dict(beta=0.5, iterations=2),
    "aggrevated": dict(beta=0.5, iterations=2),
    "lols": dict(beta=0.5, p_ppo_pp=0.5, iterations=4, seed=2),  # seed 2: AggreVaTeD, PPO++, PPO++, PPO++
    "d2lols": dict(beta=0.5, tau=2, iterations=4),
}
KL_COEF = 0.1
MODEL_KINDS = ("gpt2", "t5")  # the learner: a causal LM or an encoder-decoder LM (prompt in the encoder)


@pytest.fixture(scope="module")
def guided(models, tmp_path_factory):
    """guided(algo, kind) -> (Recorder, run folder, tokenizer, T id): commongen, a learner with ragged lengths
    (kind 'gpt2' or 't5'), the one-token callable guide, beta 0.5; recorded once per module. One minibatch and
    one epoch per iteration: the ratio is 1 in the only update, so no token's gradient is cut by the clip."""
    cache: dict = {}

    def get(algo: str, kind: str = "gpt2"):
        if (algo, kind) not in cache:
            model = models("commongen", "eos" if kind == "gpt2" else "t5-eos")
            out = tmp_path_factory.mktemp(f"guided-{algo}-{kind}")
            args = script_args(SCRIPTS[algo], "commongen", model, out, rollouts_per_iteration=8, minibatch_size=8,
                               lr=1e-3, kl_coef=KL_COEF, **GUIDED_SETTINGS[algo])
            rec, _ = run_recorded(SCRIPTS[algo], args, guide=one_token_guide())
            assert len(rec.iters) == args.iterations
            cache[(algo, kind)] = (rec, out / "run", load_tokenizer(str(model)), t_id(model))
        return cache[(algo, kind)]

    return get


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("algo", list(SCRIPTS))
def test_token_provenance_with_one_token_guide(guided, algo, kind):
    """PPO++: every roll-in token (t < k) is T, the rest is exactly what the learner sampled.
    AggreVaTeD: every token from k on (up to EOS) is T, the prefix is the learner's roll-in."""
    rec, _, tok, T = guided(algo, kind)
    eos = tok.eos_token_id
    n_switch = {"ppo++": 0, "aggrevated": 0}
    n_zero = {"ppo++": 0, "aggrevated": 0}
    for it in rec.iters:
        ro = analyse(it, phase_of(algo, it))
        for b, k in enumerate(ro.ks):
            row = ro.ri[b, : int(ro.rm[b].sum())].tolist()
            (lpos, ltoks, _), (gpos, gtoks) = ro.learner_tokens[b], ro.guide_tokens[b]
            assert sorted(lpos + gpos) == list(range(len(row))), "every token is the guide's or the learner's"
            assert [row[p] for p in lpos] == list(ltoks), "learner positions hold what the learner sampled"
            body = [t for t in gtoks if t != eos]
            assert all(t == T for t in body), f"{ro.phase}: a guide position holds a token the guide cannot write"
            assert eos not in gtoks[:-1], "EOS inside the guide's part"
            if ro.phase == "ppo++":
                assert gpos == list(range(k))
                assert 0 < len(ltoks), "PPO++: the learner must write at least one token"
            else:
                assert lpos == list(range(k))
                assert len(gtoks) > 0, "AggreVaTeD: the guide must write the rest"
            if k > 0:
                n_switch[ro.phase] += 1
            else:
                n_zero[ro.phase] += 1
        learner_all = [t for _, toks, _ in ro.learner_tokens for t in toks]
        assert learner_all and not all(t == T for t in learner_all), "the learner's tokens look like the guide's"
    for phase in ({"ppo++"} if algo == "ppo_plus_plus" else {"aggrevated"} if algo == "aggrevated" else {"ppo++", "aggrevated"}):
        assert n_switch[phase] > 0 and n_zero[phase] > 0, f"{phase}: need rows with and without a switch ({n_switch}, {n_zero})"


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("algo", list(SCRIPTS))
def test_loss_masks_follow_spec_table(guided, algo, kind):
    """SPEC 2: PPO++ policy = critic = t >= k; AggreVaTeD policy t < k, critic t >= k (k = 0 rows: critic
    only); LOLS / D2LOLS: the phase's masks (SPEC 5.3: not PPO++'s masks in AggreVaTeD iterations)."""
    rec, _, _, _ = guided(algo, kind)
    kinds = set()
    for it in rec.iters:
        ro = analyse(it, phase_of(algo, it))
        kinds |= {(ro.phase, k > 0) for k in ro.ks}
        where = f"{algo} iteration {it.metrics['step']} ({ro.phase})"
        # tokens that get the policy loss: d loss / d log pi(y_t) != 0
        pol = grads_to_full(ro, it, it.train)
        got = (pol != 0).float()
        assert torch.equal(got, ro.policy_mask), (
            f"{where}: policy-loss tokens\n got {got.int().tolist()}\nwant {ro.policy_mask.int().tolist()}\nk {ro.ks}")
        # tokens that train the critic: d loss / d V(s_t) != 0
        crit = grads_to_full(ro, it, [c for c in it.critic_calls if c["training"]])
        got = (crit != 0).float()
        assert torch.equal(got, ro.value_mask), (
            f"{where}: critic-loss tokens\n got {got.int().tolist()}\nwant {ro.value_mask.int().tolist()}\nk {ro.ks}")
        # whitening over the policy's tokens
        assert len(it.whiten) == 1 and torch.equal(it.whiten[0].float(), ro.policy_mask), f"{where}: whitening mask"
        # rows with k = 0 are present and handled: PPO++ trains all of them, AggreVaTeD only the critic
        for b, k in enumerate(ro.ks):
            if k == 0 and ro.phase == "aggrevated":
                assert ro.policy_mask[b].sum() == 0 and torch.equal(ro.value_mask[b], ro.rm[b])
            if k == 0 and ro.phase == "ppo++":
                assert torch.equal(ro.policy_mask[b], ro.rm[b])
    phases = {p for p, _ in kinds}
    assert kinds == {(p, s) for p in phases for s in (False, True)}, f"not every (phase, k > 0) case was seen: {kinds}"
    assert phases == ({"ppo++", "aggrevated"} if algo in ("lols", "d2lols") else {phase_of(algo, rec.iters[0])})


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("algo", list(SCRIPTS))
def test_kl_penalty_only_on_learner_tokens(guided, algo, kind):
    """r_t = -kl_coef * (log pi_theta(y_t) - log pi_ref(y_t)) on the learner's tokens only (the guide's
    tokens have no learner log-prob of their own), + R(x, y) at the last token (SPEC 1, 5.2)."""
    rec, _, tok, _ = guided(algo, kind)
    seen_kl = False
    for it in rec.iters:
        ro = analyse(it, phase_of(algo, it))
        assert len(it.gae) == 1
        rewards = it.gae[0][0]
        expected = -KL_COEF * (ro.old_logprobs - it.ref["logprobs"]) * ro.learner
        last = ro.rm.sum(1).long() - 1
        expected[torch.arange(len(ro.ks)), last] += torch.tensor(score_of(tok, ro))
        torch.testing.assert_close(rewards, expected, atol=1e-6, rtol=0,
                                   msg=lambda m: f"{algo} iteration {it.metrics['step']} ({ro.phase}): rewards\n{m}")
        non_learner = (1 - ro.learner).bool()
        non_learner[torch.arange(len(ro.ks)), last] = False
        assert torch.all(rewards[non_learner] == 0), "a KL penalty on a token the learner did not write"
        seen_kl |= bool((expected * ro.learner).abs().max() > 1e-5)
    assert seen_kl, "the KL term never moved: the test is vacuous"


@pytest.mark.parametrize("algo", list(SCRIPTS))
def test_guide_metrics_match_rollouts(guided, algo):
    rec, run_dir, _, _ = guided(algo)
    lines = [r for r in _jsonl(run_dir / "metrics.jsonl") if "objective/reward" in r]
    assert len(lines) == len(rec.iters)
    for it in rec.iters:
        ro = analyse(it, phase_of(algo, it))
        m = it.metrics
        ks = torch.tensor(ro.ks, dtype=torch.float)
        assert m["guide/mix_fraction"] == pytest.approx(float((ks > 0).float().mean()))
        assert m["guide/switch_point"] == pytest.approx(float(ks[ks > 0].mean()) if (ks > 0).any() else 0.0)
        assert m["guide/learner_tokens"] == pytest.approx(float(ro.learner.sum(1).mean()))
        assert m["guide/guide_tokens"] == pytest.approx(float((ro.rm - ro.learner).sum(1).mean()))
        if algo in ("lols", "d2lols"):
            assert m["guide/phase"] in (0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# 4. switch points uniform on 1..len-1, mixing with probability beta; LOLS's coin; D2LOLS's switch
# ---------------------------------------------------------------------------------------------------
def _chi2_uniform_pit(ks: list[int], lens: list[int], bins: int = 10, seed: int = 0) -> float:
    """Randomised PIT: if k ~ U{1..L-1}, (k - 1 + V) / (L - 1) with V ~ U(0,1) is U(0,1)."""
    rng = np.random.default_rng(seed)
    u = (np.array(ks) - 1 + rng.random(len(ks))) / (np.array(lens) - 1)
    assert np.all((u >= 0) & (u < 1))
    counts = np.bincount(np.minimum((u * bins).astype(int), bins - 1), minlength=bins)
    e = len(u) / bins
    return float(((counts - e) ** 2 / e).sum())


CHI2_9DOF_P001 = 27.88  # 0.999 quantile of chi-square with 9 degrees of freedom


@pytest.mark.parametrize("algo", ["ppo_plus_plus", "aggrevated"])
def test_switch_point_uniform_and_mixing_probability_beta(models, tmp_path, algo):
    beta, B, iters = 0.3, 512, 4
    args = script_args(SCRIPTS[algo], "commongen", models("commongen"), tmp_path, beta=beta, iterations=iters,
                       rollouts_per_iteration=B, minibatch_size=B, lr=1e-4)
    rec, _ = run_recorded(SCRIPTS[algo], args, guide=one_token_guide(1, 24))
    assert len(rec.iters) == iters
    heads, ks_mixed, lens_mixed, n = 0, [], [], 0
    for it in rec.iters:
        ro = analyse(it, phase_of(algo, it))
        n += len(ro.ks)
        it_heads = 0
        for b, k in enumerate(ro.ks):
            L = len(ro.roll_in[b])
            if algo == "ppo_plus_plus":
                if b in ro.coins:  # the guide rolled in: k must be drawn whenever it can be
                    it_heads += 1
                    assert (1 <= k <= L - 1) if L >= 2 else k == 0, f"k={k} for a roll-in of {L} tokens"
                else:
                    assert k == 0
            else:
                assert k == 0 or 1 <= k <= L - 1, f"k={k} for a roll-in of {L} tokens"
                it_heads += k > 0
            if k > 0:
                ks_mixed.append(k)
                lens_mixed.append(L)
        assert 0.15 * len(ro.ks) < it_heads < 0.45 * len(ro.ks), "the coin is not per row"
        heads += it_heads
    # the coin: Binomial(n, beta)
    sd = math.sqrt(n * beta * (1 - beta))
    assert abs(heads - n * beta) < 4.5 * sd, f"{heads} of {n} rows mixed, expected {n * beta:.0f} +- {sd:.0f}"
    # both ends of 1..L-1 are reached, nothing outside
    assert min(ks_mixed) == 1
    assert any(k == L - 1 for k, L in zip(ks_mixed, lens_mixed))
    chi2 = _chi2_uniform_pit(ks_mixed, lens_mixed)
    assert chi2 < CHI2_9DOF_P001, f"switch points are not uniform on 1..len-1 (chi2 {chi2:.1f}, n {len(ks_mixed)})"
    if algo == "ppo_plus_plus":  # roll-ins of one token cannot switch; ragged lengths were exercised
        assert len(set(lens_mixed)) > 5


def test_lols_coin_frequency_is_p_ppo_pp(models, tmp_path):
    p, iters = 0.3, 120
    args = script_args(lols, "commongen", models("commongen"), tmp_path, beta=0.5, p_ppo_pp=p, iterations=iters,
                       rollouts_per_iteration=2, minibatch_size=2, max_new_tokens=6, min_new_tokens=1, eval_samples=1)
    rec, _ = run_recorded(lols, args, guide=one_token_guide())
    phases = [it.metrics["guide/phase"] for it in rec.iters]
    assert len(phases) == iters and set(phases) == {0.0, 1.0}
    n_pp = sum(1 for x in phases if x == 1.0)
    sd = math.sqrt(iters * p * (1 - p))
    assert abs(n_pp - iters * p) < 4 * sd, f"{n_pp} of {iters} PPO++ iterations, expected {iters * p:.0f} +- {sd:.1f}"
    # the phase metric tells the truth: PPO++ iterations roll in with the guide and roll out with the learner
    for it in rec.iters[:20]:
        queries, prefixes, _ = it.samples[0]
        if it.metrics["guide/phase"] == 1.0:
            assert prefixes is not None and all(g[1] == [[] for _ in g[0]] for g in it.guides)
        else:
            assert len(it.guides) == 1 and it.guides[0][0] == queries


def _critic_tags(it: Iteration) -> tuple[set, set]:
    return ({c["tag"] for c in it.critic_calls if not c["training"]}, {c["tag"] for c in it.critic_calls if c["training"]})


@pytest.mark.parametrize("algo", ["lols", "d2lols"])
def test_phase_critic_is_used_and_only_it_changes(guided, algo):
    """V_phi for PPO++ iterations, a separate V_psi for AggreVaTeD iterations: the values and the value
    loss of an iteration use the phase's critic, and the other critic's parameters do not move."""
    rec, run_dir, _, _ = guided(algo)
    assert len(rec.critics) == 2, "LOLS / D2LOLS need two critics (V_phi and the guide critic V_psi)"
    by_phase: dict = {}
    prev = dict(enumerate(rec.critic_init))
    for it in rec.iters:
        phase = phase_of(algo, it)
        values_tags, train_tags = _critic_tags(it)
        assert len(values_tags) == 1 and values_tags == train_tags, f"{phase}: values {values_tags}, loss {train_tags}"
        tag = values_tags.pop()
        assert by_phase.setdefault(phase, tag) == tag, f"{phase} iterations switch critics"
        other = 1 - tag
        assert torch.equal(it.critic_params[other], prev[other]), f"{phase}: the other phase's critic changed"
        assert not torch.equal(it.critic_params[tag], prev[tag]), f"{phase}: the phase's critic did not train"
        prev = it.critic_params
    assert set(by_phase) == {"ppo++", "aggrevated"} and by_phase["ppo++"] != by_phase["aggrevated"]
    # the critic saved with the policy is the learner's V_phi (the PPO++ critic)
    saved = torch.load(run_dir / "critic.pt")
    v_phi = rec.critics[by_phase["ppo++"]]
    assert all(torch.equal(saved[n], p.detach()) for n, p in v_phi.named_parameters())


def test_d2lols_switches_phase_and_critic_at_tau(guided):
    rec, _, _, _ = guided("d2lols")
    tau = GUIDED_SETTINGS["d2lols"]["tau"]
    phases = [it.metrics["guide/phase"] for it in rec.iters]
    assert phases == [0.0 if i <= tau else 1.0 for i in range(1, len(rec.iters) + 1)]
    for i, it in enumerate(rec.iters, 1):
        ro = analyse(it, "aggrevated" if i <= tau else "ppo++")  # the rollouts follow the schedule too
        assert ro.phase == ("aggrevated" if i <= tau else "ppo++")
    psi = _critic_tags(rec.iters[0])[0].pop()   # AggreVaTeD phase's critic
    phi = _critic_tags(rec.iters[-1])[0].pop()  # PPO++ phase's critic
    assert psi != phi
    at_tau = rec.iters[tau - 1].critic_params
    end = rec.iters[-1].critic_params
    # V_phi is untouched during the first tau iterations, V_psi untouched after
    assert torch.equal(at_tau[phi], rec.critic_init[phi])
    assert not torch.equal(end[phi], at_tau[phi])
    assert not torch.equal(at_tau[psi], rec.critic_init[psi])
    assert torch.equal(end[psi], at_tau[psi])


@pytest.mark.parametrize("algo", ["lols", "d2lols"])
def test_resume_restores_coins_phase_and_both_critics(models, tmp_path, algo):
    """2 iterations + --resume to 4 == 4 iterations in one go (mixing coins, LOLS's coin, both critics)."""
    mod = SCRIPTS[algo]
    # LOLS, seed 2: AggreVaTeD, PPO++ | PPO++, PPO++; D2LOLS resumes inside the AggreVaTeD phase
    extra = dict(p_ppo_pp=0.5, seed=2) if algo == "lols" else dict(tau=3)
    kw = dict(beta=0.5, lr=1e-3, lr_schedule="constant", keep_checkpoint=True, **extra)
    model = models("commongen")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(guides, "build_guide", lambda *a, **k: one_token_guide())
        mp.setattr(rt, "make_reward", lambda *a, **k: length_reward)
        mod.main(script_args(mod, "commongen", model, tmp_path, run_name="full", iterations=4, **kw))
        mod.main(script_args(mod, "commongen", model, tmp_path, run_name="part", iterations=2, **kw))
        mod.main(script_args(mod, "commongen", model, tmp_path, run_name="part", iterations=4,
                             resume=str(tmp_path / "part"), **kw))
    full = [r for r in _jsonl(tmp_path / "full" / "metrics.jsonl") if "objective/reward" in r]
    part = [r for r in _jsonl(tmp_path / "part" / "metrics.jsonl") if "objective/reward" in r]
    assert [r["step"] for r in part] == [1, 2, 3, 4]
    assert {r["guide/phase"] for r in full} == {0.0, 1.0}
    for a, b in zip(full, part):
        for k in a:
            if not k.startswith("time/"):
                assert a[k] == b[k], f"step {a['step']}: {k} {a[k]!r} (one go) vs {b[k]!r} (resumed)"
    ca, cb = torch.load(tmp_path / "full" / "critic.pt"), torch.load(tmp_path / "part" / "critic.pt")
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


# ---------------------------------------------------------------------------------------------------
# 5. an HF guide: samples come from the guide (SPEC 5.1), its weights never change
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["ppo_plus_plus", "aggrevated", "lols"])
def test_hf_guide_is_sampled_and_frozen(models, tmp_path, algo):
    from transformers import AutoModelForCausalLM

    learner, guide = models("imdb"), models("imdb", "guideT")
    T = t_id(guide)
    assert t_id(learner) == T  # same tokenizer: the guide's text re-tokenises token for token
    extra = dict(p_ppo_pp=0.5, iterations=4) if algo == "lols" else {}
    args = script_args(SCRIPTS[algo], "imdb", learner, tmp_path, guide_model=str(guide), beta=1.0, lr=1e-3,
                       **extra)
    rec, _ = run_recorded(SCRIPTS[algo], args)
    assert len(rec.guide_objects) == 1 and isinstance(rec.guide_objects[0], HFGuide)
    g = rec.guide_objects[0]
    # frozen: bit-identical to the folder it came from
    on_disk = AutoModelForCausalLM.from_pretrained(str(guide)).state_dict()
    after = g.model.state_dict()
    assert all(torch.equal(after[k], on_disk[k]) for k in on_disk), "the guide's weights changed"
    # and the learner did train (so the guide's stillness means something)
    init = AutoModelForCausalLM.from_pretrained(str(learner)).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "policy")).state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in init)
    # sampled from the guide: every guide token is T, the learner's tokens are not
    guide_toks, learner_toks = [], []
    for it in rec.iters:
        ro = analyse(it, phase_of(algo, it))
        for (_, ltoks, _), (_, gtoks) in zip(ro.learner_tokens, ro.guide_tokens):
            guide_toks += gtoks
            learner_toks += ltoks
    assert len(guide_toks) > 20 and all(t == T for t in guide_toks), "guide samples do not come from the guide"
    assert len(learner_toks) > 20 and sum(t == T for t in learner_toks) < 0.2 * len(learner_toks), \
        "the learner's tokens look like the guide's"


# ---------------------------------------------------------------------------------------------------
# 6. every script on every task, two iterations, end to end
# ---------------------------------------------------------------------------------------------------
GUIDE_KEYS = ("guide/mix_fraction", "guide/switch_point", "guide/guide_tokens", "guide/learner_tokens",
              "time/guide_generate")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("algo", list(SCRIPTS))
def test_end_to_end_two_iterations(models, tmp_path, algo, task):
    mod = SCRIPTS[algo]
    # the rule guide where one exists for two of the scripts, the HF guide (the learner's folder) otherwise
    guide = "rule" if task != "imdb" and algo in ("ppo_plus_plus", "lols") else "model"
    extra = {"tau": 1} if algo == "d2lols" else {"p_ppo_pp": 0.5} if algo == "lols" else {}
    args = script_args(mod, task, models(task), tmp_path, rollouts_per_iteration=4, minibatch_size=2, n_epochs=2,
                       eval_samples=4, eval_interval=1, guide=guide, **extra)
    first, final = mod.main(args)
    for m in (first, final):
        assert m and all(math.isfinite(v) for v in m.values()), m
    lines = _jsonl(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in lines if "objective/reward" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        for k in GUIDE_KEYS + ("objective/kl", "loss/policy", "loss/value", "objective/entropy"):
            assert k in r, f"{k} missing from {sorted(r)}"
        assert all(math.isfinite(v) for v in r.values())
        assert 0.0 <= r["guide/mix_fraction"] <= 1.0
        assert r["guide/learner_tokens"] + r["guide/guide_tokens"] == pytest.approx(r["train/response_length"])
        if algo in ("lols", "d2lols"):
            assert r["guide/phase"] in (0.0, 1.0)
    if algo == "d2lols":
        assert [r["guide/phase"] for r in train] == [0.0, 1.0]
    assert (tmp_path / "run" / "policy" / "config.json").is_file()
    assert (tmp_path / "run" / "critic.pt").is_file()
