"""Plumbing every script needs and none should repeat: devices and torchrun, seeding, model and reward
set-up, prompt batches, evaluation, logging, checkpoints. No algorithm logic lives here."""

from __future__ import annotations

import copy
import ctypes
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

from common.errors import UsageError
from common.generation import (ValueModel, decode, forward_response, left_pad, position_limit, right_pad, sample,
                               set_bf16)
from common.chat import setup_chat, template_length
from common.models import embedded_models, load_causal_lm, load_tokenizer, resolve_model_alias
from common.tasks import Task, encode_prompt


def quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass


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
      fragmented and never shrank (IMDB PPO once peaked at 1324 MiB RSS).

    PPO, mean of iterations 2-4 (2-6 for CommonGen), the benchmark's peak above imports, 4 -> 32 MiB, pairs
    run back to back: IMDB 4.26 -> 3.89-3.93 s an iteration (549 -> 620-633 MiB), CommonGen 1.60 -> 1.40 s
    (399 -> 447 MiB, faults 735k -> 272k), TL;DR 6.73 -> 6.21 s (602 -> 667 MiB). Speed for memory: the
    heap keeps what the largest minibatch needed. Earlier, 256 KiB -> 4 MiB: IMDB 5.70 -> 3.92 s, CommonGen
    1.69 -> 1.29 s, TL;DR 8.09 -> 5.89 s. No-op off glibc, and where the user set the threshold for glibc
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


def setup_device(device: str = "auto", bf16: bool = False):
    """(rank, world_size, device). Under torchrun: DistributedDataParallel over gloo (CPU) or nccl (GPU);
    a single process behaves exactly like plain python. `bf16` turns on bf16 autocast in common.generation."""
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
    return rank, world, dev


