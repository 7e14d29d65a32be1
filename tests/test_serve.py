"""scripts/serve.py over real HTTP on loopback: endpoint schemas, logprobs, batching, 4xx."""

import threading

import pytest

from harness.checkpoints import REPO_ROOT
from harness.models.modeling import load_checkpoint
from harness.feedback.serving import ModelBackend
from serving_helpers import http, running_server, toy_judge

PROMPT = "\n\nHuman: Write a positive review of the cafe for Anna.\n\nAssistant:"


@pytest.fixture(scope="module")
def server():
    model, tok = load_checkpoint(str(REPO_ROOT / "assets" / "tiny_model"))
    backends = {"tiny": ModelBackend("tiny", model, tok, max_new_tokens=64), "judge": toy_judge()}
    with running_server(backends, max_new_tokens=64) as (srv, url):
        yield srv, url


def test_models_endpoint(server):
    _, url = server
    status, body = http(f"{url}/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["judge", "tiny"]
    assert all(m["object"] == "model" for m in body["data"])


def test_completions_schema_with_logprobs(server):
    _, url = server
    status, body = http(f"{url}/completions", {"model": "tiny", "prompt": [PROMPT, PROMPT[:30]],
                                               "max_tokens": 12, "n": 2, "logprobs": 3, "seed": 1})
    assert status == 200 and body["object"] == "text_completion" and len(body["choices"]) == 4
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + \
        body["usage"]["completion_tokens"]
    for i, choice in enumerate(body["choices"]):
        lp = choice["logprobs"]
        assert choice["index"] == i and choice["finish_reason"] in ("stop", "length")
        assert "".join(lp["tokens"]) == choice["text"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) \
            == len(lp["text_offset"])
        # a dict per position (OpenAI's schema): byte pieces decoding alike share one key
        assert all(1 <= len(alts) <= 3 for alts in lp["top_logprobs"])
        assert max(lp["token_logprobs"]) <= 0


def test_chat_schema_and_greedy_logprobs_are_the_models_argmax(server):
    _, url = server
    status, body = http(f"{url}/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Tell Ben something negative "
                                       "about the movie."}],
        "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 2})
    assert status == 200 and body["object"] == "chat.completion"
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["message"]["role"] == "assistant"
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    assert all(len(t["top_logprobs"]) == 2 for t in content)
    for t in content:  # greedy decoding picks the most likely token, so it heads top_logprobs
        assert t["top_logprobs"][0]["token"] == t["token"]
        assert t["top_logprobs"][0]["logprob"] == pytest.approx(t["logprob"])
        assert t["top_logprobs"][0]["logprob"] >= t["top_logprobs"][1]["logprob"]
        assert bytes(t["bytes"]).decode() == t["token"]


def test_seed_repeats_and_stop_cuts(server):
    _, url = server
    req = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "seed": 7}
    first, second = http(f"{url}/completions", req)[1], http(f"{url}/completions", req)[1]
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    text = first["choices"][0]["text"]
    stop = text.strip()[:3]
    cut = http(f"{url}/completions", {**req, "stop": [stop]})[1]["choices"][0]
    assert stop not in cut["text"] and cut["finish_reason"] == "stop"


def test_concurrent_requests_are_batched(server):
    # a server of its own whose batcher waits up to 0.5 s for company, so that six requests
    # released together are batched even on a loaded machine
    with running_server({"tiny": server[0].backends["tiny"]}, max_batch=6, wait_s=0.5) as (srv, url):
        results = []
        barrier = threading.Barrier(6)

        def client():
            barrier.wait()
            results.append(http(f"{url}/completions", {"model": "tiny", "prompt": PROMPT,
                                                       "max_tokens": 8, "temperature": 0}))
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [s for s, _ in results] == [200] * 6
    assert len({b["choices"][0]["text"] for _, b in results}) == 1  # greedy: same answer
    assert srv.batcher.largest_batch > 1 and srv.batcher.batches_run < 6


