"""Whole-model decode and prefill speed: a reduced-depth, real-width MiniMax, eager vs an AOTInductor engine through
``runtime.Engine``, beside the weight-bandwidth floor.

    python -m benchmarks.decode --out benchmarks/results/decode.json            # H100: 2 layers, bf16, ~5 min
    python -m benchmarks.decode --preset tiny --device cpu --out /tmp/decode.json   # the code path, on a CPU

Model: ``MiniMaxConfig.preset("minimax-text-01")`` (hidden 6144, 64 heads of 128, 32 experts of 9216, top-2,
vocab 200064) cut to ``--layers`` layers, the last of them a softmax-attention layer and the others lightning
layers (so both kinds are timed), random weights (N(0, 0.02)), ``--dtype`` (bf16) weights, fp32 router and LM head.
Measured for (a) the eager model behind ``Engine.from_model`` and (b) an AOTInductor engine loaded into
``runtime.Engine``:
  * decode ms/token at each ``--batches`` B: ``engine.decode`` steps after a ``--prompt-len`` prefill (host
    included: what the runtime achieves), and the same step replayed from a CUDA graph (GPU time alone: the
    ceiling of a graph-captured runtime); plus ``engine.generate`` end to end at B = 1 (sampling included);
  * prefill tokens/s at B = 1, one chunk of ``--prompt-len`` tokens;
  * the floor: bytes of weights read per token at B = 1 (each layer's attention weights, the router, the top-k
    experts' weights, the norms, one embedding row, the fp32 LM head) over the measured copy bandwidth
    (``benchmarks/common.py``; the lightning state and KV cache traffic is reported beside it, not in the floor);
  * the peer, transformers' ``MiniMaxForCausalLM`` (eager PyTorch, its default attention and experts
    implementations, its own ``MiniMaxCache``), measured in the same run on the same weights, last (``--no-hf`` skips
    it): built on the meta device and loaded with ``load_state_dict(assign=True)`` from views of our parameters, so
    the ~30 GB of experts exist once. transformers keeps each layer's gate and up projections in one
    ``gate_up_proj [E, 2I, hidden]``, which cannot be a view of our separate ``w1``/``w3``, so ``fuse_gate_up_``
    first moves ours into that layout (our ``w1``/``w3`` become views of it; transient peak: one layer's ``w1`` +
    ``w3``). Copies, printed and listed in the JSON: the LM head and router gates in the model dtype (ours are fp32;
    transformers runs in one dtype: ~2.5 GB in bf16 at real width) and, for partial RoPE, ``q_proj``/``k_proj`` with
    their head dims permuted (transformers rotates the whole head; see ``rope_head_permutation``). Checked first:
    ``--hf-check-len`` tokens prefilled + 3 decode steps at B = 2 through both, max |dlogit| and top-1 agreement
    recorded (fp32 on the CPU: ~1e-6; bf16 with our fp32 head: small differences, recorded, not asserted). Then
    decode ms/step at each ``--hf-batches`` B (``--hf-decode-steps`` steps after a ``--hf-prompt-len`` prefill,
    positions passed explicitly: its cache reports its length from layer 0, a lightning layer). "vs HF" in the
    table is its measured ms/step over ours at the same B. The issue's figure (87 ms/token, 2 real-width layers,
    H100) is kept in the JSON as a note only.
The AOTInductor packages are compiled without their weights (``aot_inductor.package_constants_in_so=False``) and
the loaded programs are pointed at the eager model's weight tensors (``load_constants(..., user_managed=True)``):
no second copy, no multi-GB ``.so``, a build of about a minute per program. (An engine folder of this size, with
weights inside the packages, would take far longer to build and GBs of disk.)
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import environment, time_ms, write_json

TRANSFORMERS_EAGER_MS_QUOTED = 87.0  # issue 5: transformers' eager MiniMax, 2 real-width layers, H100


def reduced_config(preset: str, layers: int):
    """``preset`` cut to ``layers`` layers: lightning layers then one softmax layer (both kinds present)."""
    from model import MiniMaxConfig
    from model.config import LIGHTNING, SOFTMAX

    base = MiniMaxConfig.preset(preset)
    if layers < 1:
        raise ValueError(f"--layers must be >= 1, got {layers}")
    kinds = tuple([LIGHTNING] * (layers - 1) + [SOFTMAX]) if layers > 1 else (LIGHTNING,)
    return dataclasses.replace(base, num_hidden_layers=layers, layer_types=kinds)


@torch.no_grad()
def random_model(config, dtype: torch.dtype, device: str, seed: int = 0):
    """A random-weight model built directly on ``device`` (no CPU copy of GBs of weights)."""
    from model import MiniMaxForCausalLM

    with torch.device("meta"):
        model = MiniMaxForCausalLM(config, dtype=dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=generator)
    model.model.reset_buffers()
    model.log_kernel_choice()
    return model.eval()


def weight_bytes_per_token(config, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of weights read to produce one token at batch 1, by part."""
    w = torch.tensor([], dtype=dtype).element_size()
    hidden, H, D, KVH = config.hidden_size, config.num_attention_heads, config.head_dim, config.num_key_value_heads
    inner = H * D
    parts = {"attention": 0, "router": 0, "experts_top_k": 0, "norms": 0}
    for kind in config.layer_types:
        if kind == "linear_attention":
            parts["attention"] += (hidden * 3 * inner + hidden * inner + inner * hidden + inner) * w
        else:
            parts["attention"] += (hidden * inner + 2 * hidden * KVH * D + inner * hidden) * w
        parts["router"] += hidden * config.num_local_experts * 4  # fp32 gate
        parts["experts_top_k"] += config.num_experts_per_tok * 3 * hidden * config.intermediate_size * w
        parts["norms"] += 2 * hidden * w
    parts["norms"] += hidden * w  # final norm
    parts["embedding_row"] = hidden * w
    parts["lm_head_fp32"] = config.vocab_size * hidden * 4
    parts["total"] = sum(parts.values())
    return parts


