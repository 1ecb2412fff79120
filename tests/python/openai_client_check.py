#!/usr/bin/env python3
"""Drive the gateway's edge with the official `openai` package, used unmodified.

Usage: openai_client_check.py EDGE_URL [--api-key KEY] [--settle-on-stdin]

Asks chat completions (plain and streamed, with and without usage) and embeddings through
`base_url = EDGE_URL/v1`, and prints one JSON summary line, `{"summary": {...}}`, for the
end-to-end test (tests/tests/e2e/openai_client.rs) to assert on. It asserts nothing itself.

The gateway writes its caches after answering, so between steps the script settles: with
--settle-on-stdin it prints `{"settle": N}` (N: requests sent since the last settle) and waits
for a line on stdin, which the test sends once both tiers are idle; otherwise it sleeps briefly.
"""

import argparse
import json
import sys
import time

import openai
from openai import OpenAI

MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"


class Gateway:
    def __init__(self, edge_url, api_key, settle_on_stdin):
        # max_retries=0: a failure must surface, not be retried away.
        self.client = OpenAI(
            base_url=f"{edge_url.rstrip('/')}/v1",
            api_key=api_key,
            max_retries=0,
            timeout=30.0,
        )
        self.settle_on_stdin = settle_on_stdin
        self.unsettled = 0
        self.total = 0

    def _sent(self):
        self.unsettled += 1
        self.total += 1

    def settle(self):
        if self.settle_on_stdin:
            print(json.dumps({"settle": self.unsettled}), flush=True)
            if not sys.stdin.readline():
                sys.exit("settle: stdin closed")
        else:
            time.sleep(0.5)
        self.unsettled = 0

    def chat(self, prompt):
        self._sent()
        raw = self.client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}]
        )
        completion = raw.parse()
        return {
            **cache_headers(raw),
            "id": completion.id,
            "content": completion.choices[0].message.content,
            "finish_reason": completion.choices[0].finish_reason,
        }

    def chat_stream(self, prompt, include_usage):
        self._sent()
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        raw = self.client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            **extra,
        )
        deltas, ids, finish_reason, usage, chunks = [], set(), None, None, 0
        for chunk in raw.parse():
            chunks += 1
            ids.add(chunk.id)
            if chunk.choices:
                choice = chunk.choices[0]
                if choice.delta.content:
                    deltas.append(choice.delta.content)
                finish_reason = choice.finish_reason or finish_reason
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
        return {
            **cache_headers(raw),
            "content_type": raw.headers.get("content-type"),
            "ids": sorted(ids),
            "content": "".join(deltas),
            "chunks": chunks,
            "finish_reason": finish_reason,
            "usage": usage,
        }

    def embedding(self, text):
        self._sent()
        # The client asks for base64 and decodes it itself, as it does for every caller.
        raw = self.client.embeddings.with_raw_response.create(model=EMBEDDING_MODEL, input=text)
        result = raw.parse()
        vector = list(result.data[0].embedding)
        return {**cache_headers(raw), "length": len(vector), "vector": vector}


def cache_headers(raw):
    return {
        "x_cache": raw.headers.get("x-cache"),
        "x_cache_layer": raw.headers.get("x-cache-layer"),
        "x_cache_key": raw.headers.get("x-cache-key"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("edge_url")
    parser.add_argument("--api-key", default="sk-dev-acme")
    parser.add_argument("--settle-on-stdin", action="store_true")
    args = parser.parse_args()
    gw = Gateway(args.edge_url, args.api_key, args.settle_on_stdin)

    # One prompt asked plainly three times (provider, origin, edge), then streamed from the cache.
    chat = []
    for _ in range(3):
        chat.append(gw.chat("a question from the official client"))
        gw.settle()
    stream = gw.chat_stream("a question from the official client", include_usage=False)
    stream_usage = gw.chat_stream("a question from the official client", include_usage=True)

    # Another prompt streamed first (live from the provider), then asked plainly.
    stream_first = gw.chat_stream("streamed before it was cached", include_usage=True)
    gw.settle()
    chat_after_stream = gw.chat("streamed before it was cached")

    embeddings = []
    for _ in range(3):
        embeddings.append(gw.embedding("embed me through the edge"))
        gw.settle()

    summary = {
        "openai_version": openai.__version__,
        "requests": gw.total,
        "chat": chat,
        "stream": stream,
        "stream_usage": stream_usage,
        "stream_first": stream_first,
        "chat_after_stream": chat_after_stream,
        "embeddings": embeddings,
    }
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
