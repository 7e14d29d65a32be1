"""Chain of Hindsight (Liu, Sferrazza, Abbeel 2023, arXiv 2302.02676) as `loss=coh`.

Every canonical preference record becomes plain language-model data, a hindsight chain

    <prompt> A helpful answer: <better><EOS> An unhelpful answer: <worse><EOS>

trained with next-token loss on the answers and their EOS only: the prompt (with any earlier
dialogue turns), the feedback phrases and padding are labelled -100, so a shared history is
never trained as both helpful and unhelpful. At inference the prompt ends in the positive phrase.

Chain orders (`loss.chain_weights`, sampled per example with the run's seed): positive,
negative, positive_negative, negative_positive, and comparison (a set's two-answer template).
A record without a pair (SFT-only data) becomes a positive-only chain on its SFT target, and
`loss.sft_mode=true` ("chain length one") makes every record one. Feedback phrases come in sets
(`loss.feedback_sets`, chosen by `loss.feedback_set`); a set holds paired positive / negative
templates such as " A helpful answer:{answer}", the text before the slot being the phrase.

The training step adds forgetful causal masking (harness/objectives/fcm.py) and a pretraining stream
(harness/data/pretraining_mix.py) when configured.
"""

import functools
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import ListConfig, OmegaConf

import losses
from harness.objectives.fcm import fcm_attention_mask, past_drop_fraction
from harness.objectives import LossSpec, StepContext, register_loss
from harness.objectives.core import trained_tokens
from harness.objectives.coh_phrases import (Blocks, bucket_phrase, feedback_sets,
                                            parse_phrase_set, score_buckets)
from harness.data.pretraining_mix import PretrainStream, looks_like_path, read_documents
from harness.data.chat import encode_block, encode_prompt
from harness.data.tokens import check_truncation_mode
from preference_datasets import ExampleFormat

# which answer goes under which phrase of a (positive, negative) wording pair, in chain order
ORDER_BLOCKS = {
    "positive": (("positive", "better"),),
    "negative": (("negative", "worse"),),
    "positive_negative": (("positive", "better"), ("negative", "worse")),
    "negative_positive": (("negative", "worse"), ("positive", "better")),
}
CHAIN_ORDERS = (*ORDER_BLOCKS, "comparison")
NO_PAIR, SFT_TARGET = "positive (no pair)", "positive (sft_mode)"


@dataclass(frozen=True)
class CohOptions:
    """The loss.* options of loss=coh (config/loss/coh.yaml documents each). Their values are
    checked together by coh_settings (train.check_config, before any model loads)."""
    chain_weights: dict
    feedback_set: str = "dialogue"
    feedback_sets: dict | None = None
    feedback_sets_file: str | None = None
    inference_phrase: str | None = None
    sft_mode: bool = False
    score_buckets: list | None = None
    fcm_min: float = 0.0
    fcm_max: float = 0.0
    pt_data: str | None = None
    pt_loss_weight: float = 0.0
    pt_text_field: str = "text"
    pt_split: str = "train"
    pt_hub_config: str | None = None
    pt_max_documents: int = 20000
    pt_max_length: int | None = None

# ------------------------------------------------------------------ settings (checked early)
@dataclass(frozen=True)
class CohSettings:
    orders: tuple[str, ...]       # chain orders with a positive weight
    probs: tuple[float, ...]      # their sampling probabilities
    pairs: tuple[dict, ...]       # wording pairs of the chosen set
    comparisons: tuple[Blocks, ...]
    inference_phrase: str
    sft_mode: bool
    fcm_min: float
    fcm_max: float
    seed: int
    buckets: tuple[tuple[float | None, str], ...] = ()  # (lowest score, phrase), highest first


def _chain_weights(loss_cfg) -> dict:
    weights = OmegaConf.to_container(loss_cfg.chain_weights, resolve=True) or {}
    for order, w in weights.items():
        if order not in CHAIN_ORDERS:
            raise ValueError(f"loss.chain_weights.{order}: unknown chain order; use {CHAIN_ORDERS}")
        if not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"loss.chain_weights.{order}={w!r} must be a number >= 0")
    if not loss_cfg.sft_mode and not sum(weights.values()) > 0:
        raise ValueError("loss.chain_weights are all 0; give some chain order a weight "
                         "(or use loss.sft_mode=true)")
    return {k: float(w) for k, w in weights.items() if w > 0}


