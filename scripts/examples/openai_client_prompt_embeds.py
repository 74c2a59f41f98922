"""Prompt embeddings over the OpenAI API: torch.save -> base64 -> the `prompt_embeds`
field of /v1/completions, sent with the official `openai` client.

    shardserve serve --tensor-parallel-size 2 --enable-prompt-embeds     # in another shell
    python scripts/examples/openai_client_prompt_embeds.py [--base-url http://127.0.0.1:8000/v1]

The embeddings are the model's own input embeddings of a chat-templated question, computed
with Hugging Face transformers from the model folder (default: the built-in tiny model);
the same question sent to /v1/chat/completions gets the same greedy answer.
"""

from __future__ import annotations

import argparse
import base64
import io

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.default_model import default_model_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    parser.add_argument("--model", default=None, help="served model name (default: the server's first)")
    parser.add_argument("--model-path", default=None, help="model folder for the embeddings (default: built-in)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--question", default="What does tensor parallelism split?")
    return parser.parse_args(argv)


def encode_embeds(tensor: torch.Tensor) -> str:
    """The wire format of `prompt_embeds`: base64 of torch.save of a (seq_len, hidden) tensor."""
    buffer = io.BytesIO()
    torch.save(tensor.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_embeddings(model_path: str, question: str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        return model.get_input_embeddings()(chat["input_ids"])[0].clone()


def main(argv=None) -> str:
    args = parse_args(argv)
    embeds = chat_embeddings(args.model_path or str(default_model_path()), args.question)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    completion = client.completions.create(
        model=model,
        prompt="",  # no text prompt: the embeddings are the prompt
        max_tokens=args.max_tokens,
        temperature=0.0,
        extra_body={"prompt_embeds": encode_embeds(embeds)},
    )
    choice = completion.choices[0]
    print(f"{model}: {completion.usage.prompt_tokens} embedding rows -> "
          f"{completion.usage.completion_tokens} tokens ({choice.finish_reason}): {choice.text!r}")
    streamed = client.completions.create(
        model=model, prompt="", max_tokens=args.max_tokens, temperature=0.0, stream=True,
        extra_body={"prompt_embeds": encode_embeds(embeds)},
    )
    text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
    print(f"streamed, same text: {text == choice.text}")
    # The same question as a chat message: the server applies the chat template itself.
    # Its tokens' embeddings are the rows sent above, so greedy decoding answers the same.
    chat = client.chat.completions.create(model=model, max_tokens=args.max_tokens, temperature=0.0,
                                          messages=[{"role": "user", "content": args.question}])
    print(f"as a chat message, same text: {chat.choices[0].message.content == choice.text}")
    return choice.text


if __name__ == "__main__":
    main()
