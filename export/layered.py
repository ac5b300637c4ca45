"""Per-kind layer programs (issue 12, "compile time that does not grow with depth"): one compiled program per
layer kind and step (lightning / softmax x prefill / decode), the layer's weights as program inputs, driven layer
by layer from the runtime (``runtime.layered``).

Why: the whole-model programs compile every layer again (AOTInductor build time grows ~1 s per layer on the CPU,
~9.5 s per layer at real width on the H200: ~13 minutes for 80 layers' prefill, ``docs/benchmarks.md``), and a
program that holds the layer once is not reachable through ``torch.export`` today
(``torch.compiler.nested_compile_region`` is inlined by export, pytorch#195005). Here a program is exported from
*one* decoder layer of its kind, called with ``torch.func.functional_call`` on weights that are inputs, so a
layer kind is compiled once whatever the depth, and every layer of the kind runs it with its own tensors (the
folder's weights, as today: ``export/weights.py``).

A layer program (``LayerProgram``):

    (h [B, T, hidden], positions [B], block_table [B, M], cos [B, T, r], sin [B, T, r], state, weights) -> h'

``state``: the layer's state tensors, updated in place (lightning: its [B, H, D, D] state; softmax: its key and
value pools); ``weights``: the layer's parameters and buffers in ``layer_weight_names`` order (names relative to
``model.layers.<i>.``). The embedding, the RoPE tables, the final norm and the LM head run in the runtime with the
model's own modules (one matmul and a few elementwise ops per step). The engine folder's ``prefill`` / ``decode``
entries keep the engine-folder contract's I/O (``program_io``): the runtime composes them from the parts listed in
``programs.<name>.layer_programs`` and the manifest's ``layer_plan``.

The DeepNorm alpha / beta are Python floats of the layer kind, the same for every layer of the kind (the config's
``*_alpha`` / ``*_beta``), so they are compiled into the program; everything that differs per layer (the lightning
decay rates, every weight) is an input.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from .engine_folder import BuildSettings, EngineFolderError

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "LayerProgram", "layer_weight_names", "layer_kinds", "export_layer_programs", "check_layered"]

KINDS = ("lightning", "softmax")


def layer_kinds(config) -> list[str]:
    """The kind of every layer, in order ("lightning" / "softmax")."""
    from model.config import LIGHTNING

    return ["lightning" if t == LIGHTNING else "softmax" for t in config.layer_types]


def layer_weight_names(layer: nn.Module) -> list[str]:
    """The layer's parameters and buffers (persistent or not), names relative to the layer, in a fixed order."""
    return [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]


def check_layered(model, settings: BuildSettings) -> None:
    """Refuse (``EngineFolderError``) what per-kind layer programs do not cover."""
    from .exporting import is_vl

    if settings.backend != "aoti":
        raise EngineFolderError(f"--layer-programs: AOTInductor only (got backend {settings.backend!r})")
    if is_vl(model):
        raise EngineFolderError("--layer-programs: text models only (MiniMax-VL-01 engines build whole programs)")
    if getattr(model.model, "tp", None) is not None:
        raise EngineFolderError("--layer-programs: not with --tensor-parallel (rank programs are whole programs)")
    layers = list(model.model.layers)
    for kind in KINDS:
        group = [(i, la) for i, la in enumerate(layers) if ("lightning" if la.is_lightning else "softmax") == kind]
        if not group:
            continue
        names = layer_weight_names(group[0][1])
        for i, layer in group[1:]:
            if layer_weight_names(layer) != names:
                raise EngineFolderError(f"--layer-programs: layer {i} ({kind}) holds other tensors than layer "
                                        f"{group[0][0]}: {layer_weight_names(layer)} vs {names}")
            if (layer.attn_alpha, layer.attn_beta, layer.mlp_alpha, layer.mlp_beta) != (
                    group[0][1].attn_alpha, group[0][1].attn_beta, group[0][1].mlp_alpha, group[0][1].mlp_beta):
                raise EngineFolderError(f"--layer-programs: layer {i} ({kind}) has other DeepNorm factors than layer "
                                        f"{group[0][0]}")


