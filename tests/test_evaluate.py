"""evaluate.py: win-rate arithmetic, the KL estimator against exact enumeration, and the judges."""
import itertools
import json
import math
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from evaluate import completion_logps, criteria_means, gold_judge, kl_estimate, llm_judge, sample, win_rate


def test_win_rate_counts_ties_and_order_disagreements_as_half():
    # (judge(policy, baseline), judge(baseline, policy)): +1 means the first answer won
    outcomes = [(1, -1), (1, -1), (-1, 1), (0, 0), (1, 1), (-1, -1)]  # win, win, loss, tie, A-bias, B-bias
    rate, se = win_rate(outcomes)
    assert rate == pytest.approx((1 + 1 + 0 + 0.5 + 0.5 + 0.5) / 6)
    points = [1, 1, 0, 0.5, 0.5, 0.5]
    assert se == pytest.approx(math.sqrt(sum((p - rate) ** 2 for p in points) / 5 / 6))


def test_a_judge_that_always_prefers_position_a_gives_exactly_one_half():
    assert win_rate([(1, 1)] * 10)[0] == 0.5


def tiny_lm(seed):
    config = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=16, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)  # sharper distributions, so that the two models differ clearly
    return model


def test_kl_estimate_on_policy_samples_matches_exact_enumeration():
    policy, sft = tiny_lm(0), tiny_lm(1)
    prompt = [1, 2]
    every = [list(y) for y in itertools.product(range(4), repeat=3)]  # all 64 completions of length 3
    lp = completion_logps(policy, [prompt] * 64, every, 64, "cpu")
    lq = completion_logps(sft, [prompt] * 64, every, 64, "cpu")
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)  # the log-probs form a distribution
    exact = (lp.exp() * (lp - lq)).sum().item()
    stub = types.SimpleNamespace(eos_token_id=None, pad_token_id=0)  # no EOS: every sample has 3 tokens
    samples = sample(policy, stub, [prompt] * 4000, 1.0, 3, 1000, 0, "cpu")
    assert all(len(s) == 3 for s in samples)
    ps = completion_logps(policy, [prompt] * 4000, samples, 1000, "cpu")
    qs = completion_logps(sft, [prompt] * 4000, samples, 1000, "cpu")
    kl_seq, kl_token = kl_estimate(ps, qs, [3] * 4000)
    se = (ps - qs).std().item() / math.sqrt(4000)
    assert abs(kl_seq - exact) < 4 * se and exact > 0.5
    assert kl_token == pytest.approx(kl_seq / 3)


def test_gold_judge_prefers_the_correct_answer_in_both_orders():
    tasks = [{"id": "t0", "family": "arithmetic", "prompt": "What is 2 + 3? Answer with just the number.", "answer": 5}]
    compare, score = gold_judge(tasks)
    assert compare(0, tasks[0]["prompt"], "5", "7") == 1 and compare(0, tasks[0]["prompt"], "7", "5") == -1
    assert compare(0, tasks[0]["prompt"], "5", "5") == 0


class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that prefers the answer containing "good" and records the key."""
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.seen.append((self.path, self.headers.get("Authorization"), body["model"]))
        question = body["messages"][0]["content"]
        a = question.split("[Answer A]")[1].split("[Answer B]")[0]
        b = question.split("[Answer B]")[1].split("Rate each")[0]
        better = "A" if "good" in a else "B" if "good" in b else "tie"
        score = {"A": (9, 3), "B": (3, 9), "tie": (5, 5)}[better]
        reply = (f"A: coherence={score[0]} correctness={score[0]} detail=5 helpfulness={score[0]} harmlessness=10\n"
                 f"B: coherence={score[1]} correctness={score[1]} detail=5 helpfulness={score[1]} harmlessness=10\n"
                 f"Better: {better}")
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_llm_judge_talks_to_a_real_local_endpoint_and_parses_verdict_and_criteria():
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        compare, criteria = llm_judge(f"http://127.0.0.1:{server.server_port}/v1", "judge-model", "secret")
        prompt = [{"role": "user", "content": "Say something nice."}]
        outcomes = [(compare(0, prompt, "a good answer", "meh"), compare(0, prompt, "meh", "a good answer")),
                    (compare(1, prompt, "meh", "good too"), compare(1, prompt, "good too", "meh")),
                    (compare(2, prompt, "same", "same"), compare(2, prompt, "same", "same"))]
        assert outcomes == [(1, -1), (-1, 1), (0, 0)]
        assert win_rate(outcomes)[0] == pytest.approx(0.5)
        assert FakeJudge.seen[0] == ("/v1/chat/completions", "Bearer secret", "judge-model")
        assert criteria[(0, "a good answer")] == [{"coherence": 9, "correctness": 9, "detail": 5, "helpfulness": 9,
                                                   "harmlessness": 10}] * 2
        policy = criteria_means(criteria, [(0, "a good answer"), (1, "good too"), (2, "same")])
        baseline = criteria_means(criteria, [(0, "meh"), (1, "meh"), (2, "same")])
        assert policy["coherence"] == pytest.approx((9 + 9 + 9 + 9 + 5 * 4) / 8)  # "same" rated 5 as A and as B, twice
        assert baseline["coherence"] == pytest.approx((3 * 4 + 5 * 4) / 8) and baseline["harmlessness"] == 10
    finally:
        server.shutdown()
