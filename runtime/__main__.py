"""Generate text with an engine folder: ``python -m runtime ENGINE_DIR --prompt "..." [--tokenizer DIR]``.

Examples:
    python -m runtime engines/tiny --prompt-ids 5,6,7 --max-new-tokens 16
    python -m runtime engines/text01 --tokenizer /models/MiniMax-Text-01 --prompt "Hello" --temperature 0.7 --top-p 0.9
    python -m runtime engines/vl01 --tokenizer /models/MiniMax-VL-01 --image photo.jpg --prompt "Describe the image."
    torchrun --nproc-per-node 8 -m runtime engines/text01-tp8 --prompt-ids 5,6,7   # build.py --tensor-parallel 8

The tokenizer is a Hugging Face tokenizer read from a local folder (``AutoTokenizer.from_pretrained(DIR)``);
without ``--tokenizer`` the prompt must be given as ids and the new ids are printed. Text (or ids) is printed as
it is produced; at the end: prefill time, decode tokens/s and peak memory (CUDA: max allocated; CPU: peak RSS).
Exit codes: 0 done; 2 bad request or unusable engine folder (message on stderr); 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("runtime")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("engine_dir", metavar="ENGINE_DIR", help="engine folder written by build.py")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs --tokenizer)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--tokenizer", metavar="DIR", help="local Hugging Face tokenizer folder")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="MiniMax-VL-01 engines: an image file (repeatable); each image's placeholder tokens go before "
                        "the prompt, in the order given")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample among the k most likely tokens (needs --temperature > 0)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: smallest set with probability >= p (needs --temperature > 0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler, 0 .. 2**63-1 (reproducible output)")
    p.add_argument("--eos-token-id", type=int, default=None,
                   help="stop at this id (default: the tokenizer's eos, else the model config's)")
    p.add_argument("--device", default=None, help="device to run on (default: the one the engine was built for)")
    p.add_argument("-v", "--verbose", action="store_true", help="log engine loading and steps")
    return p


def _peak_memory(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB CUDA max allocated"
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{rss_kib / 1024:.1f} MiB peak RSS"


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime serve",
                                description="Serve an engine folder over an OpenAI-compatible HTTP API "
                                            "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)")
    p.add_argument("engine_dir", metavar="ENGINE_DIR", help="engine folder written by build.py (aoti)")
    p.add_argument("--tokenizer", metavar="DIR", required=True, help="local Hugging Face tokenizer folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="prompt tokens prefilled per scheduler step (default: max_batch * max_input_len)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the folder's name)")
    p.add_argument("--prefix-cache-mb", type=int, default=1024,
                   help="memory for the prefix cache's lightning-state snapshots in MB (default 1024; 0 turns prefix "
                        "caching off); its shared KV pages come from the engine's pool")
    return p


def serve_main(argv: list[str]) -> int:
    try:
        args = serve_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from export.engine_folder import EngineFolderError

    from .server import serve

    try:
        if args.prefix_cache_mb < 0:
            print("error: --prefix-cache-mb must be >= 0", file=sys.stderr)
            return 2
        serve(args.engine_dir, args.tokenizer, args.host, args.port, args.token_budget, args.model_name,
              args.prefix_cache_mb)
    except (EngineFolderError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "serve":
        return serve_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: bad flags exit 2 (message printed), --help exits 0
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from export.engine_folder import EngineFolderError

    from .engine import SEED_MAX, Engine, RequestError
    from .sampling import validate_sampling

    def refuse(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    # the flags alone, before anything is loaded
    try:
        validate_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        return refuse(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        return refuse("--top-k / --top-p choose among sampled tokens: give --temperature > 0 with them "
                      "(temperature 0, the default, is greedy)")
    if args.max_new_tokens < 1:
        return refuse(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.seed is not None and not 0 <= args.seed <= SEED_MAX:
        return refuse(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        return refuse(f"--tokenizer {args.tokenizer}: folder not found (a local Hugging Face tokenizer folder)")
    if not Path(args.engine_dir).is_dir():
        return refuse(f"{args.engine_dir}: folder not found: not an engine folder")
    from export.parallel import is_parallel_folder

    if is_parallel_folder(args.engine_dir):
        return _parallel_main(args, refuse)

    tokenizer = None
    if args.tokenizer:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except Exception as e:  # transformers raises many kinds for a folder that holds no usable tokenizer
            return refuse(f"cannot load a tokenizer from {args.tokenizer}: {type(e).__name__}: {e}")
    if args.prompt is not None and tokenizer is None:
        return refuse("--prompt needs --tokenizer DIR (or give --prompt-ids)")
    if args.prompt is not None:
        ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            return refuse(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")
    if not ids:
        return refuse("the prompt is empty (--prompt-ids gave no id, or --prompt no token)")

    for path in args.image:
        if not Path(path).is_file():
            return refuse(f"--image {path}: file not found")
    try:
        engine = Engine.load(args.engine_dir, device=args.device)
    except (EngineFolderError, ValueError, RuntimeError, OSError) as e:
        return refuse(str(e))
    images = None
    if args.image:
        if engine.vision is None:
            return refuse(f"--image: {args.engine_dir} is a text engine (built from MiniMax-Text-01): it takes no images")
        from PIL import Image, UnidentifiedImageError

        images, placeholders = [], []
        vl = engine.vision["config"]
        for path in args.image:
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except (OSError, UnidentifiedImageError) as e:
                return refuse(f"--image {path}: not an image PIL can read ({e})")
            images.append(image)
            placeholders += [vl.image_token_index] * vl.image_layout(image.height, image.width).num_tokens
        ids = placeholders + ids
    eos = args.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None else None
    if eos is None:
        eos = engine.config.eos_token_id
    if eos is not None and not 0 <= eos < engine.vocab_size:
        log.warning("eos id %s is outside the engine's vocabulary [0, %d): not stopping on EOS", eos, engine.vocab_size)
        eos = None

    try:
        steps = engine.stream([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, eos_token_id=eos, seed=args.seed,
                              images=None if images is None else [images])
    except RequestError as e:
        return refuse(str(e))

    _print_stream(steps, tokenizer, args.prompt, eos)
    _print_stats(engine, ids)
    return 0


def _print_stream(steps, tokenizer, prompt: str | None, eos: int | None, out=None) -> list[int]:
    """Print the tokens of ``steps`` as they come (ids, or text through ``tokenizer``); stop at ``eos``."""
    out = sys.stdout if out is None else out
    generated: list[int] = []
    printed = ""
    if tokenizer is not None:
        out.write(prompt)
    for token in steps:
        t = int(token[0])
        if eos is not None and t == eos:
            break
        generated.append(t)
        if tokenizer is None:
            out.write(f"{',' if len(generated) > 1 else ''}{t}")
        else:
            # Decode the whole continuation and print what is new: multi-token characters come out whole.
            text = tokenizer.decode(generated, skip_special_tokens=True)
            if text.startswith(printed):
                out.write(text[len(printed):])
                printed = text
        out.flush()
    out.write("\n")
    return generated


def _print_stats(engine, ids: list[int]) -> None:
    s = engine.stats
    decode = (f"decode {s.decode_tokens_per_s:.1f} tokens/s ({s.decode_ms_per_step:.2f} ms/step)" if s.decode_steps
              else "no decode step (the first new token comes from the prefill)")
    print(
        f"[{len(ids)} prompt tokens, {s.new_tokens} new] prefill {1e3 * s.prefill_s:.1f} ms "
        f"({s.prompt_tokens / max(s.prefill_s, 1e-9):.1f} tokens/s, {s.prefill_chunks} chunk(s)); {decode}; "
        f"peak memory {_peak_memory(engine.device)}",
        file=sys.stderr,
    )


class _Quiet:
    """Where the ranks other than 0 print the tokens: nowhere."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _parallel_main(args: argparse.Namespace, refuse) -> int:
    """A tensor-parallel engine folder (``runtime.parallel``): every rank runs this under torchrun; rank 0 reads
    the prompt and prints, the others follow its request."""
    from export.engine_folder import EngineFolderError

    from .engine import RequestError
    from .parallel import (RankLostError, check_agreement, gather_status, join_world, leave_world, load_rank_engine,
                           share_request)

    if args.image:
        return refuse("--image: tensor-parallel engines are text-only so far (VL-01 engines are single-rank)")
    try:
        rank, world, manifest = join_world(args.engine_dir)
    except EngineFolderError as e:
        return refuse(str(e))
    try:
        request, tokenizer = None, None
        if rank == 0:  # rank 0 owns the request: tokenizer, prompt, sampling
            request = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                       "seed": args.seed, "max_new_tokens": args.max_new_tokens, "eos": args.eos_token_id}
            try:
                if args.prompt is not None:
                    if args.tokenizer is None:
                        raise ValueError("--prompt needs --tokenizer DIR (or give --prompt-ids)")
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
                    request["ids"] = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
                    if request["eos"] is None:
                        request["eos"] = tokenizer.eos_token_id
                else:
                    request["ids"] = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
                if not request["ids"]:
                    raise ValueError("the prompt is empty (--prompt-ids gave no id, or --prompt no token)")
            except Exception as e:  # noqa: BLE001 - any failure here is rank 0's refusal, shared with the others
                request = {"error": f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)}
        request = share_request(request, rank)
        if "error" in request:
            return refuse(request["error"]) if rank == 0 else 2
        # every rank loads its engine; a rank that cannot is reported to all, so that none waits for it
        status, engine = "ok", None
        try:
            engine = load_rank_engine(args.engine_dir, rank, device=args.device)
        except (EngineFolderError, ValueError, RuntimeError, OSError) as e:
            status = f"rank {rank}: {e}"
        bad = [m for m in gather_status(status) if m != "ok"]
        if bad:
            return refuse(bad[0]) if rank == 0 else 2
        eos = request["eos"] if request["eos"] is not None else engine.config.eos_token_id
        if eos is not None and not 0 <= eos < engine.vocab_size:
            eos = None
        try:
            steps = engine.stream([request["ids"]], max_new_tokens=request["max_new_tokens"],
                                  temperature=request["temperature"], top_k=request["top_k"], top_p=request["top_p"],
                                  eos_token_id=eos, seed=request["seed"])
        except RequestError as e:
            return refuse(str(e)) if rank == 0 else 2
        try:
            generated = _print_stream(steps, tokenizer if rank == 0 else None, args.prompt, eos,
                                      out=None if rank == 0 else _Quiet())
        except RuntimeError as e:  # a collective inside a step: peer gone or timed out
            raise RankLostError(f"rank {rank} of {world}: a step failed (another rank died or did not arrive "
                                f"within the process group's timeout): {str(e).splitlines()[0][:300]}") from e
        check_agreement(generated, rank)
        if rank == 0:
            _print_stats(engine, request["ids"])
        return 0
    except RankLostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        leave_world()


if __name__ == "__main__":
    raise SystemExit(main())
