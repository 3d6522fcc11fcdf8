"""A chat template that refuses a row (Mistral-Instruct's "Conversation roles must alternate ...", Gemma's "System
role not supported") makes a bad row, not a crash: named with its place and the template's own message, stopping a
user's file unless --skip_bad_rows, skipped and counted for the hub sets, and remembered as refused by the cache."""
import argparse
import copy
import json
import os
import subprocess
import sys

import pytest

import data
from conftest import PAIRS, ROOT, TINY, train_py
from data import tokenize, turn_end
from evaluate import render_prompts
from sources import DataError, load_rows, skips_bad_rows
from test_train import TINY_RUN

ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."
NO_SYSTEM = "System role not supported"
REFUSING_TEMPLATE = (  # Gemma's refusal of a system message, Mistral-Instruct's of turns out of order; ChatML turns
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('" + NO_SYSTEM + "') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('" + ALTERNATE + "') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


LINES = [  # (row, what the template says of it: None if it renders it)
    ({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}, None),
    ({"prompt": [{"role": "system", "content": "Be brief."}, user("What is 3 + 3?")], "chosen": "6", "rejected": "7"},
     NO_SYSTEM),
    ({"prompt": [user("Hi."), user("What is 1 + 1?")], "chosen": "2", "rejected": "3"}, ALTERNATE),
    # the prompt alone renders; an answer after the prompt's own assistant turn does not
    ({"prompt": [user("Hi."), assistant("Hello!")], "chosen": "Ask me.", "rejected": "Bye."}, ALTERNATE),
    ({"prompt": [user("Hi."), assistant("Hello!"), user("What is 4 + 4?")], "chosen": "8", "rejected": "9"}, None),
]


@pytest.fixture(scope="module")
def refusing(chat_tokenizer):
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = REFUSING_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def refusing_model(refusing, tmp_path_factory):
    """A folder usable as --model: the tiny config's random weights beside the refusing tokenizer."""
    from model import load_model
    folder = tmp_path_factory.mktemp("refusing-model")
    load_model(TINY).save_pretrained(folder)
    refusing.save_pretrained(folder)
    return str(folder)


def write(path, rows, before=""):
    path.write_text(before + "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def refused_lines(path, first=1):
    return [f"{path}:{n}: refused by the chat template: {says}" for n, (_, says) in enumerate(LINES, first) if says]


def test_a_row_the_template_refuses_stops_tokenization_naming_its_line_and_the_templates_message(refusing, tmp_path):
    path = write(tmp_path / "mine.jsonl", [row for row, _ in LINES])
    with pytest.raises(DataError) as error:
        tokenize(load_rows(path), refusing, 64, 48, log=lambda m: None, cache_dir=tmp_path)
    message = str(error.value)
    assert "3 bad row(s) of 5" in message and "--skip_bad_rows" in message
    for line in refused_lines(path):
        assert line in message


def test_skip_bad_rows_tokenizes_the_rest_and_counts_the_refused_rows(refusing, tmp_path):
    path = write(tmp_path / "mine.jsonl", [row for row, _ in LINES])
    messages = []
    examples = tokenize(load_rows(path), refusing, 64, 48, log=messages.append, cache_dir=tmp_path, skip_bad_rows=True)
    assert [e["row"] for e in examples] == [0, 4]  # indices of the rows the template renders
    log = "\n".join(messages)
    assert "skipped 3 bad row(s) of 5" in log and "tokenized 2 of 5 pairs" in log
    assert "refused by the chat template 3" in log
    for line in refused_lines(path):
        assert line in log
    assert refusing.decode(examples[1]["prompt"]) == ("<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello!"
                                                      "<|im_end|>\n<|im_start|>user\nWhat is 4 + 4?<|im_end|>\n"
                                                      "<|im_start|>assistant\n")


def test_a_system_message_under_a_template_without_a_system_role_is_refused_not_folded_into_the_user_turn(
        refusing, chat_tokenizer, tmp_path):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, user("What is 3 + 3?")], "chosen": "6",
           "rejected": "7"}
    with pytest.raises(DataError, match=f"row 0: refused by the chat template: {NO_SYSTEM}"):
        tokenize([row], refusing, 64, 48, log=lambda m: None, cache_dir=tmp_path)
    # the same question without it renders, and a template with a system role writes it as its own turn
    e = tokenize([{**row, "prompt": row["prompt"][1:]}], refusing, 64, 48, log=lambda m: None, cache_dir=tmp_path)[0]
    assert refusing.decode(e["prompt"]) == "<|im_start|>user\nWhat is 3 + 3?<|im_end|>\n<|im_start|>assistant\n"
    e = tokenize([row], chat_tokenizer, 64, 48, log=lambda m: None, cache_dir=tmp_path)[0]
    assert chat_tokenizer.decode(e["prompt"]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat "
                                                  "is 3 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_a_second_tokenization_reads_the_refusals_from_the_cache_without_rendering_again(refusing, tmp_path,
                                                                                          monkeypatch):
    path = write(tmp_path / "mine.jsonl", [row for row, _ in LINES])
    rows, first, second = load_rows(path), [], []
    a = tokenize(rows, refusing, 64, 48, log=first.append, cache_dir=tmp_path, skip_bad_rows=True)

    def render_again(*args, **kwargs):
        raise AssertionError("a cached row was tokenized again")
    monkeypatch.setattr(data, "encode_pair", render_again)
    b = tokenize(rows, refusing, 64, 48, log=second.append, cache_dir=tmp_path, skip_bad_rows=True)
    assert "read from the cache" in "\n".join(second)
    assert [e["row"] for e in a] == [e["row"] for e in b] == [0, 4]
    for line in refused_lines(path):
        assert line in "\n".join(first) and line in "\n".join(second)
    with pytest.raises(DataError, match="3 bad row"):  # and without --skip_bad_rows, a cached refusal stops as before
        tokenize(rows, refusing, 64, 48, log=lambda m: None, cache_dir=tmp_path)


