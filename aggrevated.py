"""AggreVaTeD: learner roll-in, guide roll-out ("Learning to Generate Better Than Your LLM", Chang et al.,
arXiv 2306.11816, AggreVaTeD as used in RLGF). The learner's prefix is pushed toward tokens whose guide
completion earns reward: imitate the guide's cost-to-go, then surpass it.

Algorithm (one iteration; numbers name the lines the loop's comments refer to)
  1  draw a batch of prompts x from the train split
  2  the learner rolls in a full response y_in ~ pi_theta(. | x); with probability beta a switch point k is
     drawn uniformly from {1, ..., len(y_in) - 1}, otherwise k = 0 (the guide writes the whole response)
     the guide rolls out from x + y_in[:k]: y = y_in[:k] + y_out, y_out ~ pi_g(. | x, y_in[:k])
  3  score R(x, y); log-probs of pi_ref; values V_phi(x, y_<t)
  4  per-token reward r_t = -kl_coef * KL_t on the learner's tokens (t < k), plus R(x, y) at the last token
  5  advantages by GAE(gamma, lambda); whiten them over the learner's tokens
  6  for n_epochs, for each minibatch: clipped policy loss on the learner prefix (t < k); clipped value loss on
     the guide completion (t >= k), so V_phi estimates the guide's value V^{pi_g}
  7  evaluate on the validation split every eval_interval iterations (the learner alone, no guide)

Samples with k = 0 train the critic only.

Run:  python aggrevated.py --task imdb        (--guide rule for the rule-based guide on commongen / tldr)
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
    """probability that the learner rolls in before the guide takes over (paper: IMDB, CommonGen 0.8, TL;DR 1.0)"""


ALGO = "aggrevated"
PRESET_ALIASES = {"beta": "aggrevated_beta"}  # Args field -> the preset key it reads


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
    with Run(args, ALGO) as run:  # devices, data, models, reward, optimiser; Ctrl-C / SIGTERM keep the policy
        policy, ref, critic, tok, device, world = run.policy, run.ref, run.critic, run.tok, run.device, run.world
        eos, pad, local, mb_local = run.tok.eos_token_id, run.tok.pad_token_id, run.local, run.mb_local
        kl_ctl = AdaptiveKL(args.kl_coef, args.kl_target, args.kl_horizon)
        mix_rng = run.stream("mix")  # mixing coins and switch points: their own stream
        for it in run.iterations(kl_ctl=kl_ctl):  # resume, lr schedule; after each: evaluation, checkpoint
            # ---- line 1: a batch of prompts (this process's slice of the global batch) -------------
            batch, queries = run.prompts()

            # ---- line 2: the learner rolls in; switch point k ~ U{1..len-1} with probability beta ------
            with run.timer("generate"):
                roll_in = sample(policy, queries, max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.min_new_tokens, eos_id=eos, pad_id=pad,
                                 temperature=args.temperature, device=device)
            ks = [mix_rng.randint(1, len(y) - 1) if mix_rng.random() < args.beta and len(y) >= 2 else 0
                  for y in roll_in.tokens]
            prefixes = [y[:k] for y, k in zip(roll_in.tokens, ks)]
            # ---- line 2: the guide rolls out from x + y_in[:k] --------------------------------------
            with run.timer("guide_generate"):
                guide_out = guide_continue(run.guide, tok, queries, prefixes, max_new_tokens=args.max_new_tokens,
                                           min_new_tokens=args.min_new_tokens)
            qi, qm = left_pad(queries, pad, device)
            completions = [p + y for p, y in zip(prefixes, guide_out)]  # y = y_in[:k] + y_out
            ri, rm = right_pad(completions, pad, device=device)
            rm = rm.float()
            old_logprobs = rt.right_pad_float([lp[:k] for lp, k in zip(roll_in.logprobs, ks)],
                                              ri.shape[1], device)  # learner tokens: from sampling (SPEC 4.2)
            switch = torch.tensor(ks, device=device)
            learner = rm * (torch.arange(ri.shape[1], device=device)[None] < switch[:, None]).float()  # t < k

            # ---- line 3: reward, reference log-probs, values ----------------------------------------
            with run.timer("forward"), torch.no_grad():
                ref_logprobs, ref_hidden = forward_response(  # ref_hidden: --critic reference-head's (else None)
                    ref, qi, qm, ri, rm.long(), eos_id=eos, pad_id=pad, min_new_tokens=args.min_new_tokens,
                    temperature=args.temperature, with_hidden=run.critic_reads_ref)
                values = critic(qi, qm, ri, rm.long(), hidden=ref_hidden) * rm
            with run.timer("reward"):
                responses = decode(tok, completions)
                scores = torch.tensor(run.score(batch, responses, it), dtype=torch.float, device=device)
                guide_scores = [s for s, k in zip(scores.tolist(), ks) if k == 0]  # the guide wrote all of these

            # ---- line 4: per-token reward: KL penalty on every token, R(x, y) on the last one --------
            kl = kl_per_token(old_logprobs, ref_logprobs, args.kl_estimator) * learner
            rewards = -kl_ctl.value * kl
            last = (rm.sum(1).long() - 1).clamp(min=0)
            rewards[torch.arange(len(batch), device=device), last] += scores
            kl_seq = float(rt.all_reduce_mean(kl.sum(1).mean(), world))
            kl_ctl.update(kl_seq, args.rollouts_per_iteration)  # the adaptive controller sets the next iteration's

            # ---- line 5: GAE and advantage whitening -------------------------------------------------
            advantages, returns = compute_gae(rewards, values, rm, args.gamma, args.lam)
            policy_mask = learner  # AggreVaTeD: the policy loss on the learner prefix (t < k) ...
            value_mask = rm - learner  # ... and the critic on the guide completion (t >= k): V ~ V^{pi_g}
            advantages = masked_whiten(advantages, policy_mask, world)

            # ---- line 6: n_epochs of clipped PPO updates over minibatches ----------------------------
            # (--critic-warmup: at iteration 1, first epochs of the value loss alone; the policy untouched)
            run.warm_up_critic(it, critic, run.critic_t, (qi, qm, ri, rm), values, returns, value_mask, ref_hidden)
            stats = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "entropy", "ratio",
                                     "nll")}
            with run.timer("update"):
                for epoch in range(args.n_epochs):
                    perm = torch.randperm(local, device="cpu")
                    for mb in perm.split(mb_local):
                        n_pol, n_val = policy_mask[mb].sum().clamp(min=1), value_mask[mb].sum().clamp(min=1)
                        rt.zero_gradients([policy, critic])
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
                            v = run.critic_t(q_ids, q_mask, r_ids, r_mask, hidden=h)
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
                        torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
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
                "guide/guide_tokens": float((rm - learner).sum(1).mean()),
                "guide/learner_tokens": float(learner.sum(1).mean()),
                "guide/reward_guide_only": float(np.mean(guide_scores)) if guide_scores else float("nan"),
                **({"loss/nll": upd["nll"]} if "nll" in upd else {})}
            run.log(it, metrics, ("train/samples", ["prompt", "learner part", "guide part", "reward"], mixed_rows(
                [e.prompt for e in batch], decode(tok, prefixes), decode(tok, guide_out), scores.tolist())))
        return run.finish()  # final evaluation, the trained policy and critic, eval.json


if __name__ == "__main__":
    main(cli(Args, __doc__, PRESET_ALIASES))
