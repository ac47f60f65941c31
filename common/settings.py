"""The settings that are not the algorithm, written once, and the one place that finishes a script's settings.

Each script's `Args` inherits the groups it uses (`class Args(RunSettings, ModelSettings)`, plus `GuideSettings`
for the guided scripts) and keeps in its own body the task, the models, the lengths, the evaluation and the
algorithm's hyperparameters. Flags stay flat (`--lora-r`, `--resume`, `--guide-top-p`); `--help` shows the
script's own settings first, then each group under its title, with the values the task's preset gives
(`python ppo.py --task commongen --help`).

`finish_settings(args, algo)` runs once, before any data or model is touched: `--resume` takes the run's own
settings from its `args.json`; a new run takes the task's preset for every field not given; the derived sizes are
filled in; every value is checked. From then on `args` does not change, and it is what `args.json` holds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
import weakref
from dataclasses import dataclass

from common.errors import UsageError


class NotesGiven(type):
    """Notes which fields a Python caller named: `Args(eval_decoding="sample")` gives that field even at its default
    value, so no preset overrides it (`given_fields`). A call naming every field (`dataclasses.replace`, a copy)
    notes nothing: there a field counts as given where it differs from its default."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        named = set(kwargs) if len(args) + len(kwargs) < len(dataclasses.fields(obj)) else set()
        _NAMED[id(obj)] = (weakref.ref(obj), named)  # beside the object: its __dict__ stays its fields alone
        weakref.finalize(obj, _NAMED.pop, id(obj), None)
        return obj


_NAMED: dict[int, tuple] = {}  # id(args) -> (a weak reference to it, the fields its caller named)


def named_fields(args) -> set[str]:
    """The fields the Python call that made `args` named (`NotesGiven`)."""
    ref, named = _NAMED.get(id(args), (None, set()))
    return named if ref is not None and ref() is args else set()


@dataclass
class RunSettings(metaclass=NotesGiven):
    """the run: data, presets, run folder, resume, device, checkpoints, logging"""

    data_dir: str | None = None
    """folder laid out like ../shared/data (JSONL in the hub's schemas); default: $RLGF_DATA_DIR, else the Hub"""
    preset: str = "auto"
    """per-task settings: auto, paper, embedded or smollm2 (common/presets.py); flags given win"""
    output_dir: str = "runs"
    """run folders (TensorBoard logs, metrics.jsonl, checkpoint, final policy) go here"""
    run_name: str | None = None
    """run folder name; default <algo>-<task>-seed<seed>-<time>"""
    resume: str | None = None
    """run folder of an earlier run to continue from its last checkpoint, with its own settings"""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda"""
    fsdp: bool = False
    """under torchrun: shard policy, critic(s) and optimiser state with FSDP instead of DDP (docs/scaling.md)"""
    save_interval: int | None = None
    """checkpoint every this many iterations; default: --eval-interval"""
    keep_checkpoint: bool = False
    """keep checkpoint.pt when the run finishes, to continue it later with more --iterations"""
    sample_rows: int = 8
    """rows in the TensorBoard sample tables"""
    slow_metrics: bool = False
    """also METEOR and SPICE in CommonGen's evaluations (they start a JVM)"""
    eval_num_beams: int = 5
    """beams of --eval-decoding beam (the official code's 5)"""
    final_eval_samples: int | None = None
    """prompts of the final evaluation (and the start's it is compared with); 0 = all; None = --eval-samples"""
    start_eval_from: str | None = None
    """run folder of a run with the same start policy and evaluation settings: its start evaluations are copied"""
    rebuild_models: bool = False
    """build the task's embedded models again instead of loading them from the cache (RLGF_CACHE_DIR)"""


@dataclass
class ModelSettings(metaclass=NotesGiven):
    """the model set-up: precision, memory, LoRA, quantization, chat template (docs/lora.md)"""

    bf16: bool = False
    """bf16 autocast in every forward pass (log-probs of sampling and training then agree to ~1e-2)"""
    gradient_checkpointing: bool = False
    """recompute each layer in the backward instead of keeping its activations: less memory, more time"""
    micro_batch_size: int | None = None
    """rollouts per forward/backward per process (gradient accumulation); default: the whole minibatch"""
    chat_template: str = "auto"
    """instruct models: the prompt as the user turn, the response as the assistant turn: auto, on or off"""
    lora_r: int = 0
    """LoRA rank (peft); 0 = full fine-tuning. The reference (and a guide that is the start model) is the base"""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapter's update is scaled by alpha / r (the paper's TL;DR: r 8, alpha 64)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input in the forwards with gradients (> 0 moves the first ratio off 1)"""
    lora_target_modules: tuple[str, ...] | None = None
    """modules the adapters wrap (e.g. q_proj v_proj), or all-linear; default: peft's for the architecture"""
    critic: str | None = None
    """separate (a full critic; the default without LoRA), adapter (LoRA's default: an adapter + value head on the
    frozen base) or reference-head (a value head alone on the frozen reference's last hidden states)"""
    critic_lr: float | None = None
    """AdamW learning rate of the critic(s), a parameter group of its own under the same schedule; None = --lr"""
    critic_warmup: int = 0
    """epochs of the value loss alone on iteration 1's rollouts before the first policy update; 0 = off"""
    merge_lora: bool = False
    """also save the policy with its adapter merged in (run folder/policy-merged)"""
    load_in_4bit: bool = False
    """load the frozen base, reward model and guide in 4-bit (QLoRA; bitsandbytes, CUDA); needs --lora-r"""
    load_in_8bit: bool = False
    """as --load-in-4bit, in 8-bit (LLM.int8())"""


