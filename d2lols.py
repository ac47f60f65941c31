"""D2LOLS: AggreVaTeD for the first tau iterations, then PPO++ ("Learning to Generate Better Than Your
LLM", Chang et al., arXiv 2306.11816, D2LOLS: first imitate the guide's cost-to-go, then improve past it).

Algorithm (one iteration; numbers name the lines the loop's comments refer to)
  0  phase: AggreVaTeD while iteration <= tau, PPO++ after
  1  draw a batch of prompts x from the train split
  2  AggreVaTeD: learner roll-in y_in ~ pi_theta, k ~ U{1..len-1} with probability beta (else 0), guide roll-out
     PPO++: guide roll-in y_in ~ pi_g, k ~ U{1..len-1} with probability beta (else 0), learner roll-out
     y = y_in[:k] + y_out
  3  score R(x, y); log-probs of pi_ref; values of the phase's critic: the guide critic V_psi in the
     AggreVaTeD phase, the learner critic V_phi after
  4  per-token reward r_t = -kl_coef * KL_t on the learner's tokens, plus R(x, y) at the last token
  5  advantages by GAE(gamma, lambda); whiten them over the learner's tokens
  6  for n_epochs, for each minibatch: clipped policy loss and clipped value loss with the phase's masks:
     AggreVaTeD: policy on t < k, critic V_psi on t >= k;  PPO++: policy and critic V_phi on t >= k
  7  evaluate on the validation split every eval_interval iterations (the learner alone, no guide)

Run:  python d2lols.py --task tldr        (the README's main job; --guide rule for the rule-based guide)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from common import runtime as rt
from common.errors import one_line_errors
from common.generation import decode, forward_response, left_pad, right_pad, sample, used_columns
from common.guides import guide_continue, mixed_rows
from common.harness import Run, update_means
from common.settings import GuideSettings, ModelSettings, RunSettings, cli, finish_settings


@dataclass
class Args(RunSettings, ModelSettings, GuideSettings):
    """Defaults are the paper's for IMDB; the task's preset sets every value not given (--task X --help shows it)."""

    task: str = "imdb"
    """imdb, commongen or tldr"""
    seed: int = 1
    """seed of every random number generator"""
    policy_model: str | None = None
    """learner's initial model: hub id, folder or smollm2; default: the task's embedded model (built once, cached)"""
    reward_model: str | None = None
    """IMDB: a sentiment classifier (default VADER); TL;DR: a reward model (default ROUGE-L); unused by CommonGen"""
    prompt_tokens: int = 64
    """prompt length in tokens, cut the task's way (paper: IMDB 64, CommonGen 15, TL;DR 500)"""
    min_new_tokens: int = 48
    """EOS is masked before this many response tokens, in sampling and in the loss (IMDB 48, else 5)"""
    max_new_tokens: int = 48
    """response length limit (IMDB 48, CommonGen 20, TL;DR 50)"""
    temperature: float = 1.0
    """sampling temperature, the same in the loss"""
    iterations: int = 50
    """PPO iterations (paper: IMDB 50, CommonGen 500, TL;DR 1000)"""
    rollouts_per_iteration: int = 112
    """prompts rolled out per iteration, over all processes (IMDB 112, else 128)"""
    minibatch_size: int = 28
    """rollouts per optimiser step, over all processes (IMDB 28, else 32); divides rollouts_per_iteration"""
    n_epochs: int = 5
    """passes over the iteration's rollouts (IMDB 5, else 4)"""
    lr: float = 1e-5
    """AdamW learning rate of the policy, and of the critic unless --critic-lr (IMDB 1e-5, else 5e-6)"""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """linear (decay to 0) or constant (TL;DR)"""
    weight_decay: float = 0.0
    """AdamW weight decay (TL;DR 0.01)"""
    adam_eps: float = 1e-5
    """AdamW epsilon"""
    max_grad_norm: float = 1.0
    """gradient-norm clip, applied to the policy and the critic separately"""
    gamma: float = 0.99
    """discount (TL;DR 1.0)"""
    lam: float = 0.95
    """GAE lambda"""
    clip_range: float = 0.2
    """policy ratio clip"""
    clip_range_vf: float = 0.2
    """value clip around the rollout's values"""
    vf_coef: float = 0.5
    """value-loss coefficient (CommonGen 30, TL;DR 0.1)"""
    kl_coef: float = 0.001
    """initial coefficient of the per-token KL penalty in the reward (CommonGen 0, TL;DR 0.002)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator in the reward: k1 (log-ratio) or k3 ((r - 1) - log r)"""
    kl_target: float | None = None
    """target KL per sequence (nats) of the adaptive KL controller; None keeps kl_coef fixed"""
    kl_horizon: int = 10000
    """adaptive KL controller horizon (in rollouts)"""
    nll_coef: float = 0.0
    """weight of a negative log-likelihood term on the dataset reference (the official code's 0.1; off)"""
    eval_interval: int = 10
    """evaluate every this many iterations, and at start and end (IMDB 10, CommonGen 50, TL;DR 100)"""
    eval_samples: int = 500
    """validation prompts per periodic evaluation (CommonGen 993)"""
    eval_decoding: Literal["sample", "greedy", "beam"] = "sample"
    """how evaluations decode: sample (the learner's sampling) or, with generate, greedy (TL;DR) or beam (CommonGen)"""
    beta: float = 0.8
    """probability of a switch point k > 0 in either phase (paper 0.8)"""
    tau: int = 20
    """AggreVaTeD iterations before switching to PPO++ (paper: 20 of 50, 100 of 500, 200 of 1000)"""


