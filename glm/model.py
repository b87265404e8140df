"""The General Language Model (Du et al., 2022): a pre-LN transformer with GLM's attention mask.

Read top to bottom: the attention mask, the attention implementations (CPU: SDPA with a
boolean mask; CUDA: FlexAttention with a block mask), the blocks, the model, the KV cache for
generation, and the FLOPs helpers used for MFU.

Inputs per token (see glm/objectives.py for how they are built):

* ``input_ids``: Part A (the text with spans replaced by mask tokens) then Part B (each span
  as ``<sop>`` + tokens);
* ``position_ids``: where the token belongs in Part A (Part B tokens: their mask's index);
* ``block_position_ids``: 0 in Part A, 1.. inside each Part B span.

And per sequence: ``sep`` (length of Part A) and ``lengths`` (Part A + Part B; the rest is
padding). Shapes below: B batch, T sequence, C width (d_model), nh heads, hs head size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm.config import ModelConfig

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# The attention mask: one rule, written once, used by every attention path.


def glm_mask_rule(q: Tensor, k: Tensor, sep: Tensor, length: Tensor) -> Tensor:
    """True where query position ``q`` may attend key position ``k``.

    Part A queries (q < sep) see all of Part A; Part B queries see all of Part A and Part B up
    to themselves. That is a causal mask whose first ``sep`` columns are fully open. Keys at
    or beyond ``length`` are padding and never attended (padding trails Part B, so for real
    queries the causal part already excludes it; the clause states it for every query). A
    padding query additionally sees itself, so its softmax row is never empty (no NaN),
    though its output is never used.
    """
    return ((k < sep) | (k <= q)) & ((k < length) | (k == q))


def dense_attention_mask(sep: Tensor, lengths: Tensor, T: int) -> Tensor:
    """The (B, 1, T, T) boolean mask for SDPA, built once per forward and shared by all layers."""
    idx = torch.arange(T, device=sep.device)
    q = idx.view(1, T, 1)
    k = idx.view(1, 1, T)
    return glm_mask_rule(q, k, sep.view(-1, 1, 1), lengths.view(-1, 1, 1)).unsqueeze(1)


class SDPAAttention:
    """Attention with an explicit boolean mask: the CPU path (and the reference on GPU)."""

    def __init__(self, sep: Tensor, lengths: Tensor, T: int, dropout: float = 0.0):
        self.mask = dense_attention_mask(sep, lengths, T)  # (B, 1, T, T)
        self.dropout = dropout

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=self.dropout)


_compiled_flex = None


def _flex_attention():
    """FlexAttention compiled once per process: uncompiled it materialises the full scores."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class FlexAttention:
    """GLM attention through FlexAttention: the CUDA path.

    The block mask skips 128x128 tiles that are fully masked (Part A queries against Part B
    keys, padding) and runs unmasked tiles without evaluating the rule, so no (T, T) mask is
    ever stored. Same rule as ``SDPAAttention``.
    """

    def __init__(self, sep: Tensor, lengths: Tensor, T: int, dropout: float = 0.0):
        from torch.nn.attention.flex_attention import create_block_mask

        if dropout > 0:
            raise NotImplementedError("FlexAttention path has no attention dropout; use SDPA")

        def mask_mod(b, h, q_idx, kv_idx):
            return glm_mask_rule(q_idx, kv_idx, sep[b], lengths[b])

        B = sep.shape[0]
        self.block_mask = create_block_mask(
            mask_mod, B, None, T, T, device=sep.device, _compile=True
        )

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _flex_attention()(q, k, v, block_mask=self.block_mask)


def make_attention(sep: Tensor, lengths: Tensor, T: int, dropout: float, impl: str):
    """Pick the attention implementation: "flex" on CUDA, "sdpa" elsewhere, unless forced."""
    if impl == "auto":
        impl = "flex" if sep.is_cuda and dropout == 0 else "sdpa"
    if impl == "flex":
        return FlexAttention(sep, lengths, T, dropout)
    if impl == "sdpa":
        return SDPAAttention(sep, lengths, T, dropout)
    raise ValueError(f"attention: unknown implementation {impl!r}")


