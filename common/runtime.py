"""Plumbing every script needs and none should repeat: devices and torchrun, seeding, model and reward
set-up, prompt batches, evaluation, logging, checkpoints. No algorithm logic lives here."""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.errors import RunFailed, UsageError, exit_code
from common.generation import (ReferenceHeadValue, ValueModel, decode, forward_response, left_pad, position_limit,
                               right_pad, sample, set_bf16)
from common.chat import setup_chat, template_length
from common.settings import ModelSetup, flag
from common.models import _no_dropout, is_encoder_decoder, is_model_alias, load_causal_lm, load_tokenizer
from common.tasks import Task, encode_prompt


def quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass


def is_lora(model, kind: str = "LoraPolicy") -> bool:
    """`isinstance(model, common.lora.<kind>)` without importing common.lora (peft): no model is one of its kinds
    unless something imported it (--lora-r, `build_policy_ref_critic`)."""
    lora = sys.modules.get("common.lora")
    return lora is not None and isinstance(model, getattr(lora, kind))


# ---------------------------------------------------------------------------------------------------
# devices, torchrun, seeds
# ---------------------------------------------------------------------------------------------------
def return_freed_memory(threshold: int = 32 * 1024 * 1024):
    """Fix glibc's mmap threshold at 32 MiB (its largest), so that the tensors of an iteration, whose sizes
    repeat every minibatch, come from the heap and are reused there.

    - A block above the threshold is mapped afresh and page-faulted in at every use, and in a VM a fault
      costs microseconds. At 256 KiB a quarter of the CPU time went to the kernel (66 million faults in one
      5-minute TL;DR run); at 4 MiB the [tokens, vocab] logits and the embedding's gradient still went that
      way (CommonGen PPO: 735k faults in 6 iterations, 272k at 32 MiB).
    - Fixed, not glibc's default: that raises the threshold as large blocks are freed, and its heap
      fragmented and never shrank (IMDB PPO peaked at 1324 MiB RSS with it).

    PPO, mean of iterations 2-4 (2-6 for CommonGen), the benchmark's peak above imports, threshold 256 KiB / 4 MiB
    / 32 MiB (pairs run back to back): IMDB 5.70 / 3.92 / 3.89-3.93 s an iteration, CommonGen 1.69 / 1.29 / 1.40 s
    (4 MiB against 32 MiB in one pair: 1.60 against 1.40 s, faults 735k against 272k), TL;DR 8.09 / 5.89 / 6.21 s
    (4 MiB against 32 MiB: 6.73 against 6.21 s). Speed for memory: the heap keeps what the largest minibatch
    needed (peak at 4 MiB / 32 MiB: IMDB 549 / 620-633 MiB, CommonGen 399 / 447, TL;DR 602 / 667). No-op off glibc, and where the user set the threshold for glibc
    (`MALLOC_MMAP_THRESHOLD_`, or `glibc.malloc.mmap_threshold` in `GLIBC_TUNABLES`): a low one trades time for
    memory (README: Memory)."""
    if not sys.platform.startswith("linux"):
        return
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


_RUN = {"fsdp": False, "device": torch.device("cpu")}


def world_size() -> int:
    """Number of processes (torchrun's WORLD_SIZE), known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_device(device: str = "auto", bf16: bool = False, fsdp: bool = False):
    """(rank, world_size, device). Under torchrun: DistributedDataParallel over gloo (CPU) or nccl (GPU), or
    FSDP with `fsdp` (then also in a single process, over a one-process group); a single process without
    `fsdp` behaves exactly like plain python. `bf16` turns on bf16 autocast in common.generation."""
    set_bf16(bf16)
    return_freed_memory()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if fsdp:
        from common.fsdp import ensure_process_group

        ensure_process_group(dev)
    _RUN.update(fsdp=bool(fsdp), device=dev)
    return rank, world, dev


def _load_device(device):
    """Where a trained model is loaded: under FSDP on the CPU, from where `wrap_for_training` moves each
    layer's shard to the device (a model too large for one GPU is never there whole)."""
    return torch.device("cpu") if _RUN["fsdp"] else device


def wrap_for_training(models: list, optimizer, world: int, fsdp: bool = False) -> list:
    """The handles the update's forward passes go through, one per model: DistributedDataParallel under
    torchrun, the model itself in one process; with `fsdp` the models sharded in place (common/fsdp.py) and
    `optimizer` pointed at their shards. Call it after a checkpoint is loaded into the (unsharded) models."""
    if fsdp:
        from common.fsdp import shard_for_training

        shard_for_training(models, optimizer, _RUN["device"], world)
        return list(models)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return [DDP(m) for m in models]
    return list(models)


def _fsdp():
    """common.fsdp once something imported it (--fsdp: `setup_device`, `wrap_for_training`), else None: then
    nothing is sharded and each FSDP step here is its plain PyTorch one."""
    return sys.modules.get("common.fsdp")


def is_sharded(model) -> bool:
    fsdp = _fsdp()
    return fsdp is not None and fsdp.is_sharded(model)


def full_state_dict(model, rank: int) -> dict:
    """`model.state_dict()`, gathered in full on rank 0 under FSDP (every process must call it then)."""
    fsdp = _fsdp()
    return fsdp.full_state_dict(model, rank) if fsdp is not None else model.state_dict()


def full_optimizer_state(optimizer, rank: int) -> dict:
    """`optimizer.state_dict()`, gathered in full on rank 0 under FSDP (every process must call it then)."""
    fsdp = _fsdp()
    return fsdp.full_optimizer_state(optimizer, rank) if fsdp is not None else optimizer.state_dict()


