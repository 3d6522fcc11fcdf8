"""Pair-consistent tokenization and truncation, the dataset conversions, batches and their masks."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from conftest import PAIRS, ROOT, TINY
from data import Batches, collate, encode, plain_prompt, tokenize
from sources import DataError, hh_row, load_rows, load_splits, normalize
from families import BEGIN_OF_TEXT, EOT_ID, tokenizer_of

HH_CHOSEN = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is popular.\n\nHuman: Another one?"
             "\n\nAssistant: How about Mittens?")
HH_REJECTED = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is popular.\n\nHuman: Another one?"
               "\n\nAssistant: No.")
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
quiet = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def llama3_tokenizer(chat_tokenizer):
    """Llama-3's chat template (a BOS, <|start_header_id|> headers, turns ended by <|eot_id|>), on SmolLM2's vocabulary
    with Llama-3's pre-tokenizer."""
    return tokenizer_of("llama", chat_tokenizer)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_hh_prompt_is_the_shared_dialogue_and_completions_the_last_answers():
    row = hh_row({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert row["prompt"] == [{"role": "user", "content": "What is a good name for a cat?"},
                             {"role": "assistant", "content": "Whiskers is popular."},
                             {"role": "user", "content": "Another one?"}]
    assert row["chosen"] == "How about Mittens?" and row["rejected"] == "No."


def test_hh_without_chat_template_renders_the_original_text(plain_tokenizer):
    row = hh_row({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    prompt_ids, chosen_ids = encode(plain_tokenizer, row["prompt"], row["chosen"])
    assert chosen_ids[-1] == plain_tokenizer.eos_token_id
    assert plain_tokenizer.decode(prompt_ids + chosen_ids[:-1]) == HH_CHOSEN
    assert plain_prompt(row["prompt"]) + " " + row["chosen"] == HH_CHOSEN


def test_ultrafeedback_messages_become_prompt_and_last_answers():
    row = normalize({"prompt": "hi", "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
                     "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Go away."}]})
    assert row == {"prompt": [{"role": "user", "content": "hi"}], "chosen": "Hello!", "rejected": "Go away."}
    implicit = normalize({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}],
                          "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "B"}]})
    assert implicit["prompt"] == [{"role": "user", "content": "hi"}]


def test_the_messages_before_the_final_answers_are_the_prompt_system_and_earlier_turns_included():
    earlier = [{"role": "system", "content": "You are a translator."},
               {"role": "user", "content": "Translate 'good morning' to German."},
               {"role": "assistant", "content": "Guten Morgen."},
               {"role": "user", "content": "And in French?"}]
    row = normalize({"prompt": "And in French?", "chosen": earlier + [{"role": "assistant", "content": "Bonjour."}],
                     "rejected": earlier + [{"role": "assistant", "content": "Bonsoir."}]})
    assert row == {"prompt": earlier, "chosen": "Bonjour.", "rejected": "Bonsoir."}


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "And in Spanish?", "chosen": [{"role": "user", "content": "And in French?"},
                                               {"role": "assistant", "content": "Bonjour."}],
      "rejected": [{"role": "user", "content": "And in French?"}, {"role": "assistant", "content": "Bonsoir."}]},
     "is not the last user message"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
      "rejected": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Go."}]},
     "differ before their final answers"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
      "rejected": "Go."}, "both be text or both be lists"),
])
def test_a_prompt_that_disagrees_with_the_messages_is_a_bad_row(row, problem):
    with pytest.raises(ValueError, match=problem):
        normalize(row)


# ----------------------------------------------------------------------------------------------------------------
# how prompts are rendered, and what a completion ends with


def test_a_text_prompt_without_a_template_is_continued_as_written(plain_tokenizer):
    prompt = "SUBREDDIT: r/cats\n\nTITLE: My cat ignores me\n\nPOST: She only comes when I open a can.\n\nTL;DR:"
    prompt_ids, chosen_ids = encode(plain_tokenizer, prompt, " Cat only loves me for food.")
    assert plain_tokenizer.decode(prompt_ids) == prompt
    assert plain_tokenizer.decode(chosen_ids) == " Cat only loves me for food.<|im_end|>"  # this tokenizer's EOS


