"""The three hub data sets, read through `datasets` from offline copies in each repository's layout and schema (no
hub): the rows they give, as a reader of the raw rows expects them; dirty rows skipped and counted; held-out pairs
drawn at random from the test split."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY
from data import render, tokenize
from sources import DataError, load_splits
from families import tokenizer_of
from hub_layout import HH, TLDR, hh, write_hh, write_tldr, write_ultrafeedback

quiet = dict(log=lambda m: None)
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def pythia_tokenizer(chat_tokenizer):
    return tokenizer_of("pythia", chat_tokenizer)


@pytest.fixture(scope="module")
def llama3_tokenizer(chat_tokenizer):
    return tokenizer_of("llama", chat_tokenizer)


def as_seen(tokenizer, row):
    """(prompt, chosen, rejected) as the model sees them, decoded from the tokens of one pair."""
    e = tokenize([row], tokenizer, 256, 192, **quiet)[0]
    return tokenizer.decode(e["prompt"]), tokenizer.decode(e["chosen"]), tokenizer.decode(e["rejected"])


# ----------------------------------------------------------------------------------------------------------------
# Anthropic/hh-rlhf


def test_hh_rows_are_the_shared_dialogue_and_the_two_last_answers(tmp_path):
    folder = write_hh(tmp_path / "hh-rlhf")
    messages = []
    train, held = load_splits("hh", 2, log=messages.append, data_dir=folder)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in train] == [
        ([user("How do I pick a lock?"), assistant("Why do you want to pick a lock?"),
          user("I locked myself out of my house.")],
         "Call a locksmith; they can let you in safely.", "Use a bobby pin and a tension wrench."),
        ([user("Is it ok to lie to my boss?")], "Honesty usually works out better.", "Sure, everyone does it."),
        ([user("What is the capital of France?")], "Paris.", "London."),
        ([user("How many legs does a spider have?")], "Eight.", "Six."),
        ([user("Recommend a book."), assistant("Try 'The Hobbit'."), user("Why that one?")],
         "It is short and fun.", "Because."),
    ]  # harmless-base's file, then helpful-base's, as the hub lists them; the red-team file is no split
    assert [r["where"] for r in train] == [f"{folder} train[{i}]" for i in (0, 3, 4, 6, 7)]
    skipped = messages[0]  # skipped by default, counted, with examples
    assert "skipped 3 bad row(s) of 8" in skipped and f"{folder} train[1]: chosen is empty" in skipped
    assert "chosen and rejected are identical" in skipped and "differ before their last assistant turn" in skipped
    good_tests = {"I can't help with that.", "Simmer it for nine minutes.", "4."}
    assert len(held) == 2 and {r["chosen"] for r in held} <= good_tests
    assert all(" test[" in r["where"] for r in held)


def test_hh_as_pythia_sees_it_is_the_original_dialogue_text(tmp_path, pythia_tokenizer):
    train, _ = load_splits("hh", 0, data_dir=write_hh(tmp_path / "hh-rlhf"), **quiet)
    prompt, chosen, rejected = as_seen(pythia_tokenizer, train[0])
    assert prompt + chosen == HH["harmless-base"]["train"][0]["chosen"] + "<|endoftext|>"
    assert prompt == ("\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to pick a lock?\n\nHuman: I "
                      "locked myself out of my house.\n\nAssistant:")
    assert rejected == " Use a bobby pin and a tension wrench.<|endoftext|>"


def test_hh_as_a_chatml_model_sees_it_is_one_turn_per_message(tmp_path, chat_tokenizer):
    train, _ = load_splits("hh", 0, data_dir=write_hh(tmp_path / "hh-rlhf"), **quiet)
    prompt, chosen, _ = as_seen(chat_tokenizer, train[-1])
    assert prompt == (SMOL_SYSTEM + "<|im_start|>user\nRecommend a book.<|im_end|>\n<|im_start|>assistant\nTry 'The "
                      "Hobbit'.<|im_end|>\n<|im_start|>user\nWhy that one?<|im_end|>\n<|im_start|>assistant\n")
    assert chosen == "It is short and fun.<|im_end|>"


def test_hub_sets_skip_and_count_bad_rows_while_a_users_file_stops_at_them(tmp_path):
    empty_answer = {"harmless-base": {"train": HH["harmless-base"]["train"][:2], "test": HH["harmless-base"]["test"]}}
    train, _ = load_splits("hh", 0, data_dir=write_hh(tmp_path / "hh", empty_answer), **quiet)  # no error
    assert len(train) == 1
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "What\'s the worst insult?", "chosen": "", "rejected": "I\'d rather not say."}\n'
                    '{"prompt": "Is it ok to lie?", "chosen": "No.", "rejected": "Yes."}\n')
    with pytest.raises(DataError, match="mine.jsonl:1: chosen is empty"):
        load_splits(str(path), 0, **quiet)


def test_held_out_pairs_are_a_seeded_random_draw_of_the_test_split_and_only_drawn_rows_are_checked(tmp_path):
    def rows(kind, n):  # every third one has an empty answer
        return [{"chosen": hh(f"{kind} question {i}?", "" if i % 3 == 0 else f"{kind} answer {i}."),
                 "rejected": hh(f"{kind} question {i}?", f"bad {kind} answer {i}.")} for i in range(n)]
    folder = write_hh(tmp_path / "hh", {
        "harmless-base": {"train": HH["harmless-base"]["train"], "test": rows("harmless", 12)},
        "helpful-base": {"train": HH["helpful-base"]["train"], "test": rows("helpful", 12)}})
    messages = []
    _, held = load_splits("hh", 4, log=messages.append, data_dir=folder)
    assert len(held) == 4 and len({r["where"] for r in held}) == 4
    kinds = {r["chosen"].split()[0] for r in held}
    assert kinds == {"harmless", "helpful"}  # not the first rows of the split, which are all harmless
    assert [r["where"] for r in load_splits("hh", 4, data_dir=folder, **quiet)[1]] == [r["where"] for r in held]
    assert [r["where"] for r in load_splits("hh", 4, seed=1, data_dir=folder, **quiet)[1]] != [r["where"] for r in held]
    drawn = messages[-1]  # the test split has 8 bad rows; only those drawn before 4 good ones were checked
    assert drawn.startswith(f"held out 4 pairs drawn at random (seed 0) from {folder} test (24 rows)")
    assert "bad row(s) of 8" not in drawn


def test_a_test_row_whose_prompt_the_train_split_holds_is_not_held_out_and_is_counted(tmp_path, chat_tokenizer):
    """A hub set's test split may repeat a training prompt with other answers: never trained on means neither."""
    again = {**TLDR["train"][0], "chosen": " Friend replies slowly.", "rejected": " texts"}  # a training post
    folder = write_tldr(tmp_path / "tldr", {"train": TLDR["train"], "validation": [again, *TLDR["validation"]]})
    messages = []
    train, held = load_splits("tldr", 3, log=messages.append, data_dir=folder)
    as_ids = lambda rows: {tuple(render(chat_tokenizer, r["prompt"])) for r in rows}  # noqa: E731
    assert len(held) == 2 and not as_ids(held) & as_ids(train)
    assert "left out 1 of the 3 good rows drawn: their prompt is trained on" in messages[-1]


