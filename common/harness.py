"""The run harness: everything of a training run that is not the algorithm, behind one object, so that a script's
`main()` reads as the paper's pseudocode.

    args = finish_settings(args, ALGO)            # common/settings.py: args is final from here on
    with Run(args, ALGO) as run:                  # devices, data, models, reward, optimiser; Ctrl-C / SIGTERM
        kl_ctl = AdaptiveKL(...)
        for it in run.iterations(kl_ctl=kl_ctl):  # resume, lr schedule, evaluation, checkpoints
            batch, queries = run.prompts()        # line 1
            ...                                   # lines 2-6: the algorithm, in the script
            run.log(it, metrics)                  # TensorBoard, metrics.jsonl, timings, progress bar
        return run.finish()                       # final evaluation, the trained policy, eval.json

What the harness does, in order (`Run(...)`): claim the run folder, set up the device(s), load the data, build the
policy, its frozen reference, the critic(s) (and the guide: common/guides.py), the reward and the optimiser, all
as `common/runtime.py` does it. `iterations(**state)` resumes from the checkpoint under --resume (common/resume.py:
the models, optimiser, prompt sampler, every random state and the script's own `state`: objects with plain
attributes, or `random.Random` streams), wraps the models for DDP / FSDP, evaluates the start policy, then yields
each iteration, after which it evaluates and checkpoints when due. The checkpoint's contents are written here once,
for saving and resuming alike.
"""

from __future__ import annotations

import dataclasses
import random
import time
from contextlib import contextmanager

import torch

from common import runtime as rt
from common.tasks import get_task, resolve_data_dir


