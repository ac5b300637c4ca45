#!/usr/bin/env python3
"""Build a MiniMax-01 engine folder: load weights, torch.export prefill/decode, lower, write folder + manifest.

Examples:
    python build.py --preset tiny --out engines/tiny                      # random-weight demo, CPU AOTInductor
    python build.py --checkpoint /models/MiniMax-Text-01 --out engines/text01 --backend aoti --device cuda \\
        --dtype bf16 --max-batch 8 --max-input-len 4096 --max-seq-len 32768

--overwrite replaces an existing engine folder (one whose manifest.json says it is one), only once the new one is
complete; any other existing path is refused. A lock file beside the output (.NAME.lock) keeps a second build of
the same folder out; staging folders left by killed builds are removed by the next build of that folder.

Exit codes: 0 built; 2 bad request (settings, checkpoint, config, output folder), refused before any long work;
1 failure; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM): nothing is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import signal
import sys
import threading
import time
import warnings

log = logging.getLogger("build")

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder: config.json + safetensors shards")
    src.add_argument("--preset", choices=["tiny", "tiny-vl"],
                     help="build a random-weight model of this preset (no checkpoint); tiny-vl: MiniMax-VL-01's tiny")
    p.add_argument("--out", required=True, metavar="ENGINE_DIR", help="engine folder to create")
    p.add_argument("--backend", choices=["auto", "tensorrt", "aoti", "onnx"], default="auto",
                   help="lowering: auto = TensorRT when importable and a GPU is present, else AOTInductor")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="device the engine runs on (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and KV-cache dtype (default fp32)")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch the engine accepts (default 4)")
    p.add_argument("--max-input-len", type=int, default=64,
                   help="longest prefill chunk in tokens (default 64); longer prompts are prefilled in chunks")
    p.add_argument("--max-seq-len", type=int, default=128, help="longest context (prompt + generated, default 128)")
    p.add_argument("--page-size", type=int, default=256,
                   help="KV-cache page size in tokens (default 256, capped at --max-seq-len)")
    p.add_argument("--num-pages", type=int, default=None,
                   help="pages per KV pool (default: every row at full context, max-batch * ceil(max-seq-len / "
                        "page-size)); fewer pages serve fewer long rows at once")
    p.add_argument("--max-tiles", type=int, default=None,
                   help="MiniMax-VL-01: most image tiles one call of the vision program encodes (default: the largest "
                        "image's, thumbnail + 18 = 19 for the released grids)")
    p.add_argument("--quantize", choices=["none", "experts-int8", "experts-fp8"], default="none",
                   help="expert weights: none (the --dtype), experts-int8 (int8 per output channel, W8A16; every "
                        "backend) or experts-fp8 (e4m3 per output channel, fp8 activations per row, W8A8; aoti only "
                        "so far); the router, attention and LM head are unchanged (default none)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="build one engine per rank for N GPUs / processes (heads, experts' intermediate dimension and "
                        "vocabulary split; rank folders rank0/ ... under one manifest; run with torchrun "
                        "--nproc-per-node N -m runtime ENGINE_DIR; default 1). AOTInductor streams a checkpoint into every rank's "
                        "shards; ONNX / TensorRT rank graphs are lowered from the loaded model, their collectives as "
                        "the minimax::all_reduce / all_gather plugins")
    p.add_argument("--expert-parallel", action="store_true",
                   help="with --tensor-parallel N: split whole experts across the ranks instead of each expert's "
                        "intermediate dimension (the router whole on every rank)")
    p.add_argument("--mixed-step", action="store_true",
                   help="also compile the 'mixed' program: a decode step of the running rows and a prefill chunk of "
                        "others in one forward (every weight read once per step), which the scheduler and the server "
                        "then use (AOTInductor, text models, single rank, whole programs)")
    p.add_argument("--layer-programs", action="store_true",
                   help="compile one program per layer kind (lightning / softmax) and step, the layers' weights as "
                        "inputs, instead of whole prefill / decode programs: build time independent of the depth "
                        "(AOTInductor, text models, single rank)")
    p.add_argument("--shard-mb", type=int, default=2048,
                   help="size of the engine folder's weight shards in MB (AOTInductor; default 2048)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing engine folder (only an engine folder, and only once the new one is complete)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def choose_backend(requested: str, device: str) -> str:
    """``auto``: TensorRT when it is importable and the target is a GPU, else AOTInductor. Says which and why."""
    if requested != "auto":
        return requested
    has_trt = importlib.util.find_spec("tensorrt") is not None
    if has_trt and device == "cuda":
        log.info("backend auto -> tensorrt (tensorrt importable, GPU target)")
        return "tensorrt"
    log.info("backend auto -> aoti (%s)", "tensorrt is not installed" if not has_trt else "CPU target")
    return "aoti"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the staging folder is removed on the way out."""


