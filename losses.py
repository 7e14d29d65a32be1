"""Loss functions: pure functions of log-probabilities (no models, no I/O).

Every function takes per-sequence summed log-probs of shape [batch] (or per-token tensors
where stated) and returns `(losses, chosen_rewards, rejected_rewards)` with `losses` of shape
[batch]; the trainer averages. Rewards are the implicit rewards beta * log(pi / pi_ref),
detached, for logging.
"""

import torch
import torch.nn.functional as F


def _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps, reference_free):
    """h = log pi(y_w)/pi(y_l) - log ref(y_w)/ref(y_l); the reference term is 0 when reference-free."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    if reference_free:
        return pi_logratios
    return pi_logratios - (reference_chosen_logps - reference_rejected_logps)


def _implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                      reference_chosen_logps, reference_rejected_logps, reference_free):
    if reference_free:
        return beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()
    chosen = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return chosen, rejected


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float, label_smoothing: float = 0.0, reference_free: bool = False):
    """DPO (Rafailov et al. 2023, eq. 7) and conservative DPO (label smoothing).

    Args: four tensors of shape [batch], summed log-probs of the chosen / rejected responses
        under the policy and the reference; beta: the KL-penalty temperature;
        label_smoothing: eps, the assumed probability that a label is flipped (cDPO);
        reference_free: use a uniform reference (the reference terms drop out).
    Returns: losses [batch], chosen_rewards [batch], rejected_rewards [batch].

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    """
    h = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                   reference_rejected_logps, reference_free)
    losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing)
              - F.logsigmoid(-beta * h) * label_smoothing)
    return (losses, *_implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                                       reference_chosen_logps, reference_rejected_logps,
                                       reference_free))


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float, reference_free: bool = False):
    """IPO (Azar et al. 2023, eq. 17): squared regression of h onto 1 / (2 * beta).

    Shapes as in `dpo_loss`; beta plays the role of the paper's tau.
        loss = (h - 1 / (2 * beta)) ** 2
    """
    h = _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                   reference_rejected_logps, reference_free)
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, *_implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                                       reference_chosen_logps, reference_rejected_logps,
                                       reference_free))


def sft_loss(policy_chosen_logps: torch.Tensor, n_tokens: torch.Tensor, token_mean: bool = False,
             tokens_per_example: float | None = None):
    """Negative log-likelihood of the targets.

    Args: policy_chosen_logps [batch] summed log-probs of each target; n_tokens [batch] its
        number of trained tokens; token_mean: weight every token equally across the batch
        instead of every sequence (the reference code sums per sequence, then averages over
        sequences, which is the default here so reference learning rates keep their meaning);
        tokens_per_example: the whole batch's, when this is a part of it (a micro-batch, a
        rank's share), so that the parts add up to the batch's token mean; None: this batch's.
    Returns: losses [batch]; their mean is the batch loss in both modes.
    """
    if not token_mean:
        return -policy_chosen_logps
    if tokens_per_example is not None:
        return -policy_chosen_logps / max(tokens_per_example, 1e-8)
    n = n_tokens.to(policy_chosen_logps.dtype)
    return -policy_chosen_logps * (n.numel() / n.sum().clamp(min=1))


def masked_nll(token_logps: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the trained tokens only.

    Args: token_logps [batch, seq] log p(x_t | x_<t); loss_mask [batch, seq] 1 where trained.
    Returns: a scalar, -sum(m * logp) / sum(m). Padding and untrained tokens neither add to the
    sum nor to the count (the CoH PyTorch port divided by every token, shrinking the loss).
    """
    mask = loss_mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def coh_loss(policy_chain_logps: torch.Tensor, n_tokens: torch.Tensor,
             pt_logps: torch.Tensor | None = None, pt_n_tokens: torch.Tensor | None = None,
             pt_loss_weight: float = 0.0, token_count: float | None = None):
    """Chain of Hindsight (Liu, Sferrazza, Abbeel 2023, Sec. 3): next-token NLL of the answer
    tokens of hindsight chains, averaged over the trained tokens of the batch, plus an optional
    pretraining term on a plain-text batch (the paper's regulariser against overfitting).

    Args: policy_chain_logps [batch] summed log-probs of each chain's trained tokens (answers and
        their EOS); n_tokens [batch] how many there are; pt_logps [pt_batch], pt_n_tokens
        [pt_batch] the same for the pretraining batch (None: no pretraining stream);
        pt_loss_weight: w; token_count: the whole batch's sum_i n_i when this is a part of it
        (a micro-batch, a rank's share), so that the parts' chain_nll add up; None: this one's.
    Returns: (loss scalar, chain_nll scalar, pt_nll scalar or None) with

        chain_nll = -sum_i logp_i / sum_i n_i        (= masked_nll over the batch)
        loss      = chain_nll + w * pt_nll
    """
    chain_nll = -policy_chain_logps.sum() / (n_tokens.sum().clamp(min=1) if token_count is None
                                             else max(token_count, 1))
    if pt_logps is None:
        return chain_nll, chain_nll, None
    pt_nll = -pt_logps.sum() / pt_n_tokens.sum().clamp(min=1)
    return chain_nll + pt_loss_weight * pt_nll, chain_nll, pt_nll


