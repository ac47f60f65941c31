"""Shared fixtures: tiny offline model folders per task, the local data folder, an isolated cache.

Nothing here downloads anything: tokenizers are trained on a few hundred rows of the local data (or on
synthetic text when the data folder is absent) and the models are randomly initialised 2-layer GPT-2s.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# the data folder: RLGF_DATA_DIR as for the scripts, else ../shared/data beside the repository
DATA = Path(os.environ.get("RLGF_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
HAS_DATA = all((DATA / d).is_dir() for d in ("imdb", "common_gen", "openai_summarize_tldr"))
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"local data folder {DATA} is absent")

# RLGF_TEST_DEVICE=cuda runs the tests marked `device` (sampling = training log-probs, ratio 1, packing, PPO++ with
# beta 0 = PPO) on a GPU: python -m pytest tests -m device. Every other test runs on the CPU.
DEVICE = os.environ.get("RLGF_TEST_DEVICE", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs on RLGF_TEST_DEVICE (default cpu)")
    config.addinivalue_line("markers", "whole_final_split: keeps the presets' final evaluation on the whole split")


# tiny models on a shared 2-core machine: one intra-op thread is several times faster than two (no
# spin-waiting when other processes compete for the cores); subprocesses get OMP_NUM_THREADS=1
torch.set_num_threads(1)

if str(REPO) not in sys.path:  # `import ppo` and `import common` from the repository root
    sys.path.insert(0, str(REPO))

# the task's local train file and the text of one row, for training the tiny tokenizers
_TRAIN_TEXT = {
    "imdb": ("imdb/train.jsonl", lambda r: r["text"]),
    "commongen": ("common_gen/train.jsonl", lambda r: " ".join(r["concepts"]) + ". " + r["target"]),
    "tldr": ("openai_summarize_tldr/train.jsonl", lambda r: r["prompt"] + " " + r["label"]),
}
EOS, PAD = "<|endoftext|>", "<|pad|>"
_WORDS = ("the a movie film was is great good awful bad plot actor story dog cat ran sat on mat park threw "
          "ball generate sentence with SUBREDDIT TITLE POST TL;DR r/relationships my boyfriend and i").split()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """RLGF_CACHE_DIR points at a session tmp folder: the tests never touch ~/.cache."""
    old = os.environ.get("RLGF_CACHE_DIR")
    os.environ["RLGF_CACHE_DIR"] = str(tmp_path_factory.mktemp("rlgf-cache"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield
    if old is None:
        os.environ.pop("RLGF_CACHE_DIR", None)
    else:
        os.environ["RLGF_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _final_eval_on_eval_samples(request, monkeypatch):
    """A tiny model given with --policy-model takes the paper's preset, whose final evaluation runs on the whole
    validation split (IMDB: 5000 reviews): in tests it runs on the --eval-samples prompts, as the periodic ones,
    unless the test is marked `whole_final_split` or sets --final-eval-samples itself."""
    if request.node.get_closest_marker("whole_final_split"):
        yield
        return
    from common import presets

    for table in (presets.PAPER, presets.SMOLLM2):
        for task in table:
            monkeypatch.setitem(table[task], "final_eval_samples", None)
    yield


def train_texts(task: str, n: int = 300) -> list[str]:
    """A few hundred rows of the task's train text, or synthetic text when the data is absent."""
    rel, text_of = _TRAIN_TEXT[task]
    path = DATA / rel
    if path.is_file():
        out = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.append(text_of(json.loads(line)))
                if len(out) >= n:
                    break
        return out
    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def boost_eos(model, eos_id: int, logit: float = 4.0):
    """Make EOS likely (about e^logit / (e^logit + V) per step) while every logit still depends on the
    input: the final LayerNorm's bias points along EOS's (tied) output embedding."""
    with torch.no_grad():
        wte = model.transformer.wte.weight
        u = torch.randn(wte.shape[1], generator=torch.Generator().manual_seed(7))
        u = u / u.norm()
        wte[eos_id] = u
        model.transformer.ln_f.bias.copy_(logit * u)


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """Byte-level BPE as the project builds it (common/embedded.py): EOS = BOS = <|endoftext|>, pad = <|pad|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.save_pretrained(out)
    return fast


def build_tiny_model(task: str, out: Path, vocab_size: int = 400, eos_logit: float | None = None, seed: int = 0) -> Path:
    """Byte-level BPE tokenizer (vocab ~400) + a random 2-layer GPT-2 (n_embd 32), saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_texts(task), vocab_size, out)
    assert tok.pad_token_id != tok.eos_token_id
    torch.manual_seed(seed)
    # default GPT-2 dropout (0.1) on purpose: the project must switch it off (SPEC 4.2)
    config = GPT2Config(vocab_size=len(tok), n_positions=384, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    if eos_logit is not None:
        boost_eos(model, tok.eos_token_id, eos_logit)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(task, eos_logit=None) -> folder saved with save_pretrained (built once)."""
    cache: dict = {}

    def make(task: str, eos_logit: float | None = None) -> Path:
        key = (task, eos_logit)
        if key not in cache:
            name = f"tiny-{task}" + ("" if eos_logit is None else f"-eos{eos_logit:g}")
            cache[key] = build_tiny_model(task, tmp_path_factory.mktemp(name), eos_logit=eos_logit)
        return cache[key]

    return make
