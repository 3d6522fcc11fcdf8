"""What a run logs: every key of train.py's log records (out_dir/metrics.jsonl, and W&B with --wandb), what it means,
and the panel of plot.py's curves that draws it. The one place each metric is declared: plot.py's grid is built from
it, and tests/test_plot.py runs every method on a tiny model and checks that the keys it logs are exactly these.

Names are TRL's where TRL has one. A training metric is the mean over the pairs of all ranks and the steps since the
previous log line; eval/* and drift/* repeat the latest evaluation on the held-out pairs (--eval_interval; none with
--eval_pairs 0), made after step eval/step, before that step's reference update. Log-probs are summed over completion
tokens, in nats; rewards and margins are on training's scale (per-token means where the method's loss reads them,
losses.reduction: IPO with --ipo_average).
"""

HELD_OUT_ACCURACY = "held-out reward accuracy: against the reference, against SFT"
DRIFT = "held-out drift from SFT, nats: the policy, the reference"

# name: (what it is, the panel that draws it or None, its line there: "-" solid, "--" dashed)
METRICS = {
    "step": ("optimizer steps done: the x axis", None, None),
    "loss": ("the method's loss (SFT: the per-token NLL of the chosen answers)", "training loss", "-"),
    "rewards/chosen": ("implicit reward of the chosen answers, beta (log pi - log ref)", None, None),
    "rewards/rejected": ("implicit reward of the rejected answers", None, None),
    "rewards/margins": ("rewards/chosen - rewards/rejected", "rewards/margins (train)", "-"),
    "rewards/accuracies": ("fraction of pairs with rewards/chosen > rewards/rejected (strict: a tie counts 0)",
                           "rewards/accuracies (train)", "-"),
    "logps/chosen": ("log pi of the chosen answers", None, None),
    "logps/rejected": ("log pi of the rejected answers", None, None),
    "kl": ("KTO: its KL(pi || ref) estimate on the step's mismatched pairs (the loss uses max(0, it))", None, None),
    "grad_norm": ("the gradient's norm before clipping to --max_grad_norm", None, None),
    "lr": ("the learning rate of the line's step", None, None),
    "tokens_per_s": ("tokens trained on per second (padding excluded, all ranks, evaluations not timed)", None, None),
    "ref_updates": ("reference updates so far", None, None),
    "ref_updates/applied": ("the reference updates applied since the previous record, [[step, weight], ...] (a TR run's, "
                            "where it moved): what plot.py marks and evaluate.py names", None, None),
    "skipped_steps": ("non-finite steps skipped so far (--skip_nonfinite)", None, None),
    "epoch": ("the epoch the step's batch came from, from 0", None, None),
    "eval/step": ("the step of the evaluation that the eval/* and drift/* keys repeat (0: before training)", None,
                  None),
    "eval/rewards/accuracies": ("held-out rewards/accuracies, against the moving reference", HELD_OUT_ACCURACY, "-"),
    "eval/rewards/margins": ("held-out rewards/margins, against the moving reference", None, None),
    "drift/chosen": ("held-out log pi - log pi_SFT of the chosen answers", DRIFT, "-"),
    "drift/rejected": ("held-out log pi - log pi_SFT of the rejected answers", DRIFT, "--"),
    "drift/accuracies": ("fraction of held-out pairs with drift/chosen > drift/rejected: the accuracy against SFT",
                         HELD_OUT_ACCURACY, "--"),
    "drift/reference_chosen": ("held-out log ref - log pi_SFT of the chosen answers", DRIFT, "-"),
    "drift/reference_rejected": ("held-out log ref - log pi_SFT of the rejected answers", DRIFT, "--"),
}
