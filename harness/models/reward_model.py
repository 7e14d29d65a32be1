"""Reward models: a scalar (or binned) head on any causal LM backbone (trained by `loss=reward`,
harness/objectives/reward.py).

The head reads the backbone's hidden state at the last non-pad token of prompt + response (the
EOS that ends the response), never an average over padding. Every checkpoint dir also holds

    reward_model.json   head kind, reward mean / std on the held-out pairs (for PPO to
                        normalise), held-out accuracy, tokenizer fingerprint
    reward_model/       the backbone's config.json and the tokenizer, so the checkpoint loads
                        without the base model dir

and loads back with `load_reward_model(path)` (PPO's reward and critic) or `RewardFunction(path)`
(text in, scores out: evaluate.py, judging).
"""

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

import losses
from harness.checkpoints import REWARD_META, REWARD_MODEL_DIR, reward_checkpoint_dir
from harness.data.chat import encode_prompt, encode_response, uses_chat_template
from harness.data.gold import GOLD_REWARDS, register_gold_reward
from harness.data.tokens import pad_with_mask
from harness.models.modeling import (check_model_source, last_token_index, load_tokenizer,
                                     position_ids, read_archive)


# ------------------------------------------------------------------------------ the model
class RewardModel(nn.Module):
    """backbone (a transformers base model, no LM head) -> Linear head: 1 output (a scalar
    reward) or n_bins outputs (logits over ratings 1..K, reward = expected rating)."""
    base_model_prefix = "backbone"  # where harness/parallel/parallelize.py finds the transformer (TP plan)

    def __init__(self, backbone, n_bins: int = 0):
        super().__init__()
        self.backbone, self.n_bins, self.config = backbone, n_bins, backbone.config
        hidden = backbone.config.hidden_size
        self.score = nn.Linear(hidden, n_bins or 1, dtype=backbone.dtype)
        # small init, zero bias: rewards start near 0 (Stiennon et al. 2020 init the head N(0, 1/(d+1)))
        nn.init.normal_(self.score.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    def hidden_states(self, input_ids, attention_mask):
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask)).last_hidden_state

    def scalar(self, head_out: torch.Tensor) -> torch.Tensor:
        """Head outputs [..., 1 or K] -> scalar rewards [...] in float32."""
        head_out = head_out.float()
        # a copy, not a view: FSDP hooks the outputs of a sharded root (PPO's critic) for backward
        return losses.expected_rating(head_out) if self.n_bins else head_out[..., 0].clone()

    def head_at_last_token(self, input_ids, attention_mask) -> torch.Tensor:
        """Head outputs [B, 1 or K] at the last non-pad token."""
        hidden = self.hidden_states(input_ids, attention_mask)
        last = last_token_index(attention_mask)
        return self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        """Rewards [B] read at the last non-pad token."""
        return self.scalar(self.head_at_last_token(input_ids, attention_mask))

    def values(self, input_ids, attention_mask) -> torch.Tensor:
        """The head at every position, [B, L]: PPO's critic, initialised from a reward model."""
        return self.scalar(self.score(self.hidden_states(input_ids, attention_mask)))

    def gradient_checkpointing_enable(self, **kwargs):
        self.backbone.gradient_checkpointing_enable(**kwargs)

    @property
    def _no_split_modules(self):  # the transformer block classes, FSDP's units
        return self.backbone._no_split_modules

    def tie_weights(self):
        self.backbone.tie_weights()

    def save_pretrained(self, out_dir, **kwargs):
        """An HF dir of the backbone plus the head weights (score_head.pt), for export_hf=true."""
        self.backbone.save_pretrained(out_dir, **kwargs)
        torch.save(self.score.state_dict(), Path(out_dir) / "score_head.pt")


