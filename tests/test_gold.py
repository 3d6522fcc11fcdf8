"""The gold judge on hand-written replies, make_tasks, and the shipped demo data. No model is loaded."""
import json
import os

import pytest

from demo import gold

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")


def task(family, **fields):
    return dict(id="t", family=family, prompt="(not used by the checker)", **fields)


# arithmetic: 1 for just the number, 0.5 when the right number is the last one said, else 0
def test_arithmetic_accepts_bare_number():
    assert gold.score(task("arithmetic", answer=42), "42") == 1.0


def test_arithmetic_accepts_number_with_trailing_period_and_whitespace():
    assert gold.score(task("arithmetic", answer=42), " 42.\n") == 1.0


def test_arithmetic_gives_half_credit_for_right_number_in_a_sentence():
    assert gold.score(task("arithmetic", answer=42), "The answer is 42.") == 0.5


def test_arithmetic_gives_half_credit_for_worked_equation():
    assert gold.score(task("arithmetic", answer=7), "3 + 4 = 7") == 0.5


def test_arithmetic_rejects_wrong_bare_number():
    assert gold.score(task("arithmetic", answer=42), "32") == 0.0


def test_arithmetic_rejects_right_number_followed_by_a_different_final_number():
    assert gold.score(task("arithmetic", answer=7), "7, or maybe 8") == 0.0


def test_arithmetic_rejects_reply_without_numbers():
    assert gold.score(task("arithmetic", answer=7), "seven") == 0.0


# capital: 1 for just the city, 0.5 when the city is named in a longer reply
def test_capital_accepts_bare_city_in_any_case_with_period():
    assert gold.score(task("capital", answer="Paris"), "paris.") == 1.0


def test_capital_ignores_accents():
    assert gold.score(task("capital", answer="Bogota"), "Bogotá") == 1.0


def test_capital_gives_half_credit_for_city_in_a_sentence():
    assert gold.score(task("capital", answer="Paris"), "The capital of France is Paris.") == 0.5


def test_capital_requires_whole_word_match():
    assert gold.score(task("capital", answer="Rome"), "Romeo and Juliet") == 0.0


def test_capital_rejects_wrong_city():
    assert gold.score(task("capital", answer="Canberra"), "The capital of Australia is Sydney.") == 0.0


def test_capital_accepts_multi_word_city():
    assert gold.score(task("capital", answer="Mexico City"), "Mexico City") == 1.0
    assert gold.score(task("capital", answer="Mexico City"), "Mexico") == 0.0


# yes_no: 1 for just the right word, 0.5 when the reply starts with it and goes on, else 0
def test_yes_no_accepts_bare_answer_with_punctuation():
    assert gold.score(task("yes_no", answer="yes"), "Yes.") == 1.0
    assert gold.score(task("yes_no", answer="no"), "No!") == 1.0


def test_yes_no_gives_half_credit_for_right_answer_then_explanation():
    assert gold.score(task("yes_no", answer="no"), "No, 3 is less than 8.") == 0.5


def test_yes_no_rejects_wrong_answer():
    assert gold.score(task("yes_no", answer="yes"), "No.") == 0.0


def test_yes_no_rejects_answer_not_at_the_start():
    assert gold.score(task("yes_no", answer="yes"), "The answer is yes.") == 0.0


def test_yes_no_does_not_read_yesterday_as_yes():
    assert gold.score(task("yes_no", answer="yes"), "Yesterday it was.") == 0.0


# word_count: 1 for exactly n words, 0.5 for 1 to 2n words, 0 beyond
def test_word_count_accepts_exact_count_ignoring_punctuation():
    assert gold.score(task("word_count", n=3), "Cats love fish.") == 1.0


def test_word_count_does_not_count_a_lone_dash_as_a_word():
    assert gold.score(task("word_count", n=3), "Cats - love fish") == 1.0


def test_word_count_gives_half_credit_for_short_miscounted_reply():
    assert gold.score(task("word_count", n=3), "Fish.") == 0.5
    assert gold.score(task("word_count", n=3), "Cats really love to eat fish") == 0.5


def test_word_count_rejects_rambling_reply():
    assert gold.score(task("word_count", n=2), "Cats like many things, such as fish and naps.") == 0.0


def test_word_count_rejects_empty_reply():
    assert gold.score(task("word_count", n=2), "") == 0.0


# start_word: 1 when the first word is the asked word, else 0
def test_start_word_accepts_asked_word_in_any_case():
    assert gold.score(task("start_word", word="Today"), "today, it rained.") == 1.0


def test_start_word_ignores_leading_quotes_and_markdown():
    assert gold.score(task("start_word", word="Today"), '"**Today** the rain fell."') == 1.0


