"""Prefill / decode composed from per-kind layer programs (``export/layered.py``, ``build.py --layer-programs``).

``LayeredProgram`` has the runtime protocol of a whole program (``runtime.backends``): ``(input_ids [B, T],
positions [B], block_table [B, M], state list) -> (logits [B, 1, V] fp32, state)``, the state updated in place.
It runs the embedding, the RoPE tables, the final norm and the fp32 LM head with the model's own modules
(``model.modeling``: the same code as the eager model), and each decoder layer by calling its kind's compiled
program with that layer's tensors from the folder's weights (``manifest["layer_plan"]``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LayeredProgram"]


class LayeredProgram:
    """One step program made of layer programs (module docstring). ``parts``: kind -> compiled layer program;
    ``weights``: the folder's tensors by name (``model.embed_tokens.weight``, ``model.layers.<i>.<name>`` ...)."""

    def __init__(self, parts: dict[str, Callable], weights: dict[str, Tensor], plan: dict[str, Any], config,
                 program: str):
        from model.modeling import RMSNorm

        self.parts, self.program, self.config = parts, program, config
        self.kinds: list[str] = list(plan["layer_types"])
        missing = sorted({k for k in self.kinds if k not in parts})
        if missing:
            raise ValueError(f"layered {program}: no layer program for {missing}")

        def take(name: str) -> Tensor:
            if name not in weights:
                raise KeyError(f"layered {program}: the folder's weights hold no {name!r}")
            return weights[name]

        self.layer_weights: list[list[Tensor]] = [
            [take(f"model.layers.{i}.{n}") for n in plan["weights"][kind]] for i, kind in enumerate(self.kinds)]
        self.embed = take("model.embed_tokens.weight")
        self.lm_head = take("lm_head.weight")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=self.embed.dtype).to(self.embed.device)
        self.norm.weight = torch.nn.Parameter(take("model.norm.weight"), requires_grad=False)
        r = config.rotary_dim
        exponent = torch.arange(0, r, 2, dtype=torch.float32, device=self.embed.device) / r
        self.inv_freq = 1.0 / (config.rope_theta**exponent)  # model.modeling.MiniMaxModel.reset_buffers
        self.n_lightning = self.kinds.count("lightning")
        self.n_softmax = self.kinds.count("softmax")

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, positions: Tensor, block_table: Tensor, state: Sequence[Tensor],
                 *extra: Tensor) -> tuple[Tensor, Sequence[Tensor]]:
        if extra:
            raise ValueError(f"layered {self.program}: text programs take no extra inputs")
        h = F.embedding(input_ids, self.embed)
        T = h.shape[1]
        token_positions = positions[:, None] + torch.arange(T, device=h.device)[None, :]
        freqs = token_positions.clamp(min=0)[..., None].float() * self.inv_freq  # as forward_embeddings
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        lightning = state[: self.n_lightning]
        keys = state[self.n_lightning: self.n_lightning + self.n_softmax]
        values = state[self.n_lightning + self.n_softmax:]
        i_lin = i_soft = 0
        for kind, weights in zip(self.kinds, self.layer_weights):
            if kind == "lightning":
                layer_state = [lightning[i_lin]]
                i_lin += 1
            else:
                layer_state = [keys[i_soft], values[i_soft]]
                i_soft += 1
            h = self.parts[kind](h, positions, block_table, cos, sin, layer_state, weights)
        h = self.norm(h)
        if self.program == "prefill":
            h = h[:, -1:]
        return F.linear(h.float(), self.lm_head), state
