"""The gold judge: small task families whose answers a few lines of Python can check, so that quality is measurable
offline (no GPT-4 judge, no hub download).

`make_tasks(n, seed)` draws `n` tasks with distinct prompts from six families: `arithmetic` (small sums and
differences), `capital` (capital cities from a built-in table of 65 countries), `yes_no` (compare two numbers, answer
yes or no), `word_count` (answer in exactly N words), `start_word` (start the answer with a given word) and
`list_items` (list exactly N things separated by commas). `score(task, completion)` returns 1.0 for a correct answer
in the requested format, 0.5 where a family gives half credit (documented at its checker: usually right content in the
wrong format, e.g. "The answer is 7." instead of "7"), and 0.0 otherwise. Scores take only these three values so that
any two different scores differ by at least 0.5: a pair built from them has a clear winner. The families were chosen
so that SmolLM2-135M-Instruct sampled at temperature 1 sometimes gets them right and often does not, and so that the
winning trait (short, direct, in the requested format) is learnable.
"""
import random
import re
import unicodedata

CAPITALS = {  # one unambiguous, ASCII-spelled capital per country (accents are stripped before matching)
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "the United Kingdom": "London", "Ireland": "Dublin", "the Netherlands": "Amsterdam", "Belgium": "Brussels",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "the Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Iceland": "Reykjavik", "Russia": "Moscow", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Serbia": "Belgrade", "Croatia": "Zagreb", "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Ghana": "Accra", "Senegal": "Dakar",
    "Uganda": "Kampala", "Zimbabwe": "Harare", "Japan": "Tokyo", "China": "Beijing", "South Korea": "Seoul",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "the Philippines": "Manila",
    "Malaysia": "Kuala Lumpur", "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Nepal": "Kathmandu",
    "Afghanistan": "Kabul", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Syria": "Damascus",
    "Lebanon": "Beirut", "Jordan": "Amman", "Qatar": "Doha", "Australia": "Canberra", "New Zealand": "Wellington",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana", "Argentina": "Buenos Aires", "Brazil": "Brasilia",
    "Chile": "Santiago", "Peru": "Lima", "Colombia": "Bogota", "Venezuela": "Caracas",
}
QUESTIONS = [  # open questions for word_count: any answer of the right length is fine, so only the length is checked
    "what do cats like?", "what is your favorite food?", "how is the weather in spring?", "what is the sky like?",
    "why do people sleep?", "what makes a good friend?", "what is summer like?", "what is the ocean like?",
    "what is a computer?", "why is exercise good?", "what do birds eat?", "what is a library?", "why do we read books?",
    "what is rain?", "what makes people happy?", "what is a good breakfast?", "how do plants grow?",
    "what is a city?", "why do dogs bark?", "what is music?", "what is winter like?", "what do teachers do?",
    "what is a forest?", "why is water important?", "what is the moon?", "how do you make tea?", "what is a train?",
    "what do farmers grow?", "what is a mountain?", "why do we need sleep?", "what is a garden?", "what is snow?",
    "what do doctors do?", "what is a river?", "how do you stay healthy?", "what is coffee?", "what is the sun?",
    "what is a holiday?", "what do children like to play?", "what is the wind?", "what is a kitchen?",
    "why do people travel?", "what is a good book?", "what do you see at the beach?", "what is autumn like?",
    "why do leaves fall?", "what is a bridge?", "what is chocolate?", "why do we celebrate birthdays?",
    "what is a museum?", "what do bees make?", "what is a hospital?", "how do fish breathe?", "what is a star?",
    "why do people paint?", "what is bread?", "what is a bicycle?", "what do pilots do?", "what is a farm?",
    "what is a storm?",
]
TOPICS = ["rain", "the sea", "cats", "dogs", "music", "the city", "winter", "summer", "books", "friendship", "coffee",
          "the mountains", "the forest", "school", "trains", "the moon", "gardens", "the night sky", "breakfast",
          "football", "the river", "birds", "a market", "the weekend", "cooking", "snow", "the desert", "a library",
          "bicycles", "the wind"]
START_WORDS = ["Today", "Yesterday", "Sometimes", "Every", "Once", "Tomorrow", "Always", "Perhaps", "Suddenly", "Many"]
CATEGORIES = ["fruits", "vegetables", "animals", "colors", "countries", "cities", "sports", "musical instruments",
              "birds", "flowers", "trees", "fish", "insects", "planets", "languages", "jobs", "tools", "vehicles",
              "drinks", "desserts", "board games", "breakfast foods", "kitchen utensils", "clothes",
              "pieces of furniture", "body parts", "school subjects", "shapes", "metals", "emotions", "months",
              "rivers", "mammals", "spices", "cheeses", "berries", "dog breeds", "car brands", "oceans",
              "continents", "sea animals", "toys", "hobbies", "cartoon characters", "herbs", "nuts", "grains",
              "hats", "shoes", "farm animals", "household chores", "dances"]


