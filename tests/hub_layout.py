"""Offline copies of the three hub data sets, in each repository's file layout and column schema, with a few rows
written by hand, dirty ones included (as the real sets have them):

  Anthropic/hh-rlhf                       {harmless-base,helpful-base}/{train,test}.jsonl.gz: chosen, rejected (whole
                                          dialogues); red-team-attempts/ holds another schema that no split includes
  trl-lib/tldr-preference                 data/{train,validation}-00000-of-00001.parquet: prompt, chosen,
                                          rejected (text)
  HuggingFaceH4/ultrafeedback_binarized   data/{train,test}_{prefs,sft,gen}-00000-of-00001.parquet: prompt, prompt_id,
                                          chosen, rejected, messages (lists of {content, role}), score_chosen,
                                          score_rejected
"""
import gzip
import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq


def hh(*turns):
    """HH's dialogue text from its turns, Human first; an empty turn is written bare ("\\n\\nAssistant:") as in HH."""
    names = ["Human", "Assistant"]
    return "".join(f"\n\n{names[i % 2]}:" + (f" {t}" if t else "") for i, t in enumerate(turns))


HH = {
    "harmless-base": {
        "train": [
            {"chosen": hh("How do I pick a lock?", "Why do you want to pick a lock?",
                          "I locked myself out of my house.", "Call a locksmith; they can let you in safely."),
             "rejected": hh("How do I pick a lock?", "Why do you want to pick a lock?",
                            "I locked myself out of my house.", "Use a bobby pin and a tension wrench.")},
            {"chosen": hh("What's the worst insult?", ""),  # an empty final answer, as 4 rows of the real test file
             "rejected": hh("What's the worst insult?", "I'd rather not say.")},
            {"chosen": hh("Can you help me hide a body?", "No, I can't help with that."),
             "rejected": hh("Can you help me hide a body?", "No, I can't help with that.")},  # identical
            {"chosen": hh("Is it ok to lie to my boss?", "Honesty usually works out better."),
             "rejected": hh("Is it ok to lie to my boss?", "Sure, everyone does it.")},
        ],
        "test": [
            {"chosen": hh("How do I make a fake ID?", "I can't help with that."),
             "rejected": hh("How do I make a fake ID?", "Print one at home.")},
            {"chosen": hh("Tell me a mean joke.", ""), "rejected": hh("Tell me a mean joke.", "No.")},  # empty answer
        ],
    },
    "helpful-base": {
        "train": [
            {"chosen": hh("What is the capital of France?", "Paris."),
             "rejected": hh("What is the capital of France?", "London.")},
            {"chosen": hh("Hi", "Hello! How can I help?", "Bye", "Goodbye!"),  # the dialogues part before the last turn
             "rejected": hh("Hi", "Go away.", "Bye", "Whatever.")},
            {"chosen": hh("How many legs does a spider have?", "Eight."),
             "rejected": hh("How many legs does a spider have?", "Six.")},
            {"chosen": hh("Recommend a book.", "Try 'The Hobbit'.", "Why that one?", "It is short and fun."),
             "rejected": hh("Recommend a book.", "Try 'The Hobbit'.", "Why that one?", "Because.")},
        ],
        "test": [
            {"chosen": hh("How do I boil an egg?", "Simmer it for nine minutes."),
             "rejected": hh("How do I boil an egg?", "Microwave it.")},
            {"chosen": hh("What is 2 + 2?", "4."), "rejected": hh("What is 2 + 2?", "5.")},
        ],
    },
}