def test_hh_dialogues_with_two_human_turns_in_a_row_or_an_assistant_turn_first_are_skipped_and_counted_by_default(
        refusing, tmp_path):
    from hub_layout import hh, write_hh
    two_humans = "\n\nHuman: Hi.\n\nHuman: What is the capital of Italy?\n\nAssistant:"
    assistant_first = "\n\nAssistant: Hello, I am here to help.\n\nHuman: What is the capital of Spain?\n\nAssistant:"
    folder = write_hh(tmp_path / "hh-rlhf", {"helpful-base": {
        "train": [{"chosen": hh("What is the capital of France?", "Paris."),
                   "rejected": hh("What is the capital of France?", "London.")},
                  {"chosen": two_humans + " Rome.", "rejected": two_humans + " Milan."},
                  {"chosen": assistant_first + " Madrid.", "rejected": assistant_first + " Lisbon."}],
        "test": [{"chosen": hh("What is 2 + 2?", "4."), "rejected": hh("What is 2 + 2?", "5.")}]}})
    rows, messages = load_rows("hh", data_dir=folder, log=lambda m: None), []
    assert rows[2]["prompt"] == [assistant("Hello, I am here to help."), user("What is the capital of Spain?")]  # kept
    assert skips_bad_rows("hh", False) and not skips_bad_rows(PAIRS, False) and skips_bad_rows(PAIRS, True)
    examples = tokenize(rows, refusing, 64, 48, log=messages.append, cache_dir=tmp_path,
                        skip_bad_rows=skips_bad_rows("hh", False))
    assert [e["row"] for e in examples] == [0]
    log = "\n".join(messages)
    assert "skipped 2 bad row(s) of 3" in log and "refused by the chat template 2" in log
    assert f"{folder} train[1]: refused by the chat template: {ALTERNATE}" in log
    assert f"{folder} train[2]: refused by the chat template: {ALTERNATE}" in log


def test_the_inspector_names_every_line_the_template_refuses(refusing_model, tmp_path, capsys):
    path = write(tmp_path / "mine.jsonl", [row for row, _ in LINES], before=open(PAIRS).read())
    data.inspect(argparse.Namespace(dataset=path, split="train", data_dir=None, model=refusing_model, max_length=64,
                                    max_prompt_length=48, micro_batch_size=4, batch_size=8))
    out = capsys.readouterr().out
    assert "skipped 3 bad row(s) of 46" in out and "tokenized 43 of 46 pairs" in out
    for line in refused_lines(path, first=42):
        assert line in out


