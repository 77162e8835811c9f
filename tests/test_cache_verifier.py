"""The semantic cache's verifier on each near-miss category, and on paraphrases it must accept (pure logic)."""

from __future__ import annotations

import pytest

from tritonllm.builders.cache_calibration import load_pairs
from tritonllm.python_backends.cache_verifier import conflict, normal_form

NEAR_MISSES = {
    "entity": [("What is the population of Oslo?", "What is the population of Bergen?"),
               ("How much does a kindle cost?", "How much does a kobo cost?")],
    "number": [("Set an alarm for 7 am.", "Set an alarm for 8 am."), ("What is 12 times 12?", "What is 11 times 12?"),
               ("Give me a three day plan.", "Give me a 4 day plan.")],
    "datetime": [("Will it rain in Oslo today?", "Will it rain in Oslo tomorrow?"),
                 ("Book a table at 7 pm.", "Book a table at 7 am."),
                 ("Is the shop open on Monday?", "Is the shop open on Sunday?")],
    "negation": [("How to invest in index funds?", "How not to invest in index funds?"),
                 ("Why does my phone charge?", "Why doesn't my phone charge?"),
                 ("A salad with cheese, please.", "A salad without cheese, please.")],
    "antonym": [("How do I make a soft boiled egg?", "How do I make a hard boiled egg?"),
                ("How do I turn on bluetooth?", "How do I turn off bluetooth?"),
                ("How can I increase my heart rate?", "How can I decrease my heart rate?")],
    "comparative": [("What is a cheap laptop?", "What is a cheaper laptop?"),
                    ("Which is the fastest train?", "Which is the slowest train?"),
                    ("What is the largest ocean?", "What is a large ocean?"),  # the lemma keeps the degree
                    ("What is the larger lake?", "What is the biggest lake?")],
    "attribute": [("How tall is Mount Everest?", "How old is Mount Everest?"),
                  ("How much does a Tesla cost?", "How much does a Tesla weigh?"),
                  ("What does NASA stand for?", "What does NASA do?"),
                  ("Who is the author of Dune?", "Who is the publisher of Dune?")],
    "word_order": [("How do I convert a string to an integer?", "How do I convert an integer to a string?"),
                   ("Flights from Oslo to Paris?", "Flights from Paris to Oslo?"),
                   ("Did the Romans conquer the Greeks?", "Did the Greeks conquer the Romans?"),  # no preposition
                   ("Is Oslo north of Paris?", "Is Paris north of Oslo?"),
                   ("How many km are 5 miles?", "Convert 5 km to miles.")],
    "language": [("What is the capital of France?", "Quelle est la capitale de la France ?"),
                 ("Translate hello into Spanish.", "Translate hello into Italian.")],
    "constraint": [("How do I sort a list in python?", "How do I sort a list in python without sorted()?"),
                   ("Recommend a laptop.", "Recommend a laptop under $500.")],
    # a phrase never moves to another clause or sentence
    "clause": [("What time is it in London when it's 9am in New York?",
                "What time is it in New York when it's 9am in London?"),
               ("I'm in London. What time is it in Tokyo?", "I'm in Tokyo. What time is it in London?"),
               ("If I leave Oslo at noon, when do I reach Bergen?", "If I leave Bergen at noon, when do I reach Oslo?")],
    # an abbreviation stands only for words it spells
    "abbreviation": [("What is the GDP of Japan?", "What is the gross national product of Japan?"),
                     ("How do I join tables in SQL?", "How do I join tables in SQLite?"),
                     ("Is PostgreSQL free?", "Is PostGIS free?")],
    "question": [("Why is the sky blue?", "When is the sky blue?")],
}
PARAPHRASES = [
    ("How do I reset my password?", "How can I reset my password?"),
    ("How do I reset my password?", "Could you please tell me how to reset my password?"),
    ("Set my alarm for 7:00 am.", "Set an alarm for 7 am."),
    ("What is 15 percent of 200?", "What's 15% of 200?"),
    ("What is the chemical formula for water?", "Chemical formula for water?"),
    ("What is the meaning of life?", "What is life's meaning?"),
    ("What is the difference between TCP and UDP?", "What's the difference between UDP and TCP?"),
    ("How do I center a div in CSS?", "Centering a div in CSS, how?"),
    ("How many grams are in 2 pounds?", "How many grams in 2 lbs?"),
    # WordNet synonyms (a common sense of both words)
    ("How do I fix my bike?", "How do I repair my bike?"),
    ("How do I buy a car?", "How can I purchase a car?"),
    ("What is a big city?", "What is a large city?"),
    ("What is the largest ocean?", "What is the biggest ocean?"),  # synonyms of the same degree
    # question frames
    ("How much does a Tesla Model 3 cost?", "What's the price of a Tesla Model 3?"),
    ("iPhone 15 price?", "How much does the iPhone 15 cost?"),
    ("How tall is Mount Everest?", "What is the height of Mount Everest?"),
    ("What is the population of Canada?", "How many people live in Canada?"),
    ("What does CPU stand for?", "What is CPU short for?"),
    ("Who painted the Mona Lisa?", "Who is the painter of the Mona Lisa?"),
    ("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"),
    ("When was Albert Einstein born?", "What year was Albert Einstein born?"),
    ("Convert 10 km to miles.", "How many miles is 10 km?"),
    ("Tips for growing tomatoes?", "How do I grow tomatoes?"),
    # lemmas (WordNet morphy, irregular forms)
    ("How do I change the oil in my car?", "Changing the oil in my car?"),
    ("What language do they speak in Brazil?", "Which language is spoken in Brazil?"),
    # phrases that move, parts of "A or B" that swap, terse forms
    ("In Python, how do I reverse a list?", "How do I reverse a list in Python?"),
    ("Tomorrow, will it snow in Denver?", "Will it snow in Denver tomorrow?"),
    ("Flights to Paris from Oslo", "Flights from Oslo to Paris"),
    ("Is it better to rent or buy?", "Is it better to buy or rent?"),
    ("What is the weather forecast for Berlin?", "Berlin weather forecast?"),
    ("Using SQL, how do I find duplicate rows?", "How do I find duplicate rows using SQL?"),
    ("How much protein per day should an adult eat?", "How much protein should an adult eat per day?"),
    ("When visiting Japan, is tipping expected?", "Is tipping expected when visiting Japan?"),
    # abbreviations: initials of the words on the other side, or a shortening of one word
    ("What's the best pizza in NYC?", "What's the best pizza in New York City?"),
    ("What is a good credit score in the US?", "What is a good credit score in the United States?"),
    ("What is the GDP of Japan?", "What is the gross domestic product of Japan?"),
    ("How many tbsp in a cup?", "How many tablespoons are in a cup?"),
    ("How do I reset my wifi pwd?", "How do I reset my wifi password?"),
    # hedges and interjections, requests in the imperative, more question frames
    ("Who painted the Mona Lisa?", "I was just wondering, who painted the Mona Lisa?"),
    ("Why is the sky blue?", "Sorry if this is a dumb question, but why is the sky blue?"),
    ("Name the longest river in Africa.", "What is the longest river in Africa?"),
    ("Define photosynthesis.", "What is photosynthesis?"),
    ("Convert 100 degrees Fahrenheit to Celsius.", "What is 100 degrees Fahrenheit in Celsius?"),
    ("What is the boiling point of ethanol?", "At what temperature does ethanol boil?"),
    ("Why do cats purr?", "What's the reason that cats purr?"),
    ("What's the difference between a virus and a bacterium?", "How does a virus differ from a bacterium?"),
    ("Which city is the capital of Peru?", "What is Peru's capital city?"),
]


