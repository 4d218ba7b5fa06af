"""The Transformer layer every CMAL encoder is made of: BERT's post-LayerNorm block, with
attention through ``scaled_dot_product_attention`` (flash/memory-efficient kernels on GPU).

Parameter names follow BERT's layout closely enough that a BERT checkpoint maps onto it
one tensor to one tensor (see ``cmal/model/pretrained.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """x = LN(x + Attn(x)); x = LN(x + MLP(x)) — BERT's order, so BERT weights fit."""

    def __init__(self, hidden: int, heads: int, ff: int, dropout: float, eps: float):
        super().__init__()
        self.attn = SelfAttention(hidden, heads, dropout)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.fc_in = nn.Linear(hidden, ff)
        self.fc_out = nn.Linear(ff, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        x = self.ln1(x + self.drop(self.attn(x, attn_bias)))
        # Exact (erf) GELU, as BERT and MiniLM were trained with.
        return self.ln2(x + self.drop(self.fc_out(F.gelu(self.fc_in(x)))))


class Encoder(nn.Module):
    """A stack of :class:`Block`; ``mask`` is True where a token is real."""

    def __init__(self, layers: int, hidden: int, heads: int, ff: int, dropout: float, eps: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(hidden, heads, ff, dropout, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bias = attention_bias(mask, x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        return x


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) bool key mask -> (B, 1, 1, N) additive bias (0 keep, very negative drop).

    A large finite negative rather than -inf keeps fully padded rows finite.
    """
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias.masked_fill_(~mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def init_bert_(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def matmul_flops(layers: int, hidden: int, ff: int, tokens: int) -> int:
    """Forward matmul FLOPs of ``layers`` blocks over one sequence of ``tokens`` tokens:
    QKV + output projections, the two MLP matmuls, and QK^T and AV (2 FLOPs per MAC)."""
    proj = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ff)
    attn = 2 * 2 * tokens * tokens * hidden
    return layers * (proj + attn)
