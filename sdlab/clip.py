r"""The CLIP ViT-L/14 text encoder: token ids (B, 77) -> contextual embeddings (B, 77, 768).

A pre-norm transformer with a causal mask (each token sees only the tokens before it):

$$x \leftarrow x + \operatorname{SelfAttention}(\operatorname{LN}_1(x)), \qquad
x \leftarrow x + W_2\, \operatorname{QuickGELU}(W_1 \operatorname{LN}_2(x)),$$

with $\operatorname{QuickGELU}(x) = x\,\sigma(1.702\,x)$. Stable Diffusion v1 conditions the U-Net on
the final layer-normed hidden states of *all* 77 positions (not the pooled embedding CLIP uses for
image-text matching).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .attention import SelfAttention
from .config import CLIPConfig
from .errors import ArgumentError


class CLIPEmbedding(nn.Module):
    """Token embedding plus a learned position embedding for each of the `n_token` positions."""

    def __init__(self, n_vocab: int, n_embd: int, n_token: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_embd)
        self.position_embedding = nn.Parameter(torch.zeros(n_token, n_embd))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (B, L) -> (B, L, n_embd)
        return self.token_embedding(tokens) + self.position_embedding[: tokens.shape[1]]


class CLIPLayer(nn.Module):
    """One pre-norm transformer layer: causal self-attention, then a QuickGELU MLP."""

    def __init__(self, n_head: int, n_embd: int, eps: float = 1e-5):
        super().__init__()
        self.layernorm_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attention = SelfAttention(n_head, n_embd)
        self.layernorm_2 = nn.LayerNorm(n_embd, eps=eps)
        self.linear_1 = nn.Linear(n_embd, 4 * n_embd)
        self.linear_2 = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, L, n_embd) throughout
        x = x + self.attention(self.layernorm_1(x), causal_mask=True)
        h = self.linear_1(self.layernorm_2(x))  # (B, L, 4 * n_embd)
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        return x + self.linear_2(h)


class CLIP(nn.Module):
    """The text encoder. `CLIP()` builds SD1.5's; pass a `CLIPConfig` for other sizes."""

    def __init__(self, config: CLIPConfig | None = None):
        super().__init__()
        self.config = config = config or CLIPConfig()
        self.embedding = CLIPEmbedding(config.n_vocab, config.n_embd, config.n_token)
        self.layers = nn.ModuleList(
            CLIPLayer(config.n_head, config.n_embd, config.layer_norm_eps) for _ in range(config.n_layer)
        )
        self.layernorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (B, L) int64 -> (B, L, n_embd)
        state = self.embedding(tokens.long())
        for layer in self.layers:
            state = layer(state)
        return self.layernorm(state)


def add_token_embeddings(clip: CLIP, vectors: torch.Tensor) -> list[int]:
    """Append rows (n, n_embd) to `clip`'s token embedding, for tokens added to the tokenizer
    (`CLIPTokenizer.add_tokens`); returns their ids, `n_vocab` on. The existing rows, and so the
    output for every prompt without a new token, stay bit for bit what they were."""
    table = clip.embedding.token_embedding
    if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or vectors.shape[1] != table.embedding_dim:
        shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ArgumentError(f"vectors must be a tensor (n, {table.embedding_dim}), one row per new token; got {shape}")
    first = table.num_embeddings
    with torch.no_grad():
        rows = torch.cat([table.weight.detach(), vectors.detach().to(table.weight)])  # (n_vocab + n, n_embd)
    table.weight = nn.Parameter(rows, requires_grad=table.weight.requires_grad)
    table.num_embeddings = rows.shape[0]
    clip.config = dataclasses.replace(clip.config, n_vocab=rows.shape[0])
    return list(range(first, rows.shape[0]))
