"""Loading models (hub id or local folder) and the cheap checks of a given model (configs only, no weights).

The task's embedded default models and the model aliases (`smollm2`) are made by common/embedded.py, which a run
imports only when it needs one: no --policy-model given, or an alias named.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from common.errors import UsageError
from common.tasks import hub_offline_if_unreachable

CACHE_ENV = "RLGF_CACHE_DIR"
PAD, EOS = "<|pad|>", "<|endoftext|>"
MODEL_ALIASES = ("smollm2",)
"""the models common.embedded.PRETRAINED makes (--policy-model smollm2; also ALIAS-TASK-Kshot, a few-shot guide)"""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlgf")


def check_model_path(name: str, what: str) -> None:
    """A name that looks like a path must exist: say so in one line instead of a hub traceback.
    Anything else is treated as a hub id (owner/name), whose load errors are turned into one line too."""
    if os.path.exists(os.path.expanduser(name)):
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip():
        raise UsageError(f"{what} {name!r} does not exist: pass a folder saved with save_pretrained or a hub id")


def _model_file(name: str, filename: str) -> str | None:
    """The path of `filename` of a model: in its folder, or in the local Hugging Face cache for a hub id (None when
    it is not there; nothing is downloaded)."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        f = os.path.join(path, filename)
        return f if os.path.isfile(f) else None
    if os.path.exists(path) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        f = try_to_load_from_cache(name, filename)
    except Exception:  # not a valid repo id
        return None
    return f if isinstance(f, str) and os.path.isfile(f) else None


def model_config(name: str, flag: str):
    """The transformers config of a model folder (one UsageError line when it cannot be read), or of a hub id
    whose config.json is in the local cache; None for a hub id that is not cached (loading it later says what is
    wrong)."""
    from transformers import AutoConfig

    local = os.path.isdir(os.path.expanduser(name))
    if _model_file(name, "config.json") is None:
        if local:
            raise UsageError(f"{flag} {name!r} has no config.json: pass a folder saved with save_pretrained")
        return None
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name), local_files_only=True)
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UsageError(f"{flag} {name!r}: its config.json cannot be read ({why}); pass a folder saved with "
                         "save_pretrained") from None


_OTHER_HEADS = {"ForSequenceClassification": "a sequence classifier", "ForTokenClassification": "a token classifier",
                "ForQuestionAnswering": "a question-answering model", "ForMaskedLM": "a masked LM",
                "ForMultipleChoice": "a multiple-choice model", "ForPreTraining": "a pre-training model",
                "ForImageClassification": "an image classifier", "ForCTC": "a speech model"}
_LM_ROLE = "a causal LM or a seq2seq LM (saved from AutoModelForCausalLM or AutoModelForSeq2SeqLM)"


def _check_config_kind(config, name: str, flag: str, role: str, task_name: str | None, adapter_base: bool = False):
    """The model's kind (its config's architectures and model type) against its role ('lm' or 'reward')."""
    from transformers.models.auto import modeling_auto as auto

    mtype = getattr(config, "model_type", None)
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    if role == "lm":
        heads = [next((what for suffix, what in _OTHER_HEADS.items() if a.endswith(suffix)), None) for a in archs]
        if archs and all(heads):
            raise UsageError(f"{flag} {name!r} is a {archs[0]} ({heads[0]}): it needs {_LM_ROLE}")
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        mapping = auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES if seq2seq else auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if mtype not in mapping:
            raise UsageError(f"{flag} {name!r}: transformers has no {'seq2seq' if seq2seq else 'causal'} LM for its "
                             f"model type {mtype!r}; it needs {_LM_ROLE}")
        return
    wanted = ("a sequence classifier with one output (num_labels 1), the learned reward" if task_name == "tldr"
              else "a sequence classifier with at least two labels (negative, positive)")
    if not adapter_base and archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UsageError(f"{flag} {name!r} is a {archs[0]}, not a sequence classifier: the {task_name} reward needs "
                         f"{wanted} (saved from AutoModelForSequenceClassification)")
    if mtype not in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UsageError(f"{flag} {name!r}: transformers has no sequence classifier for its model type {mtype!r}; "
                         f"the {task_name} reward needs {wanted}")
    if adapter_base:
        return
    n = config.num_labels
    if task_name == "tldr" and n != 1:
        raise UsageError(f"{flag} {name!r} has {n} labels: a reward model must have num_labels 1")
    if task_name == "imdb" and n < 2:
        raise UsageError(f"{flag} {name!r} has {n} label(s): a sentiment classifier needs at least 2 (negative, "
                         "positive)")