def coh_settings(cfg) -> CohSettings:
    """Parse and check the CoH options of cfg.loss; every error names its key."""
    loss = cfg.loss
    sets = feedback_sets(loss)
    if loss.feedback_set not in sets:
        raise ValueError(f"loss.feedback_set={loss.feedback_set!r} is not a feedback phrase set; "
                         f"choose one of {sorted(sets)} or add one under loss.feedback_sets "
                         "(or in loss.feedback_sets_file)")
    pairs, comparisons = parse_phrase_set(loss.feedback_set, sets[loss.feedback_set])
    weights = _chain_weights(loss)
    if "comparison" in weights and not comparisons:
        raise ValueError(f"loss.chain_weights.comparison > 0 but feedback set "
                         f"{loss.feedback_set!r} has no 'comparison' templates")
    if not 0.0 <= loss.fcm_min <= loss.fcm_max < 1.0:
        raise ValueError(f"need 0 <= loss.fcm_min ({loss.fcm_min}) <= loss.fcm_max "
                         f"({loss.fcm_max}) < 1")
    if loss.pt_loss_weight < 0:
        raise ValueError(f"loss.pt_loss_weight={loss.pt_loss_weight} must be >= 0")
    if loss.pt_loss_weight > 0 and not loss.pt_data:
        raise ValueError("loss.pt_loss_weight > 0 needs a pretraining corpus: set loss.pt_data "
                         "(a text file, a hub dataset id, or 'toy')")
    if loss.pt_data and looks_like_path(loss.pt_data) and not _exists(loss.pt_data):
        raise FileNotFoundError(f"loss.pt_data={loss.pt_data!r}: no such file")
    if loss.pt_data and cfg.get("micro_batch_tokens"):
        raise ValueError("micro_batch_tokens with a pretraining mix (loss.pt_data) is not "
                         "supported: its stream counts gradient_accumulation_steps micro-batches "
                         "per step; set micro_batch_tokens=null")
    total = sum(weights.values())
    buckets = score_buckets(OmegaConf.to_container(loss.score_buckets, resolve=True)
                            if isinstance(loss.get("score_buckets"), ListConfig)
                            else loss.get("score_buckets"))
    phrase = loss.inference_phrase
    if phrase is None:  # the set's first positive wording (or the top score bucket's phrase),
        # as the paper prompts at inference
        phrase = buckets[0][1] if buckets else pairs[0]["positive"][0][0]
    return CohSettings(tuple(weights), tuple(w / total for w in weights.values()), pairs,
                       comparisons, phrase, bool(loss.sft_mode), float(loss.fcm_min),
                       float(loss.fcm_max), int(cfg.seed), buckets)


def _exists(path: str) -> bool:
    return os.path.exists(os.path.expanduser(path))


# ------------------------------------------------------------------ chains
@dataclass(frozen=True)
class Chain:
    """One hindsight chain: the prompt (context), then (feedback phrase, answer) blocks."""
    prompt: str
    blocks: tuple[tuple[str, str], ...]
    truncation_mode: str
    order: str
    inference_phrase: str
    uid: str

    @property
    def chosen(self) -> str:
        """The chain after the prompt (collate keeps it as chosen_response_only)."""
        return "".join(phrase + answer for phrase, answer in self.blocks)


def build_chain(prompt: str, better: str, worse: str | None, truncation_mode: str,
                settings: CohSettings, label: str = NO_PAIR, scores=None) -> Chain:
    """A chain for one pair (or one positive-only answer when worse is None). Order and wording
    are drawn from a generator seeded by (run seed, example content): reproducible, and
    independent of data order and of which other examples are loaded. scores: (better's,
    worse's) for graded feedback: each answer's phrase is its score bucket's."""
    key = hashlib.sha256(json.dumps([prompt, better, worse]).encode("utf-8")).digest()
    rng = np.random.default_rng([settings.seed, int.from_bytes(key[:8], "big")])
    order = label if worse is None else settings.orders[rng.choice(len(settings.orders),
                                                                    p=settings.probs)]
    answers = {"better": better, "worse": worse}
    if scores is not None:
        order = "positive_negative" if order == "comparison" else order
        phrases = dict(zip(("better", "worse"), (bucket_phrase(settings.buckets, s) for s in scores)))
        blocks = tuple((phrases[which], answers[which]) for _, which in ORDER_BLOCKS[order])
        order = "graded " + order
    elif order == "comparison":
        template = settings.comparisons[rng.integers(len(settings.comparisons))]
        blocks = tuple((phrase, answers[slot]) for phrase, slot in template)
    else:
        wording = settings.pairs[rng.integers(len(settings.pairs))]
        layout = ORDER_BLOCKS.get(order, ORDER_BLOCKS["positive"])
        blocks = tuple((wording[polarity][0][0], answers[which]) for polarity, which in layout)
    uid = hashlib.sha256(json.dumps([prompt, blocks]).encode("utf-8")).hexdigest()[:16]
    return Chain(prompt, blocks, truncation_mode, order, settings.inference_phrase, uid)