def seed_everything(seed: int):
    """SPEC 4.8: same seed, same numbers on the CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def derive_seed(seed: int, purpose: str, rank: int | None = None) -> int:
    """The seed of one random stream, from the run's seed, the stream's purpose and the process's rank (None:
    a stream every process shares, such as the prompt order or LOLS's per-iteration coin). A hash, so no two
    streams of a run start alike (seed + rank would give rank 1's stream the seed of another stream's + 1)."""
    key = f"rlgf:{seed}:{purpose}:{'shared' if rank is None else rank}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def rng_stream(seed: int, purpose: str, rank: int | None = None) -> random.Random:
    """A Python random stream seeded with `derive_seed(seed, purpose, rank)`."""
    return random.Random(derive_seed(seed, purpose, rank))


def all_reduce_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x


def check_batch_sizes(rollouts: int, minibatch: int, micro: int, world: int):
    """SPEC 4.7: rollouts per iteration > minibatch > micro-batch (per process), each dividing exactly."""
    if rollouts % minibatch:
        raise UsageError(f"--rollouts-per-iteration {rollouts} must be a multiple of --minibatch-size {minibatch}")
    if minibatch % world:
        raise UsageError(f"--minibatch-size {minibatch} must be a multiple of the number of processes {world}")
    if (minibatch // world) % micro:
        raise UsageError(f"--micro-batch-size {micro} must divide the per-process minibatch {minibatch // world}")


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------
def resolve_models(task: Task, policy_model: str | None, guide_model: str | None, data_dir: str | None,
                   rank: int, world: int, log=print, need_guide: bool = False, rebuild: bool = False):
    """Hub id / folder for the policy (and the guide, when asked); a model alias (`smollm2`) becomes its
    cached folder (made once by rank 0); the task's embedded defaults (built once by rank 0, cached;
    `rebuild`: built again) for whatever is not given. A given policy without a guide is its own guide."""
    if rank == 0:  # aliases are made once, by rank 0
        resolve_alias(policy_model, log, data_dir), resolve_alias(guide_model, log, data_dir)
    if world > 1:
        dist.barrier()
    policy_model = resolve_alias(policy_model, log, data_dir)
    guide_model = resolve_alias(guide_model, log, data_dir)
    guide_model = guide_model or (policy_model if need_guide else None)
    if policy_model and (guide_model or not need_guide):
        return policy_model, guide_model
    from common import embedded  # the task's embedded defaults, built once

    if rank == 0:
        embedded.embedded_models(task, data_dir, log=log, rebuild=rebuild)
    if world > 1:
        dist.barrier()
    em = embedded.embedded_models(task, data_dir, log=log)
    return policy_model or em.policy, (guide_model or em.guide) if need_guide else None


def resolve_alias(name: str | None, log=print, data_dir: str | None = None) -> str | None:
    """A model alias (`smollm2`, `smollm2-commongen-5shot`) -> its cached folder, made on first use
    (common.embedded.resolve_model_alias); any other name unchanged."""
    if not is_model_alias(name):
        return name
    from common.embedded import resolve_model_alias

    return resolve_model_alias(name, log, data_dir)


def model_setup(args, device) -> ModelSetup:
    """The run's LoRA and quantization settings (the `# model setup` fields of its Args), checked before
    anything is loaded."""
    setup = ModelSetup.from_args(args)
    setup.check(device)
    return setup


def build_policy_ref_critic(policy_path: str, device, context: int, gradient_checkpointing: bool = False,
                            setup: ModelSetup | None = None, chat_template: str = "off"):
    """The learner, its frozen reference (KL penalty) and a critic on the same initial backbone.
    `context` = prompt tokens + new tokens must fit the model's positions. An encoder-decoder model (read from its
    config) gets the same three: its LM, a copy, and a critic on its encoder-decoder backbone.
    `gradient_checkpointing`: the trained models recompute each layer in the backward instead of keeping its
    activations. `chat_template` (auto, on, off): the tokenizer is set up for it (common.chat.setup_chat);
    the resolved mode is `tok.chat_format is not None`, and the template's tokens count toward `context`.

    Full fine-tuning: the reference is a frozen copy, the critic a separate model. With LoRA (`setup.lora`):
    one base in memory (4/8-bit when asked); the policy is its `default` adapter, the reference the base with
    the adapters off, the critic an adapter + head on it (`--critic adapter`) or a separate model (common.lora)."""
    setup = setup or ModelSetup()
    tok = load_tokenizer(policy_path)
    setup_chat(tok, chat_template, encoder_decoder=is_encoder_decoder(policy_path))
    context += template_length(tok)
    policy = load_causal_lm(policy_path, tok, _load_device(device), "--policy-model",
                            quantization=setup.quantization_config())
    limit = position_limit(policy)
    if limit and context > limit:  # an encoder-decoder model with absolute positions (BART): conservative
        raise UsageError(f"prompt + response ({context} tokens) exceed the {limit} positions of {policy_path}: "
                         "lower --prompt-tokens or --max-new-tokens")
    if setup.lora:
        from common.lora import wrap_policy

        if gradient_checkpointing:
            enable_gradient_checkpointing(policy, policy_path)
        policy = wrap_policy(policy, setup, policy_path)
        critic = make_critic(policy_path, tok, device, gradient_checkpointing, policy=policy)
        return tok, policy, policy.reference(), critic
    ref = copy.deepcopy(policy).eval().requires_grad_(False).to(device)
    critic = make_critic(policy_path, tok, device, gradient_checkpointing, kind=setup.critic_kind)
    if gradient_checkpointing:
        enable_gradient_checkpointing(policy, policy_path)
    return tok, policy, ref, critic


def enable_gradient_checkpointing(model, name: str) -> None:
    """HF gradient checkpointing: each transformer layer keeps only its input for the backward and runs again
    there. HF checkpoints a layer only in training mode and with gradients on, so the model is put in training
    mode; dropout is off everywhere (`load_causal_lm`, `make_critic`), so that changes no number. The flag stays
    on the layers alone: GPT-2's model drops the key-value cache in training mode when its own flag is set, even
    while sampling without gradients."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"{name} ({type(model).__name__}) does not support gradient checkpointing: "
                         "drop --gradient-checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise UsageError(f"{name} ({type(model).__name__}) checkpoints outside its layers, which this project does "
                         "not support: drop --gradient-checkpointing")
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing") and not isinstance(m, GradientCheckpointingLayer):
            m.gradient_checkpointing = False
    model.train()