def state_bytes_per_token(config, batch: int, context: int, dtype: torch.dtype) -> int:
    """Lightning state read + written and KV cache read (``context`` positions) per decode step: not in the floor."""
    w = torch.tensor([], dtype=dtype).element_size()
    H, D, KVH = config.num_attention_heads, config.head_dim, config.num_key_value_heads
    lightning = len(config.lightning_layers) * 2 * batch * H * D * D * 4
    kv = len(config.softmax_layers) * 2 * batch * KVH * context * D * w
    return lightning + kv


def cpu_copy_bandwidth_tbps(nbytes: int = 1 << 28) -> float:
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    ms = host_ms(lambda: dst.copy_(src), warmup=2, iters=5)
    return 2 * nbytes / (ms * 1e-3) / 1e12


def host_ms(fn: Callable[[], Any], warmup: int = 2, iters: int = 5) -> float:
    """Median wall-clock time in ms (CPU runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_step_ms(step: Callable[[], Any], reps: int = 10) -> float | str:
    """GPU time of one ``step`` with the host out of the loop: ``reps`` steps captured in one CUDA graph."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                step()
        ms = time_ms(graph.replay, warmup=2, iters=5) / reps
        del graph
        return ms
    except Exception as exc:  # noqa: BLE001 - a step that cannot be captured is a result, not a failure
        return f"capture failed ({type(exc).__name__}: {str(exc)[:160]})"


def build_aoti_engine(model, max_batch: int, max_input_len: int, max_seq_len: int, workdir: Path,
                      page_size: int = 256, num_pages: int | None = None, programs_to_build=("prefill", "decode"),
                      mixed_step: bool = False):
    """Export + AOTInductor-compile prefill and decode without packaged weights, load them onto the model's
    weights, and wrap them in ``runtime.Engine``. Returns (engine, build seconds by stage). ``mixed_step``: the
    ``mixed`` program too (``export.exporting.MixedProgram``)."""
    from export import BuildSettings, export_programs
    from export.engine_folder import DTYPES, symbolic_state_layout
    from export.exporting import image_tiles_needed, is_vl, text_model
    from runtime import Engine
    from runtime.backends import InPlaceProgram

    dtype = next(k for k, v in DTYPES.items() if v == model.dtype)
    vl = is_vl(model)  # MiniMax-VL-01: the vision program too (if asked for), tiles for its largest image
    device = text_model(model).lm_head.weight.device
    settings = BuildSettings(backend="aoti", device=device.type, dtype=dtype, max_batch=max_batch,
                             max_input_len=max_input_len, max_seq_len=max_seq_len, page_size=page_size,
                             num_pages=num_pages, max_tiles=image_tiles_needed(model.config) if vl else 0)
    paged = settings.paged_layout()
    settings = dataclasses.replace(settings, page_size=paged["page_size"], num_pages=paged["num_pages"])
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    exported = export_programs(model, settings, mixed_step=mixed_step)
    timings["export_s"] = time.perf_counter() - t0
    if mixed_step:
        programs_to_build = (*programs_to_build, "mixed")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    programs = {}
    for name, ep in exported.items():
        if name not in programs_to_build:
            continue
        t0 = time.perf_counter()
        path = workdir / f"{name}.pt2"
        torch._inductor.aoti_compile_and_package(
            ep, package_path=str(path), inductor_configs={"aot_inductor.package_constants_in_so": False})
        timings[f"compile_{name}_s"] = time.perf_counter() - t0
        fn = torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
        fqns = fn.get_constant_fqns()
        # the programs wrap the model as ``.model``: constant "model.<name>" is the model's "<name>"
        fn.load_constants({f: weights[f.removeprefix("model.")] for f in fqns}, check_full_update=True,
                          user_managed=True)
        programs[name] = fn if name in ("vision", "mixed") else InPlaceProgram(fn, name)
        print(f"  AOTI {name}: compiled in {timings[f'compile_{name}_s']:.1f}s ({path.stat().st_size / 2**20:.1f} "
              f"MiB package, {len(fqns)} constants shared with the eager model)", flush=True)
    text = text_model(model)
    layout = symbolic_state_layout(text.config, settings)
    vision = {"config": model.config, "max_tiles": settings.max_tiles} if vl and "vision" in programs else None
    engine = Engine(programs, text.config, device=device, state_layout=layout, max_batch=max_batch,
                    max_input_len=max_input_len, max_seq_len=max_seq_len, paged_kv=paged, backend="aoti", dtype=dtype,
                    source="benchmark AOTI programs (weights shared with the eager model)", vision=vision)
    return engine, timings