def check_model_kind(name: str, flag: str, role: str, task_name: str | None = None) -> None:
    """The cheap check of a given model, before any data, build or load: its config loads (config.json; for a PEFT
    adapter, its adapter_config.json and its base model's config) and its kind fits `role`: 'lm' (the policy, a
    model guide) a causal or seq2seq LM, 'reward' a sequence classifier (TL;DR: one output; IMDB: at least two
    labels). A local folder is always checked, a hub id only as far as its files are in the local Hugging Face
    cache. One UsageError line otherwise."""
    check_model_path(name, flag)
    path = os.path.expanduser(name)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {name!r} is a file: pass a folder saved with save_pretrained or a hub id")
    adapter = _model_file(name, "adapter_config.json")
    if adapter is None:
        config = model_config(name, flag)
        if config is not None:
            _check_config_kind(config, name, flag, role, task_name)
        return
    try:
        from peft import PeftConfig

        pcfg = PeftConfig.from_pretrained(os.path.dirname(adapter))
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise UsageError(f"{flag} {name!r}: its adapter_config.json cannot be read ({why})") from None
    task_type = str(getattr(pcfg.task_type, "value", pcfg.task_type)) if pcfg.task_type else None
    allowed = ("CAUSAL_LM", "SEQ_2_SEQ_LM") if role == "lm" else ("SEQ_CLS",)
    if task_type is not None and task_type not in allowed:
        raise UsageError(f"{flag} {name!r} is a PEFT adapter with task_type {task_type}: it needs "
                         f"{' or '.join(allowed)}" + (" (a sequence classifier that saves its score head)"
                                                      if role == "reward" else ""))
    base = pcfg.base_model_name_or_path
    if not base:
        raise UsageError(f"{flag} {name!r}: the adapter does not name its base model (base_model_name_or_path in "
                         "adapter_config.json)")
    what = f"{flag} {name!r}: its base model"
    check_model_path(base, what)
    config = model_config(base, what)
    if config is not None:
        _check_config_kind(config, base, f"{flag} {name!r}: its base model", role, task_name, adapter_base=True)


def model_skeleton(name: str | None, task_name: str):
    """The causal or seq2seq LM of `name` on the meta device (module names and types, no weights): from its config
    when readable without a download (None otherwise, e.g. a PEFT adapter or an uncached hub id); `name` None:
    the task's embedded default (a GPT-2 of the embedded config's shape)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GPT2Config

    if name is None:
        from common.embedded import EMBEDDED

        cfg = EMBEDDED[task_name]
        config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=0, eos_token_id=0)
    else:
        if _model_file(name, "adapter_config.json") is not None:
            return None
        config = model_config(name, "--policy-model")
        if config is None:
            return None
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except Exception:  # the model's own loading says what is wrong
        return None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    check_model_path(name, "tokenizer/model")
    hub_offline_if_unreachable()
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load a tokenizer from {name!r} ({str(e).splitlines()[0][:120]}); offline, "
                         "pass a local folder saved with save_pretrained") from None
    if tok.eos_token is None:
        raise UsageError(f"the tokenizer of {name!r} has no EOS token")
    # SPEC 4.1: a pad token distinct from EOS, so EOS is a real action that gets trained and rewarded; an
    # existing unknown-token distinct from EOS and BOS serves (pad is never sampled), else a new token is added
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token is not None and tok.unk_token_id not in (tok.eos_token_id, tok.bos_token_id):
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": PAD})
    tok.padding_side = "left"
    return tok


def is_encoder_decoder(name: str) -> bool:
    """Whether the model at `name` (folder or hub id) is an encoder-decoder model (T5, BART, ...), read from its
    config (`is_encoder_decoder`)."""
    from transformers import AutoConfig

    try:
        return bool(getattr(AutoConfig.from_pretrained(os.path.expanduser(name)), "is_encoder_decoder", False))
    except (OSError, ValueError):
        return False  # the model's own loading then says what is wrong


def load_causal_lm(name: str, tokenizer, device, what: str = "model", quantization=None):
    """A causal LM (AutoModelForCausalLM), or an encoder-decoder LM (AutoModelForSeq2SeqLM) where the model's
    config says `is_encoder_decoder`: everything downstream (common.generation) takes either. On `device`,
    dropout off, embeddings grown to the tokenizer; `quantization`: a BitsAndBytesConfig (4/8-bit, loaded
    straight onto the CUDA device)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    check_model_path(name, what)
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(name) else AutoModelForCausalLM
    kw = {} if quantization is None else {"quantization_config": quantization,
                                          "device_map": {"": torch.device(device).index or 0}}
    try:
        model = auto.from_pretrained(os.path.expanduser(name), **kw)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load {what} {name!r} ({str(e).splitlines()[0][:120]}); offline, pass a local "
                         "folder saved with save_pretrained") from None
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "is_encoder_decoder", False):
        from common.seq2seq import decoder_start_id

        try:
            decoder_start_id(model)
        except ValueError as e:
            raise UsageError(f"{what} {name!r}: {e}; set it in the model's config.json") from None
    _no_dropout(model)
    return (model if quantization is not None else model.to(device)).eval()


def _no_dropout(model):
    """Dropout off everywhere (SPEC 4.2: otherwise the ratio is not 1 on the first minibatch): the Dropout modules,
    the rates attention layers keep as plain numbers (T5's and BART's attention read `self.dropout` in training
    mode, which gradient checkpointing turns on), and the config."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for key in ("dropout", "attention_dropout", "activation_dropout", "dropout_rate"):
            if isinstance(getattr(m, key, None), float):
                setattr(m, key, 0.0)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout", "hidden_dropout",
                "dropout_rate", "activation_dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, 0.0)


def is_model_alias(name: str | None) -> bool:
    """Whether `name` is a model alias `resolve_model_alias` makes a folder for (not an existing path)."""
    if name is None or os.path.exists(name):
        return False
    m = re.fullmatch(r"(.+)-([a-z]+)-(\d+)shot", name)
    return name in MODEL_ALIASES or bool(m and m.group(1) in MODEL_ALIASES)


if __name__ == "__main__":  # the former name of `python -m common.embedded`
    from common.embedded import main

    raise SystemExit(main())
