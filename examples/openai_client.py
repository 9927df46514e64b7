"""Call `kiln serve` with the official openai client (chat, streaming, plain completion).

    kiln serve ART --port 8000 &            # in another terminal
    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--api-key KEY]
"""
import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, max_tokens=48,
                                           messages=[{"role": "user", "content": "Name three sorting algorithms."}])
    print("chat:", reply.choices[0].message.content, f"({reply.usage.completion_tokens} tokens)")
    print("stream: ", end="")
    for chunk in client.chat.completions.create(model=model, max_tokens=32, stream=True,
                                                messages=[{"role": "user", "content": "Say hello."}]):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    done = client.completions.create(model=model, prompt="import numpy as np\n", max_tokens=16, temperature=0)
    print("completion:", repr(done.choices[0].text))


if __name__ == "__main__":
    main()