@pytest.mark.parametrize("cached, asked", [pair for pairs in NEAR_MISSES.values() for pair in pairs],
                         ids=[f"{kind}-{n}" for kind, pairs in NEAR_MISSES.items() for n in range(len(pairs))])
def test_a_near_miss_is_refused_both_ways(cached, asked):
    assert conflict(cached, asked) is not None and conflict(asked, cached) is not None


@pytest.mark.parametrize("cached, asked", PARAPHRASES)
def test_a_paraphrase_is_accepted_both_ways(cached, asked):
    assert conflict(cached, asked) is None and conflict(asked, cached) is None


def test_the_reason_names_what_differs():
    assert conflict("Set an alarm for 7 am.", "Set an alarm for 7 pm.") == "different numbers (7:00 vs 19:00)"
    assert conflict("Is it safe?", "Is it not safe?") == "different polarity (negation)"
    assert conflict("Soft boiled egg?", "Hard boiled egg?") == "unmatched content words (soft vs hard)"
    assert conflict("Convert celsius to fahrenheit.", "Convert fahrenheit to celsius.") == \
        "same content words in another order"


def test_prompts_of_one_normal_form_are_accepted_and_near_misses_never_share_one():
    """On both train splits: a pair whose normal forms agree (the cache finds it by hash, without the embedder) is
    always one the verifier accepts and a labelled paraphrase; no near miss has its cached prompt's normal form."""
    same = [pair for pair in load_pairs() if normal_form(pair["a"]) == normal_form(pair["b"])]
    assert len(same) > 100
    assert all(pair["label"] == "hit" and conflict(pair["a"], pair["b"]) is None for pair in same)