def seed_everything(seed: int):
    """SPEC 4.8: same seed, same numbers on the CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


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
                   rank: int, world: int, log=print, need_guide: bool = False):
    """Hub id / folder for the policy (and the guide, when asked); a model alias (`smollm2`) becomes its
    cached folder (made once by rank 0); the task's embedded defaults (built once by rank 0, cached) for
    whatever is not given. A given policy without a guide is its own guide."""
    if rank == 0:  # aliases are made once, by rank 0
        resolve_model_alias(policy_model, log, data_dir), resolve_model_alias(guide_model, log, data_dir)
    if world > 1:
        dist.barrier()
    policy_model = resolve_model_alias(policy_model, log, data_dir)
    guide_model = resolve_model_alias(guide_model, log, data_dir)
    guide_model = guide_model or (policy_model if need_guide else None)
    if policy_model and (guide_model or not need_guide):
        return policy_model, guide_model
    if rank == 0:
        embedded_models(task, data_dir, log=log)
    if world > 1:
        dist.barrier()
    em = embedded_models(task, data_dir, log=log)
    return policy_model or em.policy, (guide_model or em.guide) if need_guide else None


def build_policy_ref_critic(policy_path: str, device, context: int, gradient_checkpointing: bool = False,
                            chat_template: str = "off"):
    """The learner, its frozen reference copy (KL penalty) and a critic on the same initial backbone.
    `context` = prompt tokens + new tokens (+ the chat template's tokens) must fit the model's positions.
    `gradient_checkpointing`: the trained models recompute each layer in the backward instead of keeping its
    activations. `chat_template` (auto, on, off): the tokenizer is set up for it (common.chat.setup_chat);
    the resolved mode is `tok.chat_format is not None`."""
    tok = load_tokenizer(policy_path)
    setup_chat(tok, chat_template)
    context += template_length(tok)
    policy = load_causal_lm(policy_path, tok, device, "--policy-model")
    limit = position_limit(policy)
    if limit and context > limit:
        raise UsageError(f"prompt + response ({context} tokens) exceed the {limit} positions of {policy_path}: "
                         "lower --prompt-tokens or --max-new-tokens")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = make_critic(policy_path, tok, device, gradient_checkpointing)
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
    and none for `idle` models, which AdamW then skips as before. In place, not `zero_grad(set_to_none=True)`:
    gradients allocated afresh in every backward land between that backward's activations, and glibc's heap
    fragments around them; called once more right after the optimizer is built, they sit next to the weights.
    Benchmark peaks, PPO, two runs each: TL;DR 646 / 708 -> 566 / 562 MiB, IMDB 582 / 608 -> 563 / 545, at the
    same speed. The numbers do not change: 0 + g = g."""
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


def make_critic(policy_path: str, tok, device, gradient_checkpointing: bool = False) -> ValueModel:
    """A separate value model (backbone + scalar head), initialised from the policy's backbone."""
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(os.path.expanduser(policy_path))
    if backbone.get_input_embeddings().num_embeddings < len(tok):
        backbone.resize_token_embeddings(len(tok))
    for m in backbone.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    if gradient_checkpointing:
        enable_gradient_checkpointing(backbone, policy_path)
    return ValueModel(backbone).to(device)


def make_reward(task: Task, reward_model: str | None, train_examples, device, log=print):
    """The task's reward callable `(prompts, responses, references) -> list[float]` (SPEC section 3)."""
    from common import rewards

    if task.name == "imdb":
        return rewards.HFSentimentReward(reward_model, device=device) if reward_model else rewards.VaderSentimentReward()
    if task.name == "commongen":
        if reward_model:
            raise UsageError("--reward-model is not used by commongen (its reward is CIDEr-D + SPICE)")
        return rewards.CommonGenReward([e.references for e in train_examples])
    if reward_model:
        return rewards.RewardModelReward(reward_model, device=device)
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
@torch.no_grad()
def evaluate(policy, ref, tok, task: Task, examples, reward_fn, args, device, batch_size: int = 32, seed: int = 1234):
    """Validation: sample with the learner's settings (fixed seed, so evaluations compare), then reward,
    KL to the reference (sum over tokens, k1), output perplexity under the reference model, and the task's
    metrics. Returns (metrics, rows of (prompt, response, reward))."""
    from common.metrics import compute_metrics, perplexity

    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    prompts, responses, kls, ppl_nll, n_tok = [], [], [], 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        q = encode_prompts(task, tok, chunk, args.prompt_tokens)
        s = sample(policy, q, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                   eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=args.temperature, device=device)
        qi, qm = left_pad(q, tok.pad_token_id, device)
        ri, rm = right_pad(s.tokens, tok.pad_token_id, device=device)
        ref_lp, _ = forward_response(ref, qi, qm, ri, rm, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                     min_new_tokens=args.min_new_tokens, temperature=args.temperature)
        lp = right_pad_float(s.logprobs, ri.shape[1], device)
        kls += ((lp - ref_lp) * rm).sum(1).tolist()
        ppl_nll += float(-(ref_lp * rm).sum())
        n_tok += int(rm.sum())
        prompts += [e.prompt for e in chunk]
        responses += decode(tok, s.tokens)
    torch.random.set_rng_state(rng_state)
    refs = [e.references for e in examples]
    scores = reward_fn(prompts, responses, refs)
    metrics = {"reward": float(np.mean(scores)), "kl": float(np.mean(kls)),
               "output_perplexity": math.exp(ppl_nll / max(1, n_tok)),
               "response_length": n_tok / max(1, len(examples))}
    metrics.update(compute_metrics(task.name, prompts, responses, refs, [e.meta for e in examples]))
    if task.name == "imdb":
        metrics["reference_perplexity"] = perplexity(policy, tok, prompts, [r[0] for r in refs], device)
    rows = list(zip(prompts, responses, scores))
    return metrics, rows


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

    def __init__(self, run_dir: Path, args, enabled: bool = True, resume_from: int | None = None):
        """`resume_from`: the first iteration of a resumed run; whatever an earlier run logged from there on
        (iterations redone after the last checkpoint) is dropped, in TensorBoard and in metrics.jsonl."""
        self.enabled, self.run_dir = enabled, run_dir
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(run_dir), purge_step=resume_from)
        jsonl = run_dir / "metrics.jsonl"
        if resume_from is not None and jsonl.exists():
            keep = [l for l in jsonl.read_text().splitlines() if l.strip() and json.loads(l)["step"] < resume_from]
            jsonl.write_text("".join(l + "\n" for l in keep))
        cfg = {k: v for k, v in asdict(args).items()}
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
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def report(before: dict, after: dict, run_dir: Path, file=sys.stdout):
    """Print the before/after table of validation reward and metrics; keep it as eval.json."""
    keys = [k for k in before if k in after]
    print(f"\n{'validation':<24}{'before':>12}{'after':>12}", file=file)
    for k in keys:
        print(f"{k:<24}{before[k]:>12.4f}{after[k]:>12.4f}", file=file)
    (run_dir / "eval.json").write_text(json.dumps({"initial": before, "final": after}, indent=1))


