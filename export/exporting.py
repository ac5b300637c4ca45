"""``torch.export`` of the model's explicit-state ``prefill`` and ``decode``, and the engine build pipeline.

The two exported programs (saved as ``exported/{prefill,decode}.pt2``) are the single source of every lowering.
Their signatures are the engine-folder contract's (``engine_folder.py``); the model's weights are parameters of
the programs and the custom ops stay single nodes.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from model import MiniMaxForCausalLM, MiniMaxState
from model.state import identity_block_table

from .engine_folder import (
    FORMAT_VERSION,
    BuildSettings,
    EngineFolderError,
    mixed_io,
    program_io,
    staged_folder,
    symbolic_state_layout,
    vision_io,
    weights_sha256,
    write_manifest,
)
from .progress import progress

logger = logging.getLogger(__name__)

__all__ = ["PrefillProgram", "DecodeProgram", "MixedProgram", "VLPrefillProgram", "VLDecodeProgram", "VisionProgram",
           "export_programs", "build_engine", "example_inputs", "check_lowering", "dynamic_shapes", "text_model",
           "is_vl"]


def is_vl(model: nn.Module) -> bool:
    """A MiniMax-VL-01 model (vision tower, projector and the text model as ``language_model``)."""
    return hasattr(model, "vision_tower") and hasattr(model, "language_model")


def text_model(model: nn.Module) -> MiniMaxForCausalLM:
    """The text model: ``model`` itself, or a VL model's ``language_model``."""
    return model.language_model if is_vl(model) else model


class PrefillProgram(nn.Module):
    """``(input_ids [B, T], positions [B], block_table [B, M], state tensors) -> last logits [B, 1, V]``.

    The state tensors (lightning states, KV page pools) are updated in place: exported, they are the program's
    mutated inputs, which AOTInductor writes in place (no copy of a pool, nothing returned but the logits).
    """

    def __init__(self, model: MiniMaxForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, positions: Tensor, block_table: Tensor, state: list[Tensor]) -> Tensor:
        logits, _ = self.model.prefill(
            input_ids, MiniMaxState.unflatten(self.model.config, state, block_table), positions, last_logits_only=True
        )
        return logits


class DecodeProgram(PrefillProgram):
    """``(input_ids [B, 1], positions [B], block_table [B, M], state tensors) -> logits [B, 1, V]`` (in place)."""

    def forward(self, input_ids: Tensor, positions: Tensor, block_table: Tensor, state: list[Tensor]) -> Tensor:
        logits, _ = self.model.decode(input_ids, positions,
                                      MiniMaxState.unflatten(self.model.config, state, block_table))
        return logits


class MixedProgram(nn.Module):
    """One decode step of some rows and one prefill chunk of others, in one forward (every weight read once per
    step: ``MiniMaxForCausalLM.mixed_step``)::

        (decode_ids [R, 1], decode_positions [R], decode_block_table [R, M],
         prefill_ids [B, T], prefill_positions [B], prefill_block_table [B, M],
         decode_lightning: list[[R, H, D, D]], prefill_lightning: list[[B, H, D, D]], pools: list)
            -> logits [R + B, 1, V]: the decode rows', then the prefill rows' last positions

    The decode and prefill rows are distinct rows of the state; the KV pools are one set (key pools, then value
    pools); everything is updated in place, as in the other programs."""

    def __init__(self, model: MiniMaxForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, decode_ids: Tensor, decode_positions: Tensor, decode_block_table: Tensor, prefill_ids: Tensor,
                prefill_positions: Tensor, prefill_block_table: Tensor, decode_lightning: list[Tensor],
                prefill_lightning: list[Tensor], pools: list[Tensor]) -> Tensor:
        config = self.model.config
        dec = MiniMaxState.unflatten(config, [*decode_lightning, *pools], decode_block_table)
        pre = MiniMaxState.unflatten(config, [*prefill_lightning, *pools], prefill_block_table)
        return self.model.mixed_step(decode_ids, decode_positions, dec, prefill_ids, prefill_positions, pre)


