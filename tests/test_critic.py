"""The critic settings: `--critic-lr` (a parameter group of its own under the lr schedule), `--critic-warmup`
(value-loss epochs before the first policy update, the policy untouched) and `--critic reference-head` (a value head
on the frozen reference's last hidden states). Tiny random models (tests/_tiny.py), one CPU thread."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DATA, needs_data  # noqa: F401  (conftest puts the repository on sys.path)

import lols  # noqa: E402
import ppo  # noqa: E402
from common.generation import ReferenceHeadValue, forward_response, left_pad, position_ids, right_pad  # noqa: E402
from common.harness import Run  # noqa: E402
from common.settings import finish_settings  # noqa: E402

pytestmark = needs_data


def _args(mod, model, out, **kw):
    base = dict(task="commongen", policy_model=str(model), data_dir=str(DATA), output_dir=str(out), run_name="run",
                iterations=2, rollouts_per_iteration=4, minibatch_size=2, n_epochs=1, eval_samples=2,
                eval_interval=1000, device="cpu")
    base.update(kw)
    return mod.Args(**base)


def _flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def _rollouts(run, n=4, width=5):
    """n prompts of the train split and random response tokens (every row of its own length)."""
    _, queries = run.prompts()
    qi, qm = left_pad(queries[:n], run.tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(5, 60, (width - i % 3,), generator=g).tolist() for i in range(n)]
    ri, rm = right_pad(responses, run.tok.pad_token_id)
    return qi, qm, ri, rm


def test_critic_lr_is_a_parameter_group_of_its_own_under_the_schedule(tiny_model, tmp_path):
    args = finish_settings(_args(ppo, tiny_model("commongen"), tmp_path, lr=1e-4, critic_lr=3e-3,
                                 lr_schedule="linear"), "ppo")
    with Run(args, "ppo") as run:
        policy_group, critic_group = run.optimizer.param_groups
        assert {id(p) for p in policy_group["params"]} == {id(p) for p in run.policy.parameters()}
        assert {id(p) for p in critic_group["params"]} == {id(p) for p in run.critic.parameters()}
        seen = {it: [g["lr"] for g in run.optimizer.param_groups] for it in run.iterations()}
    assert seen[1] == pytest.approx([1e-4, 3e-3]) and seen[2] == pytest.approx([0.5e-4, 1.5e-3])  # linear decay


def test_without_critic_lr_one_group():
    """The default keeps the one parameter group of before (the numbers do not change)."""
    assert ppo.Args().critic_lr is None and ppo.Args().critic_warmup == 0 and ppo.Args().critic is None


def test_warm_up_trains_the_critic_and_leaves_the_policy(tiny_model, tmp_path):
    args = finish_settings(_args(ppo, tiny_model("commongen"), tmp_path, critic_warmup=3, lr=1e-2), "ppo")
    with Run(args, "ppo") as run:
        qi, qm, ri, rm = _rollouts(run)
        rm = rm.float()
        values, returns = torch.zeros_like(rm), torch.rand(rm.shape) * rm
        for it in run.iterations():
            policy0, critic0 = _flat(run.policy), _flat(run.critic)
            run.warm_up_critic(it, run.critic, run.critic_t, (qi, qm, ri, rm), values, returns, rm)
            if it == 1:
                assert torch.equal(_flat(run.policy), policy0)  # the policy: no step, no weight decay
                assert not any(run.optimizer.state.get(p) for p in run.policy.parameters())  # no AdamW state either
                assert not torch.equal(_flat(run.critic), critic0)
                steps = {int(s["step"]) for p in run.critic.parameters() for s in [run.optimizer.state[p]]}
                assert steps == {3 * 2}  # 3 epochs x 2 minibatches
            else:  # iteration 1 only
                assert torch.equal(_flat(run.critic), critic0)


def test_reference_head_reads_the_reference_states_and_sends_it_no_gradient(tiny_model, tmp_path):
    args = finish_settings(_args(ppo, tiny_model("commongen"), tmp_path, critic="reference-head"), "ppo")
    with Run(args, "ppo") as run:
        assert isinstance(run.critic, ReferenceHeadValue) and run.critic_reads_ref
        assert sum(p.numel() for p in run.critic.parameters()) == run.ref.config.hidden_size + 1
        torch.nn.init.normal_(run.critic.head.weight)  # not the zero start: values that depend on the states
        qi, qm, ri, rm = _rollouts(run)
        kw = dict(eos_id=run.tok.eos_token_id, pad_id=run.tok.pad_token_id, min_new_tokens=0)
        with torch.no_grad():
            lp, hidden = forward_response(run.ref, qi, qm, ri, rm, with_hidden=True, **kw)
            assert torch.equal(lp, forward_response(run.ref, qi, qm, ri, rm, **kw)[0])  # the log-probs unchanged
            for pack in (False, True):  # the padded and the packed layout give the same states
                assert torch.allclose(forward_response(run.ref, qi, qm, ri, rm, with_hidden=True, pack=pack, **kw)[1],
                                      hidden, atol=1e-5)
            ids, mask = torch.cat([qi, ri], 1), torch.cat([qm, rm], 1)
            P, T = qi.shape[1], ri.shape[1]
            states = run.ref(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                             output_hidden_states=True).hidden_states[-1][:, P - 1: P + T - 1]
        real = rm.bool()
        assert torch.allclose(hidden[real], states[real], atol=1e-5) and not hidden[~real].any()
        v = run.critic(qi, qm, ri, rm, hidden=hidden)
        assert torch.allclose(v, run.critic.head(hidden).squeeze(-1))
        (v * rm).sum().backward()
        assert all(p.grad is None and not p.requires_grad for p in run.ref.parameters())
        assert run.critic.head.weight.grad.abs().sum() > 0
        with pytest.raises(ValueError):
            run.critic(qi, qm, ri, rm)


@pytest.mark.parametrize("mod, settings", [
    (ppo, dict(critic_lr=1e-3)), (ppo, dict(critic_warmup=2)), (ppo, dict(critic="reference-head")),
    (lols, dict(critic="reference-head", critic_warmup=1, critic_lr=1e-3, p_ppo_pp=0.5, beta=1.0)),
])
def test_a_run_with_each_setting_finishes(tiny_model, tmp_path, mod, settings):
    args = _args(mod, tiny_model("commongen"), tmp_path, **settings)
    mod.main(args)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "value/explained_variance" in r]
    assert len(train) == 2
    if "critic_lr" in settings:
        assert train[0]["train/critic_lr"] == pytest.approx(1e-3)
    if "critic_warmup" in settings:
        assert train[0]["time/critic_warmup"] > 0 and "time/critic_warmup" not in train[1]
    assert (tmp_path / "run" / "critic.pt").exists()
