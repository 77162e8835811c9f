"""Write the labelled prompt pairs of the semantic cache's verifier: a train split and a held-out split.

    python benchmarks/make_cache_pairs.py      # writes builders/data/cache_pairs_calibration.jsonl (train) and
                                               # benchmarks/data/cache_pairs_heldout.jsonl

Each pair is a cached prompt `a` and a new prompt `b`, label `hit` (serving a's answer for b is right) or `miss`,
and a `kind`: `paraphrase` (hit) or one near-miss category: entity, number, datetime, negation, antonym, comparative,
word_order, language, constraint. The two splits share no template and no slot vocabulary (other questions, other
cities, other products, other framings), so the held-out numbers measure prompts the verifier was never tuned on.
Paraphrases include synonym swaps ("fix" / "repair"), which the verifier is expected to miss: recall is honest too.
Deterministic (fixed seed): the files are committed and the script reproduces them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
# The train split ships with the package: builds derive the cache's threshold on it (builders/cache_calibration.py).
CALIBRATION_PAIRS = Path(__file__).resolve().parent.parent / "builders" / "data" / "cache_pairs_calibration.jsonl"

# Per split: questions with one {slot}; per slot kind, fillers (near misses swap a filler for another one).
SPLITS = {
    "train": {
        "tasks": [  # (verb phrase, synonym verb phrase) of "how do I ..." questions
            ("reset my password", "recover my password"), ("cancel my subscription", "end my subscription"),
            ("fix a leaking tap", "repair a leaking tap"), ("boil an egg", "cook an egg in boiling water"),
            ("delete a git branch", "remove a git branch"), ("start a vegetable garden", "begin a vegetable garden"),
            ("clean a cast iron pan", "wash a cast iron pan"), ("learn to swim", "get better at swimming"),
            ("back up my phone", "make a backup of my phone"), ("change a flat tire", "replace a flat tire"),
            ("merge two lists in python", "combine two lists in python"), ("lower my electricity bill",
                                                                           "reduce my electricity bill"),
            ("write a cover letter", "draft a cover letter"), ("improve my credit score", "raise my credit score"),
            ("train a puppy to sit", "teach a puppy to sit"), ("bake sourdough bread", "make sourdough bread"),
        ],
        "framings": ["How do I {t}?", "How can I {t}?", "What's the best way to {t}?", "Can you tell me how to {t}?",
                     "Please explain how to {t}.", "how to {t}", "What is the easiest way to {t}?",
                     "Could you tell me how I can {t}?"],
        "cities": ["Oslo", "Paris", "Tokyo", "Madrid", "Chicago", "Cairo", "Sydney", "Lima", "Dublin", "Seoul"],
        "countries": ["France", "Japan", "Brazil", "Canada", "Egypt", "Norway", "India", "Kenya", "Mexico", "Spain"],
        "entity_questions": [("What is the weather like in {x} today?", "How is the weather in {x} today?"),
                             ("What is the population of {x}?", "How many people live in {x}?"),
                             ("What is the time in {x} right now?", "What time is it in {x} now?")],
        "products": [("an iphone", "a pixel phone"), ("a toyota corolla", "a honda civic"),
                     ("a macbook air", "a dell xps"), ("a kindle", "a kobo reader")],
        "product_q": "How much does {x} cost?", "product_p": "What does {x} cost?",
        "numbers": [("Set an alarm for {n} am.", "Set my alarm for {n}:00 am."),
                    ("Convert {n} miles to kilometers.", "How many kilometers are {n} miles?"),
                    ("What is {n} percent of 300?", "What's {n}% of 300?"),
                    ("Give me a {n} day workout plan.", "Can you give me a {n}-day workout plan?")],
        "dates": [("What's on my calendar today?", "What's on my calendar tomorrow?"),
                  ("Will it rain in {x} this weekend?", "Will it rain in {x} next weekend?"),
                  ("Book a table for Friday at 7 pm.", "Book a table for Friday at 7 am."),
                  ("What happened in {x} in 1990?", "What happened in {x} in 1999?"),
                  ("Is the museum open on Monday?", "Is the museum open on Sunday?"),
                  ("Remind me to call mom in the morning.", "Remind me to call mom in the evening.")],
        "negations": [("Can I eat {x} when pregnant?", "Can't I eat {x} when pregnant?"),
                      ("Which foods contain {x}?", "Which foods contain no {x}?"),
                      ("How do I make pancakes with {x}?", "How do I make pancakes without {x}?"),
                      ("Why does my phone charge?", "Why does my phone not charge?")],
        "neg_fillers": ["eggs", "gluten", "sugar", "milk", "peanuts"],
        "antonyms": [("How do I turn on {x}?", "How do I turn off {x}?"),
                     ("How do I make a soft boiled egg?", "How do I make a hard boiled egg?"),
                     ("Why is my coffee too hot?", "Why is my coffee too cold?"),
                     ("How do I open {x}?", "How do I close {x}?"),
                     ("How can I increase my heart rate?", "How can I decrease my heart rate?"),
                     ("Should I buy stocks now?", "Should I sell stocks now?")],
        "ant_fillers": ["bluetooth", "dark mode", "the firewall", "airplane mode"],
        "comparatives": [("What is a cheap laptop for students?", "What is a cheaper laptop for students?"),
                         ("Which is the fastest train to {x}?", "Which is the slowest train to {x}?"),
                         ("What is the best pizza in {x}?", "What is the worst pizza in {x}?"),
                         ("How do I get more sleep?", "How do I get less sleep?")],
        "orders": [("Convert {x} to {y}.", "Convert {y} to {x}."),
                   ("Is {x} bigger than {y}?", "Is {y} bigger than {x}?"),
                   ("How far is it from {x} to {y}?", "How far is it from {y} to {x}?")],
        "order_pairs": [("celsius", "fahrenheit"), ("dollars", "euros"), ("a string", "an integer"),
                        ("json", "xml"), ("Oslo", "Paris"), ("Tokyo", "Seoul")],
        "languages": [("What is the capital of {x}?", "Quelle est la capitale de la {x} ?"),
                      ("How are you today?", "¿Cómo estás hoy?"),
                      ("Where is the train station?", "Wo ist der Bahnhof?"),
                      ("Translate good morning into Spanish.", "Translate good morning into Italian."),
                      ("Write a poem about the sea in English.", "Write a poem about the sea in German.")],
        "constraints": [("How do I sort a list in python?", "How do I sort a list in python without sorted()?"),
                        ("Recommend a laptop.", "Recommend a laptop under $500."),
                        ("Write a story about a dragon.", "Write a story about a dragon in 50 words."),
                        ("How do I learn guitar?", "How do I learn guitar for free?"),
                        ("Suggest a hotel in {x}.", "Suggest a pet friendly hotel in {x}."),
                        ("Give me a recipe for soup.", "Give me a vegan recipe for soup.")],
    },
    "heldout": {
        "tasks": [
            ("unblock a sink", "unclog a sink"), ("renew my passport", "get my passport renewed"),
            ("repot a cactus", "move a cactus into a new pot"), ("tie a tie", "knot a necktie"),
            ("undo my last commit", "revert my last commit"), ("pay off student loans", "clear student loans"),
            ("descale a kettle", "remove limescale from a kettle"), ("paint a bedroom wall", "paint a wall in a bedroom"),
            ("update my router firmware", "upgrade my router firmware"), ("freeze fresh basil", "freeze basil"),
            ("sharpen a kitchen knife", "hone a kitchen knife"), ("stop my cat scratching furniture",
                                                                  "keep my cat from scratching furniture"),
            ("export contacts from outlook", "get contacts out of outlook"), ("read a csv file with pandas",
                                                                               "load a csv file with pandas"),
        ],
        "framings": ["How should I {t}?", "What's the right way to {t}?", "Any idea how to {t}?",
                     "I'd like to know how to {t}.", "Is there a way to {t}?", "Steps to {t}?",
                     "Hey, how would I {t}?", "Could you explain how to {t}, please?"],
        "cities": ["Bergen", "Lisbon", "Osaka", "Denver", "Nairobi", "Hanoi", "Quito", "Krakow", "Perth", "Boston"],
        "countries": ["Portugal", "Chile", "Vietnam", "Ghana", "Finland", "Peru", "Austria", "Nepal", "Greece",
                      "Morocco"],
        "entity_questions": [("How warm is it in {x} this afternoon?", "What's the temperature in {x} this afternoon?"),
                             ("Which language do they speak in {x}?", "What language is spoken in {x}?"),
                             ("What currency does {x} use?", "What's the currency used in {x}?")],
        "products": [("a nintendo switch", "a steam deck"), ("a dyson vacuum", "a shark vacuum"),
                     ("an ipad mini", "a galaxy tab"), ("a tesla model y", "a ford mustang mach e")],
        "product_q": "What is the price of {x}?", "product_p": "How much is {x}?",
        "numbers": [("Wake me up at {n} pm.", "Wake me up at {n}:00 pm."),
                    ("How many grams are in {n} pounds?", "How many grams in {n} lbs?"),
                    ("Split a bill of {n} dollars between 3 people.", "Split a ${n} bill between 3 people."),
                    ("Plan a {n} week marathon training schedule.", "Plan a {n}-week marathon training schedule.")],
        "dates": [("Is the pharmacy open tonight?", "Is the pharmacy open tomorrow night?"),
                  ("What's the forecast for {x} on Saturday?", "What's the forecast for {x} on Tuesday?"),
                  ("Schedule the meeting for 9:30 am.", "Schedule the meeting for 9:30 pm."),
                  ("Who won the election in {x} in 2016?", "Who won the election in {x} in 2020?"),
                  ("What should I plant in April?", "What should I plant in October?"),
                  ("How busy is the gym at noon?", "How busy is the gym at midnight?")],
        "negations": [("Is it safe to drink {x} while taking antibiotics?",
                       "Is it not safe to drink {x} while taking antibiotics?"),
                      ("Give me a salad recipe with {x}.", "Give me a salad recipe without {x}."),
                      ("Why won't my car start?", "Why will my car start?"),
                      ("Which cities have {x}?", "Which cities have no {x}?")],
        "neg_fillers": ["alcohol", "coffee", "onions", "cheese", "tofu"],
        "antonyms": [("How do I enable {x}?", "How do I disable {x}?"),
                     ("Why is my bread so dense?", "Why is my bread so airy?"),
                     ("How do I import {x}?", "How do I export {x}?"),
                     ("How can I gain weight quickly?", "How can I lose weight quickly?"),
                     ("How do I upload photos to icloud?", "How do I download photos from icloud?"),
                     ("Why is the water pressure high?", "Why is the water pressure low?")],
        "ant_fillers": ["two factor authentication", "cookies in chrome", "location services", "autosave"],
        "comparatives": [("Which phone has the longest battery life?", "Which phone has the shortest battery life?"),
                         ("What's a healthy snack for kids?", "What's a healthier snack for kids?"),
                         ("Find the nearest hospital in {x}.", "Find the largest hospital in {x}."),
                         ("How do I make my code run faster?", "How do I make my code run slower?")],
        "orders": [("Translate {x} into {y}.", "Translate {y} into {x}."),
                   ("Is {x} older than {y}?", "Is {y} older than {x}?"),
                   ("Flights from {x} to {y}?", "Flights from {y} to {x}?")],
        "order_pairs": [("kilograms", "pounds"), ("yen", "pesos"), ("a tuple", "a list"), ("yaml", "toml"),
                        ("Bergen", "Lisbon"), ("Hanoi", "Quito")],
        "languages": [("What is the capital of {x}?", "Was ist die Hauptstadt von {x}?"),
                      ("How much does this cost?", "Quanto costa questo?"),
                      ("Where is the nearest pharmacy?", "¿Dónde está la farmacia más cercana?"),
                      ("Translate thank you into Japanese.", "Translate thank you into Korean."),
                      ("Summarize this article in English.", "Summarize this article in Dutch.")],
        "constraints": [("Write a function to reverse a string in javascript.",
                         "Write a function to reverse a string in javascript using recursion."),
                        ("Suggest a gift for my dad.", "Suggest a gift for my dad under 20 euros."),
                        ("Explain quantum computing.", "Explain quantum computing to a five year old."),
                        ("Plan a trip to {x}.", "Plan a budget trip to {x}."),
                        ("Give me a workout.", "Give me a workout with no equipment."),
                        ("Find a flight to {x}.", "Find a direct flight to {x}.")],
    },
}


def pairs_of(split: dict, rng: random.Random) -> list[dict]:
    pairs: list[dict] = []

    def add(a: str, b: str, label: str, kind: str) -> None:
        if a != b:
            pairs.append({"a": a, "b": b, "label": label, "kind": kind})

    framings = split["framings"]
    for task, synonym in split["tasks"]:  # paraphrases: framings of the same task, and one synonym swap
        first, *others = rng.sample(framings, len(framings))
        for framing in others:
            add(first.format(t=task), framing.format(t=task), "hit", "paraphrase")
        add(first.format(t=task), rng.choice(others).format(t=synonym), "hit", "paraphrase")
        other_task = rng.choice([other for other, _ in split["tasks"] if other != task])
        add(first.format(t=task), rng.choice(others).format(t=other_task), "miss", "constraint")
    places = split["cities"] + split["countries"]
    for question, paraphrase in split["entity_questions"]:
        for place in places:
            add(question.format(x=place), paraphrase.format(x=place), "hit", "paraphrase")
            for other in rng.sample([p for p in places if p != place], 2):
                add(question.format(x=place), question.format(x=other), "miss", "entity")
    for first, second in split["products"]:
        add(split["product_q"].format(x=first), split["product_q"].format(x=second), "miss", "entity")
        add(split["product_q"].format(x=first), split["product_p"].format(x=first), "hit", "paraphrase")
    for question, paraphrase in split["numbers"]:
        for number in rng.sample(range(2, 12), 8):
            other = rng.choice([n for n in range(2, 12) if n != number])
            add(question.format(n=number), paraphrase.format(n=number), "hit", "paraphrase")
            add(question.format(n=number), paraphrase.format(n=other), "miss", "number")
            add(question.format(n=number), question.format(n=other), "miss", "number")
    for first, second in split["dates"]:
        for place in rng.sample(places, 4) if "{x}" in first else [None]:
            add(first.format(x=place), second.format(x=place), "miss", "datetime")
    for category, fillers in (("negations", "neg_fillers"), ("antonyms", "ant_fillers")):
        kind = "negation" if category == "negations" else "antonym"
        for first, second in split[category]:
            for filler in split[fillers] if "{x}" in first else [None]:
                add(first.format(x=filler), second.format(x=filler), "miss", kind)
    for first, second in split["comparatives"]:
        for place in rng.sample(places, 5) if "{x}" in first else [None]:
            add(first.format(x=place), second.format(x=place), "miss", "comparative")
    for first, second in split["orders"]:
        for x, y in split["order_pairs"]:
            add(first.format(x=x, y=y), second.format(x=x, y=y), "miss", "word_order")
    for first, second in split["languages"]:
        for place in rng.sample(split["countries"], 5) if "{x}" in first else [None]:
            add(first.format(x=place), second.format(x=place), "miss", "language")
    for first, second in split["constraints"]:
        for place in rng.sample(places, 5) if "{x}" in first else [None]:
            add(first.format(x=place), second.format(x=place), "miss", "constraint")
    return pairs


def main() -> None:
    for name, split in SPLITS.items():
        pairs = pairs_of(split, random.Random(f"cache-pairs-{name}"))
        path = CALIBRATION_PAIRS if name == "train" else DATA / f"cache_pairs_{name}.jsonl"
        path.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs), encoding="utf-8")
        print(f"{path}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
