"""Comparison helpers for tests."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf so that it always fails a tolerance."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def logit_report(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |dlogit|, relative error, mean KL(ref || ours) and top-1 agreement over all positions."""
    ours, ref = ours.double(), ref.double()
    logp_ref = torch.log_softmax(ref, -1)
    logp_ours = torch.log_softmax(ours, -1)
    kl = (logp_ref.exp() * (logp_ref - logp_ours)).sum(-1)
    return {
        "max_abs": (ours - ref).abs().max().item(),
        "rel": rel_err(ours, ref),
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1": (ours.argmax(-1) == ref.argmax(-1)).double().mean().item(),
    }


def assert_fp32_parity(report: dict[str, float], what: str) -> None:
    """The fp32 bounds for our logits against transformers' with the same weights (text and VL alike).

    fp32 agreement is ~3e-6 max |dlogit| (logits of magnitude ~5). These bounds fail on a real difference: the
    lightning norm's eps at 1e-5 instead of 1e-6 gives 1.2e-4 / 7.6e-6, rope_theta off by 1e-4 gives 4e-5 / 5e-6.
    """
    log.warning("%s: %s", what, {k: f"{v:.3g}" for k, v in report.items()})
    print(what, report)
    assert report["max_abs"] < 3e-5, report
    assert report["rel"] < 3e-6, report
    assert report["kl_max"] < 1e-11, report
    assert report["top1"] == 1.0, report


def word_tokenizer(vocab_size: int, eos: int = 1):
    """A word-level Hugging Face tokenizer ("w<id>" is id <id>; 0 "<unk>", ``eos`` "<eos>") with a chat template
    that prefixes message i with "w<2+i>" and ends with "w9"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": eos, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}w{{ 2 + loop.index }} {{ m['content'] }} {% endfor %}w9"
    return fast


@contextlib.contextmanager
def serving(app):
    """The FastAPI ``app`` served by uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
