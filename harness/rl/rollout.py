"""Rollouts: prompts -> sampled responses -> per-token log-probs, values, scores (the rollout
loop of harness/rl/loop.py).

Token layout of a rollout batch (B rows, P prompt columns, T response columns):

    [pad pad p1 p2 p3 | r1 r2 EOS pad pad]      prompt left-padded, response right-padded
    mask               [ 0  0  1  1  1 |  1  1  1   0   0 ]

Response token t is predicted from column P - 1 + t; its value V(s_t) is the critic's head at
that same column (the state before the token). The reward model reads the last non-pad column,
which is the EOS that ends the response (score at EOS). Position ids count real tokens only, so
a left-padded row sees the same positions as in generate(). Every mask comes from lengths and
the first EOS, never from comparing ids with the pad id, so a tokenizer whose pad is its EOS
cannot hide the EOS from the loss.
"""

from dataclasses import dataclass

import torch

from harness.data.chat import encode_prompt
from harness.data.tokens import pad_to, pad_with_mask
from harness.models.generation import Sample, SamplingConfig, sample
from harness.models.modeling import position_ids
from losses import entropy_from_logits


def encode_prompts(tokenizer, examples, max_prompt_length: int) -> list[list[int]]:
    """Prompt ids as in training (harness/data/chat.py: the chat template when the tokenizer
    has one; no added BOS), cut to max_prompt_length per the dataset's mode."""
    return [encode_prompt(tokenizer, ex.prompt, ex.uid, ex.truncation_mode, max_prompt_length)
            for ex in examples]


@dataclass
class Rollout:
    """One batch of episodes; per-token tensors are [B, T] over response columns."""
    input_ids: torch.Tensor        # [B, P + T]
    attention_mask: torch.Tensor   # [B, P + T]
    prompt_width: int              # P
    mask: torch.Tensor             # [B, T] 1 on response tokens up to and including EOS
    finished: torch.Tensor         # [B] bool: the response ended with EOS
    samples: list[Sample]
    logprobs: torch.Tensor | None = None      # [B, T] policy, at rollout time
    ref_logprobs: torch.Tensor | None = None  # [B, T] frozen reference
    values: torch.Tensor | None = None        # [B, T] critic, at rollout time
    scores: torch.Tensor | None = None        # [B] reward model at EOS (raw)

    def select(self, index) -> "Rollout":
        """The rows `index` (a tensor or list) of every tensor (a minibatch), same column layout."""
        if not isinstance(index, torch.Tensor):
            index = torch.tensor(index, dtype=torch.long, device=self.input_ids.device)
        pick = lambda t: t[index] if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Rollout(**{k: pick(v) for k, v in vars(self).items() if k != "samples"},
                       samples=[self.samples[i] for i in index.tolist()])


def build_batch(samples: list[Sample], pad_token_id: int, device) -> Rollout:
    """Tensors for sampled (prompt, completion) token ids in the layout above."""
    prompt_ids, prompt_mask = pad_with_mask([s.prompt_ids for s in samples], pad_token_id, left=True)
    response_ids, response_mask = pad_with_mask([s.completion_ids for s in samples], pad_token_id)
    width = max(response_ids.shape[1], 1)  # every response empty: keep one (masked) column
    response_ids, response_mask = pad_to(response_ids, width, pad_token_id), pad_to(response_mask, width, 0)
    ids, attn = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    P = prompt_ids.shape[1]
    finished = torch.tensor([s.finished for s in samples])
    return Rollout(ids.to(device), attn.to(device), P, attn[:, P:].float().to(device),
                   finished.to(device), samples)


def generate(policy, tokenizer, prompt_ids: list[list[int]], prompts: list[str],
             max_new_tokens: int, temperature: float, seed: int, keys: list[int],
             synced: bool = False, **sampling) -> list[Sample]:
    """Sample one response per prompt (harness.models.generation: left padding, stop at EOS, pure
    temperature sampling with no top-k / top-p), keyed: response i depends only on (seed,
    keys[i]) and its prompt, so a rank sampling its share of a batch draws what one process
    drawing the whole batch would. synced: for a model sharded over the ranks. `sampling`: more
    SamplingConfig fields, e.g. static_cache."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                         batch_size=len(prompts), seed=seed, **sampling)
    return sample(policy, tokenizer, prompts, cfg, progress=False, keys=keys, synced=synced,
                  prompt_ids=prompt_ids)


def policy_logprobs(model, batch: Rollout, temperature: float, with_entropy: bool = False):
    """Per-token log-probs [B, T] of the response under `model`, from logits / temperature (the
    distribution the tokens were sampled from); optionally the entropy [B, T] too."""
    P = batch.prompt_width
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=position_ids(batch.attention_mask)).logits
    logits = logits[:, P - 1:-1].float() / temperature
    targets = batch.input_ids[:, P:]
    logprobs = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    return (logprobs, entropy_from_logits(logits)) if with_entropy else logprobs


def critic_values(critic, batch: Rollout) -> torch.Tensor:
    """V(s_t) [B, T]: the critic's head at the column that predicts response token t."""
    P = batch.prompt_width
    return critic.values(batch.input_ids, batch.attention_mask)[:, P - 1:-1]


@torch.no_grad()
def score(reward_model, batch: Rollout) -> torch.Tensor:
    """Reward-model scores [B] at the last non-pad token (the EOS of a finished response)."""
    return reward_model(batch.input_ids, batch.attention_mask).float()


@torch.no_grad()
def chunked(batch: Rollout, chunk: int, fn) -> torch.Tensor:
    """fn(rows) over `batch`, `chunk` rows at a time (bounded memory), concatenated. Every row's
    result is independent of the others in its chunk (tests/test_invariants.py), so the chunk
    size changes nothing but memory."""
    rows = batch.input_ids.shape[0]
    return torch.cat([fn(batch.select(torch.arange(start, min(start + chunk, rows),
                                                   device=batch.input_ids.device)))
                      for start in range(0, rows, chunk)])
