"""Custom ops of the MiniMax-01 model, one folder per op: ``naive.py`` (the fp32 spec) and ``op.py`` (registration).

Importing this package registers ``torch.ops.minimax.lightning_prefill``, ``lightning_decode``, ``moe``,
``paged_kv_write``, ``paged_attention_prefill`` and ``paged_attention_decode``.
"""

from . import attention, lightning_attention, moe  # noqa: F401  (registers the ops)