ALGO = "d2lols"
PRESET_ALIASES = {"beta": "d2lols_beta"}  # Args field -> the preset key it reads


def compute_gae(rewards, values, mask, gamma: float, lam: float):
    """GAE over response tokens (SPEC 4.6), V = 0 after the last token. All [B, T], right-padded."""
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        next_v = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * next_mask * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def masked_mean(x, mask, world: int = 1):
    """Mean over valid tokens; over all processes when world > 1."""
    s = torch.stack([(x * mask).sum(), mask.sum()])
    s = rt.all_reduce_mean(s, world)
    return s[0] / s[1].clamp(min=1)


def masked_whiten(x, mask, world: int = 1):
    """Advantage whitening over the valid tokens of the whole batch (SPEC 4.6)."""
    mean = masked_mean(x, mask, world)
    var = masked_mean((x - mean) ** 2, mask, world)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def kl_per_token(logprobs, ref_logprobs, estimator: str):
    """k1: log pi_theta - log pi_ref; k3: (r - 1) - log r with r = pi_ref / pi_theta."""
    log_ratio = logprobs - ref_logprobs
    return log_ratio if estimator == "k1" else torch.expm1(-log_ratio) + log_ratio


class AdaptiveKL:
    """Ziegler et al.'s proportional controller; its state goes into checkpoints."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int):
        if self.target is not None:
            err = float(np.clip(kl / self.target - 1, -0.2, 0.2))
            self.value *= 1 + err * n / self.horizon


@one_line_errors
def main(args: Args):
    args = finish_settings(args, ALGO, PRESET_ALIASES)  # presets, derived sizes, checks: args is final from here on
    # devices, data, models (the learner's critic V_phi, the guide's V_psi), reward, optimiser; Ctrl-C keeps the policy
    with Run(args, ALGO, critics=("critic", "guide_critic")) as run:
        policy, ref, tok, device, world = run.policy, run.ref, run.tok, run.device, run.world
        critic_of = {"ppo++": "critic", "aggrevated": "guide_critic"}  # V_phi in PPO++, V_psi in AggreVaTeD
        eos, pad, local, mb_local = run.tok.eos_token_id, run.tok.pad_token_id, run.local, run.mb_local
        kl_ctl = AdaptiveKL(args.kl_coef, args.kl_target, args.kl_horizon)
        mix_rng = run.stream("mix")  # mixing coins and switch points: their own stream
        for it in run.iterations(kl_ctl=kl_ctl):  # resume, lr schedule; after each: evaluation, checkpoint
            # ---- line 0: D2LOLS's schedule: AggreVaTeD for tau iterations, then PPO++ -----------------
            phase = "aggrevated" if it <= args.tau else "ppo++"
            critic, critic_t = run.critics[critic_of[phase]], run.critics_t[critic_of[phase]]

            # ---- line 1: a batch of prompts (this process's slice of the global batch) -------------
            batch, queries = run.prompts()

            if phase == "ppo++":
                # ---- line 2: guide roll-in with probability beta, switch point k ~ U{1..len-1} ------
                mixed = [i for i in range(len(batch)) if mix_rng.random() < args.beta]
                prefixes, guide_full = [[] for _ in batch], []
                with run.timer("guide_generate"):
                    if mixed:
                        guide_full = guide_continue(run.guide, tok, [queries[i] for i in mixed], [[] for _ in mixed],
                                                    max_new_tokens=args.max_new_tokens,
                                                    min_new_tokens=args.min_new_tokens)
                for i, y_in in zip(mixed, guide_full):
                    prefixes[i] = y_in[: mix_rng.randint(1, len(y_in) - 1)] if len(y_in) >= 2 else []
                # ---- line 2: the learner rolls out from x + y_in[:k] --------------------------------
                with run.timer("generate"):
                    out = sample(policy, queries, prefixes=prefixes, max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.min_new_tokens, eos_id=eos, pad_id=pad,
                                 temperature=args.temperature, device=device)
                completions = [p + y for p, y in zip(prefixes, out.tokens)]  # y = y_in[:k] + y_out
                ri, rm = right_pad(completions, pad, device=device)
                rm = rm.float()
                old_logprobs = rt.right_pad_float([[0.0] * len(p) + lp for p, lp in zip(prefixes, out.logprobs)],
                                                  ri.shape[1], device)  # learner tokens: from sampling (SPEC 4.2)
                switch = torch.tensor([len(p) for p in prefixes], device=device)
                learner = rm * (torch.arange(ri.shape[1], device=device)[None] >= switch[:, None]).float()  # t >= k
                guide_rows, guide_full = mixed, guide_full  # the guide's own samples: its full roll-ins
                table = ("guide part", "learner part", prefixes, out.tokens)
            else:
                # ---- line 2: the learner rolls in; switch point k ~ U{1..len-1} with probability beta --
                with run.timer("generate"):
                    roll_in = sample(policy, queries, max_new_tokens=args.max_new_tokens,
                                     min_new_tokens=args.min_new_tokens, eos_id=eos, pad_id=pad,
                                     temperature=args.temperature, device=device)
                ks = [mix_rng.randint(1, len(y) - 1) if mix_rng.random() < args.beta and len(y) >= 2 else 0
                      for y in roll_in.tokens]
                prefixes = [y[:k] for y, k in zip(roll_in.tokens, ks)]
                # ---- line 2: the guide rolls out from x + y_in[:k] ----------------------------------
                with run.timer("guide_generate"):
                    guide_out = guide_continue(run.guide, tok, queries, prefixes, max_new_tokens=args.max_new_tokens,
                                               min_new_tokens=args.min_new_tokens)
                completions = [p + y for p, y in zip(prefixes, guide_out)]  # y = y_in[:k] + y_out
                ri, rm = right_pad(completions, pad, device=device)
                rm = rm.float()
                old_logprobs = rt.right_pad_float([lp[:k] for lp, k in zip(roll_in.logprobs, ks)],
                                                  ri.shape[1], device)  # learner tokens: from sampling (SPEC 4.2)
                switch = torch.tensor(ks, device=device)
                learner = rm * (torch.arange(ri.shape[1], device=device)[None] < switch[:, None]).float()  # t < k
                guide_rows, guide_full = [i for i, k in enumerate(ks) if k == 0], None  # k = 0: the guide's alone
                table = ("learner part", "guide part", prefixes, guide_out)
            qi, qm = left_pad(queries, pad, device)

            # ---- line 3: reward, reference log-probs, values ----------------------------------------
            with run.timer("forward"), torch.no_grad():
                ref_logprobs, ref_hidden = forward_response(  # ref_hidden: --critic reference-head's (else None)
                    ref, qi, qm, ri, rm.long(), eos_id=eos, pad_id=pad, min_new_tokens=args.min_new_tokens,
                    temperature=args.temperature, with_hidden=run.critic_reads_ref)
                values = critic(qi, qm, ri, rm.long(), hidden=ref_hidden) * rm
            with run.timer("reward"):
                responses = decode(tok, completions)
                scores = torch.tensor(run.score(batch, responses, it), dtype=torch.float, device=device)
                guide_scores = ((run.score([batch[i] for i in guide_rows], decode(tok, guide_full), it) if guide_full
                                 else [scores[i].item() for i in guide_rows]) if guide_rows else [])

            # ---- line 4: per-token reward: KL penalty on every token, R(x, y) on the last one --------
            kl = kl_per_token(old_logprobs, ref_logprobs, args.kl_estimator) * learner
            rewards = -kl_ctl.value * kl
            last = (rm.sum(1).long() - 1).clamp(min=0)
            rewards[torch.arange(len(batch), device=device), last] += scores
            kl_seq = float(rt.all_reduce_mean(kl.sum(1).mean(), world))
            kl_ctl.update(kl_seq, args.rollouts_per_iteration)  # the adaptive controller sets the next iteration's

            # ---- line 5: GAE and advantage whitening -------------------------------------------------
            advantages, returns = compute_gae(rewards, values, rm, args.gamma, args.lam)
            policy_mask = learner  # the learner's tokens: t >= k in PPO++, t < k in AggreVaTeD (SPEC 5.3)
            value_mask = learner if phase == "ppo++" else rm - learner  # AggreVaTeD: V_psi on the guide completion
            advantages = masked_whiten(advantages, policy_mask, world)

            # ---- line 6: n_epochs of clipped PPO updates over minibatches ----------------------------
            # (--critic-warmup: at iteration 1, first epochs of the value loss alone; the policy untouched)
            run.warm_up_critic(it, critic, critic_t, (qi, qm, ri, rm), values, returns, value_mask, ref_hidden)
            stats = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "entropy", "ratio",
                                     "nll")}
            with run.timer("update"):
                for epoch in range(args.n_epochs):
                    perm = torch.randperm(local, device="cpu")
                    for mb in perm.split(mb_local):
                        n_pol, n_val = policy_mask[mb].sum().clamp(min=1), value_mask[mb].sum().clamp(min=1)
                        rt.zero_gradients([policy, critic], idle=[c for c in run.critics.values() if c is not critic])
                        for mi in mb.split(args.micro_batch_size):  # plumbing: gradient accumulation
                            mi = mi.to(device)
                            q, t = used_columns(qm[mi], rm[mi])  # plumbing: only this micro-batch's columns
                            q_ids, q_mask, r_ids, r_mask = qi[mi, q], qm[mi, q], ri[mi, t], rm[mi, t].long()
                            m_pol, m_val = policy_mask[mi, t], value_mask[mi, t]
                            new_logprobs, entropy = forward_response(
                                run.policy_t, q_ids, q_mask, r_ids, r_mask, eos_id=eos, pad_id=pad,
                                min_new_tokens=args.min_new_tokens, temperature=args.temperature, with_entropy=True)
                            log_ratio = (new_logprobs - old_logprobs[mi, t]) * m_pol
                            ratio = torch.exp(log_ratio)
                            adv = advantages[mi, t]
                            pg_losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_range,
                                                                                   1 + args.clip_range))
                            pg_loss = (pg_losses * m_pol).sum() / n_pol
                            policy_loss = pg_loss
                            if args.nll_coef > 0:  # optional NLL on the dataset reference (off by default)
                                nll = rt.reference_nll(run.policy_t, tok, run.task, [batch[j] for j in mi.tolist()],
                                                       q_ids, q_mask, args)
                                policy_loss = policy_loss + args.nll_coef * nll * len(mi) / mb_local
                                stats["nll"].append(nll.detach())
                            # loss = policy loss + vf_coef * value loss: no shared weights, so each part is
                            # backpropagated alone and the policy's activations are freed before the critic's exist
                            policy_loss.backward()
                            h = None if ref_hidden is None else ref_hidden[mi, t]  # --critic reference-head
                            v = critic_t(q_ids, q_mask, r_ids, r_mask, hidden=h)
                            v_old, ret = values[mi, t], returns[mi, t]
                            v_clip = v_old + (v - v_old).clamp(-args.clip_range_vf, args.clip_range_vf)
                            vf_losses = torch.max((v - ret) ** 2, (v_clip - ret) ** 2)
                            vf_loss = 0.5 * (vf_losses * m_val).sum() / n_val
                            (args.vf_coef * vf_loss).backward()
                            with torch.no_grad():  # plumbing: statistics, kept on the device until the end
                                stats["pg_loss"].append(pg_loss * mb_local / len(mi))
                                stats["vf_loss"].append(vf_loss * mb_local / len(mi))
                                for k, x, m in (("clipfrac", (ratio - 1).abs() > args.clip_range, m_pol),
                                                ("vf_clipfrac", (v - v_old).abs() > args.clip_range_vf, m_val),
                                                ("approx_kl", 0.5 * log_ratio ** 2, m_pol), ("entropy", entropy, m_pol),
                                                ("ratio", ratio, m_pol)):
                                    stats[k].append((x * m).sum() / m.sum().clamp(min=1))
                        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                        torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)  # the phase's critic
                        run.optimizer.step()
                upd = update_means(stats, f"iteration {it}")  # a NaN loss stops the run; the checkpoint stays

            # ---- logging (fixed metric names, docs/metrics.md) ---------------------------------------
            score_mean = float(rt.all_reduce_mean(scores.mean(), world))
            err, n_tokens = returns - values, float(rt.all_reduce_mean(rm.sum(), world)) * world
            resid = masked_mean(err ** 2, value_mask, world) - masked_mean(err, value_mask, world) ** 2
            ret_var = masked_mean(returns ** 2, value_mask, world) - masked_mean(returns, value_mask, world) ** 2
            metrics = {
                "objective/reward": score_mean, "objective/kl": kl_seq, "objective/kl_coef": kl_ctl.value,
                "objective/rlhf_reward": score_mean - kl_ctl.value * kl_seq, "objective/entropy": upd["entropy"],
                "loss/policy": upd["pg_loss"], "loss/value": upd["vf_loss"], "policy/clipfrac": upd["clipfrac"],
                "policy/approx_kl": upd["approx_kl"], "policy/ratio": upd["ratio"],
                "value/clipfrac": upd["vf_clipfrac"], "train/lr": run.lr,
                "value/explained_variance": float(1 - resid / ret_var.clamp(min=1e-8)),
                "train/response_length": n_tokens / args.rollouts_per_iteration,
                "guide/mix_fraction": float((switch > 0).float().mean()),
                "guide/switch_point": float(switch[switch > 0].float().mean()) if (switch > 0).any() else 0.0,
                "guide/phase": 1.0 if phase == "ppo++" else 0.0, "guide/learner_tokens": float(learner.sum(1).mean()),
                "guide/guide_tokens": float((rm - learner).sum(1).mean()),
                "guide/reward_guide_only": float(np.mean(guide_scores)) if guide_scores else float("nan"),
                **({"loss/nll": upd["nll"]} if "nll" in upd else {})}
            run.log(it, metrics, (f"train/samples ({phase})", ["prompt", table[0], table[1], "reward"], mixed_rows(
                [e.prompt for e in batch], decode(tok, table[2]), decode(tok, table[3]), scores.tolist())))
        return run.finish()  # final evaluation, the trained policy and critic, eval.json


if __name__ == "__main__":
    main(cli(Args, __doc__, PRESET_ALIASES))