def record_chains(prompt: str, record: dict, settings: CohSettings) -> list[Chain]:
    """The chains of one canonical record: one per preference pair; a record without pairs
    (or every record in sft_mode) gives one positive-only chain on its SFT target."""
    mode = record["truncation_mode"]
    if settings.sft_mode or not record["pairs"]:
        if record["sft_target"] is None:
            return []
        return [build_chain(prompt, record["sft_target"], None, mode, settings,
                            SFT_TARGET if settings.sft_mode else NO_PAIR)]
    responses, scores = record["responses"], record.get("scores")
    graded = bool(settings.buckets) and scores is not None
    return [build_chain(prompt, responses[w], responses[l], mode, settings, scores=(
                scores[w], scores[l]) if graded and None not in (scores[w], scores[l]) else None)
            for w, l in record["pairs"]]


# ------------------------------------------------------------------ tokenisation
def fit_blocks(blocks: list[tuple[list, list]], budget: int, uid: str) -> list[tuple[list, list]]:
    """Shorten answers so phrases + answers fit `budget` tokens. A phrase is never separated from
    its answer: each kept block keeps its phrase whole and at least one answer token; blocks that
    cannot are dropped whole from the end. Answers are cut from their ends, longest first."""
    blocks = list(blocks)
    while blocks and sum(len(p) + 1 for p, _ in blocks) > budget:
        blocks.pop()
    if not blocks:
        raise ValueError(f"example {uid}: not even one feedback phrase and answer token fit in "
                         f"{budget} tokens after the prompt; raise max_length")
    room = budget - sum(len(p) for p, _ in blocks)
    lengths = [len(a) for _, a in blocks]
    if sum(lengths) > room:
        lo, hi = 1, max(lengths)  # the largest cap c with sum(min(len, c)) <= room
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sum(min(n, mid) for n in lengths) <= room else (lo, mid - 1)
        cut = [min(n, lo) for n in lengths]
        spare = room - sum(cut)
        for i, n in enumerate(lengths):  # hand the remainder to the earliest cut answers
            extra = min(spare, n - cut[i])
            cut[i], spare = cut[i] + extra, spare - extra
        lengths = cut
    return [(p, a[:n]) for (p, a), n in zip(blocks, lengths)]