def make_task(family, rng):
    """One random task of `family`: the prompt and whatever its checker needs."""
    if family == "arithmetic":  # small numbers: the 135M model gets these right some of the time
        a, b, op = rng.randint(1, 20), rng.randint(1, 20), rng.choice("+-")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)  # no negative answers
        return dict(prompt=f"What is {a} {op} {b}? Answer with just the number.", answer=a + b if op == "+" else a - b)
    if family == "capital":  # one template per country, so a fact never reaches two splits under two wordings
        country = rng.choice(sorted(CAPITALS))
        return dict(prompt=f"What is the capital of {country}? Answer with just the city name.",
                    answer=CAPITALS[country])
    if family == "yes_no":  # compare two small numbers; "greater"/"less" keeps yes and no about equally likely
        a, b = rng.sample(range(1, 21), 2)
        relation = rng.choice(["greater", "less"])
        answer = "yes" if (a > b) == (relation == "greater") else "no"
        return dict(prompt=f"Is {a} {relation} than {b}? Answer with yes or no.", answer=answer)
    if family == "word_count":  # short counts: a few-word reply is within the model's reach, a long one is not
        n = rng.randint(2, 5)
        return dict(prompt=f"Answer in exactly {n} words: {rng.choice(QUESTIONS)}", n=n)
    if family == "start_word":  # the model follows this often enough that both outcomes are common
        word = rng.choice(START_WORDS)
        return dict(prompt=f'Write one sentence about {rng.choice(TOPICS)}. Start your answer with the word "{word}".',
                    word=word)
    if family == "list_items":  # at least 3 items: a single comma matches too much unrelated text
        n = rng.randint(3, 5)
        return dict(prompt=f"List exactly {n} {rng.choice(CATEGORIES)}, separated by commas. Write only the list.", n=n)
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ["arithmetic", "capital", "yes_no", "word_count", "start_word", "list_items"]


def make_tasks(n, seed):
    """`n` tasks with distinct prompts, families drawn uniformly (a family whose prompts run out stops appearing)."""
    rng = random.Random(seed)
    tasks, seen, misses = [], set(), 0
    while len(tasks) < n:  # rejection sampling of distinct prompts
        family = rng.choice(FAMILIES)
        task = make_task(family, rng)
        if task["prompt"] in seen:
            misses += 1
            if misses > 100_000:  # every family is (nearly) used up: fail instead of looping forever
                raise ValueError(f"only about {len(tasks)} distinct prompts exist, asked for {n}")
            continue
        seen.add(task["prompt"])
        tasks.append(dict(family=family, **task))
        misses = 0
    rng.shuffle(tasks)  # the capped `capital` family fills early; shuffling spreads it evenly over any later split
    return [dict(id=f"{t['family']}-{i:05d}", **t) for i, t in enumerate(tasks)]


def normalize(text):
    """Lowercase, accents stripped, surrounding whitespace/quotes/markdown and trailing punctuation removed."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return text.strip().strip("\"'*`").strip().rstrip(".!,;:").strip().lower()


def words(text):
    """Whitespace-separated words that contain at least one letter or digit (a lone "-" is not a word)."""
    return [w for w in text.split() if any(c.isalnum() for c in w)]


def is_short_list(line, n):
    """Is `line` exactly `n` comma-separated items of 1 to 3 words each ("a, b, and c" counts as three)?"""
    items = [re.sub(r"^(and|or) ", "", item.strip()) for item in normalize(line).split(",")]
    return len(items) == n and all(1 <= len(words(item)) <= 3 for item in items)


def score(task, completion):
    """Gold score of `completion` (the assistant's reply text) for `task`: 1.0, 0.5 or 0.0."""
    family, text = task["family"], normalize(completion)
    if family == "arithmetic":  # 1: just the number ("7", "7."); 0.5: right number is the last one said ("3 + 4 = 7")
        numbers = re.findall(r"\d+", text)
        if re.fullmatch(r"\d+", text):
            return float(int(text) == task["answer"])
        return 0.5 if numbers and int(numbers[-1]) == task["answer"] else 0.0
    if family == "capital":  # 1: just the city ("Paris."); 0.5: the city is named inside a longer reply
        city = normalize(task["answer"])
        if text == city:
            return 1.0
        return 0.5 if re.search(rf"\b{re.escape(city)}\b", text) else 0.0
    if family == "yes_no":  # 1: just the right word ("Yes."); 0.5: starts with it, then explains ("No, 3 is less.")
        first = re.match(r"[a-z]+", text)
        if first is None or first.group() != task["answer"]:
            return 0.0
        return 1.0 if text == task["answer"] else 0.5
    if family == "word_count":  # 1: exactly n words; 0.5: short but miscounted (1 to 2n words); 0: rambling
        count = len(words(text))
        return 1.0 if count == task["n"] else 0.5 if 1 <= count <= 2 * task["n"] else 0.0
    if family == "start_word":  # 1: the first word is the asked word (any case, quotes ignored); no half credit
        first = re.match(r"[^a-z]*([a-z']+)", text)
        return float(first is not None and first.group(1) == task["word"].lower())
    if family == "list_items":  # 1: the reply is just the list; 0.5: n items, but numbered or amid other text
        if "\n" not in text and is_short_list(text, task["n"]):
            return 1.0
        numbered = [line for line in completion.splitlines() if re.match(r"\s*(\d+[.)]|[-*])\s+\w", line)]
        if len(numbered) == task["n"] or any(is_short_list(line, task["n"]) for line in text.splitlines()):
            return 0.5
        return 0.0
    raise ValueError(f"unknown family {family!r}")
