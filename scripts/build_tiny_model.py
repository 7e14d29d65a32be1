"""Build the bundled tiny base model (tokenizer + 2-layer Llama) for the toy task.

    python scripts/build_tiny_model.py            # writes assets/tiny_model/ (~1-2 min on 2 CPUs)

The model is pretrained on the toy task's *base* distribution (harness/data/toy_task.py):
it learns the prompt format and the response language, but picks sentiment words at
random regardless of the request, so its gold reward is ~0 and SFT / DPO have room to
improve it. Everything is seeded, so rerunning gives the same tokenizer and weights
(up to float non-associativity across machines).
"""

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.data.tokens import pad_with_mask  # noqa: E402
from harness.data.toy_task import gold_reward, pretraining_corpus, toy_records  # noqa: E402

EOS, PAD = "<|endoftext|>", "<|pad|>"

# A little generic English so ordinary text (judge prompts, other data sets in tests)
# gets sensible merges too; byte-level BPE already guarantees that *any* text encodes.
GENERIC_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. It is a truth universally acknowledged that people who read a lot of books
tend to have opinions about them. What is the capital of France? Paris is the capital and
largest city of France. How do I make a cup of tea? Boil some water, pour it over the tea
leaves and wait three minutes. Thank you for your help! I think that answer is correct,
but could you explain why? Because the question asks for the number of days in a week,
and there are seven. Which response is more helpful, Response A or Response B? Output 1
is better than output 2. Summarize the following post in one sentence. I am not sure.
Yes, no, maybe. 0 1 2 3 4 5 6 7 8 9 10 100 2024. (a) [b] {c} "quoted" 'single' - _ / \\ @ # $ % & * + = < > ~ ^ |
"""


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, no prefix space) trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # EOS doubles as BOS (GPT-2 convention); PAD is separate so padding is never a target.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=PAD, clean_up_tokenization_spaces=False,
                                   model_max_length=512)


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def batches(ids: list[list[int]], batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled (input_ids, attention_mask, labels) batches, right-padded."""
    while True:
        order = list(range(len(ids)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = [ids[i] for i in order[start:start + batch_size]]
            input_ids, mask = pad_with_mask(rows, pad_id)
            yield input_ids, mask, input_ids.masked_fill(mask == 0, -100)


def pretrain(model, tokenizer, texts: list[str], args) -> None:
    """Plain next-token prediction on every token of prompt + response + EOS."""
    ids = [tokenizer(t + EOS, add_special_tokens=False)["input_ids"] for t in texts]
    data = batches(ids, args.batch_size, tokenizer.pad_token_id, random.Random(args.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_scale(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_scale)
    model.train()
    bar = tqdm(range(args.steps), desc="pretrain")
    for step in bar:
        input_ids, mask, labels = next(data)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    print(f"final pretraining loss {loss.item():.3f}")


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Temperature-1 samples (pure ancestral sampling: no top-k / top-p)."""
    tokenizer.padding_side = "left"  # generation continues from the right edge
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model, tokenizer, n: int, seed: int) -> dict:
    """Gold reward of the base model vs. the data set's SFT targets and random responses."""
    records = toy_records("test")
    prompts = list(records)[:n]
    torch.manual_seed(seed)
    completions = sample(model, tokenizer, prompts)
    mean = lambda xs: round(statistics.mean(xs), 3)  # noqa: E731
    return {
        "base_model": mean([gold_reward(p, c) for p, c in zip(prompts, completions)]),
        "sft_target": mean([gold_reward(p, r["sft_target"]) for p, r in records.items()]),
        "random_response": mean([gold_reward(p, x) for p, r in records.items()
                                 for x in r["responses"]]),
        "examples": list(zip(prompts[:3], completions[:3])),
    }


README = """\
# tiny_model: bundled base model for the toy task

A 2-layer Llama ({n_params:,} parameters, float32 safetensors) with a {vocab}-token
byte-level BPE tokenizer (`<|endoftext|>` = eos = bos, `<|pad|>` = pad). It was pretrained
from scratch for {steps} steps (batch {batch_size}, AdamW lr {lr}) on {n_texts:,} texts
sampled from the *base* distribution of the toy task in `harness/data/toy_task.py`:
prompt + response + `<|endoftext|>`, loss on every token. It writes well-formed toy
reviews and stops with EOS, but picks sentiment words at random whatever the request
says, so its gold reward is about 0 -- room for SFT, DPO and friends to improve it.

Prompt format (reference DPO / Anthropic HH): `"\\n\\nHuman: <request>\\n\\nAssistant:"`;
responses start with a space; no BOS; EOS ends a response.

Rebuild (deterministic, took {build_s:.0f} s on {threads} CPU threads):

    python scripts/build_tiny_model.py

## Toy gold reward (`get_gold_reward("toy")`, range [-1, 1]) on the test prompts

| what                                              | mean gold reward |
|---------------------------------------------------|------------------|
| this base model, {n_eval} samples at temperature 1.0    | {base_model}      |
| data set `sft_target`s (best of 2 base responses) | {sft_target}      |
| random base-distribution responses                | {random_response}      |
| optimum (strongest words, right topic)            | ~0.95-1.0        |

## Sample generations

{samples}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/tiny_model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=768)
    parser.add_argument("--n-texts", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-eval", type=int, default=64)
    args = parser.parse_args()

    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    texts = pretraining_corpus(args.n_texts, seed=args.seed)
    tokenizer = build_tokenizer(texts + GENERIC_ENGLISH.splitlines(), args.vocab_size)
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, {n_params:,} parameters")
    pretrain(model, tokenizer, texts, args)
    build_s = time.time() - start

    stats = evaluate(model, tokenizer, args.n_eval, args.seed)
    out = Path(args.out)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)
    samples = "\n\n".join(f"    {p!r}\n    -> {c!r}" for p, c in stats["examples"])
    (out / "README.md").write_text(README.format(
        n_params=n_params, vocab=len(tokenizer), build_s=build_s, samples=samples,
        **vars(args) | stats))
    print(f"built in {build_s:.0f} s -> {out}")
    for key in ("base_model", "sft_target", "random_response"):
        print(f"mean gold reward, {key}: {stats[key]}")
    print(samples)


if __name__ == "__main__":
    main()