class VLPrefillProgram(nn.Module):
    """MiniMax-VL-01 prefill: ``PrefillProgram``'s inputs and ``image_embeds [B, T, hidden]`` last, the image
    vectors at the positions whose id is the image token (``MiniMaxVLForConditionalGeneration.prefill_features``).
    Wraps the VL model as ``.model``, so its constants are ``model.<VL weight name>`` like every program's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, positions: Tensor, block_table: Tensor, state: list[Tensor],
                image_embeds: Tensor) -> Tensor:
        state_ = MiniMaxState.unflatten(self.model.config.text, state, block_table)
        logits, _ = self.model.prefill_features(input_ids, image_embeds, state_, positions, last_logits_only=True)
        return logits


class VLDecodeProgram(VLPrefillProgram):
    """MiniMax-VL-01 decode: ``DecodeProgram``'s signature (a decode step is text)."""

    def forward(self, input_ids: Tensor, positions: Tensor, block_table: Tensor, state: list[Tensor]) -> Tensor:
        logits, _ = self.model.decode(input_ids, positions,
                                      MiniMaxState.unflatten(self.model.config.text, state, block_table))
        return logits


class VisionProgram(nn.Module):
    """``(pixel_values [N, C, S, S], feature_index [L] int64) -> image_features [L, hidden]``: the tiles of
    consecutive images through the vision tower and projector, packed by one gather (``model.vl.packing_index``,
    computed by the runtime from the image sizes). N in [1, max_tiles], L in [2, max_tiles * (g*g + g)]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor, feature_index: Tensor) -> Tensor:
        return self.model.encode_tiles(pixel_values, feature_index)


def max_image_tokens(vl_config, max_tiles: int) -> int:
    """The most prompt vectors ``max_tiles`` tiles can pack into: each tile's g*g, plus at most g newlines."""
    g = vl_config.vision.grid
    return max_tiles * (g * g + g)


