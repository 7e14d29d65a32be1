"""The OpenAI client over the official SDK: Retry-After in every form, Azure, a proxy, the
organisation / project / custom headers, connection reuse, max_completion_tokens, redaction."""

import email.utils
import json
import sys
import time

import pytest

from fake_endpoints import chat_answer, fake_endpoint, forward_proxy
from harness.feedback.openai_client import (GaveUp, OpenAIClient, RetryPolicy, client_from_args,
                                            parse_headers, parse_retry_after)
from harness.feedback.redaction import REDACTED, redact, register_secret
from serving_helpers import ROOT, running_server, toy_judge, write_samples

sys.path.insert(0, str(ROOT / "scripts"))
import label_ai_preferences as labeller  # noqa: E402

USER = [{"role": "user", "content": "Which is better?"}]


def test_retry_after_in_every_form():
    now = time.time()
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(now + 300, usegmt=True)  # whole seconds: 299 < wait <= 300
    assert 299 < parse_retry_after({"retry-after": date}, now=now) <= 300
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}) == 0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_redaction_of_keys_and_credential_headers():
    register_secret("sk-test-redact-me-0123")
    text = ("echo: {'authorization': 'Bearer sk-test-redact-me-0123', 'api-key': 'azure-456', "
            "'x-api-key': 'other'} Proxy-Authorization: Basic dXNlcjpw bearer tok.en and "
            "sk-test-redact-me-0123 again")
    out = redact(text)
    for secret in ("sk-test-redact-me-0123", "azure-456", "other", "dXNlcjpw", "tok.en"):
        assert secret not in out
    assert out.count(REDACTED) == 6
    assert redact("authorization header missing; api_key_env: KEY") == \
        "authorization header missing; api_key_env: KEY"


def judge_answers(request):
    return 200, chat_answer("A"), {}


def test_azure_endpoint_gets_deployment_paths_api_version_and_the_api_key_header(tmp_path,
                                                                                 monkeypatch):
    samples = write_samples(tmp_path / "s.jsonl", 1)
    monkeypatch.setenv("AZ_KEY", "azure-key-0123456789")
    with fake_endpoint(judge_answers) as (server, root):
        summary = labeller.main([
            "--samples", str(samples), "--out-dir", str(tmp_path / "out"), "--judge", "llm",
            "--judge-base-url", root, "--judge-model", "my-deployment", "--api-version",
            "2024-10-21", "--api-key-env", "AZ_KEY"])
    assert summary["win_rate_output_2"]["n"] == 1
    for request in server.requests:
        assert request["path"] == ("/openai/deployments/my-deployment/chat/completions"
                                   "?api-version=2024-10-21")
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert headers["api-key"] == "azure-key-0123456789" and "authorization" not in headers


def test_a_proxy_from_the_environment_carries_the_requests(tmp_path, monkeypatch):
    """HTTP_PROXY as the SDK's httpx client reads it: the judge's host need not even resolve."""
    samples = write_samples(tmp_path / "s.jsonl", 4)
    with running_server({"judge": toy_judge()}) as (state, url), forward_proxy(url) as (proxy, purl):
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", purl)
        summary = labeller.main([
            "--samples", str(samples), "--out-dir", str(tmp_path / "out"), "--judge", "llm",
            "--judge-base-url", "http://judge.invalid:8000/v1", "--judge-model", "judge",
            "--template", "toy", "--max-attempts", "1"])
    assert summary["this_run"]["done"] == 8 and summary["this_run"]["failed"] == 0
    assert proxy.relayed.count("POST judge.invalid:8000/v1/chat/completions") == 8
    assert sum(state.requests_per_body.values()) == 8


def test_organisation_project_custom_headers_and_one_reused_connection(monkeypatch):
    monkeypatch.setenv("TEAM_TOKEN", "team-secret-9876")

    class Args:
        api_key_env, organization, project = None, "org-1", "proj-2"
        header = ["X-Team=blue", "X-Team-Token=env:TEAM_TOKEN"]
        api_version, token_limit_param = None, "auto"
        max_attempts, timeout, backoff, backoff_max = 2, 10.0, 0.0, 0.0
    with fake_endpoint(judge_answers) as (server, root):
        client = client_from_args(Args, root + "/v1")
        for _ in range(5):
            assert client.chat("m", USER, max_tokens=1)["choices"][0]["message"]["content"] == "A"
    headers = {k.lower(): v for k, v in server.requests[0]["headers"].items()}
    assert headers["openai-organization"] == "org-1" and headers["openai-project"] == "proj-2"
    assert headers["x-team"] == "blue" and headers["x-team-token"] == "team-secret-9876"
    assert len({r["port"] for r in server.requests}) == 1  # keep-alive: one TCP connection
    assert REDACTED in redact("the token team-secret-9876")  # header secrets are redacted too
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_headers(["no-equals-sign"])


def test_max_completion_tokens_when_the_endpoint_refuses_max_tokens():
    refusal = {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with "
                                    "this model. Use 'max_completion_tokens' instead.",
                         "type": "invalid_request_error", "param": "max_tokens"}}

    def newer_model(request):
        return (400, refusal, {}) if "max_tokens" in request["body"] else \
            (200, chat_answer("B"), {})
    with fake_endpoint(newer_model) as (server, root):
        client = OpenAIClient(root + "/v1", policy=RetryPolicy(1, 10.0, 0.0, 0.0))
        assert client.call(lambda c: c.chat("m", USER, max_tokens=4))[1] == 1  # one attempt
        client.chat("m", USER, max_tokens=4)
        fixed = OpenAIClient(root + "/v1", policy=RetryPolicy(1, 10.0, 0.0, 0.0),
                             token_limit="max_tokens")
        with pytest.raises(GaveUp, match="max_completion_tokens"):
            fixed.call(lambda c: c.chat("m", USER, max_tokens=4))
    bodies = [r["body"] for r in server.requests]
    assert [("max_tokens" in b, b.get("max_completion_tokens")) for b in bodies] == \
        [(True, None), (False, 4), (False, 4), (True, None)]  # then straight to the new name


def test_errors_and_answers_are_redacted_before_anything_sees_them(monkeypatch):
    """A server (or proxy) that echoes the request headers: the key never leaves the client."""
    key = "sk-planted-2b7e151628aed2a6"
    monkeypatch.setenv("ECHO_KEY", key)
    from harness.feedback.openai_client import api_key_from_env
    api_key_from_env("ECHO_KEY")

    def echo(request):
        dump = json.dumps(request["headers"])
        if request["body"]["messages"][0]["content"] == "fail":
            return 500, f"upstream error, your request: {dump}".encode(), {}
        return 200, chat_answer(f"A {dump}"), {}
    with fake_endpoint(echo) as (_, root):
        client = OpenAIClient(root + "/v1", key, RetryPolicy(2, 10.0, 0.0, 0.0))
        answer = client.chat("m", USER, max_tokens=1)
        with pytest.raises(GaveUp) as info:
            client.call(lambda c: c.chat("m", [{"role": "user", "content": "fail"}]))
    assert key not in json.dumps(answer) and REDACTED in answer["choices"][0]["message"]["content"]
    assert key not in str(info.value) and all(key not in e for e in info.value.errors)
    assert "HTTP 500" in info.value.errors[0] and REDACTED in info.value.errors[0]
    assert key not in repr(client)
