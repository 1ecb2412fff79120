#!/usr/bin/env python3
"""Drive the gateway's edge with the official `openai` (Responses API) and `anthropic`
(Messages API) packages, used unmodified.

Usage: apis_client_check.py EDGE_URL [--api-key KEY] [--settle-on-stdin]

Asks each form three times (plain, `stream=True`, and `client.messages.stream(...)`), each form
once after the other for the same body (cross-form), the never-cached Responses requests, and
bad input; prints one JSON summary line, `{"summary": {...}}`, for the end-to-end test
(tests/tests/e2e/apis_client.rs) to assert on. It asserts nothing itself. Settles between
requests like openai_client_check.py.
"""

import argparse
import json
import sys
import time

import anthropic
import openai

RESPONSES_MODEL = "gpt-4o-mini"
MESSAGES_MODEL = "claude-haiku-4-5"


def headers_of(headers):
    return {
        "x_cache": headers.get("x-cache"),
        "x_cache_layer": headers.get("x-cache-layer"),
        "cache_status": headers.get("cache-status"),
    }


class Gateway:
    def __init__(self, edge_url, api_key, settle_on_stdin):
        base = edge_url.rstrip("/")
        # max_retries=0: a failure must surface, not be retried away.
        self.openai = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=30.0)
        self.anthropic = anthropic.Anthropic(base_url=base, api_key=api_key, max_retries=0, timeout=30.0)
        self.settle_on_stdin = settle_on_stdin
        self.unsettled = 0
        self.total = 0

    def sent(self):
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

    # --- OpenAI Responses API -------------------------------------------------------------

    def response(self, prompt, **extra):
        self.sent()
        raw = self.openai.responses.with_raw_response.create(
            model=RESPONSES_MODEL, input=prompt, store=False, temperature=0, **extra
        )
        parsed = raw.parse()
        return {
            **headers_of(raw.headers),
            "text": parsed.output_text,
            "usage": parsed.usage.model_dump() if parsed.usage else None,
        }

    def response_stream(self, prompt):
        self.sent()
        raw = self.openai.responses.with_raw_response.create(
            model=RESPONSES_MODEL, input=prompt, store=False, temperature=0, stream=True
        )
        text, usage, types = "", None, []
        for event in raw.parse():
            types.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type == "response.completed":
                usage = event.response.usage.model_dump()
        return {**headers_of(raw.headers), "text": text, "usage": usage, "events": len(types),
                "first": types[0] if types else None, "last": types[-1] if types else None}

    # --- Anthropic Messages API -----------------------------------------------------------

    def message(self, prompt):
        self.sent()
        raw = self.anthropic.messages.with_raw_response.create(
            model=MESSAGES_MODEL, max_tokens=64, messages=[{"role": "user", "content": prompt}]
        )
        parsed = raw.parse()
        return {
            **headers_of(raw.headers),
            "text": "".join(b.text for b in parsed.content if b.type == "text"),
            "usage": {"input_tokens": parsed.usage.input_tokens, "output_tokens": parsed.usage.output_tokens},
            "stop_reason": parsed.stop_reason,
        }

    def message_stream_raw(self, prompt):
        """`client.messages.create(stream=True)`: the raw events."""
        self.sent()
        raw = self.anthropic.messages.with_raw_response.create(
            model=MESSAGES_MODEL, max_tokens=64, messages=[{"role": "user", "content": prompt}], stream=True
        )
        text, input_tokens, output_tokens, stop = "", None, None, None
        for event in raw.parse():
            if event.type == "message_start":
                input_tokens = event.message.usage.input_tokens
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
            elif event.type == "message_delta":
                output_tokens = event.usage.output_tokens
                stop = event.delta.stop_reason
        return {**headers_of(raw.headers), "text": text, "stop_reason": stop,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}

    def message_stream_helper(self, prompt):
        """`client.messages.stream(...)`: the SDK's accumulated final message."""
        self.sent()
        with self.anthropic.messages.stream(
            model=MESSAGES_MODEL, max_tokens=64, messages=[{"role": "user", "content": prompt}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
            headers = stream.response.headers
        return {**headers_of(headers), "text": text,
                "final_text": "".join(b.text for b in final.content if b.type == "text"),
                "stop_reason": final.stop_reason,
                "usage": {"input_tokens": final.usage.input_tokens, "output_tokens": final.usage.output_tokens}}


def error_of(call):
    try:
        call()
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        return {"status": e.status_code, "body": e.body, "class": type(e).__name__}
    return {"status": 200}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("edge_url")
    parser.add_argument("--api-key", default="sk-dev-acme")
    parser.add_argument("--settle-on-stdin", action="store_true")
    args = parser.parse_args()
    g = Gateway(args.edge_url, args.api_key, args.settle_on_stdin)
    summary = {"openai_version": openai.__version__, "anthropic_version": anthropic.__version__}

    def thrice(name, call, prompt):
        answers = []
        for _ in range(3):
            answers.append(call(prompt))
            g.settle()
        summary[name] = answers

    thrice("responses", g.response, "a question for the responses api")
    thrice("responses_stream", g.response_stream, "a streamed question for the responses api")
    thrice("messages", g.message, "a question for claude")
    thrice("messages_stream", g.message_stream_raw, "a streamed question for claude")
    thrice("messages_helper", g.message_stream_helper, "a question for the stream helper")

    # Cross-form: streamed then plain, and plain then streamed, for the same body.
    for name, first, second in [
        ("responses_stream_then_plain", g.response_stream, g.response),
        ("responses_plain_then_stream", g.response, g.response_stream),
        ("messages_stream_then_plain", g.message_stream_raw, g.message),
        ("messages_plain_then_stream", g.message, g.message_stream_raw),
    ]:
        prompt = f"cross-form {name}"
        a = first(prompt)
        g.settle()
        summary[name] = [a, second(prompt)]
        g.settle()

    # Never cached: asked twice each, both reach the provider.
    summary["previous_response_id"] = [g.response("continue", previous_response_id="resp_earlier") for _ in range(2)]
    summary["background"] = [g.response("in the background", background=True) for _ in range(2)]
    g.settle()

    summary["bad_responses"] = error_of(lambda: g.openai.responses.create(model=RESPONSES_MODEL, input=7))
    summary["bad_messages"] = error_of(lambda: g.anthropic.messages.create(
        model=MESSAGES_MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}]))
    summary["messages_unknown_key"] = error_of(lambda: anthropic.Anthropic(
        base_url=args.edge_url.rstrip("/"), api_key="sk-nobody", max_retries=0).messages.create(
        model=MESSAGES_MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}]))
    summary["requests"] = g.total
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