def image_tiles_needed(vl_config) -> int:
    """Tiles of the largest image the config's pinpoints make: the thumbnail and the largest grid."""
    S = vl_config.vision.image_size
    return 1 + max((h // S) * (w // S) for h, w in vl_config.image_grid_pinpoints)


def example_inputs(model: MiniMaxForCausalLM, settings: BuildSettings, program: str, batch: int = 2, seq: int = 3,
                   pools: list[Tensor] | None = None):
    """Sample inputs for export (batch 2, T 3: sizes that are not specialised as 0/1; the pools at build size).

    ``pools``: KV pools to use (``example_pools``), so that the two programs' examples share one set: at real
    scale a pool set is tens of GB."""
    if program == "vision":
        vc = model.config.vision
        device = model.image_newline.device
        pixels = torch.zeros(2, vc.num_channels, vc.image_size, vc.image_size, dtype=settings.torch_dtype, device=device)
        return pixels, torch.zeros(3, dtype=torch.long, device=device)
    vl = model if is_vl(model) else None
    model = text_model(model)
    device = model.lm_head.weight.device
    seq = min(seq, settings.max_input_len) if program == "prefill" else 1
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    positions = torch.zeros(batch, dtype=torch.long, device=device)
    if program == "decode":
        positions += 3
    paged = settings.paged_layout()
    config = model.config
    H, D = config.num_attention_heads, config.head_dim
    lightning = [torch.zeros(batch, H, D, D, device=device) for _ in config.lightning_layers]
    if pools is None:
        pools = example_pools(model, settings)
    table = identity_block_table(batch, paged["max_pages_per_seq"], device).remainder(paged["num_pages"])
    if vl is not None and program == "prefill":
        embeds = torch.zeros(batch, seq, config.hidden_size, dtype=settings.torch_dtype, device=device)
        return ids, positions, table, [*lightning, *pools], embeds
    return ids, positions, table, [*lightning, *pools]


def example_pools(model: MiniMaxForCausalLM, settings: BuildSettings) -> list[Tensor]:
    """Zero KV pools of the build's size (key pools, then value pools)."""
    paged = settings.paged_layout()
    model = text_model(model)
    config = model.config
    return [torch.zeros(paged["num_pages"], config.num_key_value_heads, paged["page_size"], config.head_dim,
                        dtype=settings.torch_dtype, device=model.lm_head.weight.device)
            for _ in range(2 * len(config.softmax_layers))]


def dynamic_shapes(n_lightning: int, n_softmax: int, settings: BuildSettings, program: str, vl: bool = False,
                   vl_config=None) -> tuple:
    """``dynamic_shapes`` of a program's ``(input_ids, positions, block_table, state)``: B dynamic in [1,
    max_batch] (ids, positions, table, lightning states), T in [2, max_input_len] for prefill; pools static.
    VL prefill: ``image_embeds`` last, [B, T, hidden]; vision: tiles N in [1, max_tiles], vectors L."""
    if program == "vision":
        tiles = Dim("tiles", min=1, max=max(2, settings.max_tiles))
        tokens = Dim("image_tokens", min=2, max=max(3, max_image_tokens(vl_config, settings.max_tiles)))
        return {0: tiles}, {0: tokens}
    # A range of one value cannot be a Dim (torch.export refuses min == max): the program then takes one more than
    # the engine admits (the runtime enforces max_batch / max_input_len, and B, T stay symbolic in the program).
    batch = Dim("batch", min=1, max=max(2, settings.max_batch))
    seq = Dim("seq", min=2, max=max(3, settings.max_input_len))
    ids = {0: batch, 1: seq} if program == "prefill" else {0: batch}
    shapes = ids, {0: batch}, {0: batch}, [{0: batch}] * n_lightning + [None] * (2 * n_softmax)
    if vl and program == "prefill":
        shapes += ({0: batch, 1: seq},)
    return shapes


# The mixed program's example sizes: all different (decode rows, prefill rows, chunk length), so that the export
# keeps three symbols rather than unifying equal example sizes into one.
MIXED_EXAMPLE = {"decode_batch": 3, "prefill_batch": 2, "seq": 4}


def mixed_example_inputs(model: MiniMaxForCausalLM, settings: BuildSettings, pools: list[Tensor] | None = None):
    """Sample inputs of ``MixedProgram`` (``MIXED_EXAMPLE`` sizes; the pools at build size)."""
    device = model.lm_head.weight.device
    R, B, T = MIXED_EXAMPLE["decode_batch"], MIXED_EXAMPLE["prefill_batch"], MIXED_EXAMPLE["seq"]
    paged = settings.paged_layout()
    config = model.config
    H, D = config.num_attention_heads, config.head_dim
    table = identity_block_table(R + B, paged["max_pages_per_seq"], device).remainder(paged["num_pages"])
    lightning = [[torch.zeros(n, H, D, D, device=device) for _ in config.lightning_layers] for n in (R, B)]
    if pools is None:
        pools = example_pools(model, settings)
    return (torch.zeros(R, 1, dtype=torch.long, device=device), torch.full((R,), 3, dtype=torch.long, device=device),
            table[:R].contiguous(), torch.zeros(B, T, dtype=torch.long, device=device),
            torch.zeros(B, dtype=torch.long, device=device), table[R:].contiguous(), *lightning, pools)


def mixed_dynamic_shapes(n_lightning: int, n_softmax: int, settings: BuildSettings) -> tuple:
    """R (decode rows) and B (prefill rows) in [1, max_batch], T in [2, max_input_len]; pools static. (A bound below
    the example size is raised to it: the runtime enforces the engine's limits, as for the other programs.)"""
    rows = Dim("decode_batch", min=1, max=max(MIXED_EXAMPLE["decode_batch"], settings.max_batch))
    batch = Dim("prefill_batch", min=1, max=max(MIXED_EXAMPLE["prefill_batch"], settings.max_batch))
    seq = Dim("prefill_seq", min=2, max=max(MIXED_EXAMPLE["seq"], settings.max_input_len))
    return ({0: rows}, {0: rows}, {0: rows}, {0: batch, 1: seq}, {0: batch}, {0: batch},
            [{0: rows}] * n_lightning, [{0: batch}] * n_lightning, [None] * (2 * n_softmax))


def export_programs(model: MiniMaxForCausalLM, settings: BuildSettings,
                    mixed_step: bool = False) -> dict[str, ExportedProgram]:
    """Export prefill (B and T dynamic) and decode (B dynamic) with the ranges of ``settings``; the pools are
    static (``settings.num_pages``), the lightning states and the block table follow B. ``mixed_step``: also the
    ``mixed`` program (``MixedProgram``; text models)."""
    vl = is_vl(model)
    config = text_model(model).config
    n_lin, n_soft = len(config.lightning_layers), len(config.softmax_layers)
    programs = {}
    pools = example_pools(model, settings)  # one set for both programs' examples
    wrappers = ((("prefill", VLPrefillProgram(model)), ("decode", VLDecodeProgram(model)),
                 ("vision", VisionProgram(model))) if vl
                else (("prefill", PrefillProgram(model)), ("decode", DecodeProgram(model))))
    with torch.no_grad():
        for name, wrapper in wrappers:
            start = time.perf_counter()
            args = example_inputs(model, settings, name, pools=pools)
            shapes = dynamic_shapes(n_lin, n_soft, settings, name, vl=vl, vl_config=model.config if vl else None)
            programs[name] = torch.export.export(wrapper, args, dynamic_shapes=shapes)
            logger.info("exported %s in %.1fs", name, time.perf_counter() - start)
        if mixed_step:
            start = time.perf_counter()
            programs["mixed"] = torch.export.export(MixedProgram(model), mixed_example_inputs(model, settings, pools),
                                                    dynamic_shapes=mixed_dynamic_shapes(n_lin, n_soft, settings))
            logger.info("exported mixed in %.1fs", time.perf_counter() - start)
    return programs


# backend -> module implementing the lowering protocol (``check_available``, ``lower``; see ``aoti_lowering.py``).
# Imported only when used, so that a backend's dependencies (onnx, tensorrt) are needed only by its users.
LOWERINGS: dict[str, str] = {
    "aoti": "export.aoti_lowering",
    "onnx": "export.onnx_lowering",
    "tensorrt": "export.tensorrt_lowering",
}


def lowering_module(backend: str):
    """The lowering module of ``backend``; ``EngineFolderError`` if there is none or it cannot be imported."""
    if backend not in LOWERINGS:
        raise EngineFolderError(f"backend {backend!r} is not one of {', '.join(LOWERINGS)}")
    try:
        return importlib.import_module(LOWERINGS[backend])
    except ModuleNotFoundError as e:
        raise EngineFolderError(f"backend {backend!r} is not available: {e}") from e


def check_lowering(settings: BuildSettings) -> None:
    """Refuse, before any long work, a build whose backend cannot run here (``EngineFolderError``)."""
    lowering_module(settings.backend).check_available(settings)


def without_weights(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The same program with every parameter, buffer, tensor constant and example input replaced by a meta tensor of
    its shape and dtype: what an engine folder whose weights live apart saves as ``exported/*.pt2`` (the graph, not
    the model's 912 GB nor a full-capacity KV pool)."""

    def meta(v):
        if not isinstance(v, torch.Tensor):
            return v
        t = torch.empty_like(v, device="meta")
        return torch.nn.Parameter(t, requires_grad=v.requires_grad) if isinstance(v, torch.nn.Parameter) else t

    return torch.export.ExportedProgram(
        root=ep.graph_module, graph=ep.graph, graph_signature=ep.graph_signature,
        state_dict={k: meta(v) for k, v in ep.state_dict.items()}, range_constraints=ep.range_constraints,
        module_call_graph=ep.module_call_graph,
        example_inputs=torch.utils._pytree.tree_map(meta, ep.example_inputs),  # (the state: pools of full capacity)
        constants={k: meta(v) for k, v in ep.constants.items()}, verifiers=ep.verifiers,
    )  # fmt: skip


def build_engine(
    model: MiniMaxForCausalLM, settings: BuildSettings, out_dir: str | Path, overwrite: bool = False,
    weights_writer: Callable[[Path], tuple[dict[str, Any], str]] | None = None,
    parallel: dict[str, Any] | None = None,
    layer_programs: bool = False,
    mixed_step: bool = False,
) -> dict[str, Any]:
    """Export, lower and write a complete engine folder to ``out_dir``; return its manifest.

    ``layer_programs``: compile one program per layer kind and step instead of whole prefill / decode programs
    (``export/layered.py``; AOTInductor, text models): the build time no longer grows with the depth, and the
    runtime composes prefill / decode from the parts (``runtime/layered.py``; ``manifest["layer_plan"]``).

    ``mixed_step``: also compile the ``mixed`` program (``MixedProgram``: a decode step of some rows and a prefill
    chunk of others in one forward, which ``runtime.scheduler.Scheduler`` uses; AOTInductor text engines on one
    rank with whole programs).

    ``weights_writer(folder) -> (weights entry, sha256)``: writes the folder's weights itself (AOTInductor; e.g.
    streamed from a checkpoint by ``model.loading.convert_checkpoint``), in which case ``model`` is only the
    skeleton the programs are exported from and its tensor values are never read. For ONNX the skeleton is on the
    meta device, its graphs reference one shared ``weights.onnx.data`` (a VL model's vision graph its own file),
    and ``weights_writer(folder, {data file: layout}) -> (None, sha256)`` fills them in the graphs' layouts
    (``onnx_lowering.RoutingWriter``). ``parallel``: the ``parallel`` entry of a rank's folder (``export.parallel``;
    ``model`` is then that rank's model)."""
    vl = is_vl(model)
    config = text_model(model).config
    settings.validate(config.max_position_embeddings)
    paged = settings.paged_layout()  # fixed here, so that the programs' metadata and the manifest say the same
    settings = dataclasses.replace(settings, page_size=paged["page_size"], num_pages=paged["num_pages"])
    if vl:
        check_vl_settings(model.config, settings)
    elif settings.max_tiles:
        raise EngineFolderError(f"max_tiles {settings.max_tiles}: a text model has no vision program (max_tiles 0)")
    check_lowering(settings)
    quantization = text_model(model).quantization
    check_quantization(quantization, settings)
    if model.dtype != settings.torch_dtype:  # (a VL model's dtype is its weights', as the text model's)
        raise ValueError(f"model weights are {model.dtype}, the build asks for {settings.dtype}")
    if mixed_step and (settings.backend != "aoti" or vl or parallel is not None or layer_programs):
        got = ", ".join(what for what, bad in ((f"backend {settings.backend}", settings.backend != "aoti"),
                                               ("a VL model", vl), ("tensor parallel", parallel is not None),
                                               ("layer programs", layer_programs)) if bad)
        raise EngineFolderError(f"mixed_step: built for AOTInductor text engines on one rank with whole programs "
                                f"only (got {got})")
    if mixed_step and settings.max_batch < 2:
        raise EngineFolderError(f"mixed_step: a mixed step holds a decode row and a prefill row, max_batch "
                                f"{settings.max_batch} holds one (build with --max-batch >= 2)")
    model.eval()
    layer_plan = None
    if layer_programs:
        from .layered import check_layered, layer_kinds, layer_weight_names

        check_layered(model, settings)
        kinds = layer_kinds(config)
        layer_plan = {"layer_types": kinds, "weights": {
            k: layer_weight_names(model.model.layers[kinds.index(k)]) for k in sorted(set(kinds))}}
    timings: dict[str, float] = {}
    with staged_folder(out_dir, overwrite=overwrite) as folder:
        start = time.perf_counter()
        if layer_plan is not None:
            from .layered import export_layer_programs

            programs = export_layer_programs(model, settings)  # "prefill.lightning", ... (once per kind)
        else:
            programs = export_programs(model, settings, mixed_step=mixed_step)
        timings["export_s"] = time.perf_counter() - start
        (folder / "exported").mkdir()
        for name, ep in programs.items():
            # weights apart (AOTInductor): the saved program holds its graph and the weights' names, shapes and
            # dtypes as meta tensors, not their values (the folder's weights hold those, once)
            torch.export.save(without_weights(ep) if settings.backend == "aoti" else ep,
                              folder / "exported" / f"{name}.pt2")
        manifest_programs = {}
        layouts: dict[str, list] = {}  # ONNX graphs of a weightless skeleton: data file -> the graphs' layouts
        for name, ep in programs.items():
            start = time.perf_counter()
            logger.info("lowering %s with %s ...", name, settings.backend)
            with progress(f"lowering {name} with {settings.backend}"):
                entries = lowering_module(settings.backend).lower(ep, folder, name, settings)
            if "weights_layout" in entries:
                layouts.setdefault(entries.get("external_data"), []).append(entries.pop("weights_layout"))
            timings[f"lower_{name}_s"] = time.perf_counter() - start
            logger.info("lowered %s in %.1fs", name, timings[f"lower_{name}_s"])
            if layer_plan is not None:  # a part of prefill / decode: gathered into their entries below
                manifest_programs[name] = {**entries, "exported": f"exported/{name}.pt2"}
                continue
            io = (vision_io(model.config, settings) if name == "vision" else
                  mixed_io(config.to_dict(), symbolic_state_layout(config, settings), settings.paged_layout())
                  if name == "mixed" else
                  program_io(config.to_dict(), symbolic_state_layout(config, settings), name, settings.paged_layout(),
                             in_place=entries.get("state_update", "in_place") == "in_place",
                             image_embeds=settings.dtype if vl and name == "prefill" else None))
            manifest_programs[name] = {**entries, "exported": f"exported/{name}.pt2", **io}
        if layer_plan is not None:  # prefill / decode keep the contract's I/O, made of their kinds' parts
            parts = manifest_programs
            manifest_programs = {}
            for name in ("prefill", "decode"):
                kinds = sorted(set(layer_plan["layer_types"]))
                io = program_io(config.to_dict(), symbolic_state_layout(config, settings), name,
                                settings.paged_layout(), in_place=True)
                manifest_programs[name] = {
                    "file": parts[f"{name}.{kinds[0]}"]["file"], "constants": "none (weights are inputs)",
                    "exported": parts[f"{name}.{kinds[0]}"]["exported"],
                    "layer_programs": {k: parts[f"{name}.{k}"]["file"] for k in kinds},
                    "layer_programs_exported": {k: parts[f"{name}.{k}"]["exported"] for k in kinds}, **io}
        start = time.perf_counter()
        weights, digest = None, None
        if layouts:  # the graphs reference weights.onnx.data: the checkpoint converter fills it now
            for data, group in layouts.items():
                if any(layout != group[0] for layout in group):
                    raise EngineFolderError(f"the ONNX graphs referencing {data} disagree on their weights' layout")
            if weights_writer is None:
                raise EngineFolderError("the ONNX graphs of a weightless skeleton need a checkpoint converted into "
                                        "their external data (build.py --checkpoint)")
            with progress("converting weights into the ONNX external data"):
                _, digest = weights_writer(folder, {data: group[0] for data, group in layouts.items()})
            timings["weights_s"] = time.perf_counter() - start
            start = time.perf_counter()
        elif weights_writer is not None and settings.backend != "aoti":
            raise EngineFolderError(f"backend {settings.backend!r} embeds the weights in its programs: it cannot take "
                                    "them from a weights writer")
        if settings.backend == "aoti":  # programs without constants: the weights, once, beside them
            from .weights import ShardWriter, model_tensors

            with progress("writing weights"):
                if weights_writer is not None:
                    weights, digest = weights_writer(folder)
                else:
                    writer = ShardWriter(folder)
                    for name, t in model_tensors(model):
                        writer.add(name, t)
                    weights = writer.close()
            timings["weights_s"] = time.perf_counter() - start
            start = time.perf_counter()
        manifest = {
            "format_version": FORMAT_VERSION,
            "backend": settings.backend,
            "device": settings.device,
            "dtype": settings.dtype,
            "model_config": config.to_dict(),
            "profiles": {"max_batch": settings.max_batch, "max_input_len": settings.max_input_len,
                         "max_seq_len": settings.max_seq_len},
            "paged_kv": settings.paged_layout(),
            "state_layout": symbolic_state_layout(config, settings),
            "programs": manifest_programs,
            "versions": _versions(),
            "quantization": quantization,
            "weights_sha256": digest if digest is not None else weights_sha256(model),
            "build_timings": timings,
        }
        if vl:
            manifest["profiles"]["max_tiles"] = settings.max_tiles
            manifest["vision"] = {"config": model.config.to_dict(), "max_tiles": settings.max_tiles,
                                  "max_image_tokens": max_image_tokens(model.config, settings.max_tiles)}
        if weights is not None:
            manifest["weights"] = weights
        if parallel is not None:
            manifest["parallel"] = parallel
        if layer_plan is not None:
            manifest["layer_plan"] = layer_plan
        manifest = write_manifest(folder, manifest)
        timings["manifest_s"] = time.perf_counter() - start
    logger.info("engine written to %s (%s)", out_dir, ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return manifest


def check_quantization(quantization: str, settings: BuildSettings) -> None:
    """Quantized experts (``build.py --quantize``): what is built so far. AOTInductor runs
    ``minimax::moe_quantized`` in both modes (Triton kernels on CUDA, the reference on the CPU). experts-int8 also has
    its ONNX plugin nodes and TensorRT plugins (never run here); experts-fp8 has neither yet. VL-01 engines quantize
    their language model's experts (the vision tower and projector are unchanged)."""
    if quantization == "none":
        return
    if quantization == "experts-fp8" and settings.backend != "aoti":
        raise EngineFolderError("--quantize experts-fp8: only the aoti backend lowers it so far (no ONNX node or "
                                f"TensorRT plugin for fp8 experts yet); got backend {settings.backend!r}")


def check_vl_settings(vl_config, settings: BuildSettings) -> None:
    """A VL engine: a backend that lowers the three programs, a vision program that takes the largest image in one call, and prefill chunks of at least 3 tokens (a 1-token chunk goes through
    decode, which takes no image vectors; ``runtime.engine.chunk_plan`` makes one only for a 1-token prompt)."""
    if settings.backend not in ("aoti", "onnx", "tensorrt"):
        raise EngineFolderError(f"backend {settings.backend!r} has no lowering of the VL programs")
    need = image_tiles_needed(vl_config)
    if settings.max_tiles < need:
        raise EngineFolderError(f"max_tiles {settings.max_tiles}: the largest image of this config takes {need} tiles "
                                f"(thumbnail + the largest pinpoint grid); build with --max-tiles >= {need}")
    if settings.max_input_len < 3:
        raise EngineFolderError(f"max_input_len {settings.max_input_len}: a VL engine needs prefill chunks of >= 3 "
                                "tokens (image vectors cannot go through the decode program)")


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    versions: dict[str, str | None] = {"torch": torch.__version__}
    for pkg in ("triton", "tensorrt", "torch_tensorrt", "onnx", "onnxscript"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return versions
