"""How the model is spread over ranks and what it keeps for backward: DDP or FSDP2, activation checkpointing, and
the full state dicts a checkpoint holds under either.

- ddp: every rank holds the whole model, its gradients and AdamW state (16 bytes per parameter in float32) and
  all-reduces gradients. Fastest while that fits.
- fsdp: torch.distributed.fsdp.fully_shard per block, then the whole model. Parameters, gradients and optimizer
  state are split over the ranks; each block's parameters are gathered just before its forward and backward.
  For models (or batches) that do not fit with ddp.
"""

import contextlib
import functools
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from model import GPT
from pretrain.runtime import Runtime

MODES = ("ddp", "fsdp")


def set_activation_checkpointing(model: GPT, enabled: bool) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them: a block then keeps only
    its input, for about a third more compute. Parameters and state dict keys are untouched."""
    for block in model.transformer.h:
        if enabled:
            # An instance attribute shadows Block.forward; module hooks (FSDP's) still run around it.
            block.forward = functools.partial(checkpoint, type(block).forward, block, use_reentrant=False)
        else:
            block.__dict__.pop("forward", None)


def shard(model: GPT, device: torch.device, dtype: torch.dtype) -> None:
    """FSDP2 in place: each block is one unit (gathered for its own forward/backward), the rest (embeddings, final
    LayerNorm, the tied head) the root unit. On GPU in bfloat16 the gathered parameters are bfloat16 and gradients
    are reduced in float32; the sharded master weights stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if device.type == "cuda" and dtype != torch.float32:
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def prepare(model: GPT, rt: Runtime, mode: str, activation_checkpointing: bool, world_size: int) -> torch.nn.Module:
    """The module the training loop calls. `model` is changed in place (checkpointing, sharding) and stays the one
    to build the optimizer from, sample with and take the FLOP count of.
    fsdp compiles block by block before sharding (the way torchtitan does: FSDP's hooks stay outside the graphs);
    ddp wraps the compiled model. One process ignores `mode`."""
    set_activation_checkpointing(model, activation_checkpointing)
    if world_size > 1 and mode == "fsdp":
        if rt.compile:
            for block in model.transformer.h:
                block.compile(backend=rt.compile_backend)
        shard(model, rt.device, rt.dtype)
        return model
    compiled = rt.maybe_compile(model)
    if world_size == 1:
        return compiled
    return DDP(compiled, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def is_sharded(model: torch.nn.Module) -> bool:
    # FSDP's modules take seconds to import, so only runs that shard import them; until then nothing is sharded.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(unwrap(model), fsdp.FSDPModule)


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether the whole model runs torch.compile'd (one process or DDP; FSDP compiles block by block)."""
    return hasattr(model.module if isinstance(model, DDP) else model, "_orig_mod")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP's and torch.compile's wrappers, peeled in the order prepare() wraps them: DDP outside
    the compiled module (FSDP2 wraps nothing: it changes the module in place)."""
    if isinstance(model, DDP):
        model = model.module
    return getattr(model, "_orig_mod", model)


def inference_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module to run forward passes with outside training (samples): compiled if training is compiled, without
    DDP's wrapper (whose forward prepares a backward that never comes)."""
    return model.module if isinstance(model, DDP) else model


def scoring_body(model: torch.nn.Module, rt: Runtime):
    """(the plain model, the function that gives its hidden states) for the scorers that apply the head only where
    a token is scored (HellaSwag, CORE, bits per byte): compiled, if the model is, with dynamic shapes (every batch has
    its own length: one graph serves them all instead of one compile per shape) and the runtime's backend."""
    raw = unwrap(model)
    if not is_compiled(model):
        return raw, raw.hidden_states
    return raw, torch.compile(raw.hidden_states, dynamic=True, backend=rt.compile_backend)


def gradient_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """A context for one micro-step's backward: with enabled False, gradients only accumulate locally (DDP skips
    its all-reduce, FSDP its reduce-scatter); the last micro-step of an optimizer step syncs."""
    if isinstance(model, DDP) and not enabled:
        return model.no_sync()
    if is_sharded(model):
        unwrap(model).set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm before clipping (a plain tensor, also under FSDP, whose gradients are sharded)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if is_sharded(model) else norm


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of the whole model, in the layout one process has (module.state_dict(),
    optimizer.state_dict()) whatever the parallelism, so a checkpoint does not depend on it. Under FSDP this
    gathers the shards: every rank must call it; rank 0 gets the dicts (on CPU), the others get empty dicts."""
    module = unwrap(model)
    if not is_sharded(module):
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint import state_dict as dcp_state
    options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = dcp_state.get_model_state_dict(module, options=options)
    optimizer_state = dcp_state.get_optimizer_state_dict(module, optimizer, options=options)
    if not optimizer_state:
        return model_state, {}
    return model_state, _by_index(optimizer_state)


def load_full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                          optimizer_state: dict) -> None:
    """The inverse of full_state_dicts. Under FSDP every rank calls it; only rank 0's dicts are read (each rank
    then keeps its own shard)."""
    module = unwrap(model)
    if not is_sharded(module):
        module.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint import state_dict as dcp_state
    options = dcp_state.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    dcp_state.set_model_state_dict(module, model_state, options=options)
    name_of = {id(p): name for name, p in module.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    dcp_state.set_optimizer_state_dict(module, optimizer, _by_name(optimizer_state, names), options=options)


def _by_index(state: dict) -> dict:
    """torch.distributed.checkpoint keys optimizer state by parameter name; optimizer.state_dict() by the
    parameter's position over the param groups. Names -> positions."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def _by_name(state: dict, names: list[str]) -> dict:
    """Positions -> names (see _by_index); names in the optimizer's parameter order."""
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {names[i]: value for i, value in state["state"].items()}, "param_groups": groups}