def measure_engine(engine, label: str, batches: list[int], prompt_len: int, decode_steps: int, cuda: bool,
                   graph: bool) -> dict[str, Any]:
    V = engine.vocab_size
    g = torch.Generator().manual_seed(0)
    timer = (lambda fn: time_ms(fn, warmup=2, iters=5)) if cuda else host_ms
    row: dict[str, Any] = {"engine": label, "decode": []}

    ids = torch.randint(0, V, (1, prompt_len), generator=g).to(engine.device)
    pos = torch.zeros(1, dtype=torch.long, device=engine.device)

    def prefill_once():
        engine.reset(1)
        engine.prefill(ids, pos)

    ms = timer(prefill_once)
    row["prefill_ms"] = ms
    row["prefill_tokens_per_s"] = prompt_len / (ms * 1e-3)

    for B in batches:
        ids_b = torch.randint(0, V, (B, prompt_len), generator=g).to(engine.device)
        engine.reset(B)
        engine.prefill(ids_b, torch.zeros(B, dtype=torch.long, device=engine.device))
        tok = torch.randint(0, V, (B, 1), generator=g).to(engine.device)
        start = prompt_len
        positions = torch.full((B,), start, dtype=torch.long, device=engine.device)

        held = start

        def steps(n=decode_steps):
            nonlocal positions, held
            for _ in range(n):
                engine.decode(tok, positions, [held] * B)  # positions known on the host: no device sync
                positions, held = positions + 1, held + 1

        # Positions advance through the timing (warmup included); the context stays within max_seq_len.
        ms = timer(steps) / decode_steps
        entry: dict[str, Any] = {"B": B, "decode_ms_per_step": ms, "decode_tokens_per_s": B / (ms * 1e-3),
                                 "context_at_end": held}
        if cuda and graph:
            state = [t.clone() for t in engine.state]
            fixed_pos = torch.full((B,), start, dtype=torch.long, device=engine.device)
            program = engine.programs["decode"]
            with torch.no_grad():
                table = engine.block_table
                entry["decode_graph_ms_per_step"] = graph_step_ms(lambda: program(tok, fixed_pos, table, state))
        row["decode"].append(entry)
        print(f"  {label}: B={B} decode {ms:.3f} ms/step"
              + (f", graph {entry.get('decode_graph_ms_per_step')}" if cuda and graph else ""), flush=True)

    prompt = torch.randint(0, V, (1, prompt_len), generator=g).tolist()
    engine.generate(prompt, max_new_tokens=decode_steps)  # warm
    engine.generate(prompt, max_new_tokens=decode_steps)
    s = engine.stats
    row["generate_b1"] = {"prefill_ms": 1e3 * s.prefill_s, "decode_ms_per_step": s.decode_ms_per_step,
                          "new_tokens": s.new_tokens}
    if cuda:
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


# ----------------------------------------------------------------------------------- transformers' MiniMax, a peer
_HF_DECAY_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


