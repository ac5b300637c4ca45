"""Run the eager PyTorch model: greedy generation from token ids, optionally checked against transformers.

    python -m model --checkpoint DIR --prompt-ids 1,2,3 --max-new-tokens 16 [--dtype bf16] [--device cuda]
    python -m model --preset tiny --prompt-ids 5,6,7          # random weights, no checkpoint
    python -m model --checkpoint DIR --compare-hf              # logits parity with transformers' MiniMax

This is the reference every compiled engine is checked against; it is not the fast path. What it computes (layer
by layer, with the sources) is in docs/architecture.md. Exit codes: 0 done; 2 bad request (flags, checkpoint,
config), refused before the model is built; 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from .config import ConfigError, MiniMaxConfig
from .loading import CheckpointError
from .modeling import MiniMaxForCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger("model")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="folder with config.json and safetensors shards (official key names)")
    src.add_argument("--preset", choices=["tiny"], help="random-weight model of a named preset (no checkpoint)")
    p.add_argument("--prompt-ids", type=_parse_ids, default=[1, 2, 3], help="comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate greedily (default 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--compare-hf", action="store_true",
                   help="also run transformers' MiniMaxForCausalLM on the checkpoint and report logit parity")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


@torch.no_grad()
def greedy(model: MiniMaxForCausalLM, prompt: list[int], max_new_tokens: int, device: str) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    state = model.new_state(1, len(prompt) + max_new_tokens, device=device)
    logits, state = model.prefill(ids, state, last_logits_only=True)
    out = list(prompt)
    for step in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if step + 1 == max_new_tokens:
            break
        logits, state = model.decode(torch.tensor([[token]], device=device), torch.tensor([len(out) - 1], device=device), state)
    return out


def _check_device(name: str) -> str | None:
    """Why ``name`` cannot run the model here, or None."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
    if device.type not in ("cpu", "cuda"):
        return f"--device {name!r}: the model runs on cpu or cuda"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {name}: no CUDA device is available here"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s) here"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: bad flags exit 2 (message printed), --help exits 0
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dtype = DTYPES[args.dtype]
    problem = _check_device(args.device)
    if problem is None and not args.prompt_ids:
        problem = "--prompt-ids is empty: give at least one token id"
    if problem is None and args.max_new_tokens < 1:
        problem = f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"
    if problem is None and args.compare_hf and not args.checkpoint:
        problem = "--compare-hf needs --checkpoint (transformers runs the checkpoint's weights)"
    if problem is None and args.compare_hf:
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            problem = "--compare-hf needs transformers (pip install -e '.[dev]')"
    if problem is not None:
        log.error("%s", problem)
        return 2
    try:
        config = MiniMaxConfig.from_pretrained(args.checkpoint) if args.checkpoint else MiniMaxConfig.preset(args.preset)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    vocab = config.vocab_size
    bad = [t for t in args.prompt_ids if not 0 <= t < vocab]
    if bad:
        log.error("prompt token ids %s are outside the vocabulary [0, %d)", bad[:10], vocab)
        return 2
    if len(args.prompt_ids) + args.max_new_tokens > config.max_position_embeddings:
        log.error("%d prompt tokens + --max-new-tokens %d exceed the model's max_position_embeddings %d",
                  len(args.prompt_ids), args.max_new_tokens, config.max_position_embeddings)
        return 2
    try:
        if args.checkpoint:
            model = MiniMaxForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=args.device)
        else:
            with torch.device(args.device):
                model = MiniMaxForCausalLM(config, dtype=dtype).init_random_weights(0)
    except (ConfigError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    start = time.perf_counter()
    out = greedy(model, args.prompt_ids, args.max_new_tokens, args.device)
    log.info("generated %d tokens in %.2fs", args.max_new_tokens, time.perf_counter() - start)
    print(",".join(map(str, out)))
    if args.compare_hf:
        from transformers import MiniMaxForCausalLM as HFModel

        hf = HFModel.from_pretrained(args.checkpoint, dtype=dtype).to(args.device).eval()
        ids = torch.tensor([out], device=args.device)
        with torch.no_grad():
            ref, ours = hf(input_ids=ids).logits.double(), model(ids).double()
        logp_ref, logp = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
        kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
        print(f"parity vs transformers over {ids.shape[1]} positions: max|dlogit| {(ours - ref).abs().max():.3e}, "
              f"KL mean {kl.mean():.3e}, top-1 agreement {(ours.argmax(-1) == ref.argmax(-1)).float().mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