def tokenize_chain(chain: Chain, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Token ids and labels of a chain (same keys as tokenize_example; collate pads them).

    Labels carry the ids of answer tokens and each answer's EOS, -100 on the prompt and the
    feedback phrases. Truncation is prompt first: a chain over max_length has its prompt cut to
    max_prompt_length (keep_start / keep_end), then its answers (fit_blocks).
    prompt_input_ids is the prompt followed by the inference phrase: what sampling continues."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    check_truncation_mode(chain.truncation_mode, f"chain {chain.uid}")
    uid, mode = chain.uid, chain.truncation_mode
    full_prompt = encode_prompt(tokenizer, chain.prompt, uid)
    # rendered by harness/data/chat.py: with a chat template every block is an assistant turn
    # opened by its phrase
    blocks = [encode_block(tokenizer, phrase, answer, uid, first=i == 0)
              for i, (phrase, answer) in enumerate(chain.blocks)]
    prompt = full_prompt
    if len(prompt) + sum(len(p) + len(a) for p, a in blocks) > max_length:
        prompt = encode_prompt(tokenizer, chain.prompt, uid, mode, max_prompt_length)
    ids, labels = list(prompt), [-100] * len(prompt)
    for phrase, answer in fit_blocks(blocks, max_length - len(prompt), uid):
        ids += phrase + answer
        labels += [-100] * len(phrase) + answer
    phrase = encode_block(tokenizer, chain.inference_phrase, None, uid, first=True)[0]
    if len(phrase) >= max_prompt_length:
        raise ValueError(f"loss.inference_phrase ({len(phrase)} tokens) does not fit in "
                         f"max_prompt_length={max_prompt_length}")
    context = full_prompt if len(full_prompt) + len(phrase) <= max_prompt_length else \
        encode_prompt(tokenizer, chain.prompt, uid, mode, max_prompt_length - len(phrase))
    return {"prompt_input_ids": context + phrase, "prompt_length": len(prompt),
            "chosen_input_ids": ids, "chosen_labels": labels}


# ------------------------------------------------------------------ the loss-table entry
@dataclass(frozen=True)
class CohData(ExampleFormat):
    """CoH's example format plus what its step needs: settings and the pretraining stream."""
    settings: CohSettings | None = None
    pt_stream: PretrainStream | None = None

    def describe(self, examples: list) -> str:
        counts = Counter(ex.order for ex in examples)
        return "; CoH chains: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))


def coh_data(cfg, tokenizer) -> CohData:
    settings = coh_settings(cfg)
    stream = None
    loss = cfg.loss
    if loss.pt_data:
        docs = read_documents(loss.pt_data, seed=cfg.seed, text_field=loss.pt_text_field,
                              split=loss.pt_split, hub_config=loss.pt_hub_config,
                              max_documents=loss.pt_max_documents)
        stream = PretrainStream(docs, tokenizer, loss.pt_max_length or cfg.max_length, cfg.seed)
        print(f"pretraining mix: {len(docs)} documents ({len(stream.rows)} windows) from "
              f"{loss.pt_data}, weight {loss.pt_loss_weight}")
    return CohData(functools.partial(record_chains, settings=settings), tokenize_chain,
                   settings, stream)


def coh_step(ctx: StepContext, batch, split: str):
    """Masked NLL of the chains (FCM in training), plus the weighted pretraining NLL."""
    data, size = ctx.data, len(batch["uid"])
    metrics = {}
    if split == "train" and data.settings.fcm_max > 0:
        mask = batch["chosen_attention_mask"].to(ctx.device)
        dtype = next(ctx.policy.parameters()).dtype
        mask4d = fcm_attention_mask(mask, data.settings.fcm_min, data.settings.fcm_max, dtype)
        batch = {**batch, "chosen_attention_mask": mask4d}
        metrics["fcm/drop_rate"] = past_drop_fraction(mask4d, mask)
    logps, n = ctx.forward(ctx.policy, batch)
    pt_logps = pt_n = None
    weight = ctx.options.pt_loss_weight
    if split == "train" and data.pt_stream is not None:
        pt_batch = data.pt_stream.next_batch(ctx.step, ctx.micro_batches, size)
        # weight 0 monitors the pretraining loss without touching the gradients
        with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):
            pt_logps, pt_n = ctx.forward(ctx.policy, pt_batch)
    # the chain NLL is a token mean over the whole batch (its micro-batches and ranks): scaled
    # so that the loop's per-example weighting of this part adds up to it
    stats = ctx.batch_stats
    loss, chain_nll, pt_nll = losses.coh_loss(logps, n, pt_logps, pt_n, weight,
                                              stats["tokens"] if stats else None)
    if stats:
        chain_nll = chain_nll * (stats["count"] / size)
        loss = chain_nll if pt_nll is None else chain_nll + weight * pt_nll
    metrics.update({f"loss/{split}": loss.detach().expand(size),
                    f"loss/chain_{split}": chain_nll.detach().expand(size),
                    f"logps_{split}/chosen": logps.detach()})
    if pt_nll is not None:
        metrics[f"loss/pt_{split}"] = pt_nll.detach().expand(size)
    return loss, metrics


register_loss("coh", LossSpec(
    paired=False, step=coh_step, options=CohOptions, data=coh_data,
    batch_stats=lambda ctx, part, n: trained_tokens(part, n),
    check=lambda cfg, world_size: coh_settings(cfg), from_sft=True,
    prompt_suffix=lambda cfg: coh_settings(cfg).inference_phrase))