def hf_config_for(config, experts_implementation: str | None = None):
    """transformers' ``MiniMaxConfig`` for the network of our ``config``.

    No partial-RoPE field: transformers' MiniMax rotates the whole head whatever the config says; ``hf_peer`` makes
    that compute our partial RoPE through the weights and frequencies it hands over (``rope_head_permutation``).
    """
    from transformers import MiniMaxConfig as HFConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        num_local_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok,
        layer_types=list(config.layer_types), block_size=config.block_size,
        full_attn_alpha_factor=config.full_attn_alpha, full_attn_beta_factor=config.full_attn_beta,
        linear_attn_alpha_factor=config.linear_attn_alpha, linear_attn_beta_factor=config.linear_attn_beta,
        mlp_alpha_factor=config.mlp_alpha, mlp_beta_factor=config.mlp_beta, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        max_position_embeddings=config.max_position_embeddings, hidden_act="silu", tie_word_embeddings=False,
        sliding_window=None, router_jitter_noise=0.0, output_router_logits=False,
    )
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    return HFConfig(**kwargs)


def rope_head_permutation(head_dim: int, rotary_dim: int) -> list[int] | None:
    """Head-dim order (transformers' index -> ours) under which whole-head rotate-half RoPE is our partial RoPE.

    Ours rotates pairs ``(i, i + r/2)`` for ``i < r/2`` (``r = rotary_dim``) and passes dims ``r..D-1`` through;
    transformers rotates pairs ``(j, j + D/2)`` for all ``j < D/2``. Placing our pair ``i`` at transformers' pair
    ``j = i`` and the pass-through dims at pairs ``j >= r/2`` given frequency 0 (cos 1, sin 0) computes the same
    q.k (q and k permuted alike; v untouched). ``None`` when ``r = D`` (nothing to do).
    """
    if rotary_dim == head_dim:
        return None
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} is odd: transformers' rotate-half RoPE needs an even head_dim")
    half, rest = rotary_dim // 2, (head_dim - rotary_dim) // 2
    return ([*range(half), *range(rotary_dim, rotary_dim + rest)]
            + [*range(half, rotary_dim), *range(rotary_dim + rest, head_dim)])


@torch.no_grad()
def fuse_gate_up_(model) -> dict[str, torch.Tensor]:
    """Re-home each layer's ``w1``, ``w3`` [E, I, hidden] into one [E, 2I, hidden] tensor (transformers'
    ``gate_up_proj``: gate rows then up rows per expert) and make ``w1``, ``w3`` views of its halves.

    transformers keeps gate and up in one tensor, which cannot be a view of two separate ones; moving ours into its
    layout keeps one copy of the expert weights (the transient peak is one layer's ``w1`` + ``w3``). Our model
    computes the same afterwards, but its Triton MoE would then copy the now non-contiguous ``w1``/``w3`` on every
    call: call this after the timings of our engines. Returns ``{experts module name: fused tensor}``.
    """
    from model.modeling import Experts

    fused = {}
    for name, module in model.named_modules():
        if not isinstance(module, Experts):
            continue
        w1, w3 = module.w1, module.w3
        E, inter, hidden = w1.shape
        both = torch.empty((E, 2 * inter, hidden), dtype=w1.dtype, device=w1.device)
        both[:, :inter].copy_(w1)
        both[:, inter:].copy_(w3)
        module.w1 = torch.nn.Parameter(both[:, :inter], requires_grad=w1.requires_grad)
        module.w3 = torch.nn.Parameter(both[:, inter:], requires_grad=w3.requires_grad)
        del w1, w3  # the old storage goes here (nothing else may hold it: see the docstring)
        fused[name] = both
    return fused