class Run:
    """One training run of `algo` with final settings `args` (see the module docstring). `critics` names the
    critics the algorithm trains (the first is the learner's V_phi, saved with the policy); `args` with the guide's
    settings (`common.settings.GuideSettings`) get the guide too."""

    def __init__(self, args, algo: str, critics: tuple[str, ...] = ("critic",)):
        from common.settings import GuideSettings

        guide = isinstance(args, GuideSettings)
        self.args, self.algo, self.started, self.last_eval, self.streams = args, algo, False, None, {}
        self.task = task = get_task(args.task)
        data_dir = resolve_data_dir(args.data_dir)
        self.run_dir = rt.run_dir_of(args, algo, task.name)
        self.rank, self.world, self.device = rt.setup_device(args.device, args.bf16, args.fsdp)
        setup = rt.model_setup(args, self.device)  # LoRA / 4-bit settings, checked before anything is loaded
        self.info = print if self.rank == 0 else (lambda *a, **k: None)
        self.evaluates = self.rank == 0 or args.fsdp  # a sharded policy samples only with every process taking part
        self.train = task.load("train", data_dir)
        self.val = task.load("validation", data_dir, limit=args.eval_samples)
        self.final_val = rt.final_eval_set(task, data_dir, args, self.val)  # the final evaluation's (val: the same)
        need_guide = guide and args.guide == "model"
        self.policy_path, guide_path = rt.resolve_models(
            task, args.policy_model, args.guide_model if guide else None, data_dir, self.rank, self.world, self.info,
            need_guide=need_guide, rebuild=args.rebuild_models)
        rt.seed_everything(rt.derive_seed(args.seed, "torch", self.rank))  # each process samples its own rollouts
        self.tok, self.policy, self.ref, critic = rt.build_policy_ref_critic(
            self.policy_path, self.device, args.prompt_tokens + args.max_new_tokens, args.gradient_checkpointing,
            setup, chat_template=args.chat_template)
        self.critic, self.critics = critic, {critics[0]: critic}
        for name in critics[1:]:  # e.g. the guide's value V_psi of LOLS and D2LOLS
            self.critics[name] = rt.make_critic(self.policy_path, self.tok, self.device, args.gradient_checkpointing,
                                                policy=self.policy, name=name, kind=setup.critic_kind)
        # --critic reference-head: line 3's reference forward returns its hidden states, which the critics read
        self.critic_reads_ref = any(c.reads_reference for c in self.critics.values())
        self.guide = None
        if guide:  # after the policy: a LoRA policy's start model as guide is its base with the adapter off
            from common import guides

            self.guide = guides.build_guide(
                args.guide, task, guide_path, None, self.device, top_p=args.guide_top_p, top_k=args.guide_top_k,
                temperature=args.guide_temperature, min_new_tokens=args.min_new_tokens, policy=self.policy,
                setup=setup, server=guides.server_options(args), chat_template=args.chat_template)
        self.args = args = dataclasses.replace(args, chat_template="on" if self.tok.chat_format else "off")
        self.reward_fn = rt.make_reward(task, args.reward_model, self.train, self.device, self.info, setup=setup)
        trained = [self.policy, *self.critics.values()]
        # one parameter group, or with --critic-lr a second one for the critics (the schedule scales each group's
        # own base lr: self.base_lrs)
        critic_lr = getattr(args, "critic_lr", None)
        params = [p for m in trained for p in m.parameters()]
        groups = params if critic_lr is None else [
            {"params": list(self.policy.parameters())},
            {"params": [p for m in trained[1:] for p in m.parameters()], "lr": critic_lr}]
        self.base_lrs = [args.lr] if critic_lr is None else [args.lr, critic_lr]
        # fused: one kernel per step instead of a Python loop over every tensor (~3x faster optimiser step on CPU)
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, eps=args.adam_eps, weight_decay=args.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        rt.zero_gradients(trained)  # allocated once, up front (see rt.zero_gradients)
        self.sampler = rt.PromptSampler(len(self.train), rt.derive_seed(args.seed, "prompts"))  # same in every process
        self.lr, self.times = args.lr, {}
        self.local = args.rollouts_per_iteration // self.world  # this process's rollouts per iteration
        self.mb_local = args.minibatch_size // self.world  # and per minibatch

    # ---- the loop ---------------------------------------------------------------------------------
    def stream(self, purpose: str, per_process: bool = True) -> random.Random:
        """A random stream of its own for `purpose` (e.g. mixing coins), seeded from the run's seed; checkpoints
        carry it (as `<purpose>_rng`)."""
        self.streams[f"{purpose}_rng"] = (rt.rng_stream(self.args.seed, purpose, self.rank) if per_process
                                           else rt.rng_stream(self.args.seed, purpose))
        return self.streams[f"{purpose}_rng"]

    def iterations(self, **state):
        """Yield the iteration numbers still to run; before each, set the learning rate; after each, evaluate and
        checkpoint when due. `state`: the script's own objects that checkpoints carry (by name)."""
        args, start, ck, state = self.args, 1, None, {**state, **self.streams}
        if args.resume:  # the models, optimiser, sampler, `state` and random states of the last checkpoint
            from common.resume import restore

            ck = restore(self, state)
            start = ck["iteration"] + 1
        self.policy_t, *critics_t = rt.wrap_for_training([self.policy, *self.critics.values()], self.optimizer,
                                                         self.world, args.fsdp)
        self.critics_t = dict(zip(self.critics, critics_t))  # what trains: the DDP / FSDP handles
        self.critic_t = critics_t[0]
        self.logger = rt.RunLogger(self.run_dir, args, enabled=self.rank == 0,
                                   resume_from=start if args.resume else None, algo=self.algo,
                                   final_tag="eval" if self.final_val is self.val else "final_eval")
        guide = f"guide {getattr(self.guide, 'name', args.guide)}, beta {args.beta}; " if self.guide else ""
        self.info(f"{self.algo} on {self.task.name}: {guide}policy {self.policy_path}, "
                 f"{rt.describe_params(self.policy)} params, {self.world} process(es) on "
                 f"{self.device}; run folder {self.run_dir}")
        self.started = True
        if not self.evaluates:
            self.first_eval = None
        elif args.resume:
            self.first_eval = ck["first_eval"]
        elif args.start_eval_from:  # another run's evaluations of the same start
            from common.start_eval import copied_start_eval

            self.first_eval = copied_start_eval(args, self.logger, self.final_val is not self.val)
        else:
            self.first_eval = rt.evaluate_start(self._evaluate, start - 1)
        self.progress = rt.progress_bar(range(start, args.iterations + 1), enabled=self.rank == 0)
        for it in self.progress:
            self.t_iter, self.times = time.time(), {}
            frac = 1.0 - (it - 1) / args.iterations if args.lr_schedule == "linear" else 1.0
            self.lr = args.lr * frac if args.lr_schedule == "linear" else args.lr
            for g, base in zip(self.optimizer.param_groups, self.base_lrs):
                g["lr"] = base * frac  # exactly self.lr for the policy's group
            yield it
            self.last_eval = None
            if self.evaluates and (it % args.eval_interval == 0 or it == args.iterations):
                self.last_eval = self._evaluate(it)
            if it % args.save_interval == 0 or it == args.iterations:
                self._checkpoint(it, state)

    def prompts(self):
        """Line 1: this process's slice of the iteration's batch of train prompts: (examples, token ids)."""
        local = self.args.rollouts_per_iteration // self.world
        idx = self.sampler.next(self.args.rollouts_per_iteration)[self.rank * local: (self.rank + 1) * local]
        batch = [self.train[i] for i in idx]
        return batch, rt.encode_prompts(self.task, self.tok, batch, self.args.prompt_tokens)

    def score(self, examples, responses, it: int) -> list[float]:
        """R(x, y) of each response; a reward that raises or returns NaN stops the run with one line."""
        return rt.scored(self.reward_fn, [e.prompt for e in examples], responses, [e.references for e in examples],
                         f"iteration {it}")

    def warm_up_critic(self, it: int, critic, critic_t, rollouts: tuple, values, returns, value_mask,
                       ref_hidden=None):
        """`--critic-warmup N`: at iteration 1, before the first policy update, N epochs of the value loss alone on
        the iteration's rollouts (qi, qm, ri, rm): the update's minibatches and micro-batches, its clipped value
        loss, vf_coef and grad-norm clip. The policy (and the other critics) get no gradient, so AdamW leaves
        their weights and state untouched. Off (0), nothing runs and no random number is drawn."""
        args = self.args
        if it != 1 or not getattr(args, "critic_warmup", 0):
            return
        from common.generation import used_columns

        qi, qm, ri, rm = rollouts
        idle = [self.policy, *(c for c in self.critics.values() if c is not critic)]
        with self.timer("critic_warmup"):
            for _ in range(args.critic_warmup):
                for mb in torch.randperm(self.local, device="cpu").split(self.mb_local):
                    n_val = value_mask[mb].sum().clamp(min=1)
                    rt.zero_gradients([critic], idle=idle)
                    for mi in mb.split(args.micro_batch_size):
                        mi = mi.to(self.device)
                        q, t = used_columns(qm[mi], rm[mi])
                        v = critic_t(qi[mi, q], qm[mi, q], ri[mi, t], rm[mi, t].long(),
                                     hidden=None if ref_hidden is None else ref_hidden[mi, t])
                        v_old, ret, m_val = values[mi, t], returns[mi, t], value_mask[mi, t]
                        # the scripts' value loss of line 6, line for line (tests/test_scripts_agree.py)
                        v_clip = v_old + (v - v_old).clamp(-args.clip_range_vf, args.clip_range_vf)
                        vf_losses = torch.max((v - ret) ** 2, (v_clip - ret) ** 2)
                        vf_loss = 0.5 * (vf_losses * m_val).sum() / n_val
                        (args.vf_coef * vf_loss).backward()
                    torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                    self.optimizer.step()

    @contextmanager
    def timer(self, name: str):
        """Adds the time of the block to the iteration's `time/<name>` metric."""
        t0 = time.time()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.time() - t0

    def log(self, it: int, metrics: dict, samples: tuple | None = None):
        """The iteration's metrics (docs/metrics.md) with its timings, to TensorBoard and metrics.jsonl; `samples`
        (tag, header, rows) becomes a sample table at evaluation iterations."""
        dt = time.time() - self.t_iter
        n_tokens = metrics["train/response_length"] * self.args.rollouts_per_iteration
        metrics = {**metrics, **{f"time/{k}": v for k, v in self.times.items()}, "time/iteration": dt,
                   "time/tokens_per_second": n_tokens / dt}
        if len(self.base_lrs) > 1:  # --critic-lr
            metrics["train/critic_lr"] = self.optimizer.param_groups[1]["lr"]
        if self.guide is not None:
            from common.guides import guide_metrics

            metrics.update(guide_metrics(self.guide))  # a server guide: requests, retries, tokens
        self.logger.scalars(metrics, it)
        if samples and (it % self.args.eval_interval == 0 or it == self.args.iterations):
            self.logger.table(*samples, it, self.args.sample_rows)
        self.progress.set_postfix(reward=f"{metrics['objective/reward']:.3f}", kl=f"{metrics['objective/kl']:.2f}")

    # ---- evaluation, checkpoints, the end -----------------------------------------------------------
    def _evaluate(self, step: int, final: bool = False) -> dict | None:
        """Line 7: the learner alone on the validation prompts (`final`: the final evaluation's prompts; None where
        they are the periodic ones), logged as eval/* (final_eval/*)."""
        if final and self.final_val is self.val:
            return None
        examples, tag = (self.final_val, "final_eval") if final else (self.val, "eval")
        m, rows = rt.evaluate(self.policy, self.ref, self.tok, self.task, examples, self.reward_fn, self.args,
                              self.device, step=step)
        self.logger.scalars({f"{tag}/{k}": v for k, v in m.items()}, step)
        self.logger.table(f"{tag}/samples", ["prompt", "response", "reward"], rows, step, self.args.sample_rows)
        return m

    def _checkpoint(self, it: int, state: dict):
        """Every process: under FSDP the full state dicts are gathered from all of them; rank 0 writes."""
        rt.save_checkpoint(self.run_dir / "checkpoint.pt", {
            "script": self.algo, "iteration": it, "first_eval": self.first_eval,
            "policy": rt.full_state_dict(self.policy, self.rank),
            **{name: rt.full_state_dict(c, self.rank) for name, c in self.critics.items()},
            "optimizer": rt.full_optimizer_state(self.optimizer, self.rank), "sampler": self.sampler.state_dict(),
            **{name: _get_state(obj) for name, obj in state.items()}, "rng": rt.rng_state()})

    def finish(self):
        """The final evaluation (unless the last iteration had one), the trained policy and critic, eval.json."""
        args, critic = self.args, self.critic
        self.started = False  # every iteration is checkpointed: an interruption from here is one_line_errors' to report
        final = rt.evaluate_end(self._evaluate, args.iterations, self.last_eval) if self.evaluates else None
        rt.save_final(self.policy, critic, self.tok, self.run_dir)  # every process: under FSDP the weights are gathered
        if self.rank != 0:
            return None
        rt.report(self.first_eval, final, self.run_dir,
                  protocol=rt.eval_protocol(args, len(self.val), len(self.final_val)))
        print(f"policy saved to {self.run_dir / 'policy'}")
        rt.finish(self.run_dir, args.keep_checkpoint)
        self.logger.close()
        return self.first_eval, final

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        """Ctrl-C or SIGTERM once the run has started: keep the policy, say how to continue (exit 130 / 143)."""
        if isinstance(error, KeyboardInterrupt) and self.started:
            self.logger.close()
            rt.interrupted(error, self.run_dir, self.rank, self.algo,
                           lambda: rt.save_interrupted(self.policy, self.critic, self.tok, self.run_dir),
                           bool(self.args.resume))
        return False


def update_means(stats: dict, where: str) -> dict:
    """The mean of each of the update's statistics (lists of device tensors), read from the device at once, so the
    update's time counts the GPU's work too; a loss that is NaN or infinite stops the run with one line."""
    logged = [k for k, v in stats.items() if v]
    means = dict(zip(logged, torch.stack([torch.stack(stats[k]).mean() for k in logged]).tolist()))
    rt.check_finite(means, where)
    return means


def _get_state(obj):
    if isinstance(obj, random.Random):
        return rt.per_rank(obj.getstate())  # each process's own stream
    return dict(vars(obj))