def _strip_causal_lm_keys(state: dict, prefix: str) -> dict:
    """A causal-LM state dict (an SFT policy.pt) as the base model's: drop the LM head, strip the
    base-model prefix ("model." for Llama, "transformer." for GPT-2)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_reward_model(name_or_path: str, dtype: str, n_bins: int = 0, archive: str | None = None,
                       device_map=None):
    """A fresh head on the pretrained backbone; `archive` may be an SFT policy.pt (backbone
    weights) or a reward-model policy.pt (backbone and head). device_map places the backbone
    (transformers syntax); the head follows its last layer's device."""
    from transformers import AutoModel
    extra = {"device_map": device_map} if device_map is not None else {}
    backbone = AutoModel.from_pretrained(check_model_source(name_or_path), dtype=getattr(torch, dtype),
                                         low_cpu_mem_usage=True, **extra)
    model = RewardModel(backbone, n_bins)
    if device_map is not None:
        model.score.to(list(backbone.parameters())[-1].device)
    if archive:
        state = read_archive(archive)["state"]
        if any(k.startswith("score.") for k in state):
            model.load_state_dict(state)
        else:
            prefix = backbone.base_model_prefix + "."
            missing, unexpected = backbone.load_state_dict(_strip_causal_lm_keys(state, prefix),
                                                           strict=False)
            if missing or unexpected:
                raise ValueError(f"model.archive={archive!r} does not match the backbone of "
                                 f"{name_or_path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        print(f"loaded {archive} into the reward model")
    return model


def tokenizer_fingerprint(tokenizer) -> str:
    """Same vocabulary, special tokens and chat template <=> same fingerprint (a tokenizer
    without a template keeps the fingerprint it had before templates counted)."""
    template = [tokenizer.chat_template] if uses_chat_template(tokenizer) else []
    data = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.eos_token_id,
                       tokenizer.pad_token_id] + template)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------- loading back
def load_reward_model(path, dtype: str | None = None, on_meta: bool = False):
    """(RewardModel in eval mode, its tokenizer, meta dict) from a reward checkpoint.
    on_meta=True: the architecture only, on the meta device (ranks that get rank 0's weights)."""
    from transformers import AutoConfig, AutoModel
    ckpt = reward_checkpoint_dir(path)
    meta = json.loads((ckpt / REWARD_META).read_text())
    config = AutoConfig.from_pretrained(ckpt / REWARD_MODEL_DIR)
    with torch.device("meta") if on_meta else nullcontext():
        backbone = AutoModel.from_config(config, dtype=getattr(torch, dtype or meta["dtype"]))
        model = RewardModel(backbone, meta["n_bins"])
    if not on_meta:
        state = torch.load(ckpt / "policy.pt", map_location="cpu", weights_only=True)["state"]
        model.load_state_dict(state)
    tokenizer = load_tokenizer(str(ckpt / REWARD_MODEL_DIR))
    return model.eval(), tokenizer, meta


def check_same_tokenizer(meta: dict, tokenizer, where: str):
    """Refuse a reward model whose token ids mean something else than the policy's."""
    if meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(
            f"{where}: the reward model's tokenizer differs from the policy's (fingerprint "
            f"{meta['tokenizer_fingerprint']} vs {tokenizer_fingerprint(tokenizer)}), so its "
            "scores of the policy's token ids would be meaningless. Train the reward model on "
            "the policy's base model (model.name_or_path) or score decoded text with "
            "RewardFunction, which re-tokenises explicitly.")


class RewardFunction:
    """Text in, rewards out: `fn(prompts, completions) -> [float]`, re-tokenised with the reward
    model's own tokenizer (EOS appended, as in training). normalize=True applies the held-out
    mean / std stored with the checkpoint."""

    def __init__(self, path, device: str = "cpu", batch_size: int = 32, normalize: bool = False):
        self.model, self.tokenizer, self.meta = load_reward_model(path)
        self.model.to(device)
        self.device, self.batch_size, self.normalize = device, batch_size, normalize

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        pad = self.tokenizer.pad_token_id
        out = []
        for i in range(0, len(prompts), self.batch_size):
            # prompt and completion encoded apart, then joined: exactly as in training
            # (harness/data/chat.py: the reward model's chat template, if it was trained with one)
            seqs = [encode_prompt(self.tokenizer, p) + encode_response(self.tokenizer, c)
                    for p, c in zip(prompts[i:i + self.batch_size],
                                    completions[i:i + self.batch_size])]
            ids, mask = (t.to(self.device) for t in pad_with_mask(seqs, pad))
            out.extend(self.model(ids, mask).float().cpu().tolist())
        if self.normalize:
            out = [(r - self.meta["reward_mean"]) / self.meta["reward_std"] for r in out]
        return out


def register_reward_checkpoint(path, device: str = "cpu", normalize: bool = False) -> str:
    """Make a reward checkpoint usable wherever a gold reward name is (evaluate.py --gold,
    judging): registers fn(prompt, completion) -> reward and returns its name, rm-<run>-<ckpt>."""
    import re
    ckpt = reward_checkpoint_dir(path).resolve()
    name = "rm-" + re.sub(r"[^A-Za-z0-9_.-]", "_", f"{ckpt.parent.name}-{ckpt.name}")
    if name not in GOLD_REWARDS:
        fn = RewardFunction(ckpt, device=device, normalize=normalize)
        register_gold_reward(name)(lambda prompt, completion: fn([prompt], [completion])[0])
    return name