def test_scripted_judge_answers_from_the_gold_reward(server):
    _, url = server
    user = ("Request: Write a positive review of the cafe for Anna.\n\nReview A: The cafe was "
            "awful.\n\nReview B: The cafe was wonderful.\n\nWhich review is better? Answer with a "
            "single letter, A or B.")
    status, body = http(f"{url}/chat/completions", {"model": "judge", "logprobs": True,
                                                    "top_logprobs": 2,
                                                    "messages": [{"role": "user", "content": user}]})
    assert status == 200 and body["choices"][0]["message"]["content"] == "B"
    assert [t["token"] for t in body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]] == ["B", "A"]


@pytest.mark.parametrize("path, payload, status, message", [
    ("/completions", b"{not json", 400, "malformed JSON"),
    ("/completions", b"[1, 2]", 400, "JSON object"),
    ("/completions", {"prompt": "x"}, 400, "'model' is required"),
    ("/completions", {"model": "gpt-9", "prompt": "x"}, 404, "not found; available"),
    ("/completions", {"model": "tiny"}, 400, "'prompt' must be"),
    ("/completions", {"model": "tiny", "prompt": [1, 2]}, 400, "token-id prompts"),
    ("/completions", {"model": "tiny", "prompt": "word " * 600}, 400, "exceeds the context length"),
    ("/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "'max_tokens' must be in"),
    ("/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "must be a number"),
    ("/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "'top_p' must be in"),
    ("/completions", {"model": "tiny", "prompt": "x", "n": 99}, 400, "'n' must be in"),
    ("/completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "'logprobs' must be in"),
    ("/completions", {"model": "tiny", "prompt": "x", "best_of": 3}, 400, "not supported"),
    ("/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "'stop' must be"),
    ("/chat/completions", {"model": "tiny", "messages": []}, 400, "'messages' must be"),
    ("/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0]"),
    ("/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                           "top_logprobs": 2}, 400, "needs 'logprobs'"),
    ("/embeddings", {"model": "tiny"}, 404, "no route"),
])
def test_bad_input_gets_4xx_with_a_message(server, path, payload, status, message):
    _, url = server
    raw = payload if isinstance(payload, bytes) else None
    got, body = http(url + path, None if raw else payload, raw=raw, method="POST")
    assert got == status and message in body["error"]["message"]
    assert http(f"{url}/models")[0] == 200  # and the server lives on


def test_echo_scores_the_prompt_like_the_training_code(server):
    """lm-eval's loglikelihood requests: echo=true, max_tokens=0, logprobs=k."""
    from harness.models.generation import Sample, completion_token_logps
    srv, url = server
    text = PROMPT + " The cafe was lovely."
    status, body = http(f"{url}/completions", {"model": "tiny", "prompt": text, "echo": True,
                                               "max_tokens": 0, "logprobs": 1, "temperature": 0})
    assert status == 200
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text == "".join(lp["tokens"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    backend = srv.backends["tiny"]
    ids = backend.tok(text, add_special_tokens=False)["input_ids"]
    expected = completion_token_logps(backend.model, backend.tok,
                                      [Sample("", "", (ids[0],), tuple(ids[1:]), False)])[0]
    assert len(lp["token_logprobs"]) == len(ids)
    assert lp["token_logprobs"][1:] == pytest.approx(expected.tolist(), abs=1e-4)
    assert http(f"{url}/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0})[0] == 400


def test_chat_prompt_uses_the_tokenizers_template_when_it_has_one(server):
    import copy
    srv, _ = server
    plain = srv.backends["tiny"]
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert plain.chat_prompt(messages) == "Be kind.\n\nHuman: Hi\n\nAssistant:"
    tok = copy.deepcopy(plain.tok)
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    templated = ModelBackend("t", plain.model, tok)
    assert templated.chat_prompt(messages) == "<system>Be kind.<user>Hi<assistant>"


def test_a_failing_model_answers_500_and_the_server_lives_on(server):
    class Broken(ModelBackend):
        def generate(self, prompts, params, keys=None, sinks=None):
            raise RuntimeError("CUDA out of memory (simulated)")
    tiny = server[0].backends["tiny"]
    with running_server({"broken": Broken("broken", tiny.model, tiny.tok), "tiny": tiny}) as (_, url):
        status, body = http(f"{url}/completions", {"model": "broken", "prompt": "x", "max_tokens": 2})
        assert status == 500 and "CUDA out of memory" in body["error"]["message"]
        assert http(f"{url}/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})[0] == 200
