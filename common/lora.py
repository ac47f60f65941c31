"""LoRA (peft) and 4/8-bit loading (bitsandbytes): one frozen base model in memory, several views of it.

With `--lora-r > 0` the policy's base model is loaded once and peft injects LoRA layers into it:

- the policy (`LoraPolicy`) is the base with the trainable adapter `default` (peft's name for the adapter that
  `save_pretrained` writes at the top of its folder);
- the reference policy and a model guide that is the policy's own start model are `AdapterView`s of the same
  base with every adapter off: the start model exactly, no second copy in memory;
- each critic with `--critic adapter` (`AdapterValueModel`) is a further adapter on the same base plus a
  scalar head reading the last hidden state with that adapter on (LOLS / D2LOLS: two of them).

Each view switches the adapters of the LoRA layers for the length of its own forward and restores them
after. It sets the layers' active-adapter and disabled flags itself: peft's `set_adapter`,
`enable_adapters` and `disable_adapter()` also set `requires_grad` (only the active adapter trainable), which
would silently freeze the other adapters between two optimiser steps. Which adapter gets gradients follows
from which one was active in the forward: an adapter that is off is not in the graph. Every parameter of the
base is frozen; each trained object's `parameters()` are its own adapter's (and its head's) only, so the
optimiser, the gradient clip and the checkpoints hold nothing else.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass

import torch

from common.errors import UsageError
from common.generation import ValueModel, _cache_kwarg

POLICY_ADAPTER = "default"


@dataclass
class ModelSetup:
    """The `# model setup` fields of a script's Args."""

    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] | None = None
    critic: str | None = None
    merge_lora: bool = False
    load_in_4bit: bool = False
    load_in_8bit: bool = False

    @classmethod
    def from_args(cls, args) -> "ModelSetup":
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__ if hasattr(args, k)})

    @property
    def lora(self) -> bool:
        return self.lora_r > 0

    @property
    def critic_kind(self) -> str:
        """adapter, separate or reference-head: LoRA runs default to a critic adapter, full fine-tuning has a
        separate critic."""
        return self.critic or ("adapter" if self.lora else "separate")

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    def check(self, device) -> None:
        """Bad combinations, in one line each, before anything is loaded."""
        if self.lora_r < 0:
            raise UsageError(f"--lora-r must be 0 (off) or positive, not {self.lora_r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise UsageError(f"--lora-alpha must be a number above 0 (the adapter's scale is alpha / r), not "
                             f"{self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora-dropout must be in [0, 1), not {self.lora_dropout}")
        if self.critic not in (None, "adapter", "separate", "reference-head"):
            raise UsageError(f"--critic must be adapter, separate or reference-head, not {self.critic!r}")
        if not self.lora:
            for flag, on in (("--critic adapter", self.critic == "adapter"), ("--merge-lora", self.merge_lora),
                             ("--load-in-4bit", self.load_in_4bit), ("--load-in-8bit", self.load_in_8bit)):
                if on:
                    raise UsageError(f"{flag} needs LoRA: add --lora-r 8 (or another rank > 0)")
        if self.load_in_4bit and self.load_in_8bit:
            raise UsageError("--load-in-4bit and --load-in-8bit exclude each other: pick one")
        if self.quantized and torch.device(device).type != "cuda":
            flag = "--load-in-4bit" if self.load_in_4bit else "--load-in-8bit"
            why = "no CUDA GPU is available" if not torch.cuda.is_available() else f"the device is {device}"
            raise UsageError(f"{flag} needs a CUDA GPU (bitsandbytes' quantized kernels) and {why}: "
                             f"drop {flag} (LoRA alone runs on the CPU)")

    def check_targets(self, model, name: str) -> None:
        """Each of --lora-target-modules must name layers of `model` (a module whose name is it or ends in
        `.` + it, peft's rule) that LoRA can adapt (linear, embedding or convolution layers); `model` may be a
        skeleton on the meta device. One line listing the names that would do otherwise."""
        targets = self.lora_target_modules
        if not self.lora or not targets or tuple(targets) == ("all-linear",):
            return
        leaves = {n: m for n, m in model.named_modules() if isinstance(m, _adaptable_types())}
        for target in targets:
            named = [n for n, _ in model.named_modules() if n == target or n.endswith("." + target)]
            if not any(n in leaves for n in named):
                names = sorted({n.rsplit(".", 1)[-1] for n in leaves if n})
                what = "matches no module" if not named else "matches no linear, embedding or convolution layer"
                raise UsageError(f"--lora-target-modules {target} {what} of {name}: choose among "
                                 f"{', '.join(names[:24])}{' ...' if len(names) > 24 else ''}, or all-linear")

    def quantization_config(self):
        """QLoRA's settings: nf4 with double quantization and bf16 compute, or LLM.int8(); None when off."""
        if not self.quantized:
            return None
        from transformers import BitsAndBytesConfig

        if self.load_in_4bit:
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
        return BitsAndBytesConfig(load_in_8bit=True)

    def lora_config(self, model):
        from peft import LoraConfig, TaskType
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        targets = self.lora_target_modules
        if not targets:
            targets = DEFAULTS.get(model.config.model_type) or "all-linear"
        elif len(targets) == 1 and targets[0] == "all-linear":
            targets = "all-linear"
        else:
            targets = list(targets)
        from transformers.pytorch_utils import Conv1D

        conv1d = any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2's layers store weights transposed
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, bias="none", fan_in_fan_out=conv1d,
                          task_type=TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM)


