"""Teacher completions for a prompt set, written as an SFT data set the registry loads.

    python scripts/ai_completions.py --prompts sharegpt:/data/sharegpt.json --split train \\
        --base-url https://api.openai.com/v1 --model gpt-4o-mini --api-key-env OPENAI_API_KEY \\
        --out-dir teacher/ --concurrency 16
    python train.py loss=sft datasets=[json:teacher/sft.jsonl]

--prompts is a registry dataset spec (its --split prompts) or a JSON/JSONL prompt file. Each
prompt ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:") is sent to the
teacher's chat endpoint as its turns. Requests run concurrently with retries and backoff; each
answer is appended (fsync'd) to OUT_DIR/results.jsonl, so rerunning the command after a crash
resumes where it stopped. OUT_DIR/sft.jsonl holds canonical rows {prompt, responses, pairs: [],
sft_target} (`datasets=[json:OUT_DIR/sft.jsonl]`); failed prompts are listed in
OUT_DIR/summary.json, never filled in. The API key comes from the environment only.
"""

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.checkpoints import atomic_write_text  # noqa: E402
from harness.feedback.openai_client import (GaveUp, OpenAIClient, RetryableError,  # noqa: E402
                                            add_client_args, choice_of, client_from_args,
                                            default_key_env, usage_of)
from harness.feedback.results_log import FAILED, ResultsLog, fingerprint, run_resumable  # noqa: E402
from harness.feedback.sample_files import load_prompt_set  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="dataset spec or prompt file")
    p.add_argument("--split", default="train")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible base URL")
    p.add_argument("--model", required=True, help="teacher model name at the endpoint")
    p.add_argument("--system", default="", help="system message sent before each prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    add_client_args(p, timeout=120.0)  # key, organisation, project, headers, Azure, retries
    p.add_argument("--retry-failed", action="store_true")
    p.add_argument("--price-input", type=float, default=0.0, help="$ per 1M prompt tokens")
    p.add_argument("--price-output", type=float, default=0.0, help="$ per 1M completion tokens")
    args = p.parse_args(argv)
    default_key_env(args)
    return args


def messages_of(prompt: str, system: str = "") -> list[dict]:
    """Chat messages from a dialogue prompt; a prompt without the markers is one user turn."""
    body = prompt[:-len("\n\nAssistant:")] if prompt.endswith("\n\nAssistant:") else prompt
    parts = re.split(r"\n\n(Human|Assistant): ", body)
    messages = [{"role": "system", "content": system}] if system else []
    if parts[0].strip() or len(parts) == 1:  # text before the first marker
        messages.append({"role": "user", "content": parts[0]})
    for role, text in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": text})
    return messages


def teacher_work(client: OpenAIClient, args):
    def ask(c, messages):
        answer = c.chat(args.model, messages, max_tokens=args.max_tokens,
                        temperature=args.temperature)
        choice = choice_of(answer)
        text = (choice.get("message") or {}).get("content")
        if not isinstance(text, str) or not text.strip():
            raise RetryableError(f"garbage answer: no completion text in {str(choice)[:80]!r}")
        return text, choice.get("finish_reason"), usage_of(answer)

    def work(prompt, on_retry):
        try:
            (text, finish, usage), attempts = client.call(
                lambda c: ask(c, messages_of(prompt, args.system)), on_retry)
        except GaveUp as e:
            return FAILED, {"prompt": prompt, "errors": e.errors}
        return "ok", {"prompt": prompt, "completion": text, "finish_reason": finish,
                      "prompt_tokens": usage[0], "completion_tokens": usage[1], "attempts": attempts}
    return work


def main(argv=None):
    args = parse_args(argv)
    prompts = load_prompt_set(args.prompts, args.split)[:args.max_prompts]
    out = Path(args.out_dir)
    client = client_from_args(args, args.base_url)
    config = {"teacher": args.model, "system": args.system, "max_tokens": args.max_tokens,
              "temperature": args.temperature}
    keys = [hashlib.sha256(p.encode("utf-8")).hexdigest()[:16] for p in prompts]
    with ResultsLog(str(out / "results.jsonl"), fingerprint(config)) as log:
        todo = [(k, p) for k, p in zip(keys, prompts) if not log.done(k, args.retry_failed)]
        print(f"{len(prompts)} prompts: {len(prompts) - len(todo)} already answered, {len(todo)} to do")
        stats = run_resumable(todo, teacher_work(client, args), log, args.concurrency, "teacher")
        records = [log.records.get(k) for k in keys]
    rows, failed = [], []
    for prompt, record in zip(prompts, records):
        if record is None or record["status"] == FAILED:
            failed.append({"prompt": prompt[:200], "errors": (record or {}).get("errors", ["not run"])[-1:]})
            continue
        target = " " + record["completion"].lstrip(" ")  # responses start with one space
        rows.append({"prompt": prompt, "responses": [target], "pairs": [], "sft_target": target,
                     "teacher": args.model, "finish_reason": record["finish_reason"]})
    atomic_write_text(out / "sft.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tokens_in = sum(r.get("prompt_tokens", 0) for r in records if r)
    tokens_out = sum(r.get("completion_tokens", 0) for r in records if r)
    summary = {"teacher": args.model, "prompts": len(prompts), "completed": len(rows),
               "failed": failed, "this_run": stats, "prompt_tokens": tokens_in,
               "completion_tokens": tokens_out,
               "cost_usd": round((tokens_in * args.price_input + tokens_out * args.price_output) / 1e6, 6)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
    print(f"{len(rows)} completions, {len(failed)} failed; tokens {tokens_in} in / {tokens_out} out, "
          f"cost ${summary['cost_usd']}; wrote {out / 'sft.jsonl'}")
    return summary


if __name__ == "__main__":
    main()
