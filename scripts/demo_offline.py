"""Offline demo on the built-in default model: text, token ids and prompt embeddings in
one LLM.generate call, on a tensor-parallel engine of Ray shard actors.

    python scripts/demo_offline.py [--tensor-parallel-size 2]
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM

from cluster import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: built-in tiny model)")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    args = parser.parse_args()

    with LLM(args.model, tensor_parallel_size=args.tensor_parallel_size,
             enable_prompt_embeds=True, max_model_len=512) as llm:
        tokenizer = llm.get_tokenizer()
        # Embeddings computed outside the engine, as a user would: the Hugging Face
        # model's input embedding of a chat-templated prompt.
        hf_model = AutoModelForCausalLM.from_pretrained(llm.config.model)
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Tell me about tensor parallelism."}],
            add_generation_prompt=True, return_tensors="pt", return_dict=True,
        )
        embeds = hf_model.get_input_embeddings()(chat["input_ids"]).detach()[0]
        prompts = [
            "The capital of France is",
            {"prompt_token_ids": tokenizer.encode("Ray actors hold the shards")},
            {"prompt_embeds": embeds},
        ]
        params = SamplingParams(temperature=0.0, max_tokens=24)
        for prompt, output in zip(["text", "token ids", "prompt embeds"], llm.generate(prompts, params)):
            sample = output.outputs[0]
            print(f"[{prompt:>13}] {output.num_prompt_tokens:3d} prompt tokens -> "
                  f"{len(sample.token_ids)} tokens ({sample.finish_reason}): {sample.text!r}")


if __name__ == "__main__":
    main()
