"""The peer check: Hugging Face transformers' greedy generation and logits on the same
weights, for comparison with shardserve's outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reference:
    token_ids: list[int]
    logprobs: torch.Tensor  # [steps, vocab] log-softmax of raw logits, float32


def load_hf_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.generation_config.eos_token_id = None  # run the full length, like ignore_eos
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, max_new_tokens: int, *, input_ids=None, inputs_embeds=None) -> Reference:
    """`generate` from token ids or from inputs_embeds ((seq, hidden) or (1, seq, hidden))."""
    kwargs = {}
    if input_ids is not None:
        kwargs["input_ids"] = torch.as_tensor([list(input_ids)])
        kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
    else:
        embeds = inputs_embeds if inputs_embeds.dim() == 3 else inputs_embeds[None]
        kwargs["inputs_embeds"] = embeds.to(model.dtype)
        kwargs["attention_mask"] = torch.ones(embeds.shape[:2], dtype=torch.long)
    out = model.generate(
        **kwargs,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    new_tokens = out.sequences[0, -max_new_tokens:].tolist()
    logprobs = torch.stack([torch.log_softmax(l[0].float(), dim=-1) for l in out.logits])
    return Reference(new_tokens, logprobs)


def embed_tokens(model, token_ids) -> torch.Tensor:
    """The model's own input embeddings of `token_ids`: (seq, hidden)."""
    with torch.inference_mode():
        return model.get_input_embeddings()(torch.as_tensor(list(token_ids))).detach().clone()