def zero_gradients(trained, idle=()) -> None:
    """Before each minibatch: the gradients of the models it trains, zeroed in place (allocated the first time),
    and none for `idle` models, which AdamW then skips. In place, not `zero_grad(set_to_none=True)`:
    gradients allocated afresh in every backward land between that backward's activations, and glibc's heap
    fragments around them; called once more right after the optimizer is built, they sit next to the weights.
    Benchmark peaks, PPO, two runs each, fresh gradients against these: TL;DR 646 / 708 against 566 / 562 MiB,
    IMDB 582 / 608 against 563 / 545, at the same speed. The numbers do not change: 0 + g = g. Under FSDP the
    weights a sampling pass kept gathered are freed first, so the gradients go to the shards."""
    fsdp = _fsdp()
    if fsdp is not None:
        for model in (*trained, *idle):
            fsdp.reshard(model)
    for model in trained:
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.zero_()
    for model in idle:
        for p in model.parameters():
            p.grad = None


def make_critic(policy_path: str, tok, device, gradient_checkpointing: bool = False, policy=None,
                name: str = "critic", kind: str | None = None) -> ValueModel | ReferenceHeadValue:
    """A separate value model (backbone + scalar head), initialised from the policy's backbone (AutoModel: a causal
    LM's transformer, an encoder-decoder LM's encoder-decoder without LM head, e.g. T5Model); with a LoRA
    policy and `--critic adapter` (its default), an adapter `name` + head on the policy's own base instead; with
    `--critic reference-head` (`kind`, else a LoRA policy's setting), a head alone on the reference's states."""
    from transformers import AutoConfig, AutoModel

    kind = kind or (policy.setup.critic_kind if is_lora(policy) else "separate")
    if kind == "reference-head":
        config = AutoConfig.from_pretrained(os.path.expanduser(policy_path))
        return ReferenceHeadValue(config.hidden_size).to(_load_device(device))
    if is_lora(policy) and kind == "adapter":
        from common.lora import make_adapter_critic

        return make_adapter_critic(policy, name)
    backbone = AutoModel.from_pretrained(os.path.expanduser(policy_path))
    if backbone.get_input_embeddings().num_embeddings < len(tok):
        backbone.resize_token_embeddings(len(tok))
    _no_dropout(backbone)
    if gradient_checkpointing:
        enable_gradient_checkpointing(backbone, policy_path)
    return ValueModel(backbone).to(_load_device(device))


def make_reward(task: Task, reward_model: str | None, train_examples, device, log=print,
                setup: ModelSetup | None = None):
    """The task's reward callable `(prompts, responses, references) -> list[float]` (SPEC section 3). A reward
    model is loaded in 4/8-bit with the policy (`setup`), and may be a PEFT adapter (common.rewards)."""
    from common import rewards

    quant = setup.quantization_config() if setup else None
    if task.name == "imdb":
        return (rewards.HFSentimentReward(reward_model, device=device, quantization=quant) if reward_model
                else rewards.VaderSentimentReward())
    if task.name == "commongen":
        if reward_model:
            raise UsageError("--reward-model is not used by commongen (its reward is CIDEr-D + SPICE)")
        return rewards.CommonGenReward([e.references for e in train_examples])
    if reward_model:
        return rewards.RewardModelReward(reward_model, device=device, quantization=quant)
    return rewards.RougeReward("rougeL")


