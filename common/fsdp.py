"""FSDP (`--fsdp`): policy, critic(s) and optimiser state sharded over the processes of a torchrun job with
PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`), and full state dicts for saving.

- Sharding: every transformer layer is its own FSDP unit (found generically: the model's `_no_split_modules`
  classes, which is how transformers names its decoder / encoder blocks, else its gradient-checkpointing
  layers), then the whole model (embeddings, final norm, LM or value head). A peft model is sharded the same
  way: its base model's layers hold the adapters. Parameters in fp32; `--bf16` autocasts each forward as
  without FSDP.
- Forward passes: a forward with gradients (the update) all-gathers each layer's weights and frees them
  after it, as FSDP does. A forward without gradients (sampling, the values of line 3, evaluation) gathers
  the weights once and keeps them until the next forward with gradients: processes sample responses of
  different lengths, so their decoding steps cannot be matched one to one with collectives. The first
  no-gradient forward after an update is still a collective, so every process samples (and evaluates)
  together.
- State dicts: `full_state_dict` and `full_optimizer_state` gather the sharded tensors into the same full,
  unsharded state dicts a run without FSDP saves (same keys, same optimiser indices), so checkpoints move
  between DDP and FSDP runs. A checkpoint is loaded into the unsharded models before `shard` (as without
  FSDP); `shard` then carries the loaded optimiser state over to the sharded parameters.
  `save_pretrained_unsharded` writes a sharded policy's gathered weights as a plain `save_pretrained` folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, outermost first and none inside another: modules whose class is in a
    `_no_split_modules` list of the model (or of a transformers model inside it: a peft model's base, a
    critic's backbone), else transformers' gradient-checkpointing layers."""
    names = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or ())
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()
    picked, inside = [], set()
    for m in model.modules():
        if id(m) in inside or m is model:
            continue
        if type(m).__name__ in names or (not names and isinstance(m, GradientCheckpointingLayer)):
            picked.append(m)
            inside |= {id(s) for s in m.modules()}
    return picked


def _keep_gathered(root: nn.Module, keep: bool) -> None:
    if getattr(root, "_rlgf_keep_gathered", None) == keep:
        return
    for m in _fsdp_modules(root):
        if not keep:
            m.reshard()  # frees the gathered weights: a local operation
        m.set_reshard_after_forward(not keep and m is not root, recurse=False)  # FSDP keeps its root's anyway
    root._rlgf_keep_gathered = keep


def _gather_without_grad(root: nn.Module, args, kwargs):
    """Forward pre-hook of a sharded root: without gradients keep the gathered weights across forwards (one
    collective, then none: processes may run different numbers of decoding steps); with gradients free
    them again and reshard every layer after its forward."""
    _keep_gathered(root, not torch.is_grad_enabled())


def _sharded_root(model):
    """The FSDP root that holds `model`'s weights: the model itself, or a LoRA model's shared base
    (common.lora: the policy's `lm`, a critic adapter's view of it); None without FSDP."""
    if is_sharded(model):
        return model
    base = getattr(model, "__dict__", {}).get("lm")
    if base is None:
        view = getattr(model, "backbone", None)
        base = getattr(view, "root", None)
    return base if base is not None and is_sharded(base) else None


def reshard(model: nn.Module) -> None:
    """Free the weights a no-gradient forward kept gathered, so that the sharded parameters are registered
    again (for the optimiser step, gradient zeroing, state dicts). Local; a no-op without FSDP."""
    root = _sharded_root(model)
    if root is not None:
        _keep_gathered(root, False)
    if not is_sharded(model) and isinstance(model, nn.Module):
        for m in _fsdp_modules(model):  # a LoRA critic's own sharded head
            m.reshard()


def _mesh(device: torch.device, world: int):
    """The processes' device mesh. FSDP warns that the critic returns a view (`.squeeze(-1)`): only an in-place op
    on it would skip a hook, and the scripts use the values out of place."""
    from torch.distributed.device_mesh import init_device_mesh

    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return init_device_mesh(device.type, (world,))