def test_start_word_rejects_word_later_in_the_sentence():
    assert gold.score(task("start_word", word="Today"), "The rain fell today.") == 0.0


def test_start_word_rejects_possessive_form():
    assert gold.score(task("start_word", word="Today"), "Today's rain was heavy.") == 0.0


# list_items: 1 for just the comma-separated list, 0.5 for n items numbered or amid other text, else 0
def test_list_items_accepts_comma_separated_list():
    assert gold.score(task("list_items", n=3), "Apples, bananas, cherries.") == 1.0


def test_list_items_accepts_final_and():
    assert gold.score(task("list_items", n=3), "apples, bananas, and cherries") == 1.0


def test_list_items_rejects_wrong_number_of_items():
    assert gold.score(task("list_items", n=4), "apples, bananas, cherries") == 0.0


def test_list_items_rejects_items_that_are_sentences():
    assert gold.score(task("list_items", n=3), "I like apples a lot, bananas are yellow and long, cherries") == 0.0


def test_list_items_gives_half_credit_for_numbered_list_of_n_items():
    assert gold.score(task("list_items", n=3), "1. Apples\n2. Bananas\n3. Cherries") == 0.5
    assert gold.score(task("list_items", n=4), "1. Apples\n2. Bananas\n3. Cherries") == 0.0


def test_list_items_gives_half_credit_for_list_amid_other_text():
    assert gold.score(task("list_items", n=3), "Here are three fruits:\napples, bananas, cherries\nEnjoy!") == 0.5


def test_unknown_family_raises():
    with pytest.raises(ValueError):
        gold.score(task("poetry"), "roses are red")


# make_tasks
def test_make_tasks_is_deterministic_given_seed():
    assert gold.make_tasks(200, seed=3) == gold.make_tasks(200, seed=3)
    assert gold.make_tasks(200, seed=3) != gold.make_tasks(200, seed=4)


def test_make_tasks_ids_and_prompts_are_unique_and_all_families_appear():
    tasks = gold.make_tasks(600, seed=0)
    assert len({t["id"] for t in tasks}) == len({t["prompt"] for t in tasks}) == 600
    assert {t["family"] for t in tasks} == set(gold.FAMILIES)


def test_make_tasks_correct_reference_answers_score_one():
    replies = {"arithmetic": lambda t: str(t["answer"]), "capital": lambda t: t["answer"],
               "yes_no": lambda t: t["answer"], "word_count": lambda t: " ".join(["word"] * t["n"]),
               "start_word": lambda t: f"{t['word']} it rained.", "list_items": lambda t: ", ".join(["x"] * t["n"])}
    for t in gold.make_tasks(300, seed=1):
        assert gold.score(t, replies[t["family"]](t)) == 1.0, t


def test_make_tasks_arithmetic_answers_are_right():
    for t in gold.make_tasks(300, seed=2):
        if t["family"] == "arithmetic":
            a, op, b = t["prompt"].split("?")[0].split()[-3:]
            assert t["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0


def test_make_tasks_refuses_more_prompts_than_exist():
    with pytest.raises(ValueError):
        gold.make_tasks(100_000, seed=0)


# the shipped data
def read_jsonl(name):
    path = os.path.join(DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not built (python demo/make_data.py)")
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_shipped_pairs_have_a_clear_winner_and_distinct_texts():
    for name in ["train.jsonl", "eval.jsonl"]:
        rows = read_jsonl(name)
        assert rows, name
        for row in rows:
            assert set(row) == {"id", "family", "prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
            assert row["chosen"].strip() and row["rejected"].strip(), row  # data.py rejects empty completions
            assert row["chosen"] != row["rejected"], row
            assert row["score_chosen"] > row["score_rejected"], row


def test_shipped_scores_match_the_gold_judge():
    tasks = {t["prompt"]: t for t in read_jsonl("prompts_eval.jsonl")}
    for row in read_jsonl("eval.jsonl"):
        assert gold.score(tasks[row["prompt"]], row["chosen"]) == row["score_chosen"], row
        assert gold.score(tasks[row["prompt"]], row["rejected"]) == row["score_rejected"], row


def test_shipped_train_and_eval_prompts_are_disjoint():
    train = {row["prompt"] for row in read_jsonl("train.jsonl")}
    evaluation = {row["prompt"] for row in read_jsonl("eval.jsonl")}
    held_out = {t["prompt"] for t in read_jsonl("prompts_eval.jsonl")}
    assert evaluation <= held_out
    assert not train & held_out


def test_shipped_ids_are_unique():
    for name in ["train.jsonl", "eval.jsonl", "prompts_eval.jsonl"]:
        ids = [row["id"] for row in read_jsonl(name)]
        assert len(ids) == len(set(ids)), name
