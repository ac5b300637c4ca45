"""Run the eager PyTorch model: greedy generation from token ids, optionally checked against transformers.

    python -m model --checkpoint DIR --prompt-ids 1,2,3 --max-new-tokens 16 [--dtype bf16] [--device cuda]
    python -m model --preset tiny --prompt-ids 5,6,7          # random weights, no checkpoint
    python -m model --checkpoint DIR --compare-hf              # logits parity with transformers' MiniMax

This is the reference every compiled engine is checked against; it is not the fast path.
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
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__.split("\n\n")[0])
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dtype = DTYPES[args.dtype]
    try:
        if args.checkpoint:
            model = MiniMaxForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=args.device)
        else:
            with torch.device(args.device):
                model = MiniMaxForCausalLM(MiniMaxConfig.preset(args.preset), dtype=dtype).init_random_weights(0)
    except (ConfigError, CheckpointError) as e:
        log.error("%s", e)
        return 2
    vocab = model.config.vocab_size
    bad = [t for t in args.prompt_ids if not 0 <= t < vocab]
    if bad:
        log.error("prompt token ids %s are outside the vocabulary [0, %d)", bad, vocab)
        return 2
    start = time.perf_counter()
    out = greedy(model, args.prompt_ids, args.max_new_tokens, args.device)
    log.info("generated %d tokens in %.2fs", args.max_new_tokens, time.perf_counter() - start)
    print(",".join(map(str, out)))
    if args.compare_hf:
        if not args.checkpoint:
            log.error("--compare-hf needs --checkpoint")
            return 2
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