@torch.no_grad()
def hf_peer(model, experts_implementation: str | None = None):
    """transformers' ``MiniMaxForCausalLM`` computing ``model``'s network on ``model``'s own weight storage.

    Built on the meta device and filled by ``load_state_dict(..., assign=True)`` with views of our parameters:
    ``down_proj`` is our ``w2``, ``gate_up_proj`` the tensor ``fuse_gate_up_`` moves our ``w1``/``w3`` into (or, for
    a transformers with one module per expert, ``w{1,2,3}[e]``), the rest the same-named tensors (``block_sparse_moe``
    is transformers' ``mlp``). Copies only where transformers cannot use ours as they are: a dtype it does not run
    in (our fp32 LM head and router gates, when the model is bf16) and, for partial RoPE, ``q_proj``/``k_proj`` with
    their head dims permuted (``rope_head_permutation``). The lightning decay buffers and RoPE frequencies are
    derived from ours (transformers builds slopes for a head count that is not a power of two differently from the
    published code, and divides the layer factor by ``L - 1 + 1e-5``).

    Returns ``(hf_model, info)``; ``info`` counts the bytes shared with and copied from our model, per copied key
    the reason, and the attention/experts implementations transformers chose.
    """
    import transformers
    from transformers import MiniMaxForCausalLM as HFModel

    config = model.config
    hf_config = hf_config_for(config, experts_implementation)
    with torch.device("meta"):
        hf = HFModel(hf_config)
    hf = hf.to(model.dtype).eval().requires_grad_(False)
    wanted = {k: (v.shape, v.dtype) for k, v in hf.state_dict().items()}
    fused = fuse_gate_up_(model) if any(k.endswith(".experts.gate_up_proj") for k in wanted) else {}
    ours = dict(model.named_parameters())
    our_buffers = dict(model.named_buffers())
    device = model.lm_head.weight.device
    perm = rope_head_permutation(config.head_dim, config.rotary_dim)
    perm_t = torch.tensor(perm, device=device) if perm is not None else None
    decay: dict[str, dict[str, torch.Tensor]] = {}
    copies: dict[str, str] = {}

    def source(key: str) -> tuple[torch.Tensor, str | None]:
        """(tensor for transformers' ``key``, reason it is not a view of ours or None)."""
        k = key.replace(".mlp.", ".block_sparse_moe.")
        if m := re.fullmatch(r"(.+\.experts)\.gate_up_proj", k):
            return fused[m[1]], None
        if m := re.fullmatch(r"(.+\.experts)\.down_proj", k):
            return ours[f"{m[1]}.w2"], None
        if m := re.fullmatch(r"(.+\.experts)\.(\d+)\.(w[123])\.weight", k):
            return ours[f"{m[1]}.{m[3]}"][int(m[2])], None
        if m := re.fullmatch(r"(.+\.self_attn)\.(" + "|".join(_HF_DECAY_BUFFERS) + ")", k):
            if m[1] not in decay:
                # on the CPU: some transformers releases build decay_factors' ranges there whatever the device
                slope = our_buffers[f"{m[1]}.decay_rate"].float().cpu().view(-1, 1, 1)
                q, kd, diag = hf.get_submodule(m[1]).decay_factors(slope)
                decay[m[1]] = {n: t.to(device) for n, t in zip(_HF_DECAY_BUFFERS, (slope, q, kd, diag))}
            return decay[m[1]][m[2]], "derived buffer (our decay rates)"
        if perm_t is not None and (m := re.fullmatch(r"(.+\.self_attn)\.([qk])_proj\.weight", k)):
            w = ours[k]
            return (w.view(-1, config.head_dim, w.shape[-1]).index_select(1, perm_t).reshape(w.shape),
                    f"head dims permuted for partial RoPE (rotary_dim {config.rotary_dim} of {config.head_dim})")
        if k in ours:
            return ours[k], None
        raise KeyError(f"transformers' MiniMax wants {key!r}, which maps to no tensor of our model (tried {k!r})")

    state = {}
    for key, (shape, dtype) in wanted.items():
        tensor, reason = source(key)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"transformers' {key} is {list(shape)}, our tensor for it is {list(tensor.shape)}")
        if tensor.dtype != dtype:
            reason = reason or f"{str(tensor.dtype).removeprefix('torch.')} -> {str(dtype).removeprefix('torch.')}"
            tensor = tensor.to(dtype)
        if reason is not None:
            copies[key] = reason
        state[key] = tensor.detach()
    hf.load_state_dict(state, strict=True, assign=True)
    del state

    inv_freq = our_buffers["model.inv_freq"].float()
    inv_freq = torch.cat([inv_freq, inv_freq.new_zeros(config.head_dim // 2 - inv_freq.numel())])
    for name, module in hf.named_modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            module.inv_freq = inv_freq.clone()
            if isinstance(getattr(module, "original_inv_freq", None), torch.Tensor):
                module.original_inv_freq = inv_freq.clone()
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers' MiniMax has tensors left on the meta device: {', '.join(left[:10])}")

    our_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared = [p for p in hf.parameters() if p.untyped_storage().data_ptr() in our_storages]
    info = {
        "transformers": transformers.__version__,
        "attn_implementation": hf.config._attn_implementation,
        "experts_implementation": getattr(hf.config, "_experts_implementation", None),
        "shared_bytes": sum(p.nbytes for p in shared),
        "copied_parameter_bytes": sum(p.nbytes for p in hf.parameters()) - sum(p.nbytes for p in shared),
        "copies": copies,
        "gate_up_fused_into_our_storage": bool(fused),
    }
    return hf, info


class HFRunner:
    """One forward of transformers' model with explicit positions, across transformers versions.

    Positions are always passed: transformers' ``MiniMaxCache`` reports its length from layer 0, which here is a
    lightning layer holding no KV entries, so left to itself a cached step is placed at position 0. The cache keyword
    is ``cache`` in recent releases and ``past_key_values`` before; ``cache_position`` is passed where accepted.
    """

    def __init__(self, hf):
        self.hf = hf
        params = inspect.signature(hf.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.takes_cache_position = "cache_position" in params

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, start: int, cache=None, logits_to_keep: int = 0):
        """``ids [B, T]`` at positions ``start..start+T-1`` on top of ``cache`` -> (logits [B, T or keep, V], cache)."""
        B, T = ids.shape
        positions = torch.arange(start, start + T, device=ids.device)
        kwargs: dict[str, Any] = {"use_cache": True, "position_ids": positions.expand(B, T),
                                  "logits_to_keep": logits_to_keep}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if self.takes_cache_position:
            kwargs["cache_position"] = positions
        out = self.hf(input_ids=ids, **kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits, new_cache


@torch.no_grad()
def our_logits(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Our model on ``ids [B, T]``: prefill ``prompt_len`` tokens, then decode the rest one by one (teacher forced).
    Returns fp32 logits [B, T, V] on the CPU."""
    B, T = ids.shape
    logits, state = model.prefill(ids[:, :prompt_len], model.new_state(B, T, device=ids.device))
    steps = [logits.float().cpu()]
    for t in range(prompt_len, T):
        logits, state = model.decode(ids[:, t:t + 1], torch.full((B,), t, device=ids.device), state)
        steps.append(logits.float().cpu())
    return torch.cat(steps, 1)


@torch.no_grad()
def hf_logits(runner: HFRunner, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """``our_logits`` with transformers' model and its own cache."""
    logits, cache = runner(ids[:, :prompt_len], 0)
    steps = [logits.float().cpu()]
    for t in range(prompt_len, ids.shape[1]):
        logits, cache = runner(ids[:, t:t + 1], t, cache)
        steps.append(logits.float().cpu())
    return torch.cat(steps, 1)


def compare_logits(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |dlogit|, relative error (||d|| / ||ref||), top-1 agreement over all positions, and the logit scale."""
    ours, ref = ours.double(), ref.double()
    finite = bool(torch.isfinite(ours).all() and torch.isfinite(ref).all())
    return {
        "max_abs_dlogit": (ours - ref).abs().max().item() if finite else float("inf"),
        "rel_err": ((ours - ref).norm() / ref.norm().clamp_min(1e-300)).item() if finite else float("inf"),
        "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).double().mean().item(),
        "max_abs_logit": ref.abs().max().item(),
    }


@torch.no_grad()
def measure_hf(runner: HFRunner, vocab: int, device: str, batches: list[int], prompt_len: int, decode_steps: int,
               cuda: bool) -> dict[str, Any]:
    """transformers' decode ms/step at each B (its own cache, after a ``prompt_len`` prefill) and prefill at B = 1.

    Few rounds (1 warmup + 3 timed, of ``decode_steps`` steps each): a step takes tens of ms at real width."""
    g = torch.Generator().manual_seed(0)
    timer = (lambda fn: time_ms(fn, warmup=1, iters=3)) if cuda else (lambda fn: host_ms(fn, warmup=1, iters=3))
    row: dict[str, Any] = {"engine": "transformers", "decode": [], "prompt_len": prompt_len}
    ids = torch.randint(0, vocab, (1, prompt_len), generator=g).to(device)
    ms = timer(lambda: runner(ids, 0, logits_to_keep=1))
    row["prefill_ms"] = ms
    row["prefill_tokens_per_s"] = prompt_len / (ms * 1e-3)
    for B in batches:
        ids_b = torch.randint(0, vocab, (B, prompt_len), generator=g).to(device)
        _, cache = runner(ids_b, 0, logits_to_keep=1)
        tok = torch.randint(0, vocab, (B, 1), generator=g).to(device)
        position = prompt_len

        def steps(n=decode_steps):
            nonlocal position, cache
            for _ in range(n):
                _, cache = runner(tok, position, cache)
                position += 1

        ms = timer(steps) / decode_steps
        row["decode"].append({"B": B, "decode_ms_per_step": ms, "decode_tokens_per_s": B / (ms * 1e-3),
                              "context_at_end": position})
        print(f"  transformers: B={B} decode {ms:.3f} ms/step", flush=True)
        del cache
    if cuda:
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def run_hf_peer(model, args, cuda: bool) -> dict[str, Any]:
    """Validate transformers' MiniMax on our weights against our model, then time it. Returns the JSON entry."""
    config = model.config
    device = args.device
    check_len = min(args.hf_check_len, args.prompt_len)
    ids = torch.randint(0, config.vocab_size, (2, check_len + 3), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    reference = our_logits(model, ids, check_len)  # before fuse_gate_up_ re-homes our w1/w3
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    hf, info = hf_peer(model, args.hf_experts)
    info["build_s"] = time.perf_counter() - t0
    copied = ", ".join(f"{k} ({v})" for k, v in info["copies"].items() if not v.startswith("derived")) or "none"
    print(f"  transformers {info['transformers']} MiniMax on our weights ({info['attn_implementation']} attention, "
          f"{info['experts_implementation']} experts): {info['shared_bytes'] / 2**20:.1f} MiB of parameters shared "
          f"with our model, {info['copied_parameter_bytes'] / 2**20:.1f} MiB copied: {copied}", flush=True)
    runner = HFRunner(hf)
    check = compare_logits(hf_logits(runner, ids, check_len), reference)
    check.update({"batch": ids.shape[0], "prefill_tokens": check_len, "decode_steps": ids.shape[1] - check_len})
    print(f"  transformers vs ours, prefill {check_len} + 3 decode steps, B=2: max |dlogit| "
          f"{check['max_abs_dlogit']:.3g} (logits up to {check['max_abs_logit']:.3g}), rel {check['rel_err']:.3g}, "
          f"top-1 agreement {check['top1_agreement']:.3f}", flush=True)
    hf_prompt = args.hf_prompt_len or args.prompt_len
    row = measure_hf(runner, config.vocab_size, device, args.hf_batches or args.batches, hf_prompt,
                     args.hf_decode_steps, cuda)
    del runner, hf
    return {"info": info, "check_vs_ours": check, "row": row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/decode.json", help="JSON output path")
    parser.add_argument("--preset", default="minimax-text-01", choices=["minimax-text-01", "tiny"])
    parser.add_argument("--layers", type=int, default=2, help="layers kept (lightning..., softmax); default 2")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="decode batch sizes")
    parser.add_argument("--prompt-len", type=int, default=512, help="prefill chunk / context before decoding")
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps per timing")
    parser.add_argument("--no-aoti", action="store_true", help="eager only (skip the AOTInductor build)")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timings")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' MiniMax (the peer run on our weights)")
    parser.add_argument("--hf-prompt-len", type=int, default=None,
                        help="transformers' prefill before its decode timing (default: --prompt-len)")
    parser.add_argument("--hf-decode-steps", type=int, default=8, help="transformers' decode steps per timing")
    parser.add_argument("--hf-batches", type=int, nargs="+", default=None,
                        help="transformers' decode batch sizes (default: --batches)")
    parser.add_argument("--hf-check-len", type=int, default=32,
                        help="tokens prefilled in the transformers-vs-ours logit check (then 3 decode steps)")
    parser.add_argument("--hf-experts", default=None,
                        help="transformers' experts_implementation (default: transformers' own default)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("benchmarks.decode --device cuda needs a CUDA GPU (use --preset tiny --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    config = reduced_config(args.preset, args.layers)
    max_batch = max(args.batches)
    # context: the prompt, 2 warmup + 5 timed rounds of decode steps, the CUDA-graph steps, the generate run
    max_seq_len = args.prompt_len + 8 * args.decode_steps + 16
    env = environment()
    print(f"device {env['device']}  torch {env['torch']}  model {args.preset} x {args.layers} layers "
          f"{config.layer_types}  {dtype}", flush=True)
    if cuda:
        from benchmarks.common import copy_bandwidth_tbps

        copy_tbps = copy_bandwidth_tbps()
    else:
        copy_tbps = cpu_copy_bandwidth_tbps()
    weights = weight_bytes_per_token(config, dtype)
    floor_ms = weights["total"] / (copy_tbps * 1e12) * 1e3
    print(f"copy bandwidth {copy_tbps:.3f} TB/s; weights read per token at B=1 {weights['total'] / 1e9:.3f} GB "
          f"-> floor {floor_ms:.3f} ms/token", flush=True)

    payload: dict[str, Any] = {
        "environment": env,
        "command": " ".join(["python -m benchmarks.decode", *(argv if argv is not None else sys.argv[1:])]),
        "model": {"preset": args.preset, "layers": args.layers, "layer_types": list(config.layer_types),
                  "dtype": str(dtype).removeprefix("torch."), "parameters": config.num_parameters()},
        "settings": {"batches": args.batches, "prompt_len": args.prompt_len, "decode_steps": args.decode_steps,
                     "max_seq_len": max_seq_len},
        "copy_tbps": copy_tbps,
        "floor": {"weight_bytes_per_token_b1": weights, "floor_ms_per_token_b1": floor_ms,
                  "state_bytes_per_step_b1": state_bytes_per_token(config, 1, args.prompt_len, dtype)},
        "transformers_eager_ms_per_token_quoted": TRANSFORMERS_EAGER_MS_QUOTED if args.preset != "tiny" else None,
        "transformers_eager_ms_per_token_quoted_note": "issue 5's figure, kept as a note; 'vs HF' uses the "
                                                       "transformers row measured in this run",
        "results": [],
    }
    t0 = time.perf_counter()
    model = random_model(config, dtype, args.device)
    print(f"model built in {time.perf_counter() - t0:.1f}s", flush=True)

    from runtime import Engine

    eager = Engine.from_model(model, max_batch, args.prompt_len, max_seq_len)
    payload["results"].append(measure_engine(eager, "eager", args.batches, args.prompt_len, args.decode_steps, cuda,
                                             graph=not args.no_graph))
    if not args.no_aoti:
        with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
            aoti, timings = build_aoti_engine(model, max_batch, args.prompt_len, max_seq_len, Path(tmp))
            payload["aoti_build"] = timings
            row = measure_engine(aoti, "aoti", args.batches, args.prompt_len, args.decode_steps, cuda,
                                 graph=not args.no_graph)
            payload["results"].append(row)
            # the two engines agree (same weights): greedy tokens of one prompt
            prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len),
                                   generator=torch.Generator().manual_seed(1)).tolist()
            a = aoti.generate(prompt, max_new_tokens=8)
            e = eager.generate(prompt, max_new_tokens=8)
            payload["aoti_vs_eager_greedy_ids_equal"] = float((a == e).float().mean())
            del aoti
    rc = 0
    if not args.no_hf:
        # Last: hf_peer moves our w1/w3 into transformers' fused layout (one copy of the experts, shared).
        del eager
        if cuda:
            torch.cuda.empty_cache()
        try:
            hf = run_hf_peer(model, args, cuda)
            payload["results"].append(hf.pop("row"))
            payload["transformers"] = hf
        except Exception as exc:  # noqa: BLE001 - keep the engines' results; the failure is recorded and rc != 0
            print(f"transformers peer FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            payload["transformers"] = {"error": f"{type(exc).__name__}: {exc}"}
            rc = 1
    hf_ms = {d["B"]: d["decode_ms_per_step"] for r in payload["results"] if r["engine"] == "transformers"
             for d in r["decode"]}

    print(f"\n{args.preset} x {args.layers} layers, {dtype}; floor {floor_ms:.3f} ms/token at B=1 "
          f"({weights['total'] / 1e9:.2f} GB of weights / {copy_tbps:.2f} TB/s)")
    print(f"{'engine':>12} {'B':>4} {'ms/step':>9} {'x floor':>8} {'graph ms':>9} {'tokens/s':>10} "
          f"{'vs HF':>8} {'prefill tok/s':>14}")
    for r in payload["results"]:
        for d in r["decode"]:
            gms = d.get("decode_graph_ms_per_step")
            if d["B"] in hf_ms and r["engine"] != "transformers":
                d["speedup_vs_transformers"] = hf_ms[d["B"]] / d["decode_ms_per_step"]
            vs_hf = f"{d['speedup_vs_transformers']:7.1f}x" if "speedup_vs_transformers" in d else f"{'':>8}"
            d["ratio_to_floor"] = d["decode_ms_per_step"] / floor_ms if d["B"] == 1 else None
            if d["B"] == 1 and isinstance(gms, float):
                d["graph_ratio_to_floor"] = gms / floor_ms
            print(f"{r['engine']:>12} {d['B']:>4} {d['decode_ms_per_step']:9.3f} "
                  f"{(d['ratio_to_floor'] or float('nan')):8.2f} "
                  f"{gms if isinstance(gms, float) else float('nan'):9.3f} {d['decode_tokens_per_s']:10.1f} "
                  f"{vs_hf} {r['prefill_tokens_per_s']:14.0f}")
    if "aoti_vs_eager_greedy_ids_equal" in payload:
        print(f"AOTI vs eager greedy ids equal: {payload['aoti_vs_eager_greedy_ids_equal']:.3f}")
    if "check_vs_ours" in payload.get("transformers", {}):
        c = payload["transformers"]["check_vs_ours"]
        print(f"transformers vs ours (same weights): max |dlogit| {c['max_abs_dlogit']:.3g}, "
              f"top-1 agreement {c['top1_agreement']:.3f}; vs HF = transformers' measured ms/step / ours, same B "
              f"(transformers prompt {args.hf_prompt_len or args.prompt_len} tokens)")
    write_json(args.out, payload)
    print(f"\nwrote {args.out}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