# ---------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------
class PromptSampler:
    """Seeded passes over the train prompts; every process sees its slice of the same global batch."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order, self.pos = n, random.Random(seed), [], 0

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
                self.pos = 0
            take = min(k - len(out), len(self.order) - self.pos)
            out += self.order[self.pos: self.pos + take]
            self.pos += take
        return out

    def state_dict(self):
        return {"rng": self.rng.getstate(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, s):
        self.rng.setstate(tuple(s["rng"]) if isinstance(s["rng"], list) else s["rng"])
        self.order, self.pos = s["order"], s["pos"]


def encode_prompts(task: Task, tok, examples, prompt_tokens: int) -> list[list[int]]:
    return [encode_prompt(task, tok, e.prompt, prompt_tokens) for e in examples]


# ---------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------
EVAL_DECODINGS = ("sample", "greedy", "beam")


def eval_decoding(args) -> tuple[str, int]:
    """(decoding, beams) of the run's evaluations: `args.eval_decoding` (sample when the settings have none) and
    the beams of beam search (1 for sample and greedy)."""
    decoding = getattr(args, "eval_decoding", None) or "sample"
    return decoding, (getattr(args, "eval_num_beams", None) or 1) if decoding == "beam" else 1


def _generation_model(model):
    """(the transformers model whose `generate` decodes for `model`, the context it runs in): a LoRA policy's base
    with its adapter on, a LoRA reference's base with every adapter off, a DDP-wrapped model's own module."""
    import contextlib

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if is_lora(model) or is_lora(model, "AdapterView"):
        from common.lora import POLICY_ADAPTER, use_adapter

        if is_lora(model):
            return model.lm, use_adapter(model.lm, POLICY_ADAPTER)
        return model.module, use_adapter(model.root, model.adapter)
    return model, contextlib.nullcontext()


@torch.no_grad()
def search(model, queries: list[list[int]], *, num_beams: int, max_new_tokens: int, min_new_tokens: int, eos_id: int,
           pad_id: int, device) -> list[list[int]]:
    """Each query's response by transformers' own `generate`, without sampling: greedy (`num_beams` 1) or beam
    search over `num_beams` beams (its defaults otherwise: length penalty 1, no early stopping), at most
    `max_new_tokens` and EOS not before `min_new_tokens`; pad is never chosen (suppressed), as in `sample`. Every
    other decoding setting is given explicitly, so a model's own generation_config changes nothing. Prompts go
    in left-padded (an encoder-decoder model's encoder gets them left-aligned); each response ends at its EOS
    (included). Under FSDP every process takes part in every step (`synced_gpus`)."""
    from common.generation import _autocast, is_seq2seq

    lm, active = _generation_model(model)
    ids, mask = left_pad(queries, pad_id, device)
    seq2seq = is_seq2seq(lm)
    if seq2seq:
        from common.seq2seq import left_to_right_aligned

        ids, mask = left_to_right_aligned(ids, mask)
    synced = is_sharded(lm) and dist.is_initialized() and dist.get_world_size() > 1
    with active, _autocast(ids.device):
        out = lm.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=num_beams,
                          num_return_sequences=1, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                          eos_token_id=eos_id, pad_token_id=pad_id, suppress_tokens=[pad_id], length_penalty=1.0,
                          early_stopping=False, repetition_penalty=1.0, no_repeat_ngram_size=0, synced_gpus=synced)
    out = out[:, 1:] if seq2seq else out[:, ids.shape[1]:]  # the decoder's start token / the prompt
    rows = []
    for row in out.tolist():
        row = row[: row.index(eos_id) + 1] if eos_id in row else row
        while row and row[-1] == pad_id:  # a row that ended before the others, padded by generate
            row.pop()
        rows.append(row)
    return rows


@torch.no_grad()
def evaluate(policy, ref, tok, task: Task, examples, reward_fn, args, device, batch_size: int = 32, seed: int = 1234,
             step: int = 0):
    """Validation on `examples`, decoded as `args.eval_decoding` says (`eval_decoding`): `sample` draws one
    response per prompt with the learner's settings (fixed seed, so evaluations compare); `greedy` and `beam`
    decode with transformers' `generate` (`search`). Then the reward, the KL to the reference (sum over tokens
    of log pi - log pi_ref, k1: for greedy and beam the log-probs come from scoring the chosen response under
    the policy, so it is the log-ratio of that response rather than an estimate of the KL), the output perplexity
    under the reference model, and the task's metrics (`args.slow_metrics`: also METEOR and SPICE); `prompts`
    counts the examples. The random streams are left as they were. Returns (metrics, rows of (prompt, response,
    reward))."""
    from common.metrics import compute_metrics, perplexity

    decoding, beams = eval_decoding(args)
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    prompts, responses, kls, ppl_nll, n_tok = [], [], [], 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        q = encode_prompts(task, tok, chunk, args.prompt_tokens)
        if decoding == "sample":
            s = sample(policy, q, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                       eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=args.temperature, device=device)
            tokens = s.tokens
        else:
            tokens = search(policy, q, num_beams=beams, max_new_tokens=args.max_new_tokens,
                            min_new_tokens=args.min_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                            device=device)
        qi, qm = left_pad(q, tok.pad_token_id, device)
        ri, rm = right_pad(tokens, tok.pad_token_id, device=device)
        ref_lp, _ = forward_response(ref, qi, qm, ri, rm, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                     min_new_tokens=args.min_new_tokens, temperature=args.temperature)
        if decoding == "sample":
            lp = right_pad_float(s.logprobs, ri.shape[1], device)
        else:  # the chosen responses scored under the policy (generate's scores are beam scores, not log-probs)
            lp, _ = forward_response(policy, qi, qm, ri, rm, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                     min_new_tokens=args.min_new_tokens, temperature=args.temperature)
        kls += ((lp - ref_lp) * rm).sum(1).tolist()
        ppl_nll += float(-(ref_lp * rm).sum())
        n_tok += int(rm.sum())
        prompts += [e.prompt for e in chunk]
        responses += decode(tok, tokens)
    torch.random.set_rng_state(rng_state)
    refs = [e.references for e in examples]
    scores = scored(reward_fn, prompts, responses, refs, f"evaluation at iteration {step}")
    metrics = {"reward": float(np.mean(scores)), "kl": float(np.mean(kls)),
               "output_perplexity": math.exp(ppl_nll / max(1, n_tok)),
               "response_length": n_tok / max(1, len(examples))}
    metrics.update(compute_metrics(task.name, prompts, responses, refs, [e.meta for e in examples],
                                   slow_metrics=getattr(args, "slow_metrics", False)))
    if task.name == "imdb":
        metrics["reference_perplexity"] = perplexity(policy, tok, prompts, [r[0] for r in refs], device)
    metrics["prompts"] = float(len(examples))
    rows = list(zip(prompts, responses, scores))
    return metrics, rows


def final_eval_set(task: Task, data_dir, args, val: list) -> list:
    """The prompts of the final evaluation (and of the evaluation before training that eval.json compares it
    with): the first `args.final_eval_samples` validation examples, 0 = the whole split, None = `val` (the
    periodic evaluations' first `eval_samples`). `val` itself when that is the same set."""
    n = getattr(args, "final_eval_samples", None)
    if n is None:
        return val
    examples = task.load("validation", data_dir, limit=n or None)
    return val if len(examples) == len(val) else examples


def eval_protocol(args, periodic: int, final: int) -> dict:
    """How the evaluations decoded and on how many prompts, for eval.json."""
    decoding, beams = eval_decoding(args)
    how = {"decoding": decoding, **({"num_beams": beams} if decoding == "beam" else {}),
           "min_new_tokens": args.min_new_tokens, "max_new_tokens": args.max_new_tokens}
    copied = {"start_copied_from": args.start_eval_from} if getattr(args, "start_eval_from", None) else {}
    return {**how, "periodic_prompts": periodic, "final_prompts": final, **copied}


def evaluate_start(run_eval, step: int) -> dict:
    """The evaluations before training: on the periodic prompts (the curves' first point), then on the final
    evaluation's where those differ. Returns the one eval.json keeps as "initial". `run_eval(step, final)` is the
    script's: `final=True` gives None where the final prompts are the periodic ones."""
    periodic = run_eval(step)
    final = run_eval(step, final=True)
    return periodic if final is None else final


def evaluate_end(run_eval, step: int, last_periodic: dict | None) -> dict:
    """The final evaluation (eval.json's "final"): on the final evaluation's prompts where they differ from the
    periodic ones, else the last periodic evaluation (made at the last iteration, or now)."""
    final = run_eval(step, final=True)
    if final is not None:
        return final
    return last_periodic if last_periodic is not None else run_eval(step)


def right_pad_float(rows: list[list[float]], width: int, device) -> torch.Tensor:
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        r = r[:width]
        out[i, : len(r)] = torch.tensor(r)
    return out.to(device)


# ---------------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------------
def _md_escape(s: str, n: int = 400) -> str:
    s = s if len(s) <= n else "…" + s[-n:]
    return s.replace("|", "\\|").replace("\n", " ⏎ ")


class RunLogger:
    """TensorBoard scalars and sample tables, plus metrics.jsonl, under the run folder (rank 0 only)."""

    def __init__(self, run_dir: Path, args, enabled: bool = True, resume_from: int | None = None, algo: str = "",
                 final_tag: str = "eval"):
        """`resume_from`: the first iteration of a resumed run; whatever an earlier run logged from there on
        (iterations redone after the last checkpoint) is dropped, in TensorBoard and in metrics.jsonl, and so is
        the final evaluation (logged as `final_tag`/*) of a run stopped after its last iteration."""
        self.enabled, self.run_dir = enabled, run_dir
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        run = current_run()
        if run is not None:
            run.started, run.logger = True, self
        self.writer = SummaryWriter(str(run_dir), purge_step=resume_from)
        jsonl = run_dir / "metrics.jsonl"
        if resume_from is not None and jsonl.exists():
            from common.resume import metrics_to_keep

            jsonl.write_text("".join(l + "\n" for l in metrics_to_keep(jsonl, resume_from, final_tag)))
        cfg = {"script": algo, **asdict(args)}  # the script, so that --resume refuses another script's folder
        (run_dir / "args.json").write_text(json.dumps(cfg, indent=1, default=str))
        self.writer.add_text("args", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in cfg.items()))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")

    def scalars(self, metrics: dict, step: int):
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def table(self, tag: str, header: list[str], rows: list[tuple], step: int, n: int = 8):
        if not self.enabled:
            return
        lines = ["|" + "|".join(header) + "|", "|" + "|".join("-" for _ in header) + "|"]
        for r in rows[:n]:
            lines.append("|" + "|".join(_md_escape(f"{c:.3f}" if isinstance(c, float) else str(c)) for c in r) + "|")
        self.writer.add_text(tag, "\n".join(lines), step)

    def close(self):
        """Idempotent (a run folder being discarded closes its logger too)."""
        for name in ("writer", "jsonl"):
            handle = self.__dict__.pop(name, None) if self.enabled else None
            if handle is not None:
                handle.close()