def _shard_root(root: nn.Module, mesh) -> None:
    """`fully_shard` per transformer layer, then the whole of `root`, which keeps weights gathered across
    no-gradient forwards (`_gather_without_grad`)."""
    from torch.distributed.fsdp import fully_shard

    for layer in transformer_layers(root):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    root.register_forward_pre_hook(_gather_without_grad, with_kwargs=True, prepend=True)
    root._rlgf_keep_gathered = False


def shard_for_training(models: list[nn.Module], optimizer: torch.optim.Optimizer, device: torch.device, world: int):
    """`--fsdp` (`common.runtime.wrap_for_training`): the models sharded in place, a LoRA policy's base and adapters
    with `shard_lora`, any other with `shard`; 4-bit / 8-bit weights are refused in one line."""
    from common.errors import UsageError
    from common.runtime import is_lora

    if any(type(p).__name__ in ("Params4bit", "Int8Params") for m in models for p in m.parameters()):
        raise UsageError("--fsdp does not shard 4-bit / 8-bit (bitsandbytes) weights: drop --fsdp (one GPU, or "
                         "DDP with one model copy per GPU) or load the model unquantised")
    if is_lora(models[0]):
        shard_lora(models, optimizer, device, world)
    else:
        shard(models, optimizer, device, world)


def shard(models: list[nn.Module], optimizer: torch.optim.Optimizer | None, device: torch.device, world: int):
    """Shard `models` in place over the `world` processes (`fully_shard` per transformer layer, then per
    model; weights move to `device` layer by layer), and point `optimizer` at the sharded parameters,
    its state (a resumed checkpoint's) cut into the same shards."""
    mesh = _mesh(device, world)
    saved = optimizer.state_dict() if optimizer is not None else None
    old_names = {}
    for i, model in enumerate(models):
        old_names.update({id(p): (i, n) for n, p in model.named_parameters()})
    old_params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
    for model in models:
        _shard_root(model, mesh)
    if optimizer is None:
        return
    new = {}
    for i, model in enumerate(models):
        new.update({(i, n): p for n, p in model.named_parameters()})
    _repoint(optimizer, saved, {id(p): new[old_names[id(p)]] for p in old_params})


