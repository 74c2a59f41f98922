"""Offline generation from prompt embeddings: a Hugging Face model's input embeddings of a
chat-templated prompt, fed to LLM.generate on a tensor-parallel engine of Ray shards.

    python scripts/examples/offline_prompt_embeds.py                     # built-in default model
    python scripts/examples/offline_prompt_embeds.py --model /models/Llama-3.2-1B-Instruct

The same chat is also sent as token ids: with greedy decoding both give the same text.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster import LLM, SamplingParams
from cluster.default_model import default_model_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: built-in tiny model)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--question", default="What does tensor parallelism split?")
    return parser.parse_args(argv)


def chat_embeddings(model_path: str, question: str) -> tuple[list[int], torch.Tensor]:
    """Token ids of the chat-templated question and their input embeddings (seq_len, hidden)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(chat["input_ids"])[0].clone()
    return chat["input_ids"][0].tolist(), embeds


def main(argv=None) -> list:
    args = parse_args(argv)
    model_path = args.model or str(default_model_path())
    token_ids, embeds = chat_embeddings(model_path, args.question)
    print(f"prompt_embeds: {tuple(embeds.shape)} {embeds.dtype}, from {len(token_ids)} chat tokens")
    with LLM(model_path, tensor_parallel_size=args.tensor_parallel_size, enable_prompt_embeds=True,
             max_model_len=args.max_model_len) as llm:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        outputs = llm.generate([{"prompt_embeds": embeds}, {"prompt_token_ids": token_ids}], params,
                               use_tqdm=False)
    for name, output in zip(["prompt_embeds", "token ids"], outputs):
        sample = output.outputs[0]
        print(f"[{name:>13}] {output.num_prompt_tokens} prompt tokens -> {len(sample.token_ids)} tokens "
              f"({sample.finish_reason}): {sample.text!r}")
    return outputs


if __name__ == "__main__":
    main()