@dataclass
class ModelSetup(ModelSettings):
    """A run's model set-up (the fields of `ModelSettings`, read from its Args) with the LoRA and quantization checks,
    made before anything is loaded. Plain settings: common.lora (peft) is imported only where a run asks for LoRA."""

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
        import torch

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

    def quantization_config(self):
        """QLoRA's settings: nf4 with double quantization and bf16 compute, or LLM.int8(); None when off."""
        if not self.quantized:
            return None
        import torch
        from transformers import BitsAndBytesConfig

        if self.load_in_4bit:
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
        return BitsAndBytesConfig(load_in_8bit=True)


@dataclass
class GuideSettings(metaclass=NotesGiven):
    """the guide: which one, how it samples, and the server guide's connection (docs/guides.md)"""

    guide: str = "model"
    """model (an HF LM, --guide-model), rule (commongen, tldr) or an OpenAI-compatible server's URL .../v1"""
    guide_model: str | None = None
    """hub id, folder or smollm2; default: the policy model when one is given, else the task's embedded guide"""
    guide_top_p: float = 0.92
    """guide's nucleus sampling (paper: 0.92); the learner always samples with top_p 1"""
    guide_top_k: int = 50
    """guide's top-k, 0 = off (paper: IMDB 50, CommonGen and TL;DR 0)"""
    guide_temperature: float = 1.0
    """guide's sampling temperature (a server guide: 0 = greedy)"""
    guide_model_name: str | None = None
    """server guide: the model name sent with each request; default: the first one the server lists"""
    guide_api_key_env: str = "OPENAI_API_KEY"
    """server guide: the environment variable holding the API key (sent as a Bearer token, never logged)"""
    guide_max_concurrency: int = 8
    """server guide: requests in flight at once"""
    guide_timeout: float = 60.0
    """server guide: seconds to wait for one answer"""
    guide_retries: int = 3
    """server guide: retries with backoff after a connection error, timeout, HTTP 429 or 5xx"""
    guide_chat: bool = False
    """server guide: /chat/completions instead of /completions (docs/guides.md: when a prefix is continued)"""
    guide_cache: str | None = None
    """server guide: a JSONL file of request -> answer, replayed without the server (needs temperature 0)"""
    guide_extra_body: str | None = None
    """server guide: a JSON object merged into every request (e.g. '{"min_tokens": 48}' for vLLM)"""


GROUPS = (RunSettings, ModelSettings, GuideSettings)

# settings derived from others when left at None (the only fields whose default is "see another")
DERIVED = {"save_interval": "--eval-interval", "micro_batch_size": "the whole per-process minibatch"}


def flag(name: str) -> str:
    """The command-line flag of a settings field: lora_r -> --lora-r."""
    return "--" + name.replace("_", "-")


def given_fields(args) -> set[str]:
    """The fields the user set: named on the command line or by a Python caller (`NotesGiven`), or different from
    the default."""
    from common import runtime as rt

    out = set(rt._CLI_GIVEN or ()) | named_fields(args)  # `cli` notes the command line's
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if v is not None and v != f.default:
            out.add(f.name)
        elif v is None and f.default is not None:
            out.discard(f.name)  # None for a field with a value: unset, the preset's (or the resumed run's)
    return out


def check_choices(args) -> None:
    """Every `Literal[...]` field holds one of its choices (the command line checks it too; Python callers not)."""
    hints = typing.get_type_hints(type(args))
    for f in dataclasses.fields(args):
        if typing.get_origin(hints[f.name]) is typing.Literal:
            choices = typing.get_args(hints[f.name])
            if getattr(args, f.name) not in choices:
                raise UsageError(f"{flag(f.name)} must be {' or '.join(map(str, choices))}, not "
                                 f"{getattr(args, f.name)!r}")


