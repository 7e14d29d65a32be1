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
             beta: float, reference_free: bool = False, **_unused):
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


def sft_loss(policy_chosen_logps: torch.Tensor, n_tokens: torch.Tensor, token_mean: bool = False):
    """Negative log-likelihood of the targets.

    Args: policy_chosen_logps [batch] summed log-probs of each target; n_tokens [batch] its
        number of trained tokens; token_mean: weight every token equally across the batch
        instead of every sequence (the reference code sums per sequence, then averages over
        sequences, which is the default here so reference learning rates keep their meaning).
    Returns: losses [batch]; their mean is the batch loss in both modes.
    """
    if not token_mean:
        return -policy_chosen_logps
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
             pt_loss_weight: float = 0.0):
    """Chain of Hindsight (Liu, Sferrazza, Abbeel 2023, Sec. 3): next-token NLL of the answer
    tokens of hindsight chains, averaged over the trained tokens of the batch, plus an optional
    pretraining term on a plain-text batch (the paper's regulariser against overfitting).

    Args: policy_chain_logps [batch] summed log-probs of each chain's trained tokens (answers and
        their EOS); n_tokens [batch] how many there are; pt_logps [pt_batch], pt_n_tokens
        [pt_batch] the same for the pretraining batch (None: no pretraining stream);
        pt_loss_weight: w.
    Returns: (loss scalar, chain_nll scalar, pt_nll scalar or None) with

        chain_nll = -sum_i logp_i / sum_i n_i        (= masked_nll over the batch)
        loss      = chain_nll + w * pt_nll
    """
    chain_nll = -policy_chain_logps.sum() / n_tokens.sum().clamp(min=1)
    if pt_logps is None:
        return chain_nll, chain_nll, None
    pt_nll = -pt_logps.sum() / pt_n_tokens.sum().clamp(min=1)
    return chain_nll + pt_loss_weight * pt_nll, chain_nll, pt_nll