# ---------------------------------------------------------------- reward models

def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: float | torch.Tensor = 0.0, center_coef: float = 0.0):
    """Pairwise reward-model loss (Bradley-Terry; Ouyang et al. 2022, eq. 1), with the optional
    margin of Llama 2 (Touvron et al. 2023, eq. 2) and the reward-centering term of Eisenstein et
    al. 2023 (which keeps rewards near 0 so PPO sees a stable scale).

    Args: chosen_rewards, rejected_rewards [batch] scalar rewards r(x, y_w), r(x, y_l);
        margin: a float or [batch] tensor m; center_coef: c.
    Returns: losses [batch], chosen_rewards [batch], rejected_rewards [batch] (detached).

        loss = -log sigmoid(r_w - r_l - m) + c * (r_w + r_l)^2
    """
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def expected_rating(logits: torch.Tensor) -> torch.Tensor:
    """The scalar reward of a binned head: E[k] = sum_k k * softmax(logits)_k, k = 1..K.

    Args: logits [..., K]. Returns: [...] in [1, K]."""
    ratings = torch.arange(1, logits.shape[-1] + 1, dtype=logits.dtype, device=logits.device)
    return (logits.softmax(-1) * ratings).sum(-1)


def binned_rating_loss(logits: torch.Tensor, ratings: torch.Tensor):
    """Cross-entropy of a K-way rating head against absolute ratings 1..K (ordinal data such as
    HelpSteer's 0-4 scores, shifted to start at 1).

    Args: logits [batch, K]; ratings [batch] integers in 1..K.
    Returns: losses [batch] = -log softmax(logits)[rating - 1].
    """
    K = logits.shape[-1]
    if ratings.numel() and (ratings.min() < 1 or ratings.max() > K):
        raise ValueError(f"ratings must lie in 1..{K}, got {ratings.min().item()}..{ratings.max().item()}")
    return F.cross_entropy(logits.float(), ratings.long() - 1, reduction="none")