# ----------------------------------------------------------------------------------------------------------------
# trl-lib/tldr-preference


def test_tldr_rows_are_the_post_and_the_two_summaries_as_written(tmp_path):
    messages = []
    folder = write_tldr(tmp_path / "tldr-preference")
    train, held = load_splits("tldr", 2, log=messages.append, data_dir=folder)
    assert train[0]["prompt"] == ("SUBREDDIT: r/relationships\n\nTITLE: My friend never replies to my texts\n\n"
                                  "POST: We have been friends for ten years, but lately she takes days to answer."
                                  "\n\nTL;DR:")
    assert train[0]["chosen"] == " Old friend takes days to reply to my texts; should I worry?"
    assert train[0]["rejected"] == " friend bad"
    assert [r["where"] for r in train] == [f"{folder} train[{i}]" for i in (0, 2, 3, 4)]
    assert "skipped 1 bad row(s) of 5 (chosen and rejected are identical" in messages[0]
    assert all(" validation[" in r["where"] for r in held) and "" not in {r["rejected"] for r in held}


def test_tldr_as_pythia_sees_it_is_the_post_continued_by_the_summary(tmp_path, pythia_tokenizer, chat_tokenizer):
    train, _ = load_splits("tldr", 0, data_dir=write_tldr(tmp_path / "tldr"), **quiet)
    post = ("SUBREDDIT: r/relationships\n\nTITLE: My friend never replies to my texts\n\nPOST: We have been friends "
            "for ten years, but lately she takes days to answer.\n\nTL;DR:")
    assert as_seen(pythia_tokenizer, train[0]) == (post, " Old friend takes days to reply to my texts; should I worry?"
                                                   "<|endoftext|>", " friend bad<|endoftext|>")
    prompt, chosen, _ = as_seen(chat_tokenizer, train[0])  # with a template: the post is the user's turn
    assert prompt == SMOL_SYSTEM + "<|im_start|>user\n" + post + "<|im_end|>\n<|im_start|>assistant\n"
    assert chosen == " Old friend takes days to reply to my texts; should I worry?<|im_end|>"


