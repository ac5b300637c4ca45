"""Loading official MiniMax-01 checkpoints (sharded safetensors, published key names).

The model is built on the meta device; each checkpoint tensor is opened memory-mapped by ``safetensors``, checked
against the expected name and shape, converted to the target dtype/device and assigned, one tensor at a time, so a
checkpoint is never held twice in memory. The per-expert tensors ``experts.{e}.w{1,2,3}.weight`` are copied into
one stacked parameter per layer. The router gates and the LM head are kept in fp32.

Everything is validated before any tensor data is read: the config, the index, that every shard exists, that
every expected tensor is present exactly once with the right shape, and that nothing unexpected is there (only
the known derived buffers are ignored).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from .config import MiniMaxConfig

if TYPE_CHECKING:
    from .modeling import MiniMaxForCausalLM

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "load_checkpoint", "checkpoint_key_plan", "convert_checkpoint", "validate_checkpoint",
           "derived_buffers", "IGNORED_KEY_PATTERN"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Derived buffers some exporters save (transformers writes the lightning decay tables; older checkpoints may hold
# RoPE inv_freq). They are recomputed from the config, never read.
IGNORED_KEY_PATTERN = re.compile(
    r"^model\.layers\.\d+\.self_attn\.(slope_rate|query_decay|key_decay|diagonal_decay|rotary_emb\.inv_freq)$"
    r"|^model\.rotary_emb\.inv_freq$|(^|\.)rotary_emb\.inv_freq$"
)

_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight$")
_FP32_PARAMS = re.compile(r"(^lm_head\.weight$|\.block_sparse_moe\.gate\.weight$)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and/or tensor."""


@dataclass(frozen=True)
class _Target:
    param: str  # parameter name in the model
    index: int | None  # expert index for stacked expert weights, else None
    shape: tuple[int, ...]  # expected shape of the checkpoint tensor