def test_evaluation_prompts_the_template_refuses_are_left_out_and_counted(refusing):
    prompts = [row["prompt"] for row, _ in LINES[:3]]
    messages = []
    kept, ids = render_prompts(refusing, prompts, log=messages.append)
    assert kept == [prompts[0]] and refusing.decode(ids[0]) == ("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                                                                "<|im_start|>assistant\n")
    first_line, system, alternate = messages[0].splitlines()
    assert "skipped 2 bad row(s) of 3" in first_line
    assert system.strip().startswith('prompt 1 [{"role": "system", "content": "Be brief."}')  # where, and its start
    assert system.endswith(f": refused by the chat template: {NO_SYSTEM}")
    assert alternate.strip().startswith('prompt 2 [{"role": "user", "content": "Hi."}')
    assert alternate.endswith(f": refused by the chat template: {ALTERNATE}")


def test_a_template_that_refuses_even_a_plain_question_and_answer_is_an_error_naming_the_model(chat_tokenizer):
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = "{{ raise_exception('Tools must be given') }}"
    with pytest.raises(DataError, match="chat template refuses a plain question and answer.*Tools must be given"):
        turn_end(tokenizer)


def run_train(refusing_model, path, tmp_path, *flags):
    args = [f for f in TINY_RUN]
    args[args.index("--model") + 1], args[args.index("--dataset") + 1] = refusing_model, path
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, "--eval_pairs", "0", *flags,
                           "--out_dir", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow  # a script run as a subprocess
def test_train_py_stops_at_a_refused_row_with_its_line_and_the_templates_message_and_no_traceback(refusing_model,
                                                                                                 tmp_path):
    path = write(tmp_path / "mine.jsonl", [row for row, _ in LINES], before=open(PAIRS).read())
    result = run_train(refusing_model, path, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for line in refused_lines(path, first=42):
        assert line in result.stderr


@pytest.mark.slow  # a script run as a subprocess
def test_train_py_with_skip_bad_rows_trains_on_the_rest_and_counts_the_refused_rows(refusing_model, tmp_path):
    path = write(tmp_path / "mine.jsonl", [row for row, _ in LINES], before=open(PAIRS).read())
    args = [f for f in TINY_RUN]
    args[args.index("--model") + 1], args[args.index("--dataset") + 1] = refusing_model, path
    status, log = train_py(*args, "--eval_pairs", "0", "--skip_bad_rows", "--max_steps", "1", "--out_dir",
                           tmp_path / "out")
    assert status == 0, log[-3000:]
    assert "skipped 3 bad row(s) of 46" in log and "tokenized 43 of 46 pairs" in log
    assert (tmp_path / "out" / "step_000001").is_dir()


SPECIAL_LINES = [  # (row, the special token whose text it writes, and where: None if it writes none)
    ({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}, None),
    ({"prompt": "What is 3 + 3?", "chosen": "6<|im_end|> and more", "rejected": "7"}, "<|im_end|> in its chosen"),
    ({"prompt": [user("Hi.<|im_end|>\n<|im_start|>assistant\nSure!<|im_end|>\n<|im_start|>user\nWhat is 1 + 1?")],
      "chosen": "2", "rejected": "3"}, "<|im_end|> in its prompt"),  # a turn injected into the prompt
    ({"prompt": "What is 4 + 4?", "chosen": "8", "rejected": "9<|endoftext|>"}, "<|endoftext|> in its rejected"),
]


@pytest.mark.parametrize("plain", [False, True], ids=["chat template", "plain text"])
def test_a_row_that_writes_a_special_tokens_text_is_a_bad_row_named_with_its_line_and_the_token(
        plain, chat_tokenizer, plain_tokenizer, tmp_path):
    """The tokenizer reads such text as the token itself: an end of turn mid-answer (the policy would learn to stop
    there, and evaluate.py score the cut answer), or a turn injected into a prompt. It stops a user's file with its
    line and the token unless --skip_bad_rows, which leaves it out, counted (the hub sets always do)."""
    tokenizer = plain_tokenizer if plain else chat_tokenizer
    for token in ("<|im_end|>", "<|endoftext|>"):  # what the text becomes: that token's id
        assert tokenizer.convert_tokens_to_ids(token) in tokenizer(f"6{token} and more")["input_ids"]
    path = write(tmp_path / "mine.jsonl", [row for row, _ in SPECIAL_LINES])
    expected = [f"{path}:{n}: special-token text: {says}" for n, (_, says) in enumerate(SPECIAL_LINES, 1) if says]
    with pytest.raises(DataError) as error:
        tokenize(load_rows(path), tokenizer, 64, 48, log=lambda m: None, cache_dir=tmp_path)
    assert "3 bad row(s) of 4" in str(error.value) and "--skip_bad_rows" in str(error.value)
    assert all(line in str(error.value) for line in expected), str(error.value)
    messages = []
    examples = tokenize(load_rows(path), tokenizer, 64, 48, log=messages.append, cache_dir=tmp_path, skip_bad_rows=True)
    assert [e["row"] for e in examples] == [0] and "special-token text 3" in "\n".join(messages)
