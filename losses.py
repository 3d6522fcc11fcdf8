"""The preference losses, each a pure function of per-sequence log-probs.

Convention: a "logps" tensor has shape (B,) and holds log pi(y|x) = sum over the completion tokens of
log pi(y_t | x, y_<t); prompt tokens never count. Each method declares in METHODS whether its loss reads these sums
(as the original DPO code and the TR paper authors' library do) or their per-token "mean" (divided by the completion
length); IPO reads the mean with `train.py --ipo_average` (TRL's IPO). `reduction(run)` says which a run used: train.py's
training and held-out metrics and evaluate.py's reward accuracy all ask it.

In TR-DPO / TR-IPO / TR-KTO the losses are exactly these; only the reference that produced `ref_*` moves
(see ref_update.py).
"""
import torch
import torch.nn.functional as F

from flags import at_least, in_range


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0):
    """Direct Preference Optimization (Rafailov et al. 2023). Returns (losses, chosen_rewards, rejected_rewards).
    label_smoothing eps: conservative DPO (Mitchell 2023), for labels flipped with probability eps."""
    # h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    # DPO (Rafailov et al. eq. 7): L = -log sigmoid(beta * h)
    # cDPO: L = -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    # implicit rewards r = beta * (log pi - log ref), logged only
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Identity Preference Optimization (Azar et al. 2023); their tau is our beta (tau is the TR period here)."""
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    # IPO (Azar et al. 2023, empirical loss): L = (h - 1/(2*beta))^2: pins the margin instead of pushing it to infinity
    losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def kto_loss(policy_logps, ref_logps, desirable, kl, beta, kto_lambda_d=1.0, kto_lambda_u=1.0):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired examples. Returns (losses, rewards).

    desirable: (B,) bool. kl: a 0-dim estimate of KL(pi || ref), the mean of log pi(y'|x) - log ref(y'|x) over
    mismatched (prompt, completion) pairs; train.py estimates it once per optimizer step, over all ranks.
    """
    rewards = policy_logps - ref_logps  # r = log pi(y|x) - log ref(y|x)
    # z = max(0, KL estimate): detached, a baseline rather than something to optimise
    z = kl.detach().clamp(min=0)
    # KTO (Ethayarajh et al. 2024): desirable  lambda_D * (1 - sigmoid(beta * (r - z))),
    #                                undesirable lambda_U * (1 - sigmoid(beta * (z - r)))
    losses = torch.where(desirable,
                         kto_lambda_d * (1 - torch.sigmoid(beta * (rewards - z))),
                         kto_lambda_u * (1 - torch.sigmoid(beta * (z - rewards))))
    return losses, beta * rewards.detach()


# --method: each loss, whether it trains on pairs (called with the four log-prob tensors of B pairs) or on unpaired
# examples (KTO: chosen desirable, rejected undesirable, and the KL estimate), how it reduces each sequence's token
# log-probs ("sum", or per-token "mean"), and its own flags, {name: (default, domain, help)}: train.py offers each as
# --name for this method (and its TR form), refusing values outside its domain (flags.py), and passes it to the loss
# by name.
METHODS = {
    "dpo": (dpo_loss, "paired", "sum", {"label_smoothing": (0.0, in_range(0.0, 0.5, high_open=True), "conservative "
                                        "DPO (Mitchell 2023): the probability eps, in [0, 0.5), that a pair's "
                                        "preference is flipped; 0 = plain DPO")}),
    "ipo": (ipo_loss, "paired", "sum", {}),  # the mean with --ipo_average (reduction)
    "kto": (kto_loss, "unpaired", "sum", {"kto_lambda_d": (1.0, at_least(0.0), "KTO weight of desirable (chosen) "
                                                           "examples"),
                                          "kto_lambda_u": (1.0, at_least(0.0), "KTO weight of undesirable "
                                                           "(rejected) examples")}),
}


def reduction(run):
    """How a run's loss reads each sequence's log-probs: "sum" or per-token "mean" (its method's METHODS entry; IPO
    with --ipo_average: the mean). `run`: train.py's arguments as a dict (args.json, a checkpoint's "run"); SFT and a
    plain model ({}) sum."""
    method = run.get("method", "sft").removeprefix("tr_")
    return "mean" if run.get("ipo_average") else METHODS[method][2] if method in METHODS else "sum"


def as_read(logps, loss_mask, reduction):
    """Summed log-probs (B,) as a loss of `reduction` reads them: the sums, or per completion token (loss_mask
    (B, T): 1 on completion tokens)."""
    return logps / loss_mask.sum(-1) if reduction == "mean" else logps
