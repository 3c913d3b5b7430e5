"""Small importable models: the paper's modular-addition transformer, an MLP and a CNN.

They live in the package (not in a script) so that recorded runs name an importable
factory and can be queried anywhere; the tests, examples and the demo use them.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Fully connected classifier/regressor: ``sizes`` are layer widths, input first."""

    def __init__(self, sizes: list[int] = (8, 16, 3), act: str = "gelu"):
        super().__init__()
        layers = []
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(m, n))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[act]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """The reference's attention: per head one bias-free projection used as query, key and value."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.d_head = d_model // n_heads
        self.W = nn.Parameter(torch.randn(n_heads, self.d_head, d_model) / d_model ** 0.5)
        self.O = nn.Parameter(torch.randn(n_heads, d_model, self.d_head) / self.d_head ** 0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: (B, L, D)
        z = torch.einsum("hed,bld->bhle", self.W, h)
        scores = z @ z.transpose(-1, -2) / self.d_head ** 0.5
        L = h.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return torch.einsum("hde,bhle->bld", self.O, attn @ z)


class ModAddTransformer(nn.Module):
    """One-layer transformer for a + b mod p on tokens [a, '+', b, '=']; log-probs at the last position.

    No LayerNorm and no positional encoding; heads summed with no residual around attention;
    MLP d→d_mlp→d with the activation after both layers, added residually.
    """

    def __init__(self, p: int = 113, d_model: int = 64, n_heads: int = 4, d_mlp: int = 512, act: str = "relu"):
        super().__init__()
        self.p = p
        self.emb = nn.Embedding(p + 2, d_model)
        self.attn = Attention(d_model, n_heads)
        self.linear1 = nn.Linear(d_model, d_mlp)
        self.linear2 = nn.Linear(d_mlp, d_model)
        self.act = ACTIVATIONS[act]()
        self.unembed = nn.Linear(d_model, p + 2, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.emb(tokens))
        h = h + self.act(self.linear2(self.act(self.linear1(h))))
        return torch.log_softmax(self.unembed(h[:, -1]), dim=-1)


def modadd_data(p: int = 113, n_train: int = 4000, n_test: int = 2000, seed: int = 43):
    """Pairs a >= b, as the reference uses them, split at random: (X_train, y_train, X_test, y_test)."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    keep = a >= b
    a, b = a[keep], b[keep]
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    y = (a + b) % p
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = min(n_train, len(x) - 1)
    n_test = min(n_test, len(x) - n_train)
    tr, te = perm[:n_train], perm[n_train: n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


class TinyCNN(nn.Module):
    """Two conv layers without BatchNorm, global average pooling, a linear head."""

    def __init__(self, in_ch: int = 1, classes: int = 3, width: int = 4, act: str = "gelu"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.act = ACTIVATIONS[act]()
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x))
        h = self.act(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))
