"""PPO++: PPO with the guide as a restart distribution ("Learning to Generate Better Than Your LLM",
Chang et al., arXiv 2306.11816, Algorithm PPO++). The only difference from ppo.py: roll-in with the guide,
roll-out with the learner, and the losses on the learner's tokens only.

Algorithm (one iteration; numbers name the lines the loop's comments refer to)
  1  draw a batch of prompts x from the train split
  2  with probability beta: the guide rolls in a full response y_in ~ pi_g(. | x) and a switch point k is
     drawn uniformly from {1, ..., len(y_in) - 1}; otherwise k = 0
     the learner rolls out from x + y_in[:k]: y = y_in[:k] + y_out, y_out ~ pi_theta(. | x, y_in[:k])
  3  score R(x, y); log-probs of pi_ref; values V_phi(x, y_<t)
  4  per-token reward r_t = -kl_coef * KL_t on the learner's tokens (t >= k), plus R(x, y) at the last token
  5  advantages by GAE(gamma, lambda); whiten them over the learner's tokens
  6  for n_epochs, for each minibatch: clipped policy loss + clipped value loss on the learner's tokens (t >= k)
  7  evaluate on the validation split every eval_interval iterations (the learner alone, no guide)

With beta = 0 this is exactly ppo.py (same seed, same numbers).

Run:  python ppo_plus_plus.py --task imdb        (--guide rule for the rule-based guide on commongen / tldr)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from common import runtime as rt
from common.errors import UsageError, one_line_errors
from common.generation import decode, forward_response, left_pad, right_pad, sample, used_columns
from common.guides import ServerOptions, guide_continue, guide_metrics
from common.presets import fill_presets
from common.tasks import get_task, resolve_data_dir


@dataclass
class Args:
    task: str = "imdb"
    """task: imdb, commongen or tldr"""
    data_dir: str | None = None
    """folder laid out like ../shared/data (JSONL in the hub's schemas); default: $RLGF_DATA_DIR, else the Hub"""
    policy_model: str | None = None
    """learner's initial model: hub id, folder or smollm2 (SmolLM2-135M-Instruct, made offline once, with its own
    preset); default: the task's embedded model (built once, cached)"""
    preset: str = "auto"
    """per-task settings: paper (the paper's, and with no --policy-model / --guide-model / --reward-model the
    paper's hub models and their LoRA / 4-bit set-up), embedded (sized for the offline embedded models), smollm2
    (SmolLM2-135M-Instruct on a laptop CPU), auto (embedded for the embedded models, smollm2 for that model, else
    the paper's settings for the given model); flags given win"""
    guide: str = "model"
    """the black-box guide: model (an HF causal LM, --guide-model), rule (our rule-based guide: commongen, tldr),
    the URL of an OpenAI-compatible server, http://HOST:PORT/v1 (vLLM, llama.cpp, TGI, Ollama, a hosted API), or
    learner: the official code's moving guide, the current learner sampled with the guide's settings (a defect of
    that code, SPEC 5.1: offered to reproduce the paper's published runs; docs/guides.md)"""
    guide_model: str | None = None
    """guide model: hub id, folder or smollm2; default: the policy model when one is given, else the task's embedded
    guide (IMDB: SFT on positive reviews)"""
    guide_top_p: float | None = None
    """guide's nucleus sampling (paper 0.92); the learner always samples with top_p 1"""
    guide_top_k: int | None = None
    """guide's top-k (paper: 50 on IMDB, 0 = off elsewhere)"""
    guide_temperature: float = 1.0
    """guide's sampling temperature"""
    guide_model_name: str | None = None
    """server guide: the model name sent with each request; default: the first model the server's /models lists"""
    guide_api_key_env: str = "OPENAI_API_KEY"
    """server guide: the environment variable holding the API key, sent as a Bearer token when set (the key itself
    is never logged nor saved)"""
    guide_max_concurrency: int = 8
    """server guide: requests in flight at once (one request per prompt)"""
    guide_timeout: float = 60.0
    """server guide: seconds to wait for one answer"""
    guide_retries: int = 3
    """server guide: retries, with backoff 0.5 s, 1 s, 2 s, ..., after a connection error, a timeout, HTTP 429 or
    5xx; then the run stops with a one-line error (its last checkpoint stays)"""
    guide_chat: bool = False
    """server guide: /chat/completions instead of /completions (which gets prompt + the learner's prefix as one text,
    a true continuation). Chat: the prompt is the user turn, a non-empty prefix a final assistant turn; only a server
    that continues a final assistant message (vLLM: --guide-extra-body '{"continue_final_message": true,
    "add_generation_prompt": false}') truly continues the prefix, any other answers with a new turn that is appended
    to the prefix (an approximation); PPO++'s roll-in has no prefix and is exact"""
    guide_cache: str | None = None
    """server guide: a JSONL file of request -> answer; an identical request is answered from it without the server
    (needs --guide-temperature 0: a cache replays one answer)"""
    guide_extra_body: str | None = None
    """server guide: a JSON object merged into every request (e.g. '{"min_tokens": 48}' for vLLM)"""
    beta: float | None = None
    """probability that a rollout starts from a guide roll-in (paper: IMDB 0.6, CommonGen and TL;DR 0.8)"""
    reward_model: str | None = None
    """IMDB: a sentiment classifier (paper: lvwerra/distilbert-imdb), default VADER; TL;DR: a reward model
    (sequence classifier), default ROUGE-L against the reference; unused by CommonGen (CIDEr-D + SPICE)"""
    output_dir: str = "runs"
    """run folders (TensorBoard logs, metrics.jsonl, checkpoint, final policy) go here"""
    run_name: str | None = None
    """run folder name; default <algo>-<task>-seed<seed>-<time>"""
    resume: str | None = None
    """run folder of an earlier run to continue from its last checkpoint"""
    seed: int = 1
    """seed of every random number generator"""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda"""
    fsdp: bool = False
    """shard policy, critic(s) and optimiser state over the torchrun processes with PyTorch FSDP (one unit per
    transformer layer) instead of replicating them with DDP: for models whose training state does not fit one
    GPU. Every process samples and evaluates; the frozen reference and guide stay whole (docs/scaling.md)"""
    bf16: bool = False
    """bf16 autocast in every forward pass: ~1.5x faster on CPUs with AVX-512 BF16 and on recent GPUs; sampling
    and training log-probs then agree to ~1e-2 instead of ~1e-6"""

    # model setup: LoRA and quantization
    lora_r: int = 0
    """LoRA rank (peft); 0 = off (full fine-tuning). With LoRA the policy is the base plus a trainable adapter,
    and the reference policy (and a model guide that is the policy's own start model) is that base with the
    adapter off: one copy in memory"""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapter's update is scaled by alpha / r (the paper's TL;DR: r 8, alpha 64)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input, in the forwards with gradients only (sampling and the no-grad forwards
    run without it); > 0 moves the first minibatch's ratio off 1"""
    lora_target_modules: tuple[str, ...] | None = None
    """modules the adapters wrap (e.g. q_proj v_proj), or all-linear; default: peft's for the architecture
    (Llama: q_proj v_proj, GPT-2: c_attn), else all-linear"""
    critic: str | None = None
    """LoRA runs: adapter (default; a second adapter + value head on the policy's frozen base, as the official
    code's LoRA runs) or separate (a full critic model, fully trained); full fine-tuning: always separate"""
    merge_lora: bool = False
    """also save the policy with its adapter merged in, as a plain model folder (run folder/policy-merged)"""
    load_in_4bit: bool = False
    """load the frozen base, the reward model and a separately loaded guide in 4-bit (nf4, double quantization,
    bf16 compute: QLoRA; bitsandbytes, CUDA only); needs --lora-r > 0"""
    load_in_8bit: bool = False
    """as --load-in-4bit, in 8-bit (LLM.int8())"""

    # lengths (default: the task's)
    prompt_tokens: int | None = None
    """prompt length in tokens (longer prompts are cut the task's way)"""
    min_new_tokens: int | None = None
    """EOS is masked before this many response tokens, in sampling and in the loss alike"""
    max_new_tokens: int | None = None
    """response length limit"""
    temperature: float = 1.0
    """sampling temperature, the same in the loss"""
    chat_template: str = "auto"
    """instruct models: the task's prompt as the user turn, the response as the assistant turn ended by its
    end-of-turn token as EOS; auto (on when the tokenizer has a chat template), on or off"""

    # batch hierarchy (SPEC 4.7)
    iterations: int | None = None
    """PPO iterations"""
    rollouts_per_iteration: int | None = None
    """prompts rolled out per iteration, over all processes"""
    minibatch_size: int | None = None
    """rollouts per optimiser step, over all processes; must divide rollouts_per_iteration"""
    micro_batch_size: int | None = None
    """rollouts per forward/backward per process (gradient accumulation); default: the whole minibatch"""
    gradient_checkpointing: bool = False
    """recompute each layer of the policy and critic in the backward instead of keeping its activations: less
    memory per micro-batch for more time in the update (README: Memory)"""
    n_epochs: int | None = None
    """passes over the iteration's rollouts"""

    # PPO
    lr: float | None = None
    """AdamW learning rate of policy and critic"""
    lr_schedule: str | None = None
    """linear (decay to 0) or constant"""
    weight_decay: float | None = None
    """AdamW weight decay"""
    adam_eps: float = 1e-5
    """AdamW epsilon"""
    max_grad_norm: float = 1.0
    """gradient-norm clip, applied to the policy and the critic separately"""
    gamma: float | None = None
    """discount"""
    lam: float | None = None
    """GAE lambda"""
    clip_range: float | None = None
    """policy ratio clip"""
    clip_range_vf: float | None = None
    """value clip around the rollout's values"""
    vf_coef: float | None = None
    """value-loss coefficient"""
    kl_coef: float | None = None
    """initial coefficient of the per-token KL penalty in the reward"""
    kl_estimator: str = "k1"
    """per-token KL estimator in the reward: k1 (log-ratio) or k3 ((r - 1) - log r)"""
    kl_target: float | None = None
    """set to use the adaptive KL controller (target KL per sequence, nats); None keeps kl_coef fixed"""
    kl_horizon: int = 10000
    """adaptive KL controller horizon (in rollouts)"""
    nll_coef: float = 0.0
    """weight of a negative log-likelihood term on the dataset reference (the official code's 0.1; off)"""

    # evaluation and logging
    eval_interval: int | None = None
    """evaluate every this many iterations (and at start and end)"""
    eval_samples: int | None = None
    """validation prompts per evaluation"""
    eval_decoding: str | None = None
    """how evaluations decode each validation prompt: sample (one sample with the learner's settings, fixed
    seed), greedy or beam (transformers' generate, no sampling); KL and output perplexity score the chosen
    response under the policy and the reference. Default: the task preset's (paper and smollm2: CommonGen beam,
    TL;DR greedy, IMDB sample, as the official code; embedded: sample)"""
    eval_num_beams: int | None = None
    """beams of --eval-decoding beam (default: the task preset's: 5, as the official code)"""
    final_eval_samples: int | None = None
    """validation prompts of the final evaluation and of the one before training that eval.json compares it
    with (the split's first ones); 0 = the whole split. Default: the task preset's (paper and smollm2: 0;
    embedded: --eval-samples). The periodic evaluations use --eval-samples"""
    save_interval: int | None = None
    """checkpoint every this many iterations; default eval_interval"""
    sample_rows: int = 8
    """rows in the TensorBoard sample tables"""
    slow_metrics: bool = False
    """also METEOR and SPICE in CommonGen's evaluations (they start a JVM: METEOR ~6 s each time)"""
    keep_checkpoint: bool = False
    """keep checkpoint.pt when the run finishes, to continue it later (--resume with more --iterations); a
    finished run deletes it otherwise (the policy and critic are saved beside it)"""
    rebuild_models: bool = False
    """build the task's embedded models again instead of loading them from the cache (RLGF_CACHE_DIR)"""


ALGO = "ppo_plus_plus"
PRESET_ALIASES = {"beta": "ppo_pp_beta"}  # Args field -> the preset key it reads


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
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise UsageError(f"--kl-estimator must be k1 or k3, not {estimator!r}")


class AdaptiveKL:
    """Ziegler et al.'s proportional controller; its state goes into checkpoints."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int):
        if self.target is not None:
            err = float(np.clip(kl / self.target - 1, -0.2, 0.2))
            self.value *= 1 + err * n / self.horizon


def check_args(args: Args, world: int):
    rt.check_settings(args, world)  # the settings every script shares
    if args.kl_estimator not in ("k1", "k3"):
        raise UsageError(f"--kl-estimator must be k1 or k3, not {args.kl_estimator!r}")
    if args.lr_schedule not in ("linear", "constant"):
        raise UsageError(f"--lr-schedule must be linear or constant, not {args.lr_schedule!r}")


@one_line_errors
def main(args: Args):
    rt.quiet_libraries()
    args = rt.resume_settings(args, ALGO)  # --resume: the run's own settings (its args.json)
    task = get_task(args.task)
    data_dir = resolve_data_dir(args.data_dir)
    args = fill_presets(args, task.name, args.preset, aliases=PRESET_ALIASES)
    args = dataclasses.replace(
        args, min_new_tokens=task.min_new_tokens if args.min_new_tokens is None else args.min_new_tokens,
        max_new_tokens=task.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
        save_interval=args.eval_interval if args.save_interval is None else args.save_interval)
    world = rt.world_size()
    args = dataclasses.replace(args, micro_batch_size=max(1, args.minibatch_size // world)
                               if args.micro_batch_size is None else args.micro_batch_size)
    check_args(args, world)  # every setting, before any data, model or run folder is touched
    run_dir = rt.run_dir_of(args, ALGO, task.name)
    rank, world, device = rt.setup_device(args.device, args.bf16, args.fsdp)
    setup = rt.model_setup(args, device)  # LoRA / 4-bit settings, checked before anything is loaded
    log = print if rank == 0 else (lambda *a, **k: None)
    evaluates = rank == 0 or args.fsdp  # a sharded policy samples only with every process taking part

    # ---- data, models, reward -------------------------------------------------------------------
    train = task.load("train", data_dir)
    val = task.load("validation", data_dir, limit=args.eval_samples)
    final_val = rt.final_eval_set(task, data_dir, args, val)  # the final evaluation's prompts (val when the same)
    policy_path, guide_path = rt.resolve_models(task, args.policy_model, args.guide_model, data_dir, rank, world, log,
                                                need_guide=args.guide == "model", rebuild=args.rebuild_models)
    rt.seed_everything(rt.derive_seed(args.seed, "torch", rank))  # each process samples its own rollouts
    mix_rng = rt.rng_stream(args.seed, "mix", rank)  # mixing coins and switch points: their own stream
    tok, policy, ref, critic = rt.build_policy_ref_critic(
        policy_path, device, args.prompt_tokens + args.max_new_tokens, args.gradient_checkpointing, setup,
        chat_template=args.chat_template)
    # after the policy: a LoRA policy's start model as guide is its base with the adapter off
    guide = rt.build_guide(args.guide, task, guide_path, None, device, top_p=args.guide_top_p, top_k=args.guide_top_k,
                           temperature=args.guide_temperature, min_new_tokens=args.min_new_tokens, policy=policy,
                           setup=setup, server=ServerOptions.from_args(args),
                           chat_template=args.chat_template)
    args = dataclasses.replace(args, chat_template="on" if tok.chat_format else "off")  # resolved, for args.json
    reward_fn = rt.make_reward(task, args.reward_model, train, device, log, setup=setup)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    params = list(policy.parameters()) + list(critic.parameters())
    # fused: one kernel per step instead of a Python loop over every tensor (~3x faster optimiser step on CPU)
    optimizer = torch.optim.AdamW(params, lr=args.lr, eps=args.adam_eps, weight_decay=args.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    rt.zero_gradients([policy, critic])  # allocated once, up front (see rt.zero_gradients)
    kl_ctl = AdaptiveKL(args.kl_coef, args.kl_target, args.kl_horizon)
    sampler = rt.PromptSampler(len(train), rt.derive_seed(args.seed, "prompts"))  # the same in every process
    start = 1
    if args.resume:
        ck = rt.load_checkpoint(run_dir, ALGO)
        policy.load_state_dict(ck["policy"]), critic.load_state_dict(ck["critic"])
        optimizer.load_state_dict(ck["optimizer"]), sampler.load_state_dict(ck["sampler"])
        kl_ctl.value, start = ck["kl_coef"], ck["iteration"] + 1
        mix_rng.setstate(rt.own_rank(ck["mix_rng"]))
        rt.set_rng_state(ck["rng"])
    policy_t, critic_t = rt.wrap_for_training([policy, critic], optimizer, world, args.fsdp)
    logger = rt.RunLogger(run_dir, args, enabled=rank == 0, resume_from=start if args.resume else None, algo=ALGO)
    log(f"{ALGO} on {task.name}: guide {getattr(guide, 'name', args.guide)}, beta {args.beta}; policy {policy_path}, {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M "
        f"params, {world} process(es) on {device}; run folder {run_dir}")

    def run_eval(step, final=False):  # final: on the final evaluation's prompts (None where they are val's)
        if final and final_val is val:
            return None
        examples, tag = (final_val, "final_eval") if final else (val, "eval")
        m, rows = rt.evaluate(policy, ref, tok, task, examples, reward_fn, args, device, step=step)
        logger.scalars({f"{tag}/{k}": v for k, v in m.items()}, step)
        logger.table(f"{tag}/samples", ["prompt", "response", "reward"], rows, step, args.sample_rows)
        return m

    def checkpoint(it):  # every process: under FSDP the full state dicts are gathered from all of them
        rt.save_checkpoint(run_dir / "checkpoint.pt", {
            "script": ALGO,
            "policy": rt.full_state_dict(policy, rank), "critic": rt.full_state_dict(critic, rank),
            "optimizer": rt.full_optimizer_state(optimizer, rank),
            "sampler": sampler.state_dict(), "kl_coef": kl_ctl.value, "iteration": it, "rng": rt.rng_state(), "first_eval": first_eval,
            "mix_rng": rt.per_rank(mix_rng.getstate())})

    local = args.rollouts_per_iteration // world
    mb_local = args.minibatch_size // world
    progress = rt.progress_bar(range(start, args.iterations + 1), enabled=rank == 0)
    last_eval = None
    try:
        first_eval = ((ck["first_eval"] if args.resume else rt.evaluate_start(run_eval, start - 1)) if evaluates
                      else None)
        for it in progress:
            t_iter = time.time()
            frac = 1.0 - (it - 1) / args.iterations
            lr = args.lr * frac if args.lr_schedule == "linear" else args.lr
            for g in optimizer.param_groups:
                g["lr"] = lr

            # ---- line 1: a batch of prompts (this process's slice of the global batch) -----------
            idx = sampler.next(args.rollouts_per_iteration)[rank * local: (rank + 1) * local]
            batch = [train[i] for i in idx]
            queries = rt.encode_prompts(task, tok, batch, args.prompt_tokens)

            # ---- line 2: guide roll-in with probability beta, switch point k ~ U{1..len-1} ------
            t0 = time.time()
            mixed = [i for i in range(len(batch)) if mix_rng.random() < args.beta]
            prefixes, guide_full = [[] for _ in batch], []
            if mixed:
                guide_full = guide_continue(guide, tok, [queries[i] for i in mixed], [[] for _ in mixed],
                                            max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
                for i, y_in in zip(mixed, guide_full):
                    prefixes[i] = y_in[: mix_rng.randint(1, len(y_in) - 1)] if len(y_in) >= 2 else []
            t_guide = time.time() - t0
            # ---- line 2: the learner rolls out from x + y_in[:k] --------------------------------
            t0 = time.time()
            out = sample(policy, queries, prefixes=prefixes, max_new_tokens=args.max_new_tokens,
                         min_new_tokens=args.min_new_tokens, eos_id=eos, pad_id=pad, temperature=args.temperature,
                         device=device)
            t_gen = time.time() - t0
            qi, qm = left_pad(queries, pad, device)
            ri, rm = right_pad([p + y for p, y in zip(prefixes, out.tokens)], pad, device=device)
            rm = rm.float()
            old_logprobs = rt.right_pad_float([[0.0] * len(p) + lp for p, lp in zip(prefixes, out.logprobs)],
                                              ri.shape[1], device)  # learner tokens: from sampling (SPEC 4.2)
            switch = torch.tensor([len(p) for p in prefixes], device=device)
            learner = rm * (torch.arange(ri.shape[1], device=device)[None] >= switch[:, None]).float()

            # ---- line 3: reward, reference log-probs, values ----------------------------------
            t0 = time.time()
            with torch.no_grad():
                ref_logprobs, _ = forward_response(ref, qi, qm, ri, rm.long(), eos_id=eos, pad_id=pad,
                                                   min_new_tokens=args.min_new_tokens, temperature=args.temperature)
                values = critic(qi, qm, ri, rm.long()) * rm
            t_fwd = time.time() - t0
            t0 = time.time()
            responses = decode(tok, [p + y for p, y in zip(prefixes, out.tokens)])
            scores = torch.tensor(rt.scored(reward_fn, [e.prompt for e in batch], responses, [e.references for e in batch],
                                            f"iteration {it}"),
                                  dtype=torch.float, device=device)
            guide_scores = rt.scored(reward_fn, [batch[i].prompt for i in mixed], decode(tok, guide_full),
                                     [batch[i].references for i in mixed], f"iteration {it}") if mixed else []
            t_rew = time.time() - t0

            # ---- line 4: per-token reward: KL penalty on every token, R(x, y) on the last one ---
            kl = kl_per_token(old_logprobs, ref_logprobs, args.kl_estimator) * learner
            rewards = -kl_ctl.value * kl
            last = (rm.sum(1).long() - 1).clamp(min=0)
            rewards[torch.arange(len(batch), device=device), last] += scores

            # ---- line 5: GAE and advantage whitening -------------------------------------------
            advantages, returns = compute_gae(rewards, values, rm, args.gamma, args.lam)
            policy_mask = value_mask = learner  # PPO++: only the learner's tokens (t >= k) train policy and critic
            advantages = masked_whiten(advantages, policy_mask, world)

            # ---- line 6: n_epochs of clipped PPO updates over minibatches ----------------------
            t0 = time.time()
            stats = {k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "approx_kl", "entropy", "ratio", "nll")}
            for epoch in range(args.n_epochs):
                perm = torch.randperm(local, device="cpu")
                for mb_start in range(0, local, mb_local):
                    mb = perm[mb_start: mb_start + mb_local]
                    n_pol = policy_mask[mb].sum().clamp(min=1)
                    n_val = value_mask[mb].sum().clamp(min=1)
                    rt.zero_gradients([policy, critic])
                    for micro_start in range(0, mb_local, args.micro_batch_size):
                        mi = mb[micro_start: micro_start + args.micro_batch_size].to(device)
                        # only this micro-batch's columns: its longest query and response, not the iteration's
                        q, t = used_columns(qm[mi], rm[mi])
                        q_ids, q_mask, r_ids, r_mask = qi[mi, q], qm[mi, q], ri[mi, t], rm[mi, t].long()
                        m_pol, m_val = policy_mask[mi, t], value_mask[mi, t]
                        new_logprobs, entropy = forward_response(
                            policy_t, q_ids, q_mask, r_ids, r_mask, eos_id=eos, pad_id=pad,
                            min_new_tokens=args.min_new_tokens, temperature=args.temperature, with_entropy=True)
                        log_ratio = (new_logprobs - old_logprobs[mi, t]) * m_pol
                        ratio = torch.exp(log_ratio)
                        adv = advantages[mi, t]
                        pg_losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_range, 1 + args.clip_range))
                        pg_loss = (pg_losses * m_pol).sum() / n_pol
                        policy_loss = pg_loss
                        if args.nll_coef > 0:  # optional NLL on the dataset reference (off by default)
                            nll = rt.reference_nll(policy_t, tok, task, [batch[j] for j in mi.tolist()], q_ids, q_mask, args)
                            policy_loss = policy_loss + args.nll_coef * nll * len(mi) / mb_local
                            stats["nll"].append(nll.detach())
                        # loss = policy loss + vf_coef * value loss; the two models share no weights, so each part
                        # is backpropagated alone: the policy's activations are freed before the critic's exist
                        policy_loss.backward()
                        v = critic_t(q_ids, q_mask, r_ids, r_mask)
                        v_old, ret = values[mi, t], returns[mi, t]
                        v_clip = v_old + (v - v_old).clamp(-args.clip_range_vf, args.clip_range_vf)
                        vf_losses = torch.max((v - ret) ** 2, (v_clip - ret) ** 2)
                        vf_loss = 0.5 * (vf_losses * m_val).sum() / n_val
                        (args.vf_coef * vf_loss).backward()
                        with torch.no_grad():  # kept on the device: reading a number waits for the GPU
                            stats["pg_loss"].append(pg_loss * mb_local / len(mi))
                            stats["vf_loss"].append(vf_loss * mb_local / len(mi))
                            stats["clipfrac"].append(((ratio - 1).abs() > args.clip_range).float().mul(m_pol).sum() / m_pol.sum().clamp(min=1))
                            stats["vf_clipfrac"].append(((v - v_old).abs() > args.clip_range_vf).float().mul(m_val).sum() / m_val.sum().clamp(min=1))
                            stats["approx_kl"].append((0.5 * log_ratio ** 2 * m_pol).sum() / m_pol.sum().clamp(min=1))
                            stats["entropy"].append((entropy * m_pol).sum() / m_pol.sum().clamp(min=1))
                            stats["ratio"].append((ratio * m_pol).sum() / m_pol.sum().clamp(min=1))
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                    optimizer.step()
            # the update's statistics, read from the device at once (so the time counts the GPU's work too)
            logged = [k for k, v in stats.items() if v]
            upd = dict(zip(logged, torch.stack([torch.stack(stats[k]).mean() for k in logged]).tolist()))
            rt.check_finite(upd, f"iteration {it}")  # a NaN loss stops the run; the last checkpoint stays as it was
            t_upd = time.time() - t0

            # ---- logging (fixed metric names, docs/metrics.md) ---------------------------------
            kl_seq = float(rt.all_reduce_mean(kl.sum(1).mean(), world))
            kl_ctl.update(kl_seq, args.rollouts_per_iteration)
            score_mean = float(rt.all_reduce_mean(scores.mean(), world))
            resid = masked_mean((returns - values) ** 2, value_mask, world) - masked_mean(returns - values, value_mask, world) ** 2
            ret_var = masked_mean(returns ** 2, value_mask, world) - masked_mean(returns, value_mask, world) ** 2
            n_tokens = float(rt.all_reduce_mean(rm.sum(), world)) * world
            dt = time.time() - t_iter
            metrics = {
                "objective/reward": score_mean, "objective/kl": kl_seq, "objective/kl_coef": kl_ctl.value,
                "objective/rlhf_reward": score_mean - kl_ctl.value * kl_seq,
                "objective/entropy": upd["entropy"],
                "loss/policy": upd["pg_loss"], "loss/value": upd["vf_loss"],
                "policy/clipfrac": upd["clipfrac"], "policy/approx_kl": upd["approx_kl"],
                "policy/ratio": upd["ratio"], "value/clipfrac": upd["vf_clipfrac"],
                "value/explained_variance": float(1 - resid / ret_var.clamp(min=1e-8)),
                "train/lr": lr, "train/response_length": n_tokens / args.rollouts_per_iteration,
                "guide/mix_fraction": float((switch > 0).float().mean()),
                "guide/switch_point": float(switch[switch > 0].float().mean()) if (switch > 0).any() else 0.0,
                "guide/guide_tokens": float(switch.float().mean()),
                "guide/learner_tokens": float(learner.sum(1).mean()),
                "guide/reward_guide_only": float(np.mean(guide_scores)) if guide_scores else float("nan"),
                "time/guide_generate": t_guide,
                "time/iteration": dt, "time/generate": t_gen, "time/forward": t_fwd, "time/reward": t_rew,
                "time/update": t_upd, "time/tokens_per_second": n_tokens / dt,
            }
            metrics.update(guide_metrics(guide))  # a server guide: requests, retries, tokens
            if "nll" in upd:
                metrics["loss/nll"] = upd["nll"]
            logger.scalars(metrics, it)
            if it % args.eval_interval == 0 or it == args.iterations:
                logger.table("train/samples", ["prompt", "guide part", "learner part", "reward"],
                             rt.mixed_rows([e.prompt for e in batch], decode(tok, prefixes), decode(tok, out.tokens),
                                           scores.tolist()), it, args.sample_rows)
            progress.set_postfix(reward=f"{score_mean:.3f}", kl=f"{kl_seq:.2f}")

            # ---- line 7: evaluation and checkpoints --------------------------------------------
            last_eval = None
            if evaluates and (it % args.eval_interval == 0 or it == args.iterations):
                last_eval = run_eval(it)
            if it % args.save_interval == 0 or it == args.iterations:
                checkpoint(it)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: keep the policy, say how to continue
        logger.close()
        rt.interrupted(e, run_dir, rank, ALGO, lambda: rt.save_interrupted(policy, critic, tok, run_dir), bool(args.resume))

    final = rt.evaluate_end(run_eval, args.iterations, last_eval) if evaluates else None
    rt.save_final(policy, critic, tok, run_dir)  # every process: under FSDP the weights are gathered
    if rank == 0:
        rt.report(first_eval, final, run_dir, protocol=rt.eval_protocol(args, len(val), len(final_val)))
        print(f"policy saved to {run_dir / 'policy'}")
        rt.finish(run_dir, args.keep_checkpoint)
        logger.close()
        return first_eval, final
    return None


if __name__ == "__main__":
    main(rt.cli(Args, __doc__, PRESET_ALIASES))