class LayerProgram(nn.Module):
    """One decoder layer of a kind as a program of its inputs (module docstring); ``layer`` is the template whose
    structure is traced (its own tensor values are never read: ``functional_call`` substitutes the inputs)."""

    def __init__(self, layer: nn.Module, decode: bool):
        super().__init__()
        # not a registered submodule: export would lift the template's own tensors as the program's constants
        object.__setattr__(self, "layer", layer)
        self.decode = decode
        self.names = layer_weight_names(layer)

    def forward(self, h: Tensor, positions: Tensor, block_table: Tensor, cos: Tensor, sin: Tensor,
                state: list[Tensor], weights: list[Tensor]) -> Tensor:
        from model.modeling import _StepContext

        T = h.shape[1]
        token_positions = positions[:, None] + torch.arange(T, device=h.device)[None, :]
        ctx = _StepContext(decode=self.decode, positions=positions, token_positions=token_positions,
                           block_table=block_table, cos=cos, sin=sin)
        out, _ = torch.func.functional_call(self.layer, dict(zip(self.names, weights)), (h, ctx, tuple(state)))
        return out


def _examples(model, settings: BuildSettings, kind: str, program: str, layer: nn.Module):
    """Example inputs of a layer program (batch 2, T 3 for prefill) and their dynamic shapes."""
    from .exporting import example_pools

    config = model.config
    device, dtype = model.lm_head.weight.device, settings.torch_dtype
    B, T = 2, (min(3, settings.max_input_len) if program == "prefill" else 1)
    paged = settings.paged_layout()
    h = torch.zeros(B, T, config.hidden_size, dtype=dtype, device=device)
    positions = torch.zeros(B, dtype=torch.long, device=device) + (3 if program == "decode" else 0)
    from model.state import identity_block_table

    table = identity_block_table(B, paged["max_pages_per_seq"], device).remainder(paged["num_pages"])
    cos = torch.zeros(B, T, config.rotary_dim, dtype=torch.float32, device=device)
    sin = torch.zeros_like(cos)
    if kind == "lightning":
        H, D = config.num_attention_heads, config.head_dim
        state = [torch.zeros(B, H, D, D, dtype=torch.float32, device=device)]
    else:
        pools = example_pools(model, settings)
        state = [pools[0], pools[len(pools) // 2]]
    weights = [t for _, t in layer.named_parameters()] + [t for _, t in layer.named_buffers()]
    batch = Dim("batch", min=1, max=max(2, settings.max_batch))
    seq = Dim("seq", min=2, max=max(3, settings.max_input_len))
    rows = {0: batch, 1: seq} if program == "prefill" else {0: batch}
    state_shapes = [{0: batch}] if kind == "lightning" else [None, None]
    shapes = (rows, {0: batch}, {0: batch}, rows, rows, state_shapes, [None] * len(weights))
    return (h, positions, table, cos, sin, state, weights), shapes


def export_layer_programs(model, settings: BuildSettings) -> dict[str, ExportedProgram]:
    """``{"<program>.<kind>": ExportedProgram}`` for prefill / decode and each layer kind the model has, exported
    from the first layer of the kind."""
    kinds = layer_kinds(model.config)
    out = {}
    with torch.no_grad():
        for kind in KINDS:
            if kind not in kinds:
                continue
            layer = model.model.layers[kinds.index(kind)]
            for program in ("prefill", "decode"):
                start = time.perf_counter()
                args, shapes = _examples(model, settings, kind, program, layer)
                out[f"{program}.{kind}"] = torch.export.export(LayerProgram(layer, program == "decode"), args,
                                                               dynamic_shapes=shapes)
                logger.info("exported %s.%s (layer program) in %.1fs", program, kind, time.perf_counter() - start)
    return out