def _repoint(optimizer, saved: dict, remap: dict) -> None:
    """Point `optimizer` at the sharded parameters (`remap`: id of an old parameter -> its shard) and cut its
    state (`saved`, a resumed checkpoint's) into the same shards."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for g in optimizer.param_groups:
        g["params"] = [remap[id(p)] for p in g["params"]]
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, st in list(saved["state"].items()):  # new dicts: state_dict() shares them with the optimizer
        p = flat[idx]
        if isinstance(p, DTensor):
            saved["state"][idx] = {
                k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape else v
                for k, v in st.items()}
    optimizer.state.clear()
    optimizer.load_state_dict(saved)


def shard_lora(models: list[nn.Module], optimizer: torch.optim.Optimizer, device: torch.device, world: int):
    """`shard` for a LoRA run (common.lora): the policy's base, which holds every adapter (the policy's and the
    critic adapters'), is sharded per transformer layer and as a whole; a critic adapter's head and a separate
    critic are sharded on their own. The models' adapter lists then name the adapters' shards, and `optimizer`
    is pointed at them."""
    from torch.distributed.fsdp import fully_shard

    from common.lora import AdapterValueModel, adapter_parameters

    mesh = _mesh(device, world)
    saved = optimizer.state_dict()
    policy, lm = models[0], models[0].lm
    if world > 1:  # each process drew its own LoRA initialisation: rank 0's for all, as DDP does
        with torch.no_grad():
            for m in models:
                for p in m.parameters():
                    dist.broadcast(p.data, src=0)
    old = {id(p): ("lm", n) for n, p in lm.named_parameters()}
    for i, m in enumerate(models[1:], 1):
        for n, p in m.named_parameters():
            old.setdefault(id(p), (i, n))  # an adapter's weights are keyed by their name in the base
    old_params = [p for g in optimizer.param_groups for p in g["params"]]

    _shard_root(lm, mesh)
    for m in models[1:]:
        if isinstance(m, AdapterValueModel):
            fully_shard(m.head, mesh=mesh)
        else:
            _shard_root(m, mesh)
    policy.adapter = nn.ParameterList(adapter_parameters(lm, policy.view.adapter))
    for m in models[1:]:
        if isinstance(m, AdapterValueModel):
            m.adapter = nn.ParameterList(adapter_parameters(lm, m.backbone.adapter))
            # through the sharded root: its forward gathers the weights outside the layers (embeddings, norms)
            m.backbone = type(m.backbone)(lm, lm, m.backbone.adapter)
    new = {("lm", n): p for n, p in lm.named_parameters()}
    for i, m in enumerate(models[1:], 1):
        new.update({(i, n): p for n, p in m.named_parameters() if not n.startswith("adapter.")})
    _repoint(optimizer, saved, {id(p): new[old[id(p)]] for p in old_params})


def lora_state_dict(policy, rank: int = 0) -> dict | None:
    """A sharded LoRA policy's LoRA weights, gathered in full on rank 0 under the names of its peft model's state
    dict (what `PeftModel.save_pretrained(state_dict=...)` takes); None when its base is not sharded. Every
    process must call it."""
    root = _sharded_root(policy)
    if root is None:
        return None
    reshard(policy)
    out = {}
    for n, t in root.state_dict().items():
        if "lora_" in n:
            t = _full(t, rank == 0)
            if rank == 0:
                out["base_model.model." + n] = t
    return out


def _full(t, keep: bool):
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()  # a collective: every process calls it, in the same order
    if not keep:
        return None
    return t.detach().cpu() if torch.is_tensor(t) else t


def full_state_dict(model: nn.Module, rank: int = 0) -> dict:
    """The model's full state dict, unsharded, on the CPU of rank 0 (other ranks get {}): every process
    must call it. Without FSDP: `model.state_dict()`."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    sd = model.state_dict()
    if not is_sharded(model) and not any(isinstance(v, DTensor) for v in sd.values()):
        return sd
    # a tied weight (GPT-2's lm_head.weight is transformer.wte.weight) is gathered once and kept as one tensor under
    # both names, as in `model.state_dict()`: save_pretrained then leaves the copy out as it does without FSDP
    first: dict = {}
    tied = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), n) != n and first[id(p)] in sd:
            tied[n] = first[id(p)]
    out = {}
    for k, v in sd.items():
        if k not in tied:
            v = _full(v, rank == 0)
            if rank == 0:
                out[k] = v
    if rank == 0:
        out = {k: out[tied[k]] if k in tied else out[k] for k in sd}
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer, rank: int = 0) -> dict:
    """The optimiser's state dict with every sharded tensor gathered: the format of a run without FSDP
    (on rank 0; other ranks get {}). Every process must call it."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    if not any(isinstance(v, DTensor) for st in sd["state"].values() for v in st.values()):
        return sd
    state = {}
    for idx, st in sd["state"].items():
        full = {k: _full(v, rank == 0) for k, v in st.items()}
        if rank == 0:
            state[idx] = full
    return {"state": state, "param_groups": sd["param_groups"]} if rank == 0 else {}


def save_pretrained_unsharded(model, state: dict, path: Path) -> None:
    """`save_pretrained` of a sharded model from its gathered full state dict; config.json names the model's
    own class, not FSDP's wrapper class."""
    from torch.distributed.fsdp import FSDPModule

    own = next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))
    model.save_pretrained(path, state_dict=state)
    config = type(model.config).from_pretrained(path)
    config.architectures = [own.__name__]
    config.save_pretrained(path)


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (plain `python script.py --fsdp`): a one-process group
    on a free local port."""
    import os
    import socket

    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
