"""What study.py computes from its records, without running a study (fast): a curve read at a KL in step order, and
Student's t for a mean over a few seeds."""
import math

import pytest

import study


def test_the_same_kl_is_read_along_the_curve_in_step_order_with_every_crossing():
    # the SFT model at KL 0, step 32 at KL 20, step 64 back at KL 10: the curve turns back
    curve = [(0.0, 0.2), (20.0, 0.6), (10.0, 0.3)]
    assert study.at_kl(curve, 5.0) == pytest.approx(0.3)  # on 0 -> 20 only (sorted by KL it was 0 -> 10: 0.25)
    assert study.at_kl(curve, 15.0) == pytest.approx((0.5 + 0.45) / 2)  # crossed on the way out and on the way back
    assert study.at_kl(curve, 10.0) == pytest.approx((0.4 + 0.3) / 2)  # on the way out, and at step 64's point
    assert study.at_kl(curve, 20.0) == pytest.approx(0.6)  # the turning point, once
    assert study.at_kl(curve, 20.5) is None and study.at_kl(curve, -0.1) is None  # never beyond the curve


def test_a_monotone_curve_is_read_between_its_two_neighbours():
    curve = [(0.0, 0.2), (10.0, 0.4), (20.0, 0.3)]
    assert [study.at_kl(curve, kl) for kl in (0, 5, 10, 15, 20)] == pytest.approx([0.2, 0.3, 0.4, 0.35, 0.3])


@pytest.mark.parametrize("t, df, p", [(4.2, 3, 0.0246), (12.706, 1, 0.05), (4.303, 2, 0.05), (3.182, 3, 0.05),
                                      (2.776, 4, 0.05), (2.571, 5, 0.05), (2.228, 10, 0.05), (1.0, 1, 0.5),
                                      (5.841, 3, 0.01), (0.0, 3, 1.0)])
def test_the_two_sided_p_is_students_t_with_seeds_minus_1_degrees_of_freedom(t, df, p):
    """Against the t table (two-sided critical values) and t = 4.2 on 3 degrees of freedom."""
    values = [1.0, -1.0] + [0.0] * (df - 1)  # mean 0, then shifted so that mean / s.e. is t
    se = study.mean_se(values)[1]
    t_, p_ = study.t_test([v + t * se for v in values])
    assert t_ == pytest.approx(t) and p_ == pytest.approx(p, abs=5e-4)


def test_a_difference_prints_its_p_beside_its_standard_error():
    values = [-0.038, -0.094, -0.05, -0.04]
    m, se = study.mean_se(values)
    t = m / se
    # an independent p: the t density on 3 degrees of freedom, 2 / (pi sqrt(3) (1 + x^2 / 3)^2), integrated past |t|
    tail = 2 * sum(2 / (math.pi * math.sqrt(3) * (1 + x * x / 3) ** 2) * 1e-3
                   for x in (abs(t) + 1e-3 * (i + 0.5) for i in range(200_000)))
    assert study.difference(values) == f"{m:+.3f} ± {se:.3f} (p {tail:.3f})"
    assert study.difference([0.1]).startswith("+0.100 ± nan") and "p" not in study.difference([0.1])