# ---------------------------------------------------------------------------------------------
# The transformer.


class SelfAttention(nn.Module):
    """Multi-head self-attention; the mask lives in the ``attend`` callable passed in."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)  # residual projection: scaled init
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, attend, cache: LayerCache | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, S, hs): every key so far, this step's included
        y = attend(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GeLU -> C."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)  # residual projection: scaled init
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, attend, cache: LayerCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attend, cache)
        return x + self.mlp(self.ln_2(x))


class GLM(nn.Module):
    """GLM: token + position + block-position embeddings, pre-LN blocks, tied output layer."""

    def __init__(self, cfg: ModelConfig, attention: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.attention = attention  # "auto" (flex on CUDA, SDPA elsewhere), "flex" or "sdpa"
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)  # also the output projection
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)  # position in Part A
        self.wbe = nn.Embedding(cfg.max_block_len, cfg.d_model)  # position inside a span
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)
        # Each block adds two residual outputs; scaling them keeps the stream's variance flat
        # with depth (GPT-2 / GLM).
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=resid_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def make_attention(self, sep: Tensor, lengths: Tensor, T: int):
        """The attention callable shared by every layer of one forward pass."""
        dropout = self.cfg.dropout if self.training else 0.0
        return make_attention(sep, lengths, T, dropout, self.attention)

    def embed(self, input_ids: Tensor, position_ids: Tensor, block_position_ids: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, C): the three embeddings summed."""
        x = self.wte(input_ids) + self.wpe(position_ids) + self.wbe(block_position_ids)
        return self.drop(x)

    def output_logits(self, h: Tensor) -> Tensor:
        """(..., C) final hidden states -> (..., V) logits through the tied embedding."""
        return F.linear(h, self.wte.weight)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        block_position_ids: Tensor,
        sep: Tensor,
        lengths: Tensor,
        targets: Tensor | None = None,
        logits: Literal["all", "loss"] = "all",
    ) -> tuple[Tensor, Tensor | None]:
        """Run the model on a batch from ``glm.objectives.collate``.

        ``logits="all"`` returns (B, T, V) logits. ``logits="loss"`` (needs ``targets``) runs
        the output projection only on the N positions whose target is not -100 and returns
        their (N, V) logits in row-major order: the training fast path, since Part A carries
        no loss. The loss is the mean cross-entropy over those positions (None without
        targets).
        """
        B, T = input_ids.shape
        attend = self.make_attention(sep, lengths, T)
        x = self.embed(input_ids, position_ids, block_position_ids)  # (B, T, C)
        for block in self.blocks:
            x = block(x, attend)
        h = self.ln_f(x)  # (B, T, C)

        if logits == "all":
            out = self.output_logits(h)  # (B, T, V)
            loss = None
            if targets is not None:
                loss = F.cross_entropy(
                    out.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
                )
            return out, loss
        if logits == "loss":
            if targets is None:
                raise ValueError('logits="loss" needs targets')
            keep = targets != IGNORE_INDEX  # (B, T)
            out = self.output_logits(h[keep])  # (N, V)
            return out, F.cross_entropy(out.float(), targets[keep])
        raise ValueError(f'logits: expected "all" or "loss", got {logits!r}')

    # -- generation: Part A once, then Part B one token at a time --------------------------

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, lengths: Tensor, capacity: int) -> tuple[Tensor, KVCache]:
        """Encode Part A (B, T) with its bidirectional mask and start a KV cache.

        Part A rows are right-padded to T; ``lengths`` gives each row's real length (its
        ``sep``). The cache holds room for ``capacity`` keys per row (T + tokens to decode).
        Returns the (B, T, C) final hidden states (rarely needed) and the cache.
        """
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        blocks = torch.zeros_like(input_ids)
        cache = KVCache.empty(self.cfg, B, capacity, self.wte.weight)
        cache.valid[:, :T] = positions < lengths.view(B, 1)
        # Part A only: sep == length, so the rule opens every real Part A key to every query.
        attend = make_attention(lengths, lengths, T, 0.0, "sdpa")
        x = self.embed(input_ids, positions, blocks)
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x = block(x, attend, layer_cache)
        cache.length = T
        return self.ln_f(x), cache

    @torch.no_grad()
    def decode_step(
        self,
        token_ids: Tensor,
        position_ids: Tensor,
        block_position_ids: Tensor,
        cache: KVCache,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Feed one Part B token per row (B,) and return next-token logits (B, V).

        The token attends every valid cached key (all of Part A, earlier Part B tokens) and
        itself. ``keep`` (B,) bool says whose token later steps may attend; rows that are
        idle (their blank is done) pass False so their filler token stays invisible.
        """
        B = token_ids.shape[0]
        keep = torch.ones(B, dtype=torch.bool, device=token_ids.device) if keep is None else keep
        slot = cache.length
        cache.valid[:, slot] = keep
        key_mask = cache.valid[:, : slot + 1].clone()
        key_mask[:, slot] = True  # a row always sees itself, so no softmax row is empty

        def attend(q, k, v):  # q: (B, nh, 1, hs), k/v: (B, nh, S, hs)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask.view(B, 1, 1, -1))

        x = self.embed(token_ids.view(B, 1), position_ids.view(B, 1), block_position_ids.view(B, 1))
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x = block(x, attend, layer_cache)
        cache.length = slot + 1
        return self.output_logits(self.ln_f(x[:, 0]))  # (B, V)

    # -- sizes and cost --------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the three embedding tables."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.wte.weight.numel() + self.wpe.weight.numel() + self.wbe.weight.numel()
        return total


def count_params(cfg: ModelConfig, non_embedding: bool = True) -> int:
    """Parameter count of a GLM with this config, without building it."""
    C, L = cfg.d_model, cfg.n_layer
    per_block = (3 * C * C + 3 * C) + (C * C + C) + (8 * C * C + 5 * C) + 4 * C  # attn, mlp, 2 LN
    total = L * per_block + 2 * C  # + final LN
    if not non_embedding:
        total += (cfg.vocab_size + cfg.max_seq_len + cfg.max_block_len) * C
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per input position: 6·N + 12·L·C·T (PaLM appendix B / nanoGPT).

    N counts the non-embedding parameters plus the output projection (V·C; the tied table is
    a real matmul at the output even though the input lookup is free). 12·L·C·T is the
    attention score and value matmuls, forward and backward.
    """
    n = count_params(cfg) + cfg.vocab_size * cfg.d_model
    return 6 * n + 12 * cfg.n_layer * cfg.d_model * seq_len


# ---------------------------------------------------------------------------------------------
# KV cache for generation.


@dataclass
class LayerCache:
    """Keys and values of one layer: (B, nh, capacity, hs) each, filled up to ``owner.length``."""

    k: Tensor
    v: Tensor
    owner: KVCache

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's (B, nh, t, hs) keys/values and return all keys/values so far."""
        start = self.owner.length
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache full: capacity {self.k.shape[2]}, need {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class KVCache:
    """Per-layer keys/values plus which cached positions are real (B, capacity) bool."""

    layers: list[LayerCache]
    valid: Tensor
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, capacity: int, like: Tensor) -> KVCache:
        shape = (batch, cfg.n_head, capacity, cfg.head_dim)
        cache = cls([], torch.zeros(batch, capacity, dtype=torch.bool, device=like.device))
        for _ in range(cfg.n_layer):
            k = torch.zeros(shape, dtype=like.dtype, device=like.device)
            cache.layers.append(LayerCache(k, torch.zeros_like(k), cache))
        return cache