def _adaptable_types() -> tuple:
    """The layer types peft's LoRA adapts (bitsandbytes' quantized linears are nn.Linear subclasses)."""
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn
    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


@contextlib.contextmanager
def quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model, and transformers
    5 answers with a FutureWarning on every run; the value is the same as `is_activation_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# ---------------------------------------------------------------------------------------------------
# switching adapters without touching requires_grad
# ---------------------------------------------------------------------------------------------------
def _tuner_layers(model) -> list:
    """The LoRA layers of `model`, found once (adding an adapter adds to the same layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = model.__dict__.get("_lora_layers")
    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        model.__dict__["_lora_layers"] = layers
    return layers


@contextlib.contextmanager
def use_adapter(model, adapter: str | None):
    """Inside: only `adapter` on in every LoRA layer of `model` (None: all off, the base model). LoRA dropout
    (when --lora-dropout > 0) acts in forwards with gradients only: sampling and the no-grad forwards score
    the distribution the learner samples."""
    layers = _tuner_layers(model)
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    train = torch.is_grad_enabled()
    dropouts = [m.lora_dropout[adapter] for m in layers
                if adapter is not None and adapter in getattr(m, "lora_dropout", {})]
    try:
        for m in layers:
            m._disable_adapters = adapter is None
            if adapter is not None:
                m._active_adapter = [adapter]
        for d in dropouts:
            d.train(train)
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled
        for d in dropouts:
            d.train(False)


def adapter_parameters(model, adapter: str) -> list[torch.nn.Parameter]:
    """The LoRA weights of one adapter, in module order."""
    return [p for n, p in model.named_parameters() if f".{adapter}." in n and "lora_" in n]


class AdapterView:
    """`module` (the base LM or its backbone) run with `adapter` on, or with every adapter off (None): the
    object sampling, the training forward and the guide call like a model. Its `parameters()` are the frozen
    base's; `eval()` changes nothing (dropout is off in every model, and switching the shared base out of
    training mode would turn off its gradient checkpointing)."""

    def __init__(self, module, root, adapter: str | None):
        self.module, self.root, self.adapter = module, root, adapter
        self._cache_kw = _cache_kwarg(module)

    def __call__(self, *args, cache=None, **kwargs):
        if cache is not None:
            kwargs[self._cache_kw] = cache
        with use_adapter(self.root, self.adapter):
            return self.module(*args, **kwargs)

    def forward(self, *args, cache=None, **kwargs):  # `cache` named here: generation picks the keyword from this
        return self(*args, cache=cache, **kwargs)

    @property
    def config(self):
        return self.module.config

    def get_input_embeddings(self):
        return self.module.get_input_embeddings()

    def get_output_embeddings(self):
        head = self.module.get_output_embeddings()
        return None if head is None else AdapterView(head, self.root, self.adapter)

    def get_encoder(self):
        """An encoder-decoder model's encoder, run with this view's adapter (its layers carry LoRA too)."""
        encoder = self.module.get_encoder()

        def run(*args, **kwargs):
            with use_adapter(self.root, self.adapter):
                return encoder(*args, **kwargs)

        return run

    def parameters(self):
        return (p for n, p in self.module.named_parameters() if "lora_" not in n)

    def eval(self):
        return self

    def requires_grad_(self, flag: bool = True):
        for p in self.parameters():
            p.requires_grad_(flag)
        return self


class LoraPolicy(torch.nn.Module):
    """The learner: the base with the `default` adapter on. Registered parameters: that adapter's weights only
    (optimiser, clip, checkpoints, DDP); `peft` is the PeftModel that saves it."""

    def __init__(self, peft_model, setup: ModelSetup, path: str):
        super().__init__()
        self.__dict__["peft"] = peft_model  # not a submodule: the base's weights are not the policy's parameters
        self.__dict__["lm"] = peft_model.get_base_model()
        self.__dict__["view"] = AdapterView(self.lm, self.lm, POLICY_ADAPTER)
        self.setup, self.path = setup, path
        self.adapter = torch.nn.ParameterList(adapter_parameters(self.lm, POLICY_ADAPTER))

    def forward(self, *args, cache=None, **kwargs):
        return self.view(*args, cache=cache, **kwargs)

    @property
    def config(self):
        return self.lm.config

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.view.get_output_embeddings()

    def get_encoder(self):
        return self.view.get_encoder()

    def reference(self) -> AdapterView:
        """The same base with every adapter off: the policy's start model."""
        return AdapterView(self.lm, self.lm, None)

    def add_adapter(self, name: str) -> list[torch.nn.Parameter]:
        """A further trainable adapter (a critic's) on the same base, with the policy's LoRA settings; returns
        its parameters. The policy's adapter stays the one on outside the views' forwards."""
        with quiet_peft():
            self.peft.add_adapter(name, self.setup.lora_config(self.lm))
        _freeze_base(self.lm)
        for m in _tuner_layers(self.lm):
            m._active_adapter = [POLICY_ADAPTER]
        return adapter_parameters(self.lm, name)

    def save(self, folder, tok, merged_folder=None, state_dict: dict | None = None) -> None:
        """The policy adapter (adapter_config.json + weights) and the tokenizer in `folder`; other adapters
        (critics) go to sub-folders named after them (peft's layout); `state_dict`: the weights gathered from a
        sharded base (common.fsdp.lora_state_dict). `merged_folder`: the base with the
        adapter merged in, a plain model folder, built from a fresh full-precision load of the base."""
        self.peft.save_pretrained(str(folder), **({} if state_dict is None else {"state_dict": state_dict}))
        tok.save_pretrained(str(folder))
        if merged_folder is not None:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

            auto = AutoModelForSeq2SeqLM if self.lm.config.is_encoder_decoder else AutoModelForCausalLM
            base = auto.from_pretrained(os.path.expanduser(self.path))
            if base.get_input_embeddings().num_embeddings < len(tok):
                base.resize_token_embeddings(len(tok))
            with quiet_peft():
                merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
            merged.config.pad_token_id = tok.pad_token_id
            merged.save_pretrained(str(merged_folder))
            tok.save_pretrained(str(merged_folder))


def _freeze_base(model) -> None:
    """Every base weight frozen, every LoRA weight trainable (whichever adapter is on)."""
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)


def wrap_policy(model, setup: ModelSetup, path: str) -> LoraPolicy:
    """peft's LoRA on a loaded causal LM (prepared for k-bit training first when it was loaded quantized)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    setup.check_targets(model, path)  # before peft, which would end in a traceback
    with quiet_peft():
        if setup.quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        peft_model = get_peft_model(model, setup.lora_config(model), adapter_name=POLICY_ADAPTER)
    _freeze_base(peft_model.get_base_model())
    return LoraPolicy(peft_model, setup, path)


def make_adapter_critic(policy: LoraPolicy, name: str):
    """`--critic adapter`: a value head on the policy's base with its own adapter `name`."""
    params = policy.add_adapter(name)
    critic = AdapterValueModel(AdapterView(policy.lm.base_model, policy.lm, name), params)
    return critic.to(next(iter(params)).device)


class AdapterValueModel(ValueModel):
    """ValueModel whose backbone is a view of the shared base with the critic's adapter on; its parameters are
    that adapter's weights and the head."""

    def __init__(self, view: AdapterView, params):
        super().__init__(view)  # a view is no nn.Module: not registered, its base weights are not the critic's
        self.adapter = torch.nn.ParameterList(params)
