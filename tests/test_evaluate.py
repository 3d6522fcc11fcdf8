"""evaluate.py: win-rate arithmetic, the KL estimator against exact enumeration, and the judges."""
import itertools
import json
import math
import threading
import types
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from data import encode
from evaluate import completion_logps, criteria_means, gold_judge, kl_estimate, llm_judge, sample, stop_ids, win_rate
from families import END_OF_TEXT, ENDOFTEXT, EOT_ID, IM_END, generation_config_of, tokenizer_of


def test_win_rate_counts_ties_and_order_disagreements_as_half():
    # (judge(policy, baseline), judge(baseline, policy)): +1 means the first answer won
    outcomes = [(1, -1), (1, -1), (-1, 1), (0, 0), (1, 1), (-1, -1)]  # win, win, loss, tie, A-bias, B-bias
    rate, se = win_rate(outcomes)
    assert rate == pytest.approx((1 + 1 + 0 + 0.5 + 0.5 + 0.5) / 6)
    points = [1, 1, 0, 0.5, 0.5, 0.5]
    assert se == pytest.approx(math.sqrt(sum((p - rate) ** 2 for p in points) / 5 / 6))


def test_a_judge_that_always_prefers_position_a_gives_exactly_one_half():
    assert win_rate([(1, 1)] * 10)[0] == 0.5


def tiny_lm(seed, vocab_size=4, sharpness=20):
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(sharpness)  # sharper distributions, so that the two models differ clearly
    return model


def test_kl_estimate_on_policy_samples_matches_exact_enumeration_whatever_the_generation_config_says():
    policy, sft = tiny_lm(0), tiny_lm(1)
    # what Qwen2.5-Instruct's generation_config adds to `generate`, and an n-gram ban: samples from pi see none of it
    policy.generation_config.update(repetition_penalty=1.05, no_repeat_ngram_size=2, temperature=0.7, top_p=0.8,
                                    top_k=20)
    prompt = [1, 2]
    every = [list(y) for y in itertools.product(range(4), repeat=3)]  # all 64 completions of length 3
    lp = completion_logps(policy, [prompt] * 64, every, 64, "cpu")
    lq = completion_logps(sft, [prompt] * 64, every, 64, "cpu")
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)  # the log-probs form a distribution
    exact = (lp.exp() * (lp - lq)).sum().item()
    samples = sample(policy, [prompt] * 4000, set(), 1.0, 3, 1000, 0, "cpu")  # no stop token: 3 tokens each
    assert all(len(s) == 3 for s in samples)
    counts = Counter(tuple(s) for s in samples)
    for y, logp in zip(every, lp.tolist()):  # each completion as often as pi says, within 5 standard deviations
        p = math.exp(logp)
        assert abs(counts[tuple(y)] - 4000 * p) <= 5 * math.sqrt(4000 * p * (1 - p)) + 1, (y, counts[tuple(y)], p)
    ps = completion_logps(policy, [prompt] * 4000, samples, 1000, "cpu")
    qs = completion_logps(sft, [prompt] * 4000, samples, 1000, "cpu")
    kl_seq, kl_token = kl_estimate(ps, qs, [3] * 4000)
    se = (ps - qs).std().item() / math.sqrt(4000)
    assert abs(kl_seq - exact) < 4 * se and exact > 0.5
    assert kl_token == pytest.approx(kl_seq / 3)