# ---------------------------------------------------------------------------------------------------
# checkpoints: a crash or Ctrl-C never loses finished iterations
# ---------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


RESUME_MUST_MATCH = ("task", "seed", "policy_model", "guide", "guide_model", "reward_model", "beta", "tau", "p_ppo_pp",
                     "chat_template")


def load_checkpoint(run_dir: Path, args) -> dict:
    """The last checkpoint of `run_dir`, after checking that the run is being continued with the same task,
    seed and models (other settings, e.g. --iterations, may change)."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}: --resume takes a run folder written by an earlier run")
    if (run_dir / "args.json").is_file():
        old = json.loads((run_dir / "args.json").read_text())
        new = json.loads(json.dumps(asdict(args), default=str))
        for k in RESUME_MUST_MATCH:
            if k in old and k in new and old[k] != new[k]:
                raise UsageError(f"--resume {run_dir}: --{k.replace('_', '-')} was {old[k]!r} in that run, not "
                                 f"{new[k]!r}; pass the run's own arguments (see {run_dir / 'args.json'})")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}


def set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.random.set_rng_state(s["torch"])


def save_final(policy, critic, tok, run_dir: Path):
    """The trained policy, loadable with AutoModelForCausalLM.from_pretrained(run_dir / 'policy')."""
    policy.save_pretrained(run_dir / "policy")
    tok.save_pretrained(run_dir / "policy")
    torch.save(critic.state_dict(), run_dir / "critic.pt")


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


def build_guide(kind: str, task: Task, guide_path: str | None, learner_tok, device, *, top_p: float, top_k: int,
                temperature: float, min_new_tokens: int, chat_template: str = "off"):
    """The frozen black-box guide: `model` (an HF causal LM, default the task's embedded guide) or `rule`
    (our rule-based guide for CommonGen and TL;DR). A model guide keeps its own chat template, applied to its
    own prompt, whenever its tokenizer has one and `chat_template` is not off."""
    from common.guides import RULE_GUIDES, CallableGuide, HFGuide

    if kind == "rule":
        if task.name not in RULE_GUIDES:
            raise UsageError(f"--guide rule exists for {', '.join(RULE_GUIDES)}, not {task.name}: use --guide model")
        return CallableGuide(RULE_GUIDES[task.name], name=f"{task.name}-rule")
    if kind != "model":
        raise UsageError(f"--guide must be model or rule, not {kind!r}")
    gtok = load_tokenizer(guide_path)
    setup_chat(gtok, "off" if chat_template == "off" else "auto")
    model = load_causal_lm(guide_path, gtok, device, "--guide-model")
    return HFGuide(model, gtok, top_p=top_p, top_k=top_k, temperature=temperature,
                   min_new_tokens=min_new_tokens, device=device, name=guide_path)


def mixed_rows(prompts, guide_parts, learner_parts, scores):
    """Sample-table rows that mark where the guide's text ends and the learner's begins."""
    return list(zip(prompts, guide_parts, learner_parts, scores))