def report(before: dict, after: dict, run_dir: Path, file=sys.stdout, protocol: dict | None = None):
    """Print the before/after table of validation reward and metrics; keep it as eval.json, with `protocol`
    (`eval_protocol`: the decoding and the prompts of the periodic and the final evaluations) under
    "evaluation"."""
    keys = [k for k in before if k in after]
    print(f"\n{'validation':<24}{'before':>12}{'after':>12}", file=file)
    for k in keys:
        print(f"{k:<24}{before[k]:>12.4f}{after[k]:>12.4f}", file=file)
    if protocol:
        how = protocol["decoding"] + (f" ({protocol['num_beams']} beams)" if "num_beams" in protocol else "")
        print(f"decoded by {how}; before and after on {protocol['final_prompts']} validation prompts, the curves on "
              f"{protocol['periodic_prompts']}", file=file)
    out = {"initial": before, "final": after, **({"evaluation": protocol} if protocol else {})}
    (run_dir / "eval.json").write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------------------------------------------
# settings: checked before any slow work; --resume restores a run's own
# ---------------------------------------------------------------------------------------------------
_AT_LEAST_1 = ("iterations", "rollouts_per_iteration", "minibatch_size", "micro_batch_size", "n_epochs",
               "eval_interval", "eval_samples", "save_interval", "prompt_tokens", "max_new_tokens", "kl_horizon",
               "eval_num_beams")
_AT_LEAST_0 = ("seed", "min_new_tokens", "sample_rows", "guide_top_k", "tau", "guide_temperature", "final_eval_samples",
               "critic_warmup")
_ABOVE_0 = ("temperature", "adam_eps", "max_grad_norm", "clip_range", "clip_range_vf", "kl_target", "critic_lr")
_NOT_NEGATIVE = ("lr", "weight_decay", "vf_coef", "kl_coef", "nll_coef")
_FROM_0_TO_1 = ("gamma", "lam", "beta", "p_ppo_pp", "guide_top_p")


