"""Loading models (hub id or local folder) and building the embedded offline defaults.

Embedded defaults: when no model is given, each task gets a byte-level BPE tokenizer trained on its
train text (pad distinct from EOS) and a small GPT-2-style model trained by supervised learning (SFT)
on the train split, cached on disk (RLGF_CACHE_DIR, default ~/.cache/rlgf) so the next run starts in
seconds.

- IMDB: the learner starts from an LM trained on all reviews; the guide is that LM further fine-tuned
  on positive reviews only (the paper's guide is an SFT on positive reviews).
- CommonGen, TL;DR: one SFT model on prompt + reference is both the learner's start and the guide.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.errors import UsageError
from common.tasks import Task, encode_prompt, hub_offline_if_unreachable

CACHE_ENV = "RLGF_CACHE_DIR"
PAD, EOS = "<|pad|>", "<|endoftext|>"
BUILDER_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlgf")


def check_model_path(name: str, what: str) -> None:
    """A name that looks like a path must exist: say so in one line instead of a hub traceback.
    Anything else is treated as a hub id (owner/name), whose load errors are turned into one line too."""
    if os.path.exists(os.path.expanduser(name)):
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip():
        raise UsageError(f"{what} {name!r} does not exist: pass a folder saved with save_pretrained or a hub id")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    check_model_path(name, "tokenizer/model")
    hub_offline_if_unreachable()
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except OSError as e:
        raise UsageError(f"cannot load a tokenizer from {name!r} ({str(e).splitlines()[0][:120]}); offline, "
                         "pass a local folder saved with save_pretrained") from None
    if tok.eos_token is None:
        raise UsageError(f"the tokenizer of {name!r} has no EOS token")
    # SPEC 4.1: a pad token distinct from EOS, so EOS is a real action that gets trained and rewarded
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD})
    tok.padding_side = "left"
    return tok


def load_causal_lm(name: str, tokenizer, device, what: str = "model"):
    from transformers import AutoModelForCausalLM

    check_model_path(name, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name))
    except OSError as e:
        raise UsageError(f"cannot load {what} {name!r} ({str(e).splitlines()[0][:120]}); offline, pass a local "
                         "folder saved with save_pretrained") from None
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _no_dropout(model)
    return model.to(device).eval()


def _no_dropout(model):
    """Dropout off everywhere (SPEC 4.2: otherwise the ratio is not 1 on the first minibatch)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout", "hidden_dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)


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
    prompt_tokens: int = 64
    sft_seconds: float = 150.0
    """wall-clock budget of the base SFT"""
    guide_seconds: float = 0.0
    """extra SFT of the guide (IMDB: on positive reviews)"""
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 2e-3
    max_train_texts: int = 20000
    response_loss_only: bool = False
    seed: int = 0


EMBEDDED = {
    "imdb": EmbeddedConfig(prompt_tokens=64, sft_seconds=150, guide_seconds=50, seq_len=128),
    "commongen": EmbeddedConfig(prompt_tokens=32, sft_seconds=180, seq_len=48, batch_size=64),
    "tldr": EmbeddedConfig(prompt_tokens=256, n_positions=320, sft_seconds=180, seq_len=320, batch_size=16),
}


@dataclass
class EmbeddedModels:
    policy: str
    guide: str
    config: EmbeddedConfig


def _sft_texts(task: Task, examples) -> list[tuple[str, str]]:
    """(prompt, response) pairs; IMDB trains on whole reviews."""
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
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   padding_side="left")
    fast.save_pretrained(out)
    return fast


def _encode_pairs(task: Task, tok, pairs, cfg: EmbeddedConfig):
    rows = []
    for prompt, resp in pairs:
        p = encode_prompt(task, tok, prompt, cfg.prompt_tokens)
        r = tok(resp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p, r[: max(1, cfg.seq_len - len(p))]))
    return rows


