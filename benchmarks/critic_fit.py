"""How fast can the critic learn? Explained variance of the value predictions against the iterations' returns, for
the critic settings (`--critic-lr`, `--critic-warmup`, `--critic reference-head`), with the policy held fixed.

Rolls out the start policy for `--iterations` batches (the task's preset: rollouts, lengths, reward, KL
coefficient), keeps each batch's tokens, reward, KL and the reference's last hidden states, then replays PPO's
critic half on them for each setting: per iteration, the values of the batch before it is trained on (what
`value/explained_variance` measures), GAE returns from those values, then `n_epochs` x minibatches of the scripts'
clipped value loss (x vf_coef, grad-norm clip, AdamW eps 1e-5, the lr schedule). The policy does not change (its
update is left out), so the returns come from one policy; what the table shows is how well each critic can fit
them, and at what cost per update.

    RLGF_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/critic_fit.py --policy-model smollm2 \
        --iterations 8 --json-out critic_fit.json

`--ceiling` adds how much of the returns a linear head on the reference's states can predict on batches it was not
fitted on (`linear_ceiling`: ridge regressions of the returns on the stored states).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import ppo  # noqa: E402
from common import runtime as rt  # noqa: E402
from common.generation import (ValueModel, decode, forward_response, left_pad, position_ids, right_pad,  # noqa: E402
                               sample, used_columns)
from common.harness import Run  # noqa: E402
from common.settings import finish_settings  # noqa: E402


def explained_variance(values, returns, mask) -> float:
    m = mask.bool()
    v, r = values[m], returns[m]
    return float(1 - (r - v).var(unbiased=False) / r.var(unbiased=False).clamp(min=1e-8))


class Head(torch.nn.Module):
    """A value head on stored hidden states (the reference's), zero-initialised like ValueModel's."""

    def __init__(self, hidden: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, h):
        return self.head(h.float()).squeeze(-1)


def collect(run, args, n: int) -> list[dict]:
    policy, ref, tok, device = run.policy, run.ref, run.tok, run.device
    eos, pad = tok.eos_token_id, tok.pad_token_id
    out = []
    for i in range(n):
        batch, queries = run.prompts()
        with torch.no_grad():
            s = sample(policy, queries, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                       eos_id=eos, pad_id=pad, temperature=args.temperature, device=device)
            qi, qm = left_pad(queries, pad, device)
            ri, rm = right_pad(s.tokens, pad, device=device)
            old = rt.right_pad_float(s.logprobs, ri.shape[1], device)
            ref_lp, _ = forward_response(ref, qi, qm, ri, rm, eos_id=eos, pad_id=pad,
                                         min_new_tokens=args.min_new_tokens, temperature=args.temperature)
            ids, mask = torch.cat([qi, ri], 1), torch.cat([qm, rm], 1)
            P, T = qi.shape[1], ri.shape[1]
            h = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                    output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            h = h[:, P - 1: P + T - 1].float()
        scores = torch.tensor(run.score(batch, decode(tok, s.tokens), i + 1))
        rmf = rm.float()
        rewards = -args.kl_coef * (old - ref_lp) * rmf
        last = (rm.sum(1) - 1).clamp(min=0)
        rewards[torch.arange(len(batch)), last] += scores
        out.append(dict(qi=qi, qm=qm, ri=ri, rm=rm, rewards=rewards, hidden=h, scores=scores))
        print(f"batch {i + 1}/{n}: reward {scores.mean():.3f} +- {scores.std():.3f}, {rmf.sum(1).mean():.1f} tokens",
              flush=True)
    return out


def replay(setting: dict, critic0, hidden_size: int, batches: list[dict], args) -> dict:
    """PPO's critic half on the stored batches (see the module docstring)."""
    kind, lr, warm = setting["kind"], setting["lr"], setting.get("warmup", 0)
    model = copy.deepcopy(critic0) if kind == "full" else Head(hidden_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=args.adam_eps, weight_decay=args.weight_decay)

    def values_of(b, rows=slice(None), cols=slice(None), qcols=slice(None)):
        if kind == "full":
            return model(b["qi"][rows][:, qcols], b["qm"][rows][:, qcols], b["ri"][rows][:, cols],
                         b["rm"][rows][:, cols])
        return model(b["hidden"][rows][:, cols])

    evs, upd_times, grad_norms, steps = [], [], [], 0
    for i, b in enumerate(batches):
        frac = 1.0 - i / args.iterations if args.lr_schedule == "linear" else 1.0
        for g in opt.param_groups:
            g["lr"] = lr * frac
        rm = b["rm"].float()
        with torch.no_grad():
            values = values_of(b) * rm
        adv, returns = ppo.compute_gae(b["rewards"], values, rm, args.gamma, args.lam)
        evs.append(explained_variance(values, returns, rm))
        t0 = time.time()
        n_rows = len(rm)
        for epoch in range(args.n_epochs + (warm if i == 0 else 0)):
            for mb in torch.randperm(n_rows).split(args.minibatch_size):
                opt.zero_grad()
                q, t = used_columns(b["qm"][mb], b["rm"][mb])
                v = values_of(b, mb, t, q)
                v_old, ret, m = values[mb][:, t], returns[mb][:, t], rm[mb][:, t]
                v_clip = v_old + (v - v_old).clamp(-args.clip_range_vf, args.clip_range_vf)
                loss = 0.5 * (torch.max((v - ret) ** 2, (v_clip - ret) ** 2) * m).sum() / m.sum().clamp(min=1)
                (args.vf_coef * loss).backward()
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)))
                opt.step()
                steps += 1
        upd_times.append(time.time() - t0)
        print(f"  {setting['name']}: iteration {i + 1}: explained variance {evs[-1]:+.3f}, "
              f"update {upd_times[-1]:.2f} s, "
              f"values {values[rm.bool()].mean():+.3f} +- {values[rm.bool()].std():.3f}", flush=True)
    return dict(setting, explained_variance=evs, update_seconds=upd_times, adam_steps=steps,
                grad_norm_median=float(torch.tensor(grad_norms).median()))