_received: list[int] = []  # the signals that arrived while the build ran (see _stop_signals)


def _raise_stopped(signum, frame):
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _stop_signals():
    """While the build runs, SIGTERM raises ``Terminated`` and Ctrl-C ``KeyboardInterrupt``, and both are recorded.

    The record matters because the exception does not always arrive as itself: raised inside a Python callback of
    a C++ operator during torch.export's tracing, it can come back out of torch as another exception (CI saw
    exit 1 with a traceback; the exception's type was cut from its log). A build that was
    told to stop is reported as stopped whatever the exception looks like by then. Main thread only; the previous
    handlers are restored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: bad flags exit 2 (message printed), --help exits 0
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with _stop_signals():
        try:
            code = _build(args)
        except BaseException as e:
            if not _received and not isinstance(e, KeyboardInterrupt):
                raise
            if not isinstance(e, KeyboardInterrupt):
                log.debug("the stop arrived as %s: %s", type(e).__name__, e)
            return _stopped(args, terminated=isinstance(e, Terminated) or signal.SIGTERM in _received)
        # a stop that came back as an error _build reported itself (an OSError, say) is still a stop
        return _stopped(args, signal.SIGTERM in _received) if code != 0 and _received else code


def _stopped(args: argparse.Namespace, terminated: bool) -> int:
    log.error("%s: stopped; nothing was written to %s", "terminated (SIGTERM)" if terminated else "interrupted",
              args.out)
    return 143 if terminated else 130


def _build(args: argparse.Namespace) -> int:
    # torch's own pytree pickling warns about LeafSpec once per lowered program; nothing we can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    import torch

    from export import BuildSettings, EngineFolderError, build_engine, check_lowering
    from export.engine_folder import reserve_destination
    from model import (CheckpointError, ConfigError, MiniMaxConfig, MiniMaxForCausalLM, MiniMaxVLConfig,
                       MiniMaxVLForConditionalGeneration)
    from model.config import read_config_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda: no CUDA device is available here")
        return 2
    parallel = args.tensor_parallel != 1 or args.expert_parallel
    if args.tensor_parallel < 1:
        log.error("--tensor-parallel must be >= 1, got %d", args.tensor_parallel)
        return 2
    backend = choose_backend(args.backend, device)
    with contextlib.ExitStack() as stack:
        try:  # everything cheap is checked before weights are read
            vl_config = None
            if args.checkpoint:
                _, raw = read_config_json(args.checkpoint)
                if isinstance(raw, dict) and "vision_config" in raw:  # MiniMax-VL-01 (remote-code or HF schema)
                    vl_config = MiniMaxVLConfig.from_pretrained(args.checkpoint)
                    config = vl_config.text
                else:
                    config = MiniMaxConfig.from_pretrained(args.checkpoint)
            elif args.preset == "tiny-vl":
                vl_config = MiniMaxVLConfig.preset("tiny")
                config = vl_config.text
            else:
                config = MiniMaxConfig.preset(args.preset)
            max_tiles = args.max_tiles or 0
            if vl_config is not None and args.max_tiles is None:
                from export.exporting import image_tiles_needed

                max_tiles = image_tiles_needed(vl_config)
            elif vl_config is None and args.max_tiles:
                raise EngineFolderError(f"--max-tiles {args.max_tiles}: {args.checkpoint or args.preset} is a text "
                                        "model (no vision program)")
            settings = BuildSettings(backend=backend, device=device, dtype=DTYPES[args.dtype],
                                     max_batch=args.max_batch, max_input_len=args.max_input_len,
                                     max_seq_len=args.max_seq_len, page_size=args.page_size,
                                     num_pages=args.num_pages, max_tiles=max_tiles)
            settings.validate(config.max_position_embeddings)
            if vl_config is not None:
                from export.exporting import check_vl_settings

                check_vl_settings(vl_config, settings)
            check_lowering(settings)
            if args.layer_programs and (parallel or backend != "aoti" or vl_config is not None):
                raise EngineFolderError("--layer-programs: AOTInductor text engines on one rank only (got "
                                        + ", ".join(x for x in (f"--backend {backend}" if backend != "aoti" else "",
                                                                "--tensor-parallel" if parallel else "",
                                                                "a VL-01 model" if vl_config is not None else "") if x)
                                        + ")")
            if args.mixed_step and (parallel or backend != "aoti" or vl_config is not None or args.layer_programs):
                raise EngineFolderError("--mixed-step: AOTInductor text engines on one rank with whole programs only "
                                        "(got " + ", ".join(x for x in (
                                            f"--backend {backend}" if backend != "aoti" else "",
                                            "--tensor-parallel" if parallel else "",
                                            "a VL-01 model" if vl_config is not None else "",
                                            "--layer-programs" if args.layer_programs else "") if x) + ")")
            if args.mixed_step and settings.max_batch < 2:
                raise EngineFolderError(f"--mixed-step: a mixed step holds a decode row and a prefill row, "
                                        f"--max-batch {settings.max_batch} holds one")
            from export.exporting import check_quantization

            check_quantization(args.quantize, settings)
            plan = None
            if parallel:
                from model.parallel import ParallelPlan, ParallelPlanError

                if vl_config is not None:
                    raise EngineFolderError("--tensor-parallel: MiniMax-VL-01 engines are single-rank so far (the "
                                            "vision tower is not split)")
                try:
                    plan = ParallelPlan(config, args.tensor_parallel, expert_parallel=args.expert_parallel)
                except ParallelPlanError as e:
                    flag = "--expert-parallel " if args.expert_parallel else ""
                    raise EngineFolderError(f"{flag}--tensor-parallel {args.tensor_parallel}: {e}") from None
            # the output folder: refused unless absent or an engine folder with --overwrite; locked until the end
            stack.enter_context(reserve_destination(args.out, overwrite=args.overwrite))
        except (ConfigError, EngineFolderError) as e:
            log.error("%s", e)
            return 2

        start = time.perf_counter()
        weights_writer = None
        try:
            if args.checkpoint and (backend == "aoti" or (backend == "onnx" and plan is None)):
                # Never hold the weights: the programs are exported from a skeleton (AOTInductor: allocated, not
                # written; ONNX: on the meta device), and the checkpoint is converted tensor by tensor into the
                # folder's weights (AOTInductor: safetensors shards; ONNX: the graphs' external data files).
                from export.exporting import text_model

                if vl_config is not None:
                    from model.vl import convert_vl_checkpoint as convert
                    from model.vl import validate_vl_checkpoint as validate

                    model_class, model_config = MiniMaxVLForConditionalGeneration, vl_config
                else:
                    from model.loading import convert_checkpoint as convert
                    from model.loading import validate_checkpoint as validate

                    model_class, model_config = MiniMaxForCausalLM, config
                validate(args.checkpoint, settings.torch_dtype)  # names and shapes, before any work
                with torch.device("meta"):
                    model = model_class(model_config, dtype=settings.torch_dtype)
                text_model(model).quantize_experts_(args.quantize)  # still weightless: the converter quantizes
                if backend == "aoti" and plan is None:  # (parallel: each rank's skeleton is allocated alone)
                    model = model.to_empty(device=device)
                    text_model(model).model.reset_buffers()
                model.eval()

                def weights_writer(folder, layouts=None):
                    if layouts is not None:  # ONNX: {data file: layout}
                        from export.onnx_lowering import RoutingWriter

                        writer = RoutingWriter(folder, layouts)
                        convert(args.checkpoint, writer, settings.torch_dtype, quantize=args.quantize)
                        writer.close()
                        return None, writer.sha256
                    from export.weights import ShardWriter

                    writer = ShardWriter(folder, shard_bytes=args.shard_mb << 20)
                    convert(args.checkpoint, writer, settings.torch_dtype, quantize=args.quantize)
                    return writer.close(), writer.sha256
            elif args.checkpoint and vl_config is not None:
                # TensorRT: the plans are built from graphs with their weights (as Text-01's)
                log.info("loading %s (MiniMax-VL-01, %s, %s)", args.checkpoint, settings.dtype, device)
                model = MiniMaxVLForConditionalGeneration.from_pretrained(args.checkpoint, dtype=settings.torch_dtype,
                                                                          device=device)
                model.language_model.quantize_experts_(args.quantize)
            elif args.checkpoint:  # TensorRT, and ONNX rank folders: the ranks' graphs are lowered from the model
                log.info("loading %s (%s, %s)", args.checkpoint, settings.dtype, device)
                model = MiniMaxForCausalLM.from_pretrained(args.checkpoint, dtype=settings.torch_dtype, device=device)
                model.quantize_experts_(args.quantize)
            elif vl_config is not None:
                log.info("building a random-weight %r model (%s, %s)", args.preset, settings.dtype, device)
                with torch.device(device):
                    model = MiniMaxVLForConditionalGeneration(vl_config, dtype=settings.torch_dtype)
                    model.init_random_weights(seed=0)
                model.language_model.quantize_experts_(args.quantize)
            else:
                log.info("building a random-weight %r model (%s, %s)", args.preset, settings.dtype, device)
                with torch.device(device):
                    model = MiniMaxForCausalLM(config, dtype=settings.torch_dtype).init_random_weights(seed=0)
                model.quantize_experts_(args.quantize)
        except (ConfigError, CheckpointError) as e:
            log.error("%s", e)
            return 2
        log.info("weights ready in %.1fs", time.perf_counter() - start)
        try:
            if plan is not None:
                _build_parallel(args, model, plan, settings, weights_writer)
            else:
                build_engine(model, settings, args.out, overwrite=args.overwrite, weights_writer=weights_writer,
                             layer_programs=args.layer_programs, mixed_step=args.mixed_step)
        except (EngineFolderError, CheckpointError) as e:
            log.error("build failed, nothing written to %s: %s", args.out, e)
            return 2
        except OSError as e:  # disk full, permissions changed under us: the staging folder is already removed
            log.error("build failed, nothing written to %s: %s", args.out, e)
            return 1
    log.info("built %s in %.1fs", args.out, time.perf_counter() - start)
    return 0


def _build_parallel(args: argparse.Namespace, model, plan, settings, weights_writer) -> None:
    """``--tensor-parallel N``: one engine folder per rank (``export.parallel``). From a checkpoint the ranks'
    programs are exported from per-rank skeletons and the checkpoint is streamed once into every rank's weights
    (``RankWriter`` keeps the rank's slice of each tensor; peak memory: one shard per rank plus one tensor); from
    a preset, the random model is split."""
    import torch

    from export.parallel import FanOut, RankWriter, build_parallel_engine
    from model.parallel import rank_skeleton, tensor_parallel_model

    if weights_writer is None:  # the model holds its weights (a preset): each rank takes its slice of them
        rank_model = lambda rank: tensor_parallel_model(model, plan, rank)  # noqa: E731
        convert_weights = None
    else:
        def rank_model(rank):
            return rank_skeleton(plan.config, plan, rank, settings.torch_dtype, args.quantize,
                                 torch.device(settings.device))

        def convert_weights(folders):  # one pass over the checkpoint, every rank's slice written as it streams
            from export.weights import ShardWriter
            from model.loading import convert_checkpoint

            writers = [RankWriter(ShardWriter(f, shard_bytes=args.shard_mb << 20), plan, r)
                       for r, f in enumerate(folders)]
            convert_checkpoint(args.checkpoint, FanOut(writers), settings.torch_dtype, quantize=args.quantize)
            return [(w.close(), w.sha256) for w in writers]

    build_parallel_engine(rank_model, plan, settings, args.out, overwrite=args.overwrite,
                          convert_weights=convert_weights)


if __name__ == "__main__":
    sys.exit(main())