def test_a_conversation_gets_human_and_assistant_turns_without_a_template(plain_tokenizer):
    row = normalize({"prompt": "Write a haiku about rain.",
                     "chosen": [{"role": "user", "content": "Write a haiku about rain."},
                                {"role": "assistant", "content": "Soft rain on the roof."}],
                     "rejected": [{"role": "user", "content": "Write a haiku about rain."},
                                  {"role": "assistant", "content": "Rain is water."}]})
    prompt_ids, chosen_ids = encode(plain_tokenizer, row["prompt"], row["chosen"])
    assert plain_tokenizer.decode(prompt_ids) == "\n\nHuman: Write a haiku about rain.\n\nAssistant:"
    assert plain_tokenizer.decode(chosen_ids) == " Soft rain on the roof.<|im_end|>"


def test_with_chatml_a_completion_ends_with_im_end_not_with_the_newline_after_it(chat_tokenizer):
    prompt_ids, completion_ids = encode(chat_tokenizer, "hi", "Hello!")
    assert chat_tokenizer.decode(prompt_ids) == SMOL_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert completion_ids == ids(chat_tokenizer, "Hello!") + [2]  # <|im_end|>; the template's "\n" is the next turn's


def test_with_llama3_a_completion_ends_with_eot_id_and_the_prompt_has_one_bos(llama3_tokenizer):
    prompt_ids, completion_ids = encode(llama3_tokenizer, "hi", "Hello!")
    assert llama3_tokenizer.decode(prompt_ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi"
                                                   "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt_ids.count(BEGIN_OF_TEXT) == 1 and prompt_ids[0] == BEGIN_OF_TEXT
    assert completion_ids == ids(llama3_tokenizer, "Hello!") + [EOT_ID]  # <|eot_id|>, not the EOS <|end_of_text|>


def test_an_answer_that_merges_with_the_end_of_the_prompt_is_tokenized_alone(chat_tokenizer, llama3_tokenizer):
    # Llama-3's template on SmolLM2's own pre-tokenizer: "\n\n" alone is one token, but two when "Hello" follows
    tokenizer = copy.deepcopy(llama3_tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = chat_tokenizer.backend_tokenizer.pre_tokenizer
    messages = [{"role": "user", "content": "hi"}]
    generation_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    joint = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "Hello!"}], tokenize=True)
    assert joint["input_ids"][: len(generation_prompt)] != generation_prompt  # the joint ids cannot be sliced
    prompt_ids, completion_ids = encode(tokenizer, "hi", "Hello!")
    assert prompt_ids == generation_prompt  # the ids sampling will see
    assert completion_ids == ids(tokenizer, "Hello!") + [EOT_ID]  # the answer from its text, then the end of turn


# ----------------------------------------------------------------------------------------------------------------
# truncation at turn boundaries

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
EXCHANGES = [{"role": "user", "content": "Name a fruit that is yellow."},
             {"role": "assistant", "content": "A banana is yellow."},
             {"role": "user", "content": "And one that is green?"},
             {"role": "assistant", "content": "A lime is green."},
             {"role": "user", "content": "And one that is red?"}]
FRUIT = {"prompt": [SYSTEM] + EXCHANGES, "chosen": "An apple is red.", "rejected": "A cherry."}
# the prompts a reader expects when the oldest exchange goes (max_length 64) and when only the last question stays (36)
CHATML_CUT = {64: "<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n<|im_start|>user\nAnd one that is "
                  "green?<|im_end|>\n<|im_start|>assistant\nA lime is green.<|im_end|>\n<|im_start|>user\nAnd one that "
                  "is red?<|im_end|>\n<|im_start|>assistant\n",
              36: "<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n<|im_start|>user\nAnd one that is "
                  "red?<|im_end|>\n<|im_start|>assistant\n"}
LLAMA3_CUT = {64: "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer in one short sentence."
                  "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd one that is green?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nA lime is green.<|eot_id|><|start_header_id|>user"
                  "<|end_header_id|>\n\nAnd one that is red?<|eot_id|><|start_header_id|>assistant"
                  "<|end_header_id|>\n\n",
              36: "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer in one short sentence."
                  "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd one that is red?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n"}
PLAIN_CUT = {64: "\n\nSystem: You answer in one short sentence.\n\nHuman: And one that is green?\n\nAssistant: A "
                 "lime is green.\n\nHuman: And one that is red?\n\nAssistant:",
             36: "\n\nSystem: You answer in one short sentence.\n\nHuman: And one that is red?\n\nAssistant:"}