def finish_settings(args, algo: str, aliases: dict | None = None):
    """The one place that finishes a script's settings (module docstring); returns the final `args`."""
    from common import runtime as rt
    from common.presets import fill_presets
    from common.tasks import get_task

    rt.quiet_libraries()
    given = given_fields(args)
    old = None
    if args.resume:  # the run's own settings, flags given again checked (common/resume.py)
        from common.resume import resume_settings, saved_args

        old = saved_args(args.resume)
        args = resume_settings(args, algo)
    task = get_task(args.task)
    if old is None:
        args = fill_presets(args, task.name, args.preset, aliases=aliases, given=given)
    else:  # a run saved before a setting existed: that setting's preset value
        args = fill_presets(args, task.name, args.preset, aliases=aliases, given=given | set(old))
    world = rt.world_size()
    args = dataclasses.replace(
        args, save_interval=args.eval_interval if args.save_interval is None else args.save_interval,
        micro_batch_size=max(1, args.minibatch_size // world) if args.micro_batch_size is None
        else args.micro_batch_size)
    check_choices(args)
    rt.check_settings(args, world)
    return args


# ---------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass and of its bases (every field is documented that way)."""
    import ast
    import inspect

    out = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def _argv_value(argv: list[str], flag: str) -> str | None:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def shown_defaults(cls, argv: list[str], aliases: dict | None = None) -> tuple[dict, str]:
    """The values a run with `argv` would take for the fields it does not give: the preset's for its task."""
    from common.presets import preset_values
    from common.tasks import TASKS

    task = _argv_value(argv, "--task") or cls.task
    if task not in TASKS:
        return {}, ""
    try:
        name, values = preset_values(_argv_value(argv, "--preset") or "auto", task, _argv_value(argv, "--policy-model"))
    except UsageError:
        return {}, ""
    out = {}
    for f in dataclasses.fields(cls):
        key = (aliases or {}).get(f.name, f.name)
        if key in values:
            out[f.name] = values[key]
    return out, f"values: the {name} preset for {task}"


def cli(cls, doc: str, aliases: dict | None = None):
    """Parse the command line into `cls` (a script's Args) with tyro: the script's own fields first, then one titled
    group per settings group it inherits, all with flat flags; defaults shown are the preset's for the task asked.
    The fields named on the command line are noted (`given_fields`): a preset or a resumed run never overrides them."""
    import tyro

    from common import runtime as rt
    argv = sys.argv[1:]
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    shown, preset_note = shown_defaults(cls, argv, aliases)
    groups = [g for g in GROUPS if issubclass(cls, g)]
    grouped = {f.name for g in groups for f in dataclasses.fields(g)}

    def spec(f):
        default = shown.get(f.name, f.default)
        hint = f"(default: {DERIVED[f.name]})" if f.name in DERIVED else None
        kind, metavar = hints[f.name], None
        if typing.get_origin(kind) is typing.Literal:  # parsed as text: a bad choice is check_choices' one line
            kind, metavar = str, "{" + ",".join(map(str, typing.get_args(kind))) + "}"
        marker = tyro.conf.arg(help=docs.get(f.name), help_behavior_hint=hint, metavar=metavar)
        return f.name, typing.Annotated[kind, marker], dataclasses.field(default=default)

    fields = [spec(f) for f in dataclasses.fields(cls) if f.name not in grouped]
    for g in groups:
        inner = dataclasses.make_dataclass(g.__name__, [spec(f) for f in dataclasses.fields(g)])
        title = g.__name__.removesuffix("Settings").lower()  # the group's title in --help: run, model, guide
        fields.append((title, typing.Annotated[inner, tyro.conf.OmitArgPrefixes,
                                                               tyro.conf.arg(help=g.__doc__)],
                       dataclasses.field(default_factory=inner)))
    parsed = tyro.cli(dataclasses.make_dataclass(cls.__name__, fields), args=argv,
                      description=_description(doc, preset_note))
    flat = {}
    for name in vars(parsed):
        value = getattr(parsed, name)
        flat.update(vars(value) if dataclasses.is_dataclass(value) else {name: value})
    names = {f.name for f in dataclasses.fields(cls)}
    given = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            given.add(name[3:] if name.startswith("no_") and name[3:] in names else name)
    rt._CLI_GIVEN = given & names  # read by given_fields and resume_settings
    # a field not named keeps the class's default: finish_settings fills it (from the preset, or a resumed run)
    return cls(**{f.name: flat[f.name] if f.name in given else f.default for f in dataclasses.fields(cls)})


def _description(doc: str, preset_note: str) -> str:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return (f"{paragraph}\n\nDefaults shown: {preset_note.removeprefix('values: ') or 'the defaults'} "
            "(--task / --preset / --policy-model change them); a value given here wins. --resume RUN_DIR continues a "
            "run with its own settings.")