def linear_ceiling(batches: list[dict], gamma: float, alphas=(1.0, 1e2, 1e3, 1e4, 1e5, 1e6)) -> dict:
    """How much of the returns a value head on these hidden states can predict, given every other batch: ridge
    regressions (features standardised on the training batches, closed form) of each response position's return (the
    discounted sum of the rewards from there on, GAE with lambda 1 and no values) on the reference's hidden state,
    scored leave-one-batch-out (a batch's rollouts never train the model that scores them). Returns, per ridge
    alpha, the explained variance of the held-out predictions pooled over every batch, and the same for training
    on the first k batches only and scoring the last two (how the ceiling grows with data)."""
    X = [b["hidden"][b["rm"].bool()].double() for b in batches]
    y = [ppo.compute_gae(b["rewards"], torch.zeros_like(b["rewards"]), b["rm"].float(), gamma, 1.0)[1][
        b["rm"].bool()].double() for b in batches]

    def fit_predict(train, test, alpha):
        Xt, yt = torch.cat([X[i] for i in train]), torch.cat([y[i] for i in train])
        mu, sd = Xt.mean(0), Xt.std(0).clamp(min=1e-8)
        Z = (Xt - mu) / sd
        w = torch.linalg.solve(Z.T @ Z + alpha * torch.eye(Z.shape[1], dtype=Z.dtype), Z.T @ (yt - yt.mean()))
        return torch.cat([((X[i] - mu) / sd) @ w + yt.mean() for i in test])

    def ev(pred, target):
        return float(1 - (target - pred).var(unbiased=False) / target.var(unbiased=False).clamp(min=1e-12))

    n = len(batches)
    out = {"leave_one_batch_out": {}, "by_training_batches": {}}
    for a in alphas:
        pred = torch.cat([fit_predict([j for j in range(n) if j != i], [i], a) for i in range(n)])
        out["leave_one_batch_out"][a] = ev(pred, torch.cat(y))
        test = [n - 2, n - 1]
        out["by_training_batches"][a] = {k: ev(fit_predict(list(range(k)), test, a), torch.cat([y[i] for i in test]))
                                         for k in (1, 2, 4, 8, 16, 32, 64) if k <= n - 2}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policy-model", default="smollm2")
    p.add_argument("--task", default="commongen")
    p.add_argument("--iterations", type=int, default=8, help="batches rolled out (iterations replayed)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--settings", default="all",
                   help="comma-separated setting names (default: all; none: the rollouts and --ceiling only)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--ceiling", action="store_true",
                   help="also the linear ceiling: how much of the returns a linear head on the reference's states "
                        "predicts")
    o = p.parse_args()
    out_dir = tempfile.mkdtemp(prefix="critic-fit-")
    args = finish_settings(ppo.Args(task=o.task, policy_model=o.policy_model, seed=o.seed, output_dir=out_dir,
                                    run_name="fit", device="cpu"), "ppo")
    run = Run(args, "ppo")
    hidden_size = run.critic.head.in_features
    t0 = time.time()
    batches = collect(run, args, o.iterations)
    print(f"rolled out {o.iterations} batches in {time.time() - t0:.0f} s", flush=True)
    allret = torch.cat([ppo.compute_gae(b["rewards"], torch.zeros_like(b["rewards"]), b["rm"].float(), args.gamma,
                                        1.0)[1][b["rm"].bool()] for b in batches])
    hid = torch.cat([b["hidden"][b["rm"].bool()] for b in batches])
    facts = dict(returns_mean=float(allret.mean()), returns_std=float(allret.std()),
                 hidden_norm=float(hid.norm(dim=-1).mean()), hidden_abs_mean=float(hid.abs().mean()),
                 lr=args.lr, vf_coef=args.vf_coef, n_epochs=args.n_epochs, minibatch=args.minibatch_size,
                 rollouts=args.rollouts_per_iteration, preset_iterations=args.iterations)
    print(json.dumps(facts), flush=True)
    if o.ceiling:
        ceil = linear_ceiling(batches, args.gamma)
        facts["linear_ceiling"] = ceil
        print("linear ceiling (ridge on the reference's states), explained variance of held-out returns:")
        for a, v in ceil["leave_one_batch_out"].items():
            grow = ", ".join(f"{k}: {e:+.3f}" for k, e in ceil["by_training_batches"][a].items())
            print(f"  alpha {a:g}: leave one batch out {v:+.3f}; trained on the first k batches, scored on the "
                  f"last two: {grow}", flush=True)
        if o.json_out:
            with open(o.json_out, "w") as f:
                json.dump(dict(facts=facts, results=[]), f, indent=1)
    lr = args.lr
    settings = [
        dict(name="full lr x1", kind="full", lr=lr), dict(name="full lr x10", kind="full", lr=10 * lr),
        dict(name="full lr x10 warmup 4", kind="full", lr=10 * lr, warmup=4),
        dict(name="head lr x1", kind="head", lr=lr), dict(name="head lr x10", kind="head", lr=10 * lr),
        dict(name="head lr x100", kind="head", lr=100 * lr), dict(name="head lr x1000", kind="head", lr=1000 * lr),
        dict(name="head lr x100 warmup 4", kind="head", lr=100 * lr, warmup=4),
        dict(name="head lr x100 warmup 20", kind="head", lr=100 * lr, warmup=20),
    ]
    if o.settings != "all":
        wanted = o.settings.split(",")
        settings = [s for s in settings if s["name"] in wanted]
    results = []
    torch.manual_seed(o.seed)
    for s in settings:
        results.append(replay(s, run.critic, hidden_size, batches, args))
        if o.json_out:
            with open(o.json_out, "w") as f:
                json.dump(dict(facts=facts, results=results), f, indent=1)
    print("\nsetting | EV per iteration | mean EV of the last half | update s (median)")
    for r in results:
        ev, half = r["explained_variance"], len(r["explained_variance"]) // 2
        upd = sorted(r["update_seconds"])[len(r["update_seconds"]) // 2]
        print(f"{r['name']} | {' '.join(f'{e:+.2f}' for e in ev)} | {sum(ev[half:]) / len(ev[half:]):+.3f} | "
              f"{upd:.2f}")


if __name__ == "__main__":
    main()