# ------------------------------------------------------------------------- PPO
# Per-token tensors are [batch, T] over the response tokens; mask is 1 on real response tokens
# (up to and including EOS) and 0 on padding after it.

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries (Bessel-corrected, as in TRL / OpenAI lm-human-prefs)."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    return ((x - mean) ** 2 * mask).sum() / (n - 1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; shift_mean=False keeps the mean (rescales only).
    Padding entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020,
    "Approximating KL divergence"). With log r = log pi_ref - log pi:
        k1 = -log r                 (unbiased, can be negative per token)
        k3 = (r - 1) - log r        (unbiased, always >= 0)
    Args: logprobs, ref_logprobs [batch, T]. Returns [batch, T]."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens.

    Args: rewards, values, mask [batch, T]; values[t] = V(s_t), the value before token t.
    Returns: (advantages [batch, T], returns [batch, T] = advantages + values), zero on padding.

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma * lam * A_{t+1}
    where V and A are 0 after the last real token (the episode ends at EOS).
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float):
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    Args: logprobs (current, with grad), old_logprobs (at rollout), advantages, mask [batch, T].
    Returns: (loss scalar, clip fraction scalar, approx KL(old || new) scalar (k3 estimator)).

        ratio = exp(logp - logp_old)
        loss  = mean_t max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_range_value: float):
    """Clipped value loss (OpenAI baselines ppo2; Huang et al. 2024, "N+ implementation details").

    Args: values (current, with grad), old_values (at rollout), returns, mask [batch, T].
    Returns: (loss scalar, value clip fraction scalar).

        v_clip = v_old + clip(v - v_old, -eps_v, eps_v)
        loss   = 0.5 * mean_t max((v - R)^2, (v_clip - R)^2)
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, clipfrac


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (section 2.2):
        e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n_steps / horizon)
    where KL is the mean per-sequence KL of the last rollout and n_steps its number of episodes."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over masked entries: 1 is a perfect critic, <= 0 a useless one."""
    var_returns = masked_var(returns, mask)
    return (1.0 - masked_var(returns - values, mask) / var_returns).item() \
        if var_returns > 0 else float("nan")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last dim: [..., V] -> [...]."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)



# ------------------------------------------------- unpaired and reference-free offline losses

def kto_reference_point(logratio_sum, count) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, eq. 8; batch estimate of Sec. 4.1):
    KL(pi || pi_ref) from mismatched pairs (prompt x_j, completion y'_j of another prompt),
    clamped at 0, no gradient: z0 = max(0, (1/m) sum_j log pi(y'_j|x_j) - log pi_ref(y'_j|x_j)).
    Takes the sum of the m log-ratios and m, so micro-batches and ranks add up to the batch's."""
    return (torch.as_tensor(logratio_sum, dtype=torch.float32) / max(count, 1)).clamp(min=0)


def kto_loss(policy_logps, reference_logps, desirable, reference_point, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired completions.

    Args: policy_logps, reference_logps [batch] summed log-probs; desirable [batch] bool;
        reference_point z0 (kto_reference_point); beta; lambda_D, lambda_U.
    Returns: losses [batch], rewards [batch] = beta * r (detached), with r = log pi/pi_ref and
        loss = lambda_D (1 - sigmoid(beta (r - z0))) if desirable, else
               lambda_U (1 - sigmoid(beta (z0 - r)))
    """
    r = policy_logps - reference_logps
    z0 = torch.as_tensor(reference_point, dtype=r.dtype, device=r.device).detach()
    losses = torch.where(desirable.to(torch.bool),
                         desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses, beta * r.detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_n_tokens, rejected_n_tokens,
               beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO (Meng, Xia, Chen 2024, eq. 6): length-normalised reward, no reference, target
    margin gamma (= TRL's simpo_gamma); label smoothing eps as in cDPO (the SimPO code).
    Args: summed log-probs [batch] and token counts [batch] of chosen / rejected.
    Returns: losses, chosen_rewards, rejected_rewards [batch] (rewards detached), with
        r(y) = beta / |y| * log pi(y|x),  h = r(y_w) - r(y_l) - gamma,
        loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)
    """
    chosen = beta * policy_chosen_logps / chosen_n_tokens.clamp(min=1)
    rejected = beta * policy_rejected_logps / rejected_n_tokens.clamp(min=1)
    h = chosen - rejected - gamma
    losses = -F.logsigmoid(h) * (1 - label_smoothing) - F.logsigmoid(-h) * label_smoothing
    return losses, chosen.detach(), rejected.detach()


def orpo_log_odds_ratio(chosen_mean_logps, rejected_mean_logps):
    """log odds(y_w) - log odds(y_l), odds = P / (1 - P), P = exp(mean token log-prob) (ORPO,
    eqs. 3-5); log(1 - P) as log(-expm1(m)), exact near P = 1 (P = 1 itself is clamped)."""
    def log_odds(m):
        m = m.clamp(max=-1e-8)
        return m - torch.log(-torch.expm1(m))
    return log_odds(chosen_mean_logps) - log_odds(rejected_mean_logps)


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_n_tokens, rejected_n_tokens,
              beta: float):
    """ORPO (Hong, Lee, Thorne 2024, eqs. 6-7): SFT on the chosen answer plus beta (the paper's
    lambda) times the odds-ratio loss, no reference. Shapes as in simpo_loss; rewards are
    beta * m(y) (TRL's). With m(y) = log pi(y|x) / |y|:
        loss = -m(y_w) - beta * log sigmoid(log odds(y_w) - log odds(y_l))
    The SFT term is each answer's mean token NLL (TRL averages over a device batch's tokens,
    which makes its loss depend on how a batch is split)."""
    chosen = policy_chosen_logps / chosen_n_tokens.clamp(min=1)
    rejected = policy_rejected_logps / rejected_n_tokens.clamp(min=1)
    odds_loss = -F.logsigmoid(orpo_log_odds_ratio(chosen, rejected))
    return -chosen + beta * odds_loss, beta * chosen.detach(), beta * rejected.detach()


# ------------------------------------------------------------- critic-free online RL
# Rewards of a rollout with K samples per prompt are [G, K]; per-token tensors as for PPO.

def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4):
    """GRPO's outcome advantages (Shao et al. 2024, Sec. 4.1.2), [G, K] -> [G, K]:
    A_ik = (r_ik - mean_k r_i) / (std + eps), std unbiased over the group (scale=group), over
    the whole batch (batch, TRL's), or no division (none: Dr. GRPO, Liu et al. 2025)."""
    centered = rewards - rewards.mean(1, keepdim=True)
    std = {"group": lambda: rewards.std(1, keepdim=True), "batch": rewards.std,
           "none": lambda: None}.get(scale)
    if std is None:
        raise ValueError(f"unknown reward scaling {scale!r}; use group, batch or none")
    return centered if scale == "none" else centered / (std() + eps)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, eq. 8), [G, K]:
    A_ik = r_ik - 1/(K-1) sum_{j != k} r_ij = (K r_ik - sum_j r_ij) / (K - 1)."""
    K = rewards.shape[1]
    return (rewards * K - rewards.sum(1, keepdim=True)) / (K - 1)


def clipped_surrogate(logprobs, old_logprobs, advantages, clip_low: float, clip_high: float):
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7) with DAPO's decoupled
    upper clip (Yu et al. 2025), as a loss; all [batch, T]. Returns (loss, clipped: bool where
    the clipped term won), with ratio = exp(logp - logp_old) and
        loss = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))"""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.max(unclipped, clipped), (clipped > unclipped).detach()