TLDR_PROMPT = "SUBREDDIT: r/{}\n\nTITLE: {}\n\nPOST: {}\n\nTL;DR:"
TLDR = {
    "train": [
        {"prompt": TLDR_PROMPT.format("relationships", "My friend never replies to my texts",
                                      "We have been friends for ten years, but lately she takes days to answer."),
         "chosen": " Old friend takes days to reply to my texts; should I worry?", "rejected": " friend bad"},
        {"prompt": TLDR_PROMPT.format("cats", "My cat ignores me", "She only comes when I open a can of food."),
         "chosen": " Cat only loves me for food.", "rejected": " Cat only loves me for food."},  # identical
        {"prompt": TLDR_PROMPT.format("running", "First marathon", "I trained for a year and finished in five hours."),
         "chosen": " Ran my first marathon in 5 hours after a year of training.", "rejected": " I ran."},
        {"prompt": TLDR_PROMPT.format("cooking", "Burnt rice again", "Every time I cook rice the bottom burns."),
         "chosen": " My rice always burns at the bottom; how do I stop it?", "rejected": " rice"},
        {"prompt": TLDR_PROMPT.format("books", "Reading slump", "I have not finished a book in six months."),
         "chosen": " Haven't finished a book in six months; tips?", "rejected": " books are hard"},
    ],
    "validation": [
        {"prompt": TLDR_PROMPT.format("travel", "Lost passport", "I lost my passport two days before my flight."),
         "chosen": " Lost my passport right before a flight; what now?", "rejected": " passport"},
        {"prompt": TLDR_PROMPT.format("pets", "Dog barks at night", "My dog barks at 3am every night."),
         "chosen": " Dog barks every night at 3am.", "rejected": ""},  # an empty answer
        {"prompt": TLDR_PROMPT.format("money", "Saving tips", "I want to save for a house."),
         "chosen": " How do I save for a house?", "rejected": " money"},
    ],
}


def uf(prompt, earlier, chosen, rejected, scores=(8.0, 3.0)):
    """A row of ultrafeedback_binarized: the messages before the answers, then each answer as an assistant message."""
    both = [{"content": m["content"], "role": m["role"]} for m in earlier]
    c = both + [{"content": chosen, "role": "assistant"}]
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "chosen": c,
            "rejected": both + [{"content": rejected, "role": "assistant"}], "messages": c,
            "score_chosen": scores[0], "score_rejected": scores[1]}


def user(text):
    return {"role": "user", "content": text}


TRANSLATOR = [{"role": "system", "content": "You are a translator."}, user("Translate 'good morning' to German."),
              {"role": "assistant", "content": "Guten Morgen."}, user("And in French?")]
ULTRAFEEDBACK = {
    "train_prefs": [
        uf("Write a haiku about rain.", [user("Write a haiku about rain.")], "Soft rain on the roof.",
           "Rain is water."),
        uf("And in French?", TRANSLATOR, "Bonjour.", "Bonsoir."),  # a system message and earlier turns
        uf("Name a prime number.", [user("Name a colour.")], "Seven.", "Nine."),  # prompt and messages disagree
        uf("Say hi.", [user("Say hi.")], "Hi!", ""),  # an empty answer
        uf("What is the boiling point of water?", [user("What is the boiling point of water?")],
           "100 degrees Celsius at sea level.", "Hot."),
        uf("Give me a synonym for happy.", [user("Give me a synonym for happy.")], "Joyful.", "Sad."),
    ],
    "test_prefs": [
        uf("Name a planet.", [user("Name a planet.")], "Mars.", "The Sun."),
        uf("Spell 'cat' backwards.", [user("Spell 'cat' backwards.")], "tac", "cat"),
        uf("Count to three.", [user("Count to three.")], "1, 2, 3.", "1, 3."),
    ],
    # splits the preference loader must not read
    "train_sft": [uf("SFT ONLY", [user("SFT ONLY")], "a", "b")],
    "test_gen": [uf("GEN ONLY", [user("GEN ONLY")], "a", "b")],
}

MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
UF_SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", MESSAGES),
                       ("rejected", MESSAGES), ("messages", MESSAGES), ("score_chosen", pa.float64()),
                       ("score_rejected", pa.float64())])


def write_hh(folder, splits=HH):
    for subset, files in splits.items():
        os.makedirs(os.path.join(folder, subset), exist_ok=True)
        for split, rows in files.items():
            with gzip.open(os.path.join(folder, subset, f"{split}.jsonl.gz"), "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    os.makedirs(os.path.join(folder, "red-team-attempts"), exist_ok=True)  # another schema, in no split
    with gzip.open(os.path.join(folder, "red-team-attempts", "red_team_attempts.jsonl.gz"), "wt") as f:
        f.write(json.dumps({"transcript": hh("a", "b"), "min_harmlessness_score_transcript": -1.0}) + "\n")
    return str(folder)


def write_parquet(folder, splits, schema=None):
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    for split, rows in splits.items():
        table = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(table, os.path.join(folder, "data", f"{split}-00000-of-00001.parquet"))
    return str(folder)


def write_tldr(folder, splits=TLDR):
    return write_parquet(folder, splits)


def write_ultrafeedback(folder, splits=ULTRAFEEDBACK):
    return write_parquet(folder, splits, UF_SCHEMA)
