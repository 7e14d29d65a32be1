"""scripts/serve.py through the official `openai` client on loopback: streaming and not, n,
logprobs, stop strings that end generation, seeds independent of batch-mates, content parts,
the developer role, models.retrieve, the 400s for what it does not support, 64 clients at once."""

import sys
import threading
import time

import openai
import pytest

from harness.checkpoints import REPO_ROOT
from harness.feedback.serving import ModelBackend
from harness.models.modeling import load_checkpoint
from serving_helpers import ROOT, running_server, toy_judge

sys.path.insert(0, str(ROOT / "scripts" / "bench"))
from bench_serve import concurrent_requests  # noqa: E402

PROMPT = "\n\nHuman: Write a positive review of the cafe for Anna.\n\nAssistant:"
USER = [{"role": "user", "content": "Tell Ben something negative about the movie."}]


@pytest.fixture(scope="module")
def server():
    model, tok = load_checkpoint(str(REPO_ROOT / "assets" / "tiny_model"))
    backends = {"tiny": ModelBackend("tiny", model, tok, max_new_tokens=64), "judge": toy_judge()}
    # the batcher waits up to 0.2 s for company, so requests sent together share a batch
    with running_server(backends, max_new_tokens=64, wait_s=0.2) as (state, url):
        yield state, openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)


def forward_calls(model):
    """A counter of the model's forward passes (a hook; remove it after)."""
    calls = []
    return calls, model.register_forward_hook(lambda *_: calls.append(1))


def test_chat_stream_gives_the_same_text_as_no_stream_and_usage_last(server):
    _, client = server
    kwargs = dict(model="tiny", messages=USER, max_tokens=24, seed=3, temperature=1.0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(chunks) > 3  # token by token
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(**kwargs, stream=True))  # no usage unless asked
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)


def test_completions_stream_with_n_streams_each_choice(server):
    _, client = server
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=16, n=2, seed=5)
    whole = client.completions.create(**kwargs)
    texts = {0: "", 1: ""}
    for c in client.completions.create(**kwargs, stream=True):
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == {c.index: c.text for c in whole.choices}
    assert texts[0] != texts[1]  # two draws, not one twice


def test_logprobs_and_n_through_the_client(server):
    _, client = server
    out = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, n=3,
                                         logprobs=True, top_logprobs=2, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice in out.choices:
        tokens = choice.logprobs.content
        assert "".join(t.token for t in tokens) == choice.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    comp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, logprobs=2,
                                     echo=True, temperature=0)
    assert comp.choices[0].text.startswith(PROMPT) and comp.choices[0].logprobs.token_logprobs[0] is None


def test_stop_strings_end_generation_and_usage_counts_kept_tokens(server):
    state, client = server
    tiny = state.backends["tiny"]
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=48, seed=11)
    calls, hook = forward_calls(tiny.model)
    try:
        full = client.completions.create(**kwargs)
        steps_full = len(calls)
        text = full.choices[0].text
        stop = text[len(text) // 3:len(text) // 3 + 3]
        calls.clear()
        cut = client.completions.create(**kwargs, stop=[stop, "never-there"])
        steps_cut = len(calls)
    finally:
        hook.remove()
    choice = cut.choices[0]
    assert choice.text == text[:text.index(stop)] and choice.finish_reason == "stop"
    # the same keyed draw up to the stop: the tokens kept are those until the stop was complete
    kept = len(tiny.tok(text[:text.index(stop) + len(stop)], add_special_tokens=False)["input_ids"])
    assert abs(cut.usage.completion_tokens - kept) <= 1
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    assert steps_cut < steps_full  # generation ended there, it was not cut afterwards
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(**kwargs, stop=[stop], stream=True) if c.choices)
    assert streamed == choice.text  # the held-back start of the stop string is never sent


def test_a_seed_gives_the_same_sample_alone_and_in_a_batch(server):
    state, client = server
    alone = client.chat.completions.create(model="tiny", messages=USER, max_tokens=16, seed=42,
                                           top_p=0.9).choices[0].message.content
    results, barrier = {}, threading.Barrier(6)

    def ask(i):
        barrier.wait()
        messages = USER if i == 0 else [{"role": "user", "content": f"Say hi to Ben {i} times."}]
        results[i] = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=16, seed=42 if i == 0 else i,
            top_p=0.9).choices[0].message.content
    before = state.batcher.largest_batch
    state.batcher.largest_batch = 0
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state.batcher.largest_batch > 1, "the six requests must have shared a batch"
    state.batcher.largest_batch = max(before, state.batcher.largest_batch)
    assert results[0] == alone


def test_content_parts_and_the_developer_role(server):
    _, client = server
    greedy = dict(model="tiny", max_tokens=10, temperature=0)
    parts = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Tell Ben"}, {"type": "text", "text": "about the movie."}]}], **greedy)
    joined = client.chat.completions.create(
        messages=[{"role": "user", "content": "Tell Ben\nabout the movie."}], **greedy)
    assert parts.choices[0].message.content == joined.choices[0].message.content
    dev = client.chat.completions.create(messages=[{"role": "developer", "content": "Be kind."},
                                                   *USER], **greedy)
    system = client.chat.completions.create(messages=[{"role": "system", "content": "Be kind."},
                                                      *USER], **greedy)
    assert dev.choices[0].message.content == system.choices[0].message.content


def test_models_retrieve_and_errors_through_the_client(server):
    _, client = server
    assert client.models.retrieve("tiny").id == "tiny"
    assert [m.id for m in client.models.list()] == ["judge", "tiny"]
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.models.retrieve("gpt-9")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    refused = [
        (dict(messages=USER, tools=[tool]), "'tools' is not supported"),
        (dict(messages=USER, response_format={"type": "json_object"}), "response_format"),
        (dict(messages=USER, logprobs=True, stream=True), "with 'stream'"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "http://x/y.png"}}]}]), "only text parts"),
        (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "tool messages")]
    for kwargs, message in refused:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model="tiny", max_tokens=4, **kwargs)
    with pytest.raises(openai.BadRequestError, match="prompt 0 is empty"):
        client.completions.create(model="tiny", prompt="", max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="not found; available"):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=4)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices  # alive


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    tiny = server[0].backends["tiny"]
    # a backend that never ends before 64 tokens: only the client leaving can stop it early
    long = ModelBackend("long", tiny.model, tiny.tok, 64, {"min_new_tokens": 64})
    calls, hook = forward_calls(tiny.model)
    try:
        with running_server({"long": long}) as (_, url):
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
            stream = client.completions.create(model="long", prompt=PROMPT, max_tokens=64,
                                               seed=2, stream=True)
            next(iter(stream))
            stream.close()
            time.sleep(1.5)
            settled = len(calls)
            time.sleep(0.5)
            assert len(calls) == settled  # nothing more is generated for a client that left
    finally:
        hook.remove()
    assert settled < 48


def test_64_concurrent_clients_connect_without_resets():
    """64 clients released at once, each on fresh connections (scripts/bench/bench_serve.py
    measures the same with latencies, against the stdlib server this one replaced)."""
    with running_server({"judge": toy_judge()}) as (_, url):
        result = concurrent_requests(url, clients=64, per_client=3)
    assert result["requests"] == 192 and result["resets"] == 0 and result["non_200"] == 0, result