def check_settings(args, world: int) -> None:
    """Every setting the scripts share, checked at once (no model, data or run folder touched yet): counts of at
    least 1, non-negative seeds and coefficients, probabilities in [0, 1], the device, the guide for the task,
    model paths and the batch hierarchy (called by `common.settings.finish_settings`)."""
    def value(name):
        return getattr(args, name, None)

    for name in _AT_LEAST_1 + _AT_LEAST_0 + _ABOVE_0 + _NOT_NEGATIVE + _FROM_0_TO_1:
        v = value(name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"{flag(name)} must be a finite number, not {v}")
    for names, ok, what in ((_AT_LEAST_1, lambda v: v >= 1, "at least 1"), (_AT_LEAST_0, lambda v: v >= 0, "0 or more"),
                            (_ABOVE_0, lambda v: v > 0, "above 0"), (_NOT_NEGATIVE, lambda v: v >= 0, "0 or more"),
                            (_FROM_0_TO_1, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for name in names:
            v = value(name)
            if v is not None and not ok(v):
                raise UsageError(f"{flag(name)} must be {what}, not {v}")
    if args.min_new_tokens > args.max_new_tokens:
        raise UsageError(f"--min-new-tokens {args.min_new_tokens} exceeds --max-new-tokens {args.max_new_tokens}")
    decoding = value("eval_decoding")
    if decoding is not None and decoding not in EVAL_DECODINGS:
        raise UsageError(f"--eval-decoding must be {', '.join(EVAL_DECODINGS[:-1])} or {EVAL_DECODINGS[-1]}, "
                         f"not {decoding!r}")
    device = args.device
    if device != "auto" and device != "cpu" and device.split(":")[0] != "cuda":
        raise UsageError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch sees no CUDA device; use --device cpu (or auto)")
    setup = None
    if hasattr(args, "lora_r"):  # LoRA and quantization (common.settings.ModelSetup)
        setup = ModelSetup.from_args(args)
        setup.check(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if setup.critic_kind == "reference-head" and args.fsdp:
            raise UsageError("--critic reference-head is a value head alone, not sharded by --fsdp: drop one of them")
    if value("guide") is not None:  # the guided scripts' guide settings (common/guides.py)
        from common.guides import check_guide_settings

        check_guide_settings(args)
    if value("start_eval_from") and not args.resume:
        from common.start_eval import check_start_eval_from

        check_start_eval_from(args)
    if args.task == "commongen" and args.reward_model:
        raise UsageError("--reward-model is not used by commongen (its reward is CIDEr-D + SPICE)")
    check_batch_sizes(args.rollouts_per_iteration, args.minibatch_size, args.micro_batch_size, world)
    check_models(args, setup)


def check_models(args, setup: ModelSetup | None = None) -> None:
    """Every given model, the cheap way (configs only, no weights; common.models.check_model_kind): the policy
    and a model guide must be causal or seq2seq LMs, the reward model a sequence classifier of the task's kind;
    with LoRA, --lora-target-modules must name layers of the policy's model (read from its config on the meta
    device: the task's embedded default when no policy is given). Model aliases (smollm2) are checked once made."""
    from common.models import check_model_kind, model_skeleton

    roles = {"policy_model": "lm", "guide_model": "lm", "reward_model": "reward"}
    for name, role in roles.items():
        v = getattr(args, name, None)
        if v and not is_model_alias(v):
            check_model_kind(v, flag(name), role, args.task)
    policy = getattr(args, "policy_model", None)
    if setup is not None and setup.lora and setup.lora_target_modules and not is_model_alias(policy):
        from common.lora import check_targets

        skeleton = model_skeleton(policy, args.task)
        if skeleton is not None:
            check_targets(setup, skeleton, policy or f"the embedded {args.task} policy")


_CLI_GIVEN: set | None = None  # the fields named on the command line (set by `cli`)


def run_dir_of(args, algo: str, task: str, rank: int = 0) -> Path:
    """The run folder: --resume's, or a new one under --output-dir, claimed for this run (rank 0; see RunFolder)
    before anything else is done: a folder another live run holds, a new run's folder that holds a finished or
    stopped run (its metrics.jsonl would mix two runs) and a folder that cannot be written are refused."""
    _RUN["iterations"] = args.iterations  # every process: --resume's check against the checkpoint
    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_dir = run_dir_for(args.output_dir, algo, task, args.seed, args.run_name)
    if rank == 0 and int(os.environ.get("RANK", "0")) == 0:
        RunFolder.claim(run_dir, algo, bool(args.resume))
    return run_dir


_RUN_FILES = ("args.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.pt.tmp", "eval.json", "critic.pt")
_NEW_RUN_FILES = ("args.json", "metrics.jsonl", "checkpoint.pt.tmp")  # what a run writes before its first checkpoint


class RunFolder:
    """The folder a run writes, held by this process for the run's life: an exclusive `flock` on `RUN_DIR/.lock`
    (which holds the process id), taken before any model is loaded. The OS releases the lock when the process
    dies, however it dies, so a killed run never blocks its folder; `.lock` is removed when the run ends.

    It also knows how far the run got (set up; running, with or without a checkpoint; every iteration done), so
    that an error or an interruption says what is kept, and a new run stopped before its first checkpoint
    leaves no folder behind (the same command runs again)."""

    LOCK = ".lock"

    def __init__(self, path: Path, algo: str, resumed: bool, created: bool, fd: int):
        self.path, self.algo, self.resumed, self.created, self.fd = path, algo, resumed, created, fd
        self.started = False  # the run's files (args.json, metrics.jsonl) are being written
        self.checkpoint: int | None = None  # the iteration of the checkpoint on disk
        self.logger = None

    @classmethod
    def claim(cls, run_dir: Path, algo: str, resumed: bool) -> "RunFolder":
        import fcntl

        created, made = False, []
        if not resumed:
            made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first: removed on discard
            try:
                run_dir.mkdir(parents=True)
                created = True
            except FileExistsError:
                if not run_dir.is_dir():
                    raise UsageError(f"run folder {run_dir} is a file, not a folder: choose another --run-name") from None
            except OSError as e:
                raise UsageError(f"cannot create the run folder {run_dir} ({e.strerror}): choose a writable "
                                 "--output-dir") from None
        lock = run_dir / cls.LOCK
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UsageError(f"run folder {run_dir} cannot be written ({e.strerror}): "
                                 + ("make it writable, then resume" if resumed else "choose a writable --output-dir")
                                 ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                what = ("that run is still running" if resumed else "another run is using it")
                raise UsageError(f"run folder {run_dir}: {what} (process {pid}); wait for it to end or stop it"
                                 + ("" if resumed else ", or choose another --run-name")) from None
            try:  # the lock is on the file now at that path (not on one a finishing run has just removed)
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        run = cls(run_dir, algo, resumed, created, fd)
        run.made = made
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            if not resumed and any((run_dir / n).exists() for n in ("args.json", "metrics.jsonl", "checkpoint.pt")):
                raise UsageError(f"run folder {run_dir} already holds a run: continue it with --resume {run_dir}, or "
                                 "choose another --run-name")
            unwritable = [n for n in (".", *_RUN_FILES) if (run_dir / n).exists() and not os.access(run_dir / n, os.W_OK)]
            if unwritable:
                raise UsageError(f"run folder {run_dir} cannot be written ({', '.join(unwritable)}: permission "
                                 "denied): " + ("make it writable, then resume" if resumed else
                                                "choose a writable --output-dir"))
        except BaseException:
            run.release()
            if created:
                run.remove_folders()
            raise
        from common.errors import set_run

        set_run(run)
        return run

    def checkpoint_note(self) -> str:
        """What an error stopping the run leaves, for the end of its line (a new run without a checkpoint: nothing,
        and its folder is removed)."""
        if not self.started:
            return ""
        if self.checkpoint is None and not (self.path / "checkpoint.pt").is_file():
            return "; nothing was checkpointed yet: the run folder is removed, so the same command can run again"
        done = f" of iteration {self.checkpoint}" if self.checkpoint is not None else ""
        if self.finishing:
            return (f"; every iteration is in the checkpoint{done}: python {self.algo}.py --resume {self.path} "
                    "writes the final evaluation and policy")
        return f"; the checkpoint{done} is kept (python {self.algo}.py --resume {self.path} continues from it)"

    @property
    def finishing(self) -> bool:
        """Every iteration is done and checkpointed: what is left is the final evaluation and saves."""
        return self.checkpoint is not None and self.checkpoint >= (_RUN.get("iterations") or math.inf)

    def stopped(self, failure: bool) -> str:
        """Called once by `one_line_errors` when an error (`failure`) or an interruption ends the run: the end of
        the error's line, or the interruption's line. A new run without a checkpoint is removed."""
        has_checkpoint = (self.path / "checkpoint.pt").is_file()
        note = self.checkpoint_note() if failure else ""
        if not has_checkpoint and self.checkpoint is None:
            self.discard()
        if failure:
            return note
        if not self.started:
            return "\ninterrupted while setting up, before the first iteration: nothing new was saved"
        if self.finishing and has_checkpoint:
            return (f"\ninterrupted after the last iteration ({self.checkpoint}), while writing the final evaluation "
                    f"and policy: every iteration is in checkpoint.pt; python {self.algo}.py --resume {self.path} "
                    "writes them")
        if self.finishing:  # checkpoint.pt deleted by `finish`: the run had ended
            return f"\ninterrupted after the run finished: its policy and eval.json are in {self.path}"
        if has_checkpoint:
            return f"\ninterrupted: continue from the last checkpoint with python {self.algo}.py --resume {self.path}"
        return "\ninterrupted before the first checkpoint: nothing to resume, run the command again"

    def discard(self) -> None:
        """A new run stopped before its first checkpoint: remove what it wrote (and its folder, when this run made
        it or nothing else is in it), so the same command runs again. A resumed run's folder is left alone."""
        if self.resumed:
            return
        if self.logger is not None:
            self.logger.close()
        for p in [*(self.path / n for n in _NEW_RUN_FILES), *self.path.glob("events.out.tfevents.*")]:
            p.unlink(missing_ok=True)
        self.release()
        self.remove_folders()

    def remove_folders(self) -> None:
        """The run folder, and the folders above it that the claim made (e.g. a new --output-dir), where empty."""
        for p in getattr(self, "made", None) or [self.path]:
            try:
                p.rmdir()
            except OSError:
                return

    def release(self) -> None:
        """Remove `.lock` (while still holding it) and let it go. Idempotent."""
        if self.fd is None:
            return
        try:
            (self.path / self.LOCK).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def current_run() -> RunFolder | None:
    """The run folder this process holds (rank 0 of a running script), or None."""
    from common import errors

    return errors._run if isinstance(errors._run, RunFolder) else None


# ---------------------------------------------------------------------------------------------------
# checkpoints: a crash, Ctrl-C or SIGTERM never loses finished iterations
# ---------------------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(path: Path, state: dict):
    """Written by rank 0 alone (any process may call it): to a temporary file, flushed to disk, then renamed
    over the old one, so a kill at any moment leaves the previous checkpoint or the new one, never a part of
    either. Ctrl-C or SIGTERM during the write is held back until the new checkpoint is in place, then raised."""
    if _rank() != 0:
        return
    from common.errors import signals_deferred

    tmp = path.with_name(path.name + ".tmp")
    with signals_deferred():  # Ctrl-C / SIGTERM wait for the write (and are raised after it)
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself
            finally:
                os.close(fd)
        except OSError:
            pass
        run = current_run()
        if run is not None and isinstance(state.get("iteration"), int):
            run.checkpoint = state["iteration"]


def per_rank(state):
    """`state` of every process, a list by rank, under torchrun (every process must call it): each process
    samples its own rollouts, so a resumed run needs each one's random state. One process: `state`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return state
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def rng_state():
    """The global generators' states, per process (`per_rank`: every process calls it), in the plain forms
    `torch.load(weights_only=True)` accepts."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return per_rank({"python": [py[0], list(py[1]), py[2]], "torch": torch.random.get_rng_state(),
                     "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                               "gauss": float(gauss)}})


def interrupted(e: KeyboardInterrupt, run_dir: Path, rank: int, algo: str, save_policy, resumed: bool):
    """Ctrl-C or SIGTERM: keep the policy as it is and say how to continue from the last checkpoint; before any
    checkpoint, remove what this run wrote (so the same command can run again). Exits with 130 or 143."""
    from common.errors import signals_deferred

    if rank == 0:
        run = current_run()
        if (run_dir / "checkpoint.pt").is_file():
            with signals_deferred(reraise=False):  # stopping already: a second Ctrl-C does not cut the save
                saved = save_policy()
            where = f"policy saved to {run_dir / 'policy'}; " if saved is not False else ""
            print(f"\ninterrupted: {where}continue from the last checkpoint with python {algo}.py --resume {run_dir}",
                  file=sys.stderr)
        else:
            if run is not None:
                run.discard()
            elif not resumed:
                for p in [run_dir / "args.json", run_dir / "metrics.jsonl", *run_dir.glob("events.out.tfevents.*")]:
                    p.unlink(missing_ok=True)
                try:
                    run_dir.rmdir()
                except OSError:
                    pass
            print("\ninterrupted before the first checkpoint: nothing to resume, run the command again",
                  file=sys.stderr)
    raise SystemExit(exit_code(e))


def finish(run_dir: Path, keep_checkpoint: bool) -> None:
    """A finished run deletes its checkpoint (the policy and critic are saved beside it) unless asked to keep it."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return
    if keep_checkpoint:
        print(f"checkpoint kept: {path} (--resume {run_dir} --iterations N continues the run)")
    else:
        size = path.stat().st_size
        path.unlink()
        print(f"checkpoint.pt deleted ({size / 2**20:.0f} MiB): the run is finished (--keep-checkpoint keeps it)")


# ---------------------------------------------------------------------------------------------------
# a run that cannot go on: one line naming the iteration
# ---------------------------------------------------------------------------------------------------
def scored(reward_fn, prompts, responses, references, where: str) -> list[float]:
    """`reward_fn`'s scores, which must be one finite number per response; a reward that raises or returns NaN
    stops the run with one line (RunFailed) naming `where`, e.g. the iteration; `one_line_errors` adds what is
    kept (RunFolder.checkpoint_note)."""
    try:
        scores = [float(x) for x in reward_fn(prompts, responses, references)]
    except (KeyboardInterrupt, UsageError, RunFailed):
        raise
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0][:160]
        raise RunFailed(f"{where}: the reward raised {type(e).__name__}: {msg}") from None
    if len(scores) != len(responses):
        raise RunFailed(f"{where}: the reward returned {len(scores)} scores for {len(responses)} responses")
    bad = sum(not math.isfinite(x) for x in scores)
    if bad:
        raise RunFailed(f"{where}: the reward returned {bad} non-finite score(s) (NaN or inf) for {len(scores)} "
                        "responses")
    return scores


def check_finite(stats: dict, where: str) -> None:
    """Stop with one line when a loss or statistic of the update is NaN or infinite (the weights are no good from
    here on; nothing of this iteration is saved)."""
    bad = [k for k, v in stats.items() if not math.isfinite(v)]
    if bad:
        raise RunFailed(f"{where}: {', '.join(bad)} is not finite (NaN or inf): the run stops (a lower --lr may "
                        "help)")


def describe_params(policy) -> str:
    """The policy's size for a run's start line, followed there by "params": "5.3M" (full fine-tuning: every
    weight trains), "0.5M trainable of 135.0M" with LoRA (the adapter's weights of the base + adapter)."""
    if not is_lora(policy):
        return f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M"
    trainable = sum(p.numel() for p in policy.parameters())
    base = sum(p.numel() for n, p in policy.lm.named_parameters() if "lora_" not in n)
    return f"{trainable / 1e6:.1f}M trainable of {(base + trainable) / 1e6:.1f}M"


def save_final(policy, critic, tok, run_dir: Path):
    """The trained policy, loadable with AutoModelForCausalLM.from_pretrained(run_dir / 'policy'); with LoRA,
    the adapter (AutoPeftModelForCausalLM.from_pretrained(run_dir / 'policy'), critic adapters in sub-folders
    named after them) and, with --merge-lora, the merged model in run_dir / 'policy-merged'. The critic's
    trained weights (all of a separate critic; adapter + head of a critic adapter) go to critic.pt. Written by
    rank 0; every process calls it: under FSDP it gathers the full weights."""
    rank, fsdp = _rank(), _fsdp()
    lora = is_lora(policy)
    policy_state = full_state_dict(policy, rank) if is_sharded(policy) and not lora else None
    adapters = fsdp.lora_state_dict(policy, rank) if lora and fsdp is not None else None
    critic_state = full_state_dict(critic, rank)
    if rank != 0:
        return
    if lora:
        policy.save(run_dir / "policy", tok, run_dir / "policy-merged" if policy.setup.merge_lora else None,
                    state_dict=adapters)
        torch.save(critic_state, run_dir / "critic.pt")
        return
    if policy_state is None:
        policy.save_pretrained(run_dir / "policy")
    else:
        fsdp.save_pretrained_unsharded(policy, policy_state, run_dir / "policy")
    tok.save_pretrained(run_dir / "policy")
    torch.save(critic_state, run_dir / "critic.pt")


def save_interrupted(policy, critic, tok, run_dir: Path) -> bool:
    """On Ctrl-C or SIGTERM, rank 0: save the policy where the processes can do so alone (not under FSDP, whose
    gather needs every process while each stopped somewhere else). True where it was saved."""
    if is_sharded(policy):
        return False
    save_final(policy, critic, tok, run_dir)
    return True


def run_dir_for(output_dir: str, algo: str, task: str, seed: int, run_name: str | None) -> Path:
    name = run_name or f"{algo}-{task}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(output_dir) / name


def progress_bar(iterable, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, desc="iterations")


def reference_nll(model, tok, task: Task, examples, qi, qm, args) -> torch.Tensor:
    """Mean negative log-likelihood of each prompt's first dataset reference (the official code's
    optional supervised term), scored with the same masked distribution as the policy."""
    refs = [tok(e.references[0], add_special_tokens=False)["input_ids"][: args.max_new_tokens - 1] + [tok.eos_token_id]
            for e in examples]
    ri, rm = right_pad(refs, tok.pad_token_id, device=qi.device)
    lp, _ = forward_response(model, qi, qm, ri, rm, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                             min_new_tokens=0, temperature=args.temperature)
    return -(lp * rm).sum() / rm.sum().clamp(min=1)