def sft(model, rows, cfg: EmbeddedConfig, seconds: float, pad_id: int, log=print, max_steps: int | None = None):
    """Plain supervised next-token training for a wall-clock budget (bf16 autocast on CPU, AdamW,
    cosine decay). Rows are (prompt ids, response ids); the loss covers the whole text unless
    cfg.response_loss_only."""
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    t0, step, losses = time.time(), 0, []
    est_steps = max_steps or 10**9
    while True:
        elapsed = time.time() - t0
        if elapsed > seconds or step >= est_steps:
            break
        frac = min(1.0, elapsed / max(seconds, 1e-9)) if max_steps is None else step / max_steps
        for g in opt.param_groups:
            g["lr"] = cfg.lr * (min(1.0, (step + 1) / 50)) * 0.5 * (1 + math.cos(math.pi * frac))
        batch = [rows[rng.randrange(len(rows))] for _ in range(cfg.batch_size)]
        seqs = [(p + r)[: cfg.seq_len] for p, r in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, ((p, _), s) in enumerate(zip(batch, seqs)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            start = len(p) if cfg.response_loss_only else 0
            labels[i, start: len(s)] = torch.tensor(s[start:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log(f"  sft step {step} loss {sum(losses[-100:]) / 100:.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return step, (sum(losses[-50:]) / max(1, len(losses[-50:]))) if losses else float("nan")


def _key(task: Task, cfg: EmbeddedConfig, data_dir: str | None) -> str:
    blob = json.dumps({"task": task.name, "cfg": asdict(cfg), "v": BUILDER_VERSION,
                       "data": str(Path(data_dir).resolve()) if data_dir else task.hub_id}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def embedded_models(task: Task, data_dir: str | None, cfg: EmbeddedConfig | None = None,
                    log=print) -> EmbeddedModels:
    """The task's embedded learner and guide, built once and cached (atomic rename: an interrupted
    build leaves nothing half-written behind)."""
    cfg = cfg or EMBEDDED[task.name]
    root = cache_root() / f"{task.name}-{_key(task, cfg, data_dir)}"
    policy_dir, guide_dir = root / "policy", root / ("guide" if task.name == "imdb" else "policy")
    if (root / "DONE").exists():
        return EmbeddedModels(str(policy_dir), str(guide_dir), cfg)

    from transformers import GPT2Config, GPT2LMHeadModel

    log(f"building the embedded {task.name} models in {root} (once; later runs load them in seconds)")
    torch.manual_seed(cfg.seed)
    train = task.load("train", data_dir)
    pairs = _sft_texts(task, train)
    random.Random(cfg.seed).shuffle(pairs)
    pairs = pairs[: cfg.max_train_texts]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{task.name}-", dir=root.parent))
    try:
        t0 = time.time()
        tok = _train_tokenizer([p + r for p, r in pairs], cfg, tmp / "policy")
        rows = _encode_pairs(task, tok, pairs, cfg)
        mcfg = GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tok.eos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
        model = GPT2LMHeadModel(mcfg)
        steps, loss = sft(model, rows, cfg, cfg.sft_seconds, tok.pad_token_id, log)
        log(f"  policy SFT: {steps} steps, loss {loss:.3f}, {time.time() - t0:.0f}s")
        model.save_pretrained(tmp / "policy")
        info = {"policy_sft_steps": steps, "policy_sft_loss": loss, "params": sum(p.numel() for p in model.parameters())}
        if task.name == "imdb":
            # the guide: the same LM fine-tuned further on positive reviews only
            pos = [(e.prompt, e.references[0]) for e in train if e.meta["label"] == 1]
            gsteps, gloss = sft(model, _encode_pairs(task, tok, pos, cfg),
                                EmbeddedConfig(**{**asdict(cfg), "lr": cfg.lr / 2, "seed": cfg.seed + 1}),
                                cfg.guide_seconds, tok.pad_token_id, log)
            log(f"  guide SFT on positive reviews: {gsteps} steps, loss {gloss:.3f}")
            model.save_pretrained(tmp / "guide")
            tok.save_pretrained(tmp / "guide")
            info.update(guide_sft_steps=gsteps, guide_sft_loss=gloss)
        (tmp / "info.json").write_text(json.dumps({"config": asdict(cfg), **info}, indent=1))
        (tmp / "DONE").write_text("ok\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return EmbeddedModels(str(policy_dir), str(guide_dir), cfg)
