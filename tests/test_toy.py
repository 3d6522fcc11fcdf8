"""The toy example's exact enumeration against independent float64 arithmetic, and a short run of it."""
import itertools
import math

import pytest
import torch

from toy import TabularPolicy, all_sequences, kl_exact, make_data, sequence_logps, train

# the table's rows, listed independently of toy.prefix_rows: the empty prefix, then the one- and two-token ones
ROW = {prefix: i for i, prefix in enumerate([()] + list(itertools.product(range(4), repeat=1))
                                            + list(itertools.product(range(4), repeat=2)))}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As toy.py does: on an 84-number table, thread start-up costs more than the math (seconds on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_policy(seed):
    torch.manual_seed(seed)
    policy = TabularPolicy()
    with torch.no_grad():
        policy.logits.copy_(2 * torch.randn(21, 4, dtype=torch.float64))
    return policy


def log_softmax_by_hand(row, token):
    return row[token] - math.log(sum(math.exp(x) for x in row))


def logp_by_hand(policy, seq):
    table = policy.logits.tolist()
    return sum(log_softmax_by_hand(table[ROW[tuple(seq[:t])]], seq[t]) for t in range(3))


def test_all_sequences_are_the_64_distinct_sequences_of_length_3():
    seqs = all_sequences()
    assert seqs.shape == (64, 3)
    assert {tuple(s) for s in seqs.tolist()} == set(itertools.product(range(4), repeat=3))


def test_probabilities_of_all_64_sequences_sum_to_one():
    p = sequence_logps(random_policy(0), all_sequences()).exp()
    assert p.dtype == torch.float64
    assert abs(p.sum().item() - 1) < 1e-12


def test_sequence_logps_is_the_sum_of_per_step_log_softmax_written_out():
    policy = random_policy(1)
    t = policy.logits.tolist()
    # y = (2, 0, 3): rows () -> 0, (2,) -> 1 + 2 = 3, (2, 0) -> 5 + 2*4 + 0 = 13
    want_203 = log_softmax_by_hand(t[0], 2) + log_softmax_by_hand(t[3], 0) + log_softmax_by_hand(t[13], 3)
    # y = (1, 3, 1): rows () -> 0, (1,) -> 2, (1, 3) -> 5 + 1*4 + 3 = 12
    want_131 = log_softmax_by_hand(t[0], 1) + log_softmax_by_hand(t[2], 3) + log_softmax_by_hand(t[12], 1)
    got = sequence_logps(policy, torch.tensor([[2, 0, 3], [1, 3, 1]]))
    assert abs(got[0].item() - want_203) < 1e-12
    assert abs(got[1].item() - want_131) < 1e-12


def test_kl_is_zero_for_identical_policies():
    policy = random_policy(2)
    logp = sequence_logps(policy, all_sequences())
    assert abs(kl_exact(logp, logp).item()) < 1e-12


def test_kl_equals_brute_force_sum_over_all_sequences():
    policy, sft = random_policy(3), random_policy(4)
    want = 0.0
    for seq in itertools.product(range(4), repeat=3):  # sum_y p(y) (log p(y) - log q(y)), one sequence at a time
        log_p, log_q = logp_by_hand(policy, seq), logp_by_hand(sft, seq)
        want += math.exp(log_p) * (log_p - log_q)
    assert want > 0
    got = kl_exact(sequence_logps(policy, all_sequences()), sequence_logps(sft, all_sequences()))
    assert abs(got.item() - want) < 1e-10


def test_sft_model_is_not_degenerate_and_pairs_are_distinct():
    sft, chosen, rejected = make_data(seed=0)
    p = sequence_logps(sft, all_sequences()).exp()
    assert (p > 0).all() and abs(p.sum().item() - 1) < 1e-12
    assert len(set(chosen.tolist()) | set(rejected.tolist())) == 2 * len(chosen)  # OOD = the other 52


def test_short_tr_dpo_run_gives_finite_figures_that_partition_the_mass():
    sft, chosen, rejected = make_data(seed=0)
    _, _, history = train("tr_dpo", 0.6, 1, sft, chosen, rejected, steps=20, lr=0.05, beta=0.1)
    assert len(history) == 21  # step 0 (the SFT model) then one per optimizer step
    for h in history:
        assert all(math.isfinite(v) for v in h.values())
        assert abs(h["p_chosen"] + h["p_rejected"] + h["p_ood"] - 1) < 1e-9
    assert history[0]["kl"] == 0 and history[-1]["kl"] > 0


def test_hard_update_every_step_makes_the_reference_equal_the_policy():
    sft, chosen, rejected = make_data(seed=0)
    policy, reference, _ = train("tr_dpo", 1.0, 1, sft, chosen, rejected, steps=20, lr=0.05, beta=0.1)
    assert torch.equal(reference.logits, policy.logits)
    assert not torch.equal(reference.logits, sft.logits)


def test_vanilla_reference_stays_the_sft_model():
    sft, chosen, rejected = make_data(seed=0)
    policy, reference, _ = train("kto", None, None, sft, chosen, rejected, steps=20, lr=0.05, beta=0.1)
    assert torch.equal(reference.logits, sft.logits)
    assert not torch.equal(policy.logits, sft.logits)


def test_neural_policy_rows_are_the_network_written_out_for_each_prefix():
    from toy import NeuralPolicy
    policy = NeuralPolicy(width=3, seed=5)
    E, P, W1, W2 = (x.detach() for x in (policy.E, policy.P, policy.W1, policy.W2))
    table = policy.table()
    for prefix, row in ROW.items():  # h = P[t] + sum_{s<t} E[s, y_s], logits = W2 tanh(W1 h), one prefix at a time
        h = P[len(prefix)] + sum((E[s * 4 + y] for s, y in enumerate(prefix)), torch.zeros(3, dtype=torch.float64))
        assert torch.allclose(table[row], torch.tanh(h @ W1) @ W2, rtol=0, atol=1e-12), prefix
    p = sequence_logps(policy, all_sequences()).exp()
    assert abs(p.sum().item() - 1) < 1e-12


def test_neural_sft_model_fits_its_data_and_a_tr_run_moves_the_shared_weights():
    sft, chosen, rejected = make_data(seed=0, width=2)
    sft_data = torch.randint(0, 4, (24, 3), generator=torch.Generator().manual_seed(0))  # as make_data draws them
    assert sequence_logps(sft, sft_data).mean() > math.log(1 / 64) + 0.5  # well above uniform on its training data
    assert len(set(chosen.tolist()) | set(rejected.tolist())) == 12
    policy, reference, history = train("tr_dpo", 1.0, 4, sft, chosen, rejected, steps=8, lr=0.01, beta=0.1)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), policy.parameters()))  # copied at step 8
    assert not torch.equal(policy.W2, sft.W2) and history[0]["kl"] == 0 and history[-1]["kl"] > 0
    for h in history:
        assert abs(h["p_chosen"] + h["p_rejected"] + h["p_ood"] - 1) < 1e-9