@pytest.mark.parametrize("which, expected", [("chat_tokenizer", CHATML_CUT), ("llama3_tokenizer", LLAMA3_CUT),
                                             ("plain_tokenizer", PLAIN_CUT)])
@pytest.mark.parametrize("max_length", [64, 36])
def test_a_long_conversation_loses_its_oldest_exchanges_and_keeps_the_system_message_and_last_question(
        which, expected, max_length, request):
    tokenizer = request.getfixturevalue(which)
    messages = []
    examples = tokenize([FRUIT], tokenizer, max_length, 30, log=messages.append)
    e = examples[0]
    assert tokenizer.decode(e["prompt"]) == expected[max_length]
    end = EOT_ID if which == "llama3_tokenizer" else 2  # <|eot_id|>; ChatML's <|im_end|> is also the plain EOS
    space = " " if which == "plain_tokenizer" else ""
    assert e["chosen"].tolist() == ids(tokenizer, space + "An apple is red.") + [end]  # completions stay whole
    assert e["rejected"].tolist() == ids(tokenizer, space + "A cherry.") + [end]
    assert len(e["prompt"]) + len(e["chosen"]) <= max_length
    assert "prompt turns dropped 1, prompt text cut 0, completion cut 0" in messages[-1]


STORY = "Once upon a time a dragon learned to bake bread in a small village by the sea, and everyone came to taste it. "