def checkpoint_key_plan(model: "MiniMaxForCausalLM") -> dict[str, _Target]:
    """Map every checkpoint key the model needs to the parameter (and expert slot) it fills."""
    plan: dict[str, _Target] = {}
    for name, param in model.named_parameters():
        if re.match(r"^model\.layers\.\d+\.block_sparse_moe\.experts\.w[123]_scale$", name):
            continue  # quantized experts: the scales are computed while converting, the checkpoint has none
        m = re.match(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(w[123])$", name)
        if m:
            for e in range(param.shape[0]):
                plan[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = _Target(name, e, tuple(param.shape[1:]))
        else:
            plan[name] = _Target(name, None, tuple(param.shape))
    return plan


def _read_index(root: Path) -> dict[str, str]:
    """Checkpoint key -> shard file name, from the index (or the single-file checkpoint's header)."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: 'weight_map' is not an object")
        return weight_map
    single = root / SINGLE_FILE
    if single.is_file():
        with _open_shard(single) as f:
            return {k: SINGLE_FILE for k in f.keys()}
    raise CheckpointError(f"{root}: neither {INDEX_FILE} nor {SINGLE_FILE} found")


def _open_shard(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError for corrupt or truncated files
        raise CheckpointError(f"{path}: cannot open as safetensors ({e})") from e


def _validate(plan: dict[str, _Target], weight_map: dict[str, str], root: Path) -> dict[str, list[str]]:
    """Check names, coverage and shard presence; return shard file -> keys to load from it."""
    ignored = [k for k in weight_map if IGNORED_KEY_PATTERN.search(k)]
    unexpected = sorted(k for k in weight_map if k not in plan and k not in ignored)
    missing = sorted(k for k in plan if k not in weight_map)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(
            f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else "")
        )
    if problems:
        raise CheckpointError(f"{root}: checkpoint does not match the config: " + "; ".join(problems))
    by_shard: dict[str, list[str]] = defaultdict(list)
    for key, shard in weight_map.items():
        if key in plan:
            by_shard[shard].append(key)
    absent = sorted(s for s in by_shard if not (root / s).is_file())
    if absent:
        raise CheckpointError(f"{root}: missing shard file(s): {', '.join(absent)}")
    return dict(by_shard)


def _check_shapes(root: Path, by_shard: dict[str, list[str]], plan: dict[str, _Target]) -> None:
    """Read only the headers: every key is in its shard, with the expected shape and a floating dtype."""
    for shard, keys in by_shard.items():
        with _open_shard(root / shard) as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise CheckpointError(f"{root / shard}: tensor {key} listed in the index is not in this file")
                sl = f.get_slice(key)
                shape = tuple(sl.get_shape())
                if shape != plan[key].shape:
                    raise CheckpointError(
                        f"{root / shard}: tensor {key} has shape {list(shape)}, expected {list(plan[key].shape)}"
                    )
                dtype = sl.get_dtype()
                if dtype not in ("F32", "F16", "BF16", "F64"):
                    raise CheckpointError(f"{root / shard}: tensor {key} has dtype {dtype}, expected a float dtype")


def _prepare(cls, path: str | Path, dtype: torch.dtype, config_overrides: dict):
    """Config, meta-device model, key plan and shard -> keys, all validated without reading tensor data."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory not found")
    config = MiniMaxConfig.from_pretrained(root, **config_overrides)
    with torch.device("meta"):
        model = cls(config, dtype=dtype)
    plan = checkpoint_key_plan(model)
    by_shard = _validate(plan, _read_index(root), root)
    _check_shapes(root, by_shard, plan)
    return root, config, model, plan, by_shard


def _stream(root: Path, by_shard: dict[str, list[str]], plan: dict[str, _Target], verb: str):
    """``(target, tensor)`` for every planned key, shard by shard, one memory-mapped tensor at a time."""
    total = sum(len(k) for k in by_shard.values())
    done, start = 0, time.perf_counter()
    for n, (shard, keys) in enumerate(sorted(by_shard.items()), 1):
        with _open_shard(root / shard) as f:
            for key in keys:
                try:
                    tensor = f.get_tensor(key)  # memory-mapped view of the file
                except Exception as e:
                    raise CheckpointError(f"{root / shard}: cannot read tensor {key} ({e})") from e
                yield plan[key], tensor
                del tensor
        done += len(keys)
        logger.info("%s %s: shard %d/%d (%s), %d/%d tensors, %.1fs", verb, root.name, n, len(by_shard), shard, done,
                    total, time.perf_counter() - start)


def load_checkpoint(
    cls: type["MiniMaxForCausalLM"],
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    **config_overrides,
) -> "MiniMaxForCausalLM":
    """Build ``cls`` from ``path/config.json`` on the meta device and fill it from the safetensors shards."""
    device = torch.device(device)
    start = time.perf_counter()
    root, config, model, plan, by_shard = _prepare(cls, path, dtype, config_overrides)
    params = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        if ".block_sparse_moe.experts." in name:  # stacked: allocated once, filled expert by expert
            loaded[name] = torch.empty(p.shape, dtype=p.dtype, device=device)
    total = 0
    for target, tensor in _stream(root, by_shard, plan, "loading"):
        if target.index is None:
            loaded[target.param] = tensor.to(device=device, dtype=params[target.param].dtype)
        else:
            loaded[target.param][target.index].copy_(tensor)
        total += 1

    model.load_state_dict(loaded, strict=True, assign=True)
    model.model.reset_buffers()
    model.eval()
    model.log_kernel_choice()
    bad = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    if bad:  # cannot happen if the plan covers the model; a guard against a half-initialised model
        raise CheckpointError(f"{root}: tensors left uninitialised after loading: {', '.join(bad)}")
    logger.info("loaded %s: %d tensors from %d shard(s) in %.1fs (%s on %s)", root, total, len(by_shard),
                time.perf_counter() - start, dtype, device)
    return model


def derived_buffers(config: MiniMaxConfig) -> dict[str, torch.Tensor]:
    """The buffers the model computes from its config (decay rates per lightning layer, RoPE inverse frequencies),
    by name, fp32 on the CPU: what ``MiniMaxModel.reset_buffers`` computes, without a model."""
    from .config import LIGHTNING

    buffers = {f"model.layers.{i}.self_attn.decay_rate": torch.tensor(config.lightning_decay_rates(i),
                                                                      dtype=torch.float32)
               for i, kind in enumerate(config.layer_types) if kind == LIGHTNING}
    r = config.rotary_dim
    buffers["model.inv_freq"] = 1.0 / (config.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    return buffers


def validate_checkpoint(path: str | Path, dtype: torch.dtype = torch.bfloat16, **config_overrides) -> MiniMaxConfig:
    """Check a checkpoint without reading tensor data (config, index, shards, names, shapes, dtypes);
    ``CheckpointError`` naming the file and tensor. Returns the config."""
    from .modeling import MiniMaxForCausalLM

    return _prepare(MiniMaxForCausalLM, path, dtype, config_overrides)[1]


def convert_checkpoint(path: str | Path, writer, dtype: torch.dtype = torch.bfloat16, quantize: str = "none",
                       **config_overrides) -> MiniMaxConfig:
    """Stream a checkpoint into an engine folder's weights (``export.weights.ShardWriter``) without building the
    model: validated as ``load_checkpoint`` validates (config, index, shards, names, shapes), then read one tensor
    at a time, converted (model dtype; fp32 router gates and LM head) and handed to ``writer``, which writes a shard
    whenever it holds ``shard_bytes``. Expert weights are written as the slices of their stacked tensors
    (``writer.add_part``: stacked on load), so peak memory is one shard plus one tensor, whatever the model size.
    ``quantize`` ("experts-int8" / "experts-fp8"): each expert matrix is quantized as it streams (its own
    per-output-channel scales, ``kernels/moe/naive.quantize_weight``) and written with its scales. Returns the
    config."""
    from .modeling import MiniMaxForCausalLM

    root, config, skeleton, plan, by_shard = _prepare(MiniMaxForCausalLM, path, dtype, config_overrides)
    skeleton.quantize_experts_(quantize)
    plan = checkpoint_key_plan(skeleton)
    stream_converted(writer, skeleton, root, by_shard, plan, derived_buffers(config))
    return config


def stream_converted(writer, skeleton: torch.nn.Module, root: Path, by_shard: dict[str, list[str]],
                     plan: dict[str, _Target], buffers: dict[str, torch.Tensor]) -> None:
    """Every planned checkpoint tensor into ``writer``, one at a time, in the skeleton's dtypes (experts as parts
    of their stacked tensors), then the derived ``buffers``, which must be the skeleton's buffers by name (a guard,
    checked before anything is read)."""
    expected = {n for n, _ in skeleton.named_buffers()}
    if expected != set(buffers):
        raise CheckpointError(f"model buffers {sorted(expected)} differ from the derived ones {sorted(buffers)}")
    from kernels.moe.naive import quantize_weight

    from .modeling import QUANTIZATIONS

    modes = {dt: mode for mode, dt in QUANTIZATIONS.items() if dt is not None}
    params = dict(skeleton.named_parameters())
    for target, tensor in _stream(root, by_shard, plan, "converting"):
        param = params[target.param]
        if target.index is None:
            writer.add(target.param, tensor.to(param.dtype))
        elif param.dtype in modes:  # a quantized expert matrix: its rows' scales come from it alone
            q, scale = quantize_weight(tensor, modes[param.dtype])
            writer.add_part(target.param, target.index, param.shape[0], q)
            writer.add_part(f"{target.param}_scale", target.index, param.shape[0], scale)
        else:
            writer.add_part(target.param, target.index, param.shape[0], tensor.to(param.dtype))
    for name, t in buffers.items():
        writer.add(name, t)