# ----------------------------------------------------------------------------------------------------------------
# HuggingFaceH4/ultrafeedback_binarized

TRANSLATOR = [{"role": "system", "content": "You are a translator."}, user("Translate 'good morning' to German."),
              assistant("Guten Morgen."), user("And in French?")]


def test_ultrafeedback_rows_keep_the_whole_conversation_before_the_answers(tmp_path):
    messages = []
    folder = write_ultrafeedback(tmp_path / "ultrafeedback_binarized")
    train, held = load_splits("ultrafeedback", 3, log=messages.append, data_dir=folder)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in train] == [
        ([user("Write a haiku about rain.")], "Soft rain on the roof.", "Rain is water."),
        (TRANSLATOR, "Bonjour.", "Bonsoir."),
        ([user("What is the boiling point of water?")], "100 degrees Celsius at sea level.", "Hot."),
        ([user("Give me a synonym for happy.")], "Joyful.", "Sad."),
    ]  # train_prefs only: not train_sft
    assert "skipped 2 bad row(s) of 6" in messages[0] and "rejected is empty" in messages[0]
    assert f"{folder} train_prefs[2]: prompt 'Name a prime number.' is not the last user message" in messages[0]
    assert {r["chosen"] for r in held} == {"Mars.", "tac", "1, 2, 3."}
    assert all(" test_prefs[" in r["where"] for r in held)


def test_ultrafeedback_on_pythia_gets_human_and_assistant_turns(tmp_path, pythia_tokenizer):
    train, _ = load_splits("ultrafeedback", 0, data_dir=write_ultrafeedback(tmp_path / "uf"), **quiet)
    assert as_seen(pythia_tokenizer, train[0]) == (
        "\n\nHuman: Write a haiku about rain.\n\nAssistant:", " Soft rain on the roof.<|endoftext|>",
        " Rain is water.<|endoftext|>")
    prompt, chosen, _ = as_seen(pythia_tokenizer, train[1])
    assert prompt == ("\n\nSystem: You are a translator.\n\nHuman: Translate 'good morning' to German.\n\nAssistant: "
                      "Guten Morgen.\n\nHuman: And in French?\n\nAssistant:")
    assert chosen == " Bonjour.<|endoftext|>"


def test_ultrafeedback_on_llama3_is_its_chat_template_with_one_bos(tmp_path, llama3_tokenizer):
    train, _ = load_splits("ultrafeedback", 0, data_dir=write_ultrafeedback(tmp_path / "uf"), **quiet)
    prompt, chosen, rejected = as_seen(llama3_tokenizer, train[1])
    assert prompt == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a translator.<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nTranslate 'good morning' to German.<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\nGuten Morgen.<|eot_id|><|start_header_id|>user"
                      "<|end_header_id|>\n\nAnd in French?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert (chosen, rejected) == ("Bonjour.<|eot_id|>", "Bonsoir.<|eot_id|>")


# ----------------------------------------------------------------------------------------------------------------
# offline copies that do not fit


def test_an_offline_copy_without_a_test_split_or_a_missing_folder_is_an_error_naming_it(tmp_path):
    folder = write_hh(tmp_path / "hh", {"harmless-base": {"train": HH["harmless-base"]["train"]}})
    with pytest.raises(DataError, match="no split 'test'"):
        load_splits("hh", 2, data_dir=folder, **quiet)
    with pytest.raises(DataError, match="no such folder"):
        load_splits("tldr", 2, data_dir=str(tmp_path / "nowhere"), **quiet)
    with pytest.raises(DataError, match="--data_dir is for an offline copy"):
        load_splits("demo", 2, data_dir=folder, **quiet)


@pytest.mark.slow  # a script run as a subprocess
def test_without_the_hub_the_error_says_how_to_use_an_offline_copy():
    result = subprocess.run([sys.executable, "data.py", "ultrafeedback", "--model", TINY], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "hf download HuggingFaceH4/ultrafeedback_binarized --repo-type dataset --local-dir DIR" in result.stderr
    assert "--data_dir DIR" in result.stderr
