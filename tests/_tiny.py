"""Tiny offline models for the guided-algorithm tests (tests/test_guided.py).

A byte-level BPE tokenizer (EOS = BOS = <|endoftext|>, pad = <|pad|>) trained on a few hundred rows of
the task's local train data, and a randomly initialised 2-layer GPT-2, saved with save_pretrained.
Nothing is downloaded. `favour_token` turns a model into a recognisable guide that (nearly) always
emits one given token.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# the data folder: RLGF_DATA_DIR as for the scripts, else ../shared/data beside the repository
DATA = Path(os.environ.get("RLGF_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
TASK_DIRS = {"imdb": "imdb", "commongen": "common_gen", "tldr": "openai_summarize_tldr"}

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_TEXT = {
    "imdb": ("imdb/train.jsonl", lambda r: r["text"]),
    "commongen": ("common_gen/train.jsonl", lambda r: " ".join(r["concepts"]) + ". " + r["target"]),
    "tldr": ("openai_summarize_tldr/train.jsonl", lambda r: r["prompt"] + " " + r["label"]),
}


def has_data(task: str) -> bool:
    return (DATA / _TEXT[task][0]).is_file()


def train_texts(task: str, n: int = 300) -> list[str]:
    rel, text_of = _TEXT[task]
    out = []
    with open(DATA / rel, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(text_of(json.loads(line)))
            if len(out) >= n:
                break
    return out


def build_tiny(task: str, out: Path, *, vocab_size: int = 400, seed: int = 0, favour: str | None = None,
               favour_logit: float = 14.0) -> Path:
    """Tokenizer + random GPT2LMHeadModel(n_layer=2, n_embd=32, n_head=2, n_positions=384) in `out`.
    With `favour` (a string the tokenizer encodes as one token), that token gets probability > 0.99
    at every step (so top-p 0.92 sampling always picks it)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from common.embedded import EmbeddedConfig, _train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(train_texts(task), EmbeddedConfig(vocab_size=vocab_size), out)
    assert tok.pad_token_id != tok.eos_token_id
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=384, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(config)
    if favour is not None:
        ids = tok(favour, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (favour, ids)
        favour_token(model, ids[0], favour_logit)
    model.save_pretrained(out)
    return out


def favour_token(model, token_id: int, logit: float):
    """The final LayerNorm's bias points along the token's (tied) output embedding: that token's logit
    is about `logit` above every other one, whatever the input."""
    with torch.no_grad():
        wte = model.transformer.wte.weight
        u = torch.randn(wte.shape[1], generator=torch.Generator().manual_seed(11))
        u = u / u.norm()
        wte[token_id] = u
        model.transformer.ln_f.bias.copy_(logit * u)


def build_tiny_t5(task: str, out: Path, *, vocab_size: int = 400, seed: int = 0, favour: str | int | None = None,
                  favour_logit: float = 14.0) -> Path:
    """The same tokenizer as `build_tiny` (pad distinct from EOS) + a random 2-layer T5ForConditionalGeneration
    (d_model 32), decoder_start_token_id = pad as T5 has it, default T5 dropout (0.1: the project must switch it
    off). With `favour` (a one-token string or a token id) and the default `favour_logit`, that token gets
    probability > 0.99 at every decoder step (a lower logit: just a likelier token, e.g. EOS for ragged lengths): the last decoder layer's
    feed-forward writes a large positive sum of its ReLU units into dimension 0, which the final RMSNorm turns
    into a near-constant feature, and only the favoured token's (tied) embedding has a dimension 0."""
    from transformers import T5Config, T5ForConditionalGeneration

    from common.embedded import EmbeddedConfig, _train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(train_texts(task), EmbeddedConfig(vocab_size=vocab_size), out)
    assert tok.pad_token_id != tok.eos_token_id
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    model = T5ForConditionalGeneration(config)
    if favour is not None:
        ids = [favour] if isinstance(favour, int) else tok(favour, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (favour, ids)
        with torch.no_grad():
            model.decoder.block[-1].layer[-1].DenseReluDense.wo.weight[0, :] = 5.0
            model.shared.weight[:, 0] = 0.0
            model.shared.weight[ids[0], 0] = favour_logit
    model.save_pretrained(out)
    return out


def build_tiny_bart(task: str, out: Path, *, vocab_size: int = 400, seed: int = 0) -> Path:
    """The same tokenizer as `build_tiny`, with a BOS `<s>` of its own and BART's way of adding special tokens
    (`<s> text <|endoftext|>`), + a random 2-layer BartForConditionalGeneration (d_model 32): absolute learned
    positions (128 a side), decoder start token = EOS as BART has it, BART's default dropouts (0.1)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import BartConfig, BartForConditionalGeneration

    from common.embedded import EmbeddedConfig, _train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(train_texts(task), EmbeddedConfig(vocab_size=vocab_size), out)
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A <|endoftext|>", special_tokens=[("<s>", tok.bos_token_id), ("<|endoftext|>", tok.eos_token_id)])
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                        decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None, forced_eos_token_id=None)
    BartForConditionalGeneration(config).save_pretrained(out)
    return out
