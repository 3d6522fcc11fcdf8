"""Pair-consistent tokenization and truncation, the dataset conversions, batches and their masks."""
import subprocess
import sys

import pytest
import torch

from conftest import PAIRS, ROOT, TINY
from data import DataError, batches, collate, encode, hh_row, load_rows, normalize, plain_prompt, tokenize, truncate

HH_CHOSEN = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is popular.\n\nHuman: Another one?"
             "\n\nAssistant: How about Mittens?")
HH_REJECTED = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Whiskers is popular.\n\nHuman: Another one?"
               "\n\nAssistant: No.")


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
    assert row == {"prompt": "hi", "chosen": "Hello!", "rejected": "Go away."}
    implicit = normalize({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}],
                          "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "B"}]})
    assert implicit["prompt"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("which", ["chat_tokenizer", "plain_tokenizer"])
def test_chosen_and_rejected_share_identical_prompt_ids_after_truncation(which, request):
    tokenizer = request.getfixturevalue(which)
    long_prompt = "Tell me about the sea. " * 40
    rows = [{"prompt": long_prompt, "chosen": "The sea is big and blue. " * 10, "rejected": "No."}]
    examples = tokenize(rows, tokenizer, max_length=64, max_prompt_length=32, log=lambda m: None)
    e = examples[0]
    assert len(e["prompt"]) + len(e["chosen"]) <= 64 and len(e["prompt"]) + len(e["rejected"]) <= 64
    # both sides were built from one prompt: check against an independent re-encoding of each side
    full_prompt, chosen_ids = encode(tokenizer, long_prompt, rows[0]["chosen"])
    _, rejected_ids = encode(tokenizer, long_prompt, rows[0]["rejected"])
    assert e["prompt"].tolist() == full_prompt[-len(e["prompt"]):]  # cut from the left: the end of the prompt stays
    assert e["chosen"].tolist() == chosen_ids[: len(e["chosen"])]  # cut from the right: the start of the answer stays
    assert e["rejected"].tolist() == rejected_ids  # short enough to stay whole, end-of-turn included


def test_truncation_never_writes_eos_into_a_cut_completion():
    eos = 2
    p, c, r = truncate(list(range(10, 30)), list(range(100, 140)) + [eos], [200, 201, eos], max_length=32,
                       max_prompt_length=8)
    assert p == list(range(22, 30)) and c == list(range(100, 124)) and r == [200, 201, eos]
    assert eos not in c


def test_pairs_that_fit_are_left_alone():
    assert truncate([1, 2], [3, 4], [5], max_length=4, max_prompt_length=1) == ([1, 2], [3, 4], [5])


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


def test_kto_kl_rows_pair_each_prompt_with_the_next_examples_completion(chat_tokenizer):
    examples = tokenize(load_rows(PAIRS)[:3], chat_tokenizer, 128, 64, log=lambda m: None)
    batch = collate(examples, pad_id=chat_tokenizer.pad_token_id, method="kto", max_length=128)
    completions = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    prompts = [e["prompt"] for e in examples] * 2
    for i in range(6):
        row = batch["kl"]["input_ids"][i]
        assert row[: len(prompts[i])].tolist() == prompts[i].tolist()
        assert row[batch["kl"]["loss_mask"][i]].tolist() == completions[(i + 1) % 6].tolist()


def test_two_ranks_see_the_same_pairs_per_step_as_one_process():
    examples = [{"row": i} for i in range(37)]
    one = list(batches(examples, 4, rank=0, world_size=1, seed=3, epoch=1))
    two = [list(batches(examples, 2, rank=r, world_size=2, seed=3, epoch=1)) for r in (0, 1)]
    for step in range(4):  # one process: micro-batch of 4; two ranks: micro-batches of 2 each
        assert sorted(e["row"] for e in one[step]) == sorted(e["row"] for r in (0, 1) for e in two[r][step])


def test_resuming_mid_epoch_continues_the_same_order():
    examples = [{"row": i} for i in range(20)]
    full = [[e["row"] for e in b] for b in batches(examples, 3, 0, 1, seed=0, epoch=0)]
    rest = [[e["row"] for e in b] for b in batches(examples, 3, 0, 1, seed=0, epoch=0, skip=2)]
    assert rest == full[2:]


def pairs_of_lengths(lengths):
    """Pairs whose padded length (prompt + longer completion) is the given one: prompt 1 token, chosen the rest."""
    t = lambda n: torch.zeros(n, dtype=torch.int32)
    return [{"row": i, "prompt": t(1), "chosen": t(n - 1), "rejected": t(1)} for i, n in enumerate(lengths)]


def test_group_by_length_makes_each_global_batch_a_run_of_the_sorted_lengths():
    lengths = torch.randperm(120, generator=torch.Generator().manual_seed(0)).add(2).tolist()  # distinct, 2..121
    examples = pairs_of_lengths(lengths)
    got = [[lengths[e["row"]] for e in b] for b in batches(examples, 4, 0, 1, seed=1, epoch=0, group_size=4)]
    runs = sorted(lengths)  # one window (64 batches > 30): batch k of the sorted order is runs[4k: 4k + 4]
    assert sorted(sorted(b) for b in got) == [runs[k: k + 4] for k in range(0, 120, 4)]
    assert got != sorted(got)  # the batches themselves come in shuffled order, not shortest first


def test_group_by_length_keeps_every_pair_once_and_the_same_pairs_per_step_on_two_ranks():
    lengths = [int(x) for x in torch.randint(5, 400, (203,), generator=torch.Generator().manual_seed(1))]
    examples = pairs_of_lengths(lengths)
    one = list(batches(examples, 2, 0, 1, seed=2, epoch=3, group_size=6))  # global batch 6: 3 micro-batches of 2
    rows = [e["row"] for b in one for e in b]
    assert len(rows) == len(set(rows)) == 202  # each pair once; the odd one out does not fill a micro-batch
    two = [list(batches(examples, 1, r, 2, seed=2, epoch=3, group_size=6)) for r in (0, 1)]
    for step in range(33):  # one process: 3 micro-batches of 2; two ranks: 3 micro-batches of 1 each
        assert sorted(e["row"] for b in one[3 * step: 3 * step + 3] for e in b) == \
            sorted(e["row"] for r in (0, 1) for b in two[r][3 * step: 3 * step + 3] for e in b)
    rest = list(batches(examples, 2, 0, 1, seed=2, epoch=3, skip=5, group_size=6))
    assert [[e["row"] for e in b] for b in rest] == [[e["row"] for e in b] for b in one[5:]]


def test_group_by_length_cuts_padding():
    lengths = [int(x) for x in torch.randint(10, 500, (512,), generator=torch.Generator().manual_seed(2))]
    examples = pairs_of_lengths(lengths)

    def padding(group_size):  # padded positions / all positions, micro-batches of 4 pairs
        bs = [[lengths[e["row"]] for e in b] for b in batches(examples, 4, 0, 1, seed=0, epoch=0, group_size=group_size)]
        return 1 - sum(sum(b) for b in bs) / sum(4 * max(b) for b in bs)
    assert padding(0) > 0.25 and padding(16) < 0.02


def test_inspector_lists_every_bad_row_and_the_padding(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(open(PAIRS).read() + '{"prompt": "x", "chosen": "y"}\nnot json\n')
    out = subprocess.run([sys.executable, "data.py", str(path), "--model", TINY], capture_output=True, text=True,
                         cwd=ROOT)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "bad.jsonl:42: missing field(s) rejected" in log and "bad.jsonl:43: not valid JSON" in log
    assert "tokenized 41 of 41 pairs" in log and "with --group_by_length (global batch 8)" in log