@pytest.mark.parametrize("which, head, tail", [
    ("chat_tokenizer", SMOL_SYSTEM + "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3_tokenizer", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
     "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("plain_tokenizer", "", ""),  # a text prompt without a template is raw text: its end stays
])
def test_a_question_too_long_by_itself_is_cut_from_its_start_inside_the_template(which, head, tail, request):
    tokenizer = request.getfixturevalue(which)
    messages = []
    e = tokenize([{"prompt": STORY * 3, "chosen": "Bread!", "rejected": "No."}], tokenizer, 64, 50,
                 log=messages.append)[0]
    text = tokenizer.decode(e["prompt"])
    assert text.startswith(head) and text.endswith(tail)  # the case: the left cut lost both
    question = text[len(head): len(text) - len(tail)]
    assert (STORY * 3).strip().endswith(question.strip()) and len(question) < len(STORY * 3) and "taste it" in question
    assert 50 <= len(e["prompt"]) <= 64 - len(e["chosen"])  # as long as the completions leave room for
    assert "prompt turns dropped 0, prompt text cut 1" in messages[-1]


@pytest.mark.parametrize("which, head, tail", [
    ("chat_tokenizer", SMOL_SYSTEM + "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
    ("plain_tokenizer", "", "")])
def test_chosen_and_rejected_share_identical_prompt_ids_after_truncation(which, head, tail, request):
    tokenizer = request.getfixturevalue(which)
    rows = [{"prompt": "Tell me about the sea. " * 40, "chosen": "The sea is big and blue. " * 10, "rejected": "No."}]
    e = tokenize(rows, tokenizer, max_length=96, max_prompt_length=64, **quiet)[0]
    assert len(e["prompt"]) + len(e["chosen"]) <= 96 and len(e["prompt"]) + len(e["rejected"]) <= 96
    text = tokenizer.decode(e["prompt"])
    question = text[len(head): len(text) - len(tail)]  # what is left of the question
    for side in ("chosen", "rejected"):  # each side encoded alone after that question: the very same prompt ids
        prompt_ids, completion_ids = encode(tokenizer, question, rows[0][side])
        assert prompt_ids == e["prompt"].tolist()
        assert e[side].tolist() == completion_ids[: len(e[side])]
    assert e["rejected"].tolist() == completion_ids  # short enough to stay whole, end of turn included


def test_a_cut_completion_keeps_its_start_and_gets_no_end_token(chat_tokenizer):
    answer = "The answer is four, because two plus two makes four, as everyone learns in school."
    e = tokenize([{"prompt": "What is 2 + 2?", "chosen": answer, "rejected": "Four."}], chat_tokenizer, 48, 40,
                 **quiet)[0]
    room = 48 - len(e["prompt"])
    assert e["chosen"].tolist() == ids(chat_tokenizer, answer)[:room]  # its start; no <|im_end|> written into it
    assert e["rejected"].tolist() == ids(chat_tokenizer, "Four.") + [2]  # short enough to stay whole, end included


def test_pairs_that_fit_are_left_alone(chat_tokenizer):
    e = tokenize([{"prompt": "hi", "chosen": "Hello!", "rejected": "Go."}], chat_tokenizer, 64, 48, **quiet)[0]
    assert chat_tokenizer.decode(e["prompt"]) == SMOL_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert e["chosen"].tolist() == ids(chat_tokenizer, "Hello!") + [2]


# ----------------------------------------------------------------------------------------------------------------
# the tokenization cache


def test_a_second_tokenization_reads_the_cache_and_gives_the_same_examples(chat_tokenizer, tmp_path):
    rows = load_rows(PAIRS)
    first, second = [], []
    a = tokenize(rows, chat_tokenizer, 64, 48, log=first.append, cache_dir=tmp_path)
    b = tokenize(rows, chat_tokenizer, 64, 48, log=second.append, cache_dir=tmp_path)
    assert "in 1 process, cached in" in first[0] and "read from the cache" in second[0]
    assert " s (" in second[0]  # the time it took
    assert [(e["row"], e["prompt"].tolist(), e["chosen"].tolist(), e["rejected"].tolist()) for e in a] == \
        [(e["row"], e["prompt"].tolist(), e["chosen"].tolist(), e["rejected"].tolist()) for e in b]


def test_the_cache_is_not_used_when_rows_lengths_tokenizer_or_template_change(chat_tokenizer, plain_tokenizer,
                                                                              tmp_path):
    rows = load_rows(PAIRS)
    tokenize(rows, chat_tokenizer, 64, 48, cache_dir=tmp_path, **quiet)
    other_template = copy.deepcopy(chat_tokenizer)
    other_template.chat_template = chat_tokenizer.chat_template.replace("You are a helpful", "You are a kind")
    other_rows = rows[:-1] + [{**rows[-1], "chosen": rows[-1]["chosen"] + "!"}]
    for args in [(rows, chat_tokenizer, 64, 40), (rows, chat_tokenizer, 96, 48), (other_rows, chat_tokenizer, 64, 48),
                 (rows, plain_tokenizer, 64, 48), (rows, other_template, 64, 48)]:
        messages = []
        tokenize(*args, log=messages.append, cache_dir=tmp_path)
        assert "cached in" in messages[0], args[2:]


def test_two_processes_tokenize_exactly_like_one(chat_tokenizer, tmp_path):
    rows = load_rows(PAIRS) + [FRUIT]  # one with turns to drop
    one = tokenize(rows, chat_tokenizer, 64, 30, cache_dir=tmp_path / "one", **quiet)
    messages = []
    two = tokenize(rows, chat_tokenizer, 64, 30, log=messages.append, cache_dir=tmp_path / "two", processes=2)
    assert "in 2 processes" in messages[0]
    assert [(e["row"], e["prompt"].tolist(), e["chosen"].tolist()) for e in one] == \
        [(e["row"], e["prompt"].tolist(), e["chosen"].tolist()) for e in two]


# ----------------------------------------------------------------------------------------------------------------
# rows of a user's file, and its held-out pairs


def test_a_jsonl_file_holds_out_a_random_sample_of_its_rows_and_trains_on_the_rest():
    rows = load_rows(PAIRS)
    train, held = load_splits(PAIRS, 8, **quiet)
    assert len(held) == 8 and len(train) == 33
    assert sorted(r["where"] for r in train + held) == sorted(r["where"] for r in rows)  # disjoint, nothing lost
    assert [r["where"] for r in held] != [r["where"] for r in rows[-8:]]  # not the file's last rows
    assert [r["where"] for r in load_splits(PAIRS, 8, **quiet)[1]] == [r["where"] for r in held]  # every rank alike


def test_eval_pairs_0_holds_out_nothing_and_keeps_every_row_for_training():
    train, held = load_splits(PAIRS, 0, **quiet)
    assert held == [] and len(train) == 41
    with pytest.raises(DataError, match="would hold out all 41 pairs"):
        load_splits(PAIRS, 41, **quiet)


def rows_per_prompt(path, pairs_per_prompt, prompts=40):
    """A JSONL file with several pairs per prompt (samples of a policy, all pairs of a ranking), one prompt's rows not
    next to each other."""
    rows = [{"prompt": f"What is {p} + {p}?", "chosen": str(2 * p), "rejected": str(2 * p + k + 1)}
            for k in range(pairs_per_prompt) for p in range(prompts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("pairs_per_prompt", [2, 3, 4])
def test_a_jsonl_file_holds_out_whole_prompts_so_no_held_out_prompt_is_trained_on(pairs_per_prompt, tmp_path):
    messages = []
    train, held = load_splits(rows_per_prompt(tmp_path / "pairs.jsonl", pairs_per_prompt), 8, log=messages.append)
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    whole = -(-8 // pairs_per_prompt)  # prompts held out, each with all its pairs, until 8 rows are
    assert len({r["prompt"] for r in held}) == whole and len(held) == whole * pairs_per_prompt
    assert len(train) + len(held) == 40 * pairs_per_prompt
    assert f"held out {len(held)} of the {40 * pairs_per_prompt} pairs" in messages[-1]
    assert f"{whole} of its 40 prompts" in messages[-1]


def test_with_one_pair_per_prompt_the_held_out_rows_are_a_plain_seeded_draw_of_rows():
    rows = load_rows(PAIRS)  # 41 prompts, one pair each: the split that runs made before prompts were grouped
    drawn = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:8].tolist()
    assert [r["where"] for r in load_splits(PAIRS, 8, **quiet)[1]] == [rows[i]["where"] for i in drawn]


def test_a_prompt_whose_pairs_are_all_the_rows_cannot_be_held_out(tmp_path):
    with pytest.raises(DataError, match=r"would hold out all 4 pairs of .* \(1 prompt\(s\), each held out with all"):
        load_splits(rows_per_prompt(tmp_path / "one.jsonl", 4, prompts=1), 1, **quiet)


BAD_LINES = [
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}', None),
    (b'{not json', "not valid JSON"),
    (b'{"prompt": "a", "chosen": "b"}', "missing field(s) rejected"),
    (b'{"prompt": "a", "chosen": 3, "rejected": "c"}', "chosen must be text"),
    (b'{"prompt": "a", "chosen": "same", "rejected": "same"}', "chosen and rejected are identical"),
    (b'{"prompt": "a", "chosen": "  ", "rejected": "c"}', "chosen is empty"),
    (b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}', "not valid UTF-8"),
    (b'{"prompt": [{"role": "robot", "content": "hi"}], "chosen": "b", "rejected": "c"}', "unknown message role"),
    (b'[1, 2]', "expected a JSON object"),
]


def test_every_bad_row_of_a_file_is_reported_with_its_line_in_one_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    with pytest.raises(DataError) as error:
        load_rows(str(path))
    message = str(error.value)
    assert f"{len(BAD_LINES) - 1} bad row(s) of {len(BAD_LINES)}" in message and "--skip_bad_rows" in message
    for number, (_, problem) in enumerate(BAD_LINES, 1):
        if problem:
            assert f"bad.jsonl:{number}: {problem}" in message


def test_skip_bad_rows_keeps_the_good_rows_and_counts_the_rest(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    messages = []
    rows = load_rows(str(path), skip_bad_rows=True, log=messages.append)
    assert [r["where"] for r in rows] == [f"{path}:1"]
    assert f"skipped {len(BAD_LINES) - 1} bad row(s) of {len(BAD_LINES)}" in messages[0]


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable rows"):
        load_rows(str(tmp_path / "empty.jsonl"))


def test_loss_mask_marks_exactly_the_completion_tokens(chat_tokenizer):
    examples = tokenize(load_rows(PAIRS)[:3], chat_tokenizer, 128, 64, log=lambda m: None)
    batch = collate(examples, pad_id=chat_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6  # chosen rows, then rejected rows
    for i, e in enumerate(examples):
        for row, completion in ((i, e["chosen"]), (i + 3, e["rejected"])):
            n = len(e["prompt"]) + len(completion)
            assert batch["input_ids"][row, batch["loss_mask"][row]].tolist() == completion.tolist()
            assert batch["attention_mask"][row].sum() == n and not batch["loss_mask"][row, n:].any()


def test_kto_kl_rows_pair_each_prompt_with_its_neighbours_completions(chat_tokenizer):
    examples = tokenize(load_rows(PAIRS)[:3], chat_tokenizer, 128, 64, log=lambda m: None)
    neighbours = examples[1:] + examples[:1]
    batch = collate(examples, pad_id=chat_tokenizer.pad_token_id, method="kto", max_length=128, neighbours=neighbours)
    completions = [n["chosen"] for n in neighbours] + [n["rejected"] for n in neighbours]
    prompts = [e["prompt"] for e in examples] * 2
    for i in range(6):
        row = batch["kl"]["input_ids"][i]
        assert row[: len(prompts[i])].tolist() == prompts[i].tolist()
        assert row[batch["kl"]["loss_mask"][i]].tolist() == completions[i].tolist()


def step_pairs(examples, index, batch_size, micro_batch_size, world_size, group_by_length=False, seed=3):
    """Every rank's micro-batches of global batch `index`, as lists of row ids: [rank][micro-step]."""
    return [[[pair["row"] for pair, _ in micro] for micro in
             Batches(examples, batch_size, micro_batch_size, rank, world_size, seed, group_by_length)(index)]
            for rank in range(world_size)]


LAYOUTS = [(1, 8), (1, 4), (2, 2), (4, 1), (2, 4)]  # (processes, micro-batch size) for a global batch of 8


def test_every_layout_trains_the_same_pairs_in_every_step_and_no_step_holds_a_pair_twice():
    """37 pairs, global batch 8: 4 steps an epoch, 5 pairs left over. Over two epochs, 1 process x 8, 1 x 4 x 2
    accumulation, 2 x 2 x 2, 4 x 1 x 2 and 2 x 4 x 1 give each step the same 8 pairs, all different."""
    examples = [{"row": i, "prompt": torch.tensor([i])} for i in range(37)]
    for index in range(8):  # two epochs
        steps = [sorted(r for rank in step_pairs(examples, index, 8, micro, world) for m in rank for r in m)
                 for world, micro in LAYOUTS]
        assert all(s == steps[0] for s in steps), (index, steps)
        assert len(set(steps[0])) == 8, (index, steps[0])
    epochs = [sorted(r for index in range(e * 4, e * 4 + 4) for r in step_pairs(examples, index, 8, 8, 1)[0][0])
              for e in (0, 1)]
    assert all(len(set(e)) == 32 for e in epochs) and epochs[0] != epochs[1]  # each epoch: 32 pairs, each once


def test_a_seeds_second_epoch_is_not_the_next_seeds_first():
    examples = [{"row": i, "prompt": torch.tensor([i])} for i in range(64)]
    first_epoch_of_seed_1 = step_pairs(examples, 0, 64, 64, 1, seed=1)
    second_epoch_of_seed_0 = step_pairs(examples, 1, 64, 64, 1, seed=0)
    assert first_epoch_of_seed_1 != second_epoch_of_seed_0
    assert step_pairs(examples, 1, 64, 64, 1, seed=0) == step_pairs(examples, 1, 64, 64, 1, seed=0)  # but repeatable


def test_kto_mismatched_pairs_of_a_global_batch_are_the_same_on_every_layout():
    """KTO's KL estimate is the mean over the mismatched rows of the whole global batch: the same set of (prompt,
    completion) rows whatever the layout, so the same estimate."""
    examples = [{"row": i, "prompt": torch.tensor([i]), "chosen": torch.tensor([100 + i]),
                 "rejected": torch.tensor([200 + i])} for i in range(24)]
    for index in range(3):
        rows = []
        for world, micro in LAYOUTS:
            kl = set()
            for rank in range(world):
                for m in Batches(examples, 8, micro, rank, world, seed=5)(index):
                    pairs, neighbours = zip(*m)
                    batch = collate(pairs, 0, "kto", 16, neighbours)["kl"]
                    kl |= {tuple(r[mask].tolist()) + tuple(r[:1].tolist()) for r, mask in
                           zip(batch["input_ids"], batch["loss_mask"])}
            rows.append(kl)
        assert len(rows[0]) == 16 and all(r == rows[0] for r in rows), index  # 2 per pair: chosen and rejected


def matched_share(examples, group_by_length, world, micro, prompt_of):
    """The share of KTO's mismatched rows over an epoch whose completions are of the pair's own prompt."""
    matched = []
    for index in range(Batches(examples, 8, 8).per_epoch):
        for rank in range(world):
            for m in Batches(examples, 8, micro, rank, world, seed=2, group_by_length=group_by_length)(index):
                matched += [prompt_of(pair) == prompt_of(neighbour) for pair, neighbour in m]
    return sum(matched) / len(matched)


def test_kto_mismatched_rows_have_another_prompt_on_every_layout_and_order():
    """Three pairs per prompt, each prompt of its own length: --group_by_length puts a prompt's pairs side by side,
    and the next pair's completions were then most often the pair's own prompt's (2/3 here, ~45% on UltraFeedback),
    biasing KTO's reference point. No mismatched row has the pair's own prompt, on every layout, in either order."""
    examples = [{"row": 3 * p + j, "prompt": torch.arange(p + 2), "chosen": torch.tensor([100 + j]),
                 "rejected": torch.tensor([200 + j])} for p in range(20) for j in range(3)]
    for grouped in (False, True):
        for world, micro in LAYOUTS:
            assert matched_share(examples, grouped, world, micro, lambda pair: pair["row"] // 3) == 0, (grouped, world)


def pairs_of_lengths(lengths):
    """Pairs whose padded length (prompt + longer completion) is the given one: prompt 1 token (its own), chosen the
    rest."""
    t = lambda n: torch.zeros(n, dtype=torch.int32)
    return [{"row": i, "prompt": torch.tensor([i]), "chosen": t(n - 1), "rejected": t(1)} for i, n in enumerate(lengths)]


def test_group_by_length_makes_each_global_batch_a_run_of_the_sorted_lengths():
    lengths = torch.randperm(120, generator=torch.Generator().manual_seed(0)).add(2).tolist()  # distinct, 2..121
    examples = pairs_of_lengths(lengths)
    got = [[lengths[r] for r in step_pairs(examples, i, 4, 4, 1, group_by_length=True, seed=1)[0][0]]
           for i in range(30)]
    runs = sorted(lengths)  # one window (64 batches > 30): batch k of the sorted order is runs[4k: 4k + 4]
    assert sorted(sorted(b) for b in got) == [runs[k: k + 4] for k in range(0, 120, 4)]
    assert got != sorted(got)  # the batches themselves come in shuffled order, not shortest first


def test_group_by_length_keeps_every_pair_once_and_the_same_pairs_per_step_on_every_layout():
    lengths = [int(x) for x in torch.randint(5, 400, (203,), generator=torch.Generator().manual_seed(1))]
    examples = pairs_of_lengths(lengths)
    rows = [r for i in range(25) for r in step_pairs(examples, i, 8, 8, 1, True)[0][0]]
    assert len(rows) == len(set(rows)) == 200  # each pair once; 3 left over
    for index in range(25):
        steps = [sorted(r for rank in step_pairs(examples, index, 8, micro, world, True) for m in rank for r in m)
                 for world, micro in LAYOUTS]
        assert all(s == steps[0] for s in steps), index


def test_group_by_length_cuts_padding():
    lengths = [int(x) for x in torch.randint(10, 500, (512,), generator=torch.Generator().manual_seed(2))]
    examples = pairs_of_lengths(lengths)

    def padding(grouped):  # padded positions / all positions, micro-batches of 4 pairs, global batches of 16
        bs = [[lengths[r] for r in m] for i in range(32) for m in step_pairs(examples, i, 16, 4, 1, grouped)[0]]
        return 1 - sum(sum(b) for b in bs) / sum(4 * max(b) for b in bs)
    assert padding(False) > 0.25 and padding(True) < 0.02


@pytest.mark.slow  # a script run as a subprocess
def test_inspector_lists_every_bad_row_and_the_padding(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(open(PAIRS).read() + '{"prompt": "x", "chosen": "y"}\nnot json\n')
    out = subprocess.run([sys.executable, "data.py", str(path), "--model", TINY], capture_output=True, text=True,
                         cwd=ROOT)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "bad.jsonl:42: missing field(s) rejected" in log and "bad.jsonl:43: not valid JSON" in log
    assert "tokenized 41 of 41 pairs" in log and "with --group_by_length (global batch 8)" in log
    assert "41 pairs of 41 prompts (1.00 pairs per prompt, at most 1; --eval_pairs holds out whole prompts)" in log


@pytest.mark.slow  # a script run as a subprocess
@pytest.mark.parametrize("content, says", [
    ('{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}\n', "1 pair(s) cannot fill one batch"),
    (b'null\n"text"\n[1, 2]\n{"prompt": 5, "chosen": {}, "rejected": []}\n\xff\xfe\x00garbage\n', "no usable rows"),
])
def test_inspector_never_shows_a_traceback_whatever_the_file(content, says, tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = subprocess.run([sys.executable, "data.py", str(path), "--model", TINY], capture_output=True, text=True,
                         cwd=ROOT)
    log = out.stdout + out.stderr
    assert "Traceback" not in log and says in log, log