AGGREGATIONS = ("token", "sequence", "sum", "constant")


def aggregation_denominator(mask: torch.Tensor, how: str, max_tokens: int = 1) -> float:
    """N of `aggregate` for a response mask [batch, T]: token: real tokens; sequence and sum:
    sequences (rows with a masked-in token); constant: sequences * max_tokens."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; use one of {AGGREGATIONS}")
    return float(mask.sum()) if how == "token" else float((mask.sum(-1) > 0).sum()) * (
        max_tokens if how == "constant" else 1)


def aggregate(per_token, mask, how: str, denominator: float | None = None, max_tokens: int = 1):
    """A per-token loss [batch, T] reduced to a scalar:
        token     sum_it x / N_tokens               DAPO (Yu et al. 2025)
        sequence  sum_i (sum_t x / |y_i|) / N_seq   GRPO (Shao et al. 2024, eq. 3)
        sum       sum_it x / N_seq                  REINFORCE on log pi(y|x) (RLOO)
        constant  sum_it x / (N_seq * max_tokens)   Dr. GRPO (Liu et al. 2025)
    denominator: N of the whole minibatch when this is a part of it (a micro-batch, a rank's
    share), so the parts add up to the whole; None: this batch's own N."""
    own = aggregation_denominator(mask, how, max_tokens)
    mask = mask.to(per_token.dtype)
    per_row = (per_token * mask).sum(-1)
    if how == "sequence":
        per_row = per_row / mask.sum(-1).clamp(min=1)
    return per_row.sum() / max(own if denominator is None else denominator, 1e-8)