def test_samples_stop_at_an_eos_whose_id_is_0_and_the_kl_is_that_of_the_length_limited_distribution():
    policy, sft = tiny_lm(0, sharpness=5), tiny_lm(1, sharpness=5)
    prompt, eos = [3, 1], 0  # Pythia's EOS id
    # every completion of at most 3 tokens that ends at its first EOS, or has 3 tokens and no EOS
    every = [list(y) for n in (1, 2, 3) for y in itertools.product(range(4), repeat=n)
             if eos not in y[:-1] and (n == 3 or y[-1] == eos)]
    lp = completion_logps(policy, [prompt] * len(every), every, 64, "cpu")
    lq = completion_logps(sft, [prompt] * len(every), every, 64, "cpu")
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)  # they are the whole length-limited distribution
    exact_kl = (lp.exp() * (lp - lq)).sum().item()
    exact_length = sum(math.exp(l) * len(y) for l, y in zip(lp.tolist(), every))
    samples = sample(policy, [prompt] * 4000, {eos}, 1.0, 3, 1000, 0, "cpu")
    assert all(eos not in s[:-1] and (len(s) == 3 or s[-1] == eos) for s in samples)  # cut at EOS, which is kept
    lengths = torch.tensor([len(s) for s in samples], dtype=torch.float64)
    assert 0.2 < (lengths < 3).double().mean() < 0.8  # a real share of samples ends early
    assert abs(lengths.mean().item() - exact_length) < 4 * lengths.std().item() / math.sqrt(4000)
    ps = completion_logps(policy, [prompt] * 4000, samples, 1000, "cpu")
    qs = completion_logps(sft, [prompt] * 4000, samples, 1000, "cpu")
    kl_seq, _ = kl_estimate(ps, qs, lengths.tolist())
    assert abs(kl_seq - exact_kl) < 4 * (ps - qs).std().item() / math.sqrt(4000)


def draw_by_hand(model, prompts, stop, steps, seed):
    """What `sample` must draw, computed the plain way: each prompt unpadded, its whole sequence recomputed every step,
    one multinomial call per step on the (B, V) probabilities (as `sample` makes it); finished rows draw on,
    unrecorded."""
    generator, sequences = torch.Generator().manual_seed(seed), [list(p) for p in prompts]
    drawn, done = [[] for _ in prompts], [False] * len(prompts)
    with torch.no_grad():
        for _ in range(steps):
            logits = torch.stack([model(torch.tensor([s])).logits[0, -1].float() for s in sequences])
            tokens = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1).tolist()
            for i, t in enumerate(tokens):
                sequences[i].append(t)
                if not done[i]:
                    drawn[i].append(t)
                    done[i] = t in stop
            if all(done):
                break
    return drawn


def test_left_padded_batched_sampling_with_a_cache_draws_what_one_prompt_at_a_time_without_cache_draws():
    model = tiny_lm(2, vocab_size=32)
    prompts, stop = [[5], [3, 9, 4, 7, 1], [8, 8, 2]], {0, 31}
    assert sample(model, prompts, stop, 1.0, 6, 3, 7, "cpu") == draw_by_hand(model, prompts, stop, 6, 7)


@pytest.mark.parametrize("family, expected", [("pythia", {0}), ("llama", {EOT_ID, END_OF_TEXT}),
                                              ("qwen2", {IM_END, ENDOFTEXT})])
def test_sampling_stops_at_the_end_of_turn_training_puts_after_every_answer_and_at_every_eos(family, expected,
                                                                                              chat_tokenizer):
    tokenizer = tokenizer_of(family, chat_tokenizer)
    model = types.SimpleNamespace(generation_config=generation_config_of(family))
    assert stop_ids(tokenizer, model) == expected  # Pythia's EOS 0 included; Llama-3's <|eot_id|> from its template
    _, completion = encode(tokenizer, "hi", "Hello!")
    assert completion[-1] in expected


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
    FakeJudge.seen.clear()  # what this test's calls sent, not another test's (tests/test_evaluate_runs.py uses it too)
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


def test_the_reward_accuracy_counts_a_tie_one_half_as_the_win_rate_does():
    """The SFT model scored against itself ties on every pair: 0.5, no better than chance (it printed 0.000)."""
    from evaluate import reward_accuracy
    policy = [torch.tensor([-1.0, -2.0, -3.0, -1.0]), torch.tensor([-4.0, -5.0])]  # chosen rows, then rejected
    batches = [{"loss_mask": torch.ones(len(logps), 3)} for logps in policy]
    assert reward_accuracy(policy, policy, batches, "sum") == 0.5
    sft = [torch.tensor([-1.5, -2.0, -3.0, -1.5]), torch.tensor([-4.0, -5.0])]
    assert reward_accuracy(policy, sft, batches, "sum") == (1 + 0 + 0.5) / 3  # margins +0.5, -0.5 and a tie
