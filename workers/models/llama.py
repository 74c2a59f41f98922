"""The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3) as one tensor-parallel
model with Hugging Face parameter names; ModelConfig flags select the differences.
Runs in each shard."""

from __future__ import annotations

import torch
from torch import nn

from workers.attention import Attention, AttentionMetadata
from workers.config import ModelConfig
from workers.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from workers.parallel import ProcessGroup
from workers.rotary import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


class LlamaMLP(nn.Module):
    """[N, H] -> gate_up (column) -> silu(gate) * up -> down (row, all_reduce) -> [N, H]."""

    def __init__(self, config: ModelConfig, pg: ProcessGroup, dtype, device):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size, size], pg, dtype, config.mlp_bias, device
        )
        self.down_proj = RowParallelLinear(size, config.hidden_size, pg, dtype, config.mlp_bias, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x), silu_and_mul=True)


class LlamaAttention(nn.Module):
    """[N, H] -> qkv (column; this rank's heads) -> [q/k norm] -> RoPE and the K/V cache
    write (one kernel on CUDA) -> paged attention -> o_proj (row, all_reduce) -> [N, H]."""

    def __init__(self, config: ModelConfig, pg: ProcessGroup, dtype, device):
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            d,
            config.num_attention_heads,
            config.num_key_value_heads,
            pg,
            dtype,
            config.attention_bias,
            device,
        )
        heads, kv_heads = self.qkv_proj.num_local_heads, self.qkv_proj.num_local_kv_heads
        self.split_sizes = self.qkv_proj.local_sizes
        # Qwen2 biases only q/k/v; Llama's attention_bias also covers o_proj.
        o_bias = config.attention_bias and config.architecture != "Qwen2ForCausalLM"
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size, pg, dtype, o_bias, device)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(d, config.rms_norm_eps, dtype, device)
        self.qk_norm = config.qk_norm
        self.attn = Attention(heads, kv_heads, d, config.sliding_window)
        self.head_shapes = ((heads, d), (kv_heads, d))

    def forward(
        self,
        hidden: torch.Tensor,
        rotary_emb: RotaryEmbedding,
        positions: torch.Tensor,
        kv_cache: KVCache,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        (heads, d), (kv_heads, _) = self.head_shapes
        q, k, v = self.qkv_proj(hidden).split(self.split_sizes, dim=-1)
        q = q.view(-1, heads, d)  # [N, heads, d]
        k = k.view(-1, kv_heads, d)
        v = v.view(-1, kv_heads, d)
        if self.qk_norm:  # Qwen3: RMSNorm per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(q, k, v, kv_cache, attn_metadata, rotary=(rotary_emb, positions))  # [N, heads, d]
        return self.o_proj(out.reshape(-1, heads * d))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block, in HF's order of operations and roundings."""

    def __init__(self, config: ModelConfig, pg: ProcessGroup, dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(config, pg, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(config, pg, dtype, device)

    def forward(self, hidden, residual, rotary_emb, positions, kv_cache, attn_metadata):
        """(hidden, residual) -> (hidden, residual), the residual add deferred into the
        next norm: the layer's output is hidden + residual (residual None: layer 0)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rotary_emb, positions, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm; `rotary_emb` holds one cos/sin table."""

    def __init__(self, config: ModelConfig, pg: ProcessGroup, dtype, device):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, pg, dtype, device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, pg, dtype, device) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            dtype,
            device,
        )

    def forward(self, input_ids, positions, attn_metadata, kv_caches, input_embeds=None, embeds_mask=None):
        if input_embeds is not None and embeds_mask is None:
            # Every row is a prompt-embedding row: no lookup (at TP > 1, no all-reduce of it).
            # Read only: the tensor may be the request's own embeddings.
            hidden = input_embeds
        else:
            hidden = self.embed_tokens(input_ids)  # [N, H]
        if embeds_mask is not None:
            # Prompt-embedding rows replace the token embedding; no data-dependent branching.
            hidden = torch.where(embeds_mask.unsqueeze(-1), input_embeds, hidden)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, self.rotary_emb, positions, kv_cache, attn_metadata)
        return self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """The model plus the vocab-parallel LM head (tied to the embedding when configured).

    forward(...) -> hidden [N, H] after the final norm; compute_logits(hidden [M, H]) ->
    float32 [M, vocab_size] on rank 0, None on other ranks.
    """

    # HF checkpoint module -> (our packed module, shard id its weight_loader takes)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, pg: ProcessGroup, dtype: torch.dtype, device=None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, pg, dtype, device)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, pg, dtype, device, tied_embedding=tied
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: list[KVCache],
        input_embeds: torch.Tensor | None = None,
        embeds_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_embeds [N, H] replaces the token embedding where embeds_mask [N] is True,
        or on every row when embeds_mask is None (never written to)."""
        if embeds_mask is not None and input_embeds is None:
            raise ValueError("embeds_mask needs input_embeds")
        return self.model(input_ids, positions, attn_metadata, kv_caches, input_embeds, embeds_mask)

    def compute_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden_rows)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with a sliding attention window (config.sliding_window)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v biases (config.attention_bias)."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with per-head q/k RMSNorm before RoPE (config.qk_norm) and explicit head_dim."""
