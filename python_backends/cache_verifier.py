"""Verification stage of the semantic cache: may the answer cached for one prompt be served for another?

The vector index proposes candidates; this module decides. A bi-encoder barely moves when one content word changes
("soft yolk" / "hard yolk" 0.96, "in Oslo today" / "in Oslo tomorrow" 0.97 with MiniLM), and single-word cosines do
not separate synonyms from antonyms either (sea/ocean 0.87, monday/tuesday 0.87, husband/wife 0.87). So the verifier
is an alignment of content words: both prompts are read into

- the question asked (what or how / why / when / where / who, with "how do I", "what's the best way to", ... read as
  one "how"),
- the numbers, times and units (7 am == 7:00 == 07:00; 1,000 == 1000 == one thousand; km == kilometres),
- polarity (an odd number of not / no / never / without / n't),
- the content words (function words, request framing like "can you tell me" and politeness dropped; each word read
  with its WordNet lemmas, so "changing" / "change", "spoken" / "speak", "largest" / "large" (degree kept: "cheaper" is
  not "cheap"); a WordNet synonym of a word counts as that word),
- where those words stand: a prompt is cut into phrases at punctuation, question words and prepositions; phrases may
  move ("in Python, how do I reverse a list" / "how do I reverse a list in Python") and the parts of "A and B" / "A or
  B" may swap, but words never move inside a phrase or across a direction word ("euros to dollars" / "dollars to
  euros", "Romans conquer Greeks" / "Greeks conquer Romans"); a terse form without prepositions may stand for one
  with neutral ones only ("Berlin weather forecast" / "weather forecast for Berlin"). Phrases move within their
  clause only: a sentence is one, and "if" / "when" / "because" ... open another ("what time is it in London | when
  it is 9 am in New York"), so two phrases never trade places across clauses; auxiliaries end a phrase ("how much
  protein per day | should an adult eat").
- abbreviations: capitals or a short word WordNet lacks stand for the words whose initials they spell ("NYC" / "New
  York City", "US" / "United States", "GDP" / "gross domestic product"), and a short word WordNet lacks for a word
  it has whose letters it keeps in order ("tbsp" / "tablespoons", "pwd" / "password").

Before reading, common question frames are rewritten to one form each: "how much does X cost" / "what does X cost" /
"X price" -> "what is the price of X"; "how tall is X" -> "what is the height of X" (age, length, distance, depth,
weight, size, speed, width alike); "what does X mean / stand for", "X short for" -> "what is the meaning of X"; "who
is the painter of X" -> "who painted X"; "what year" / "on what date did" -> "when"; "what is the reason that" /
"how come" -> "why"; "at what temperature does X boil" -> "what is the boiling point of X"; "how does X differ from
Y" -> "what is the difference between X and Y"; "how many miles is 10 km", "what is 10 km in miles" -> "convert 10 km
to miles"; a request in the imperative ("list / name / define / calculate X") -> "what is X". Hedges and
interjections ("sorry if this is a dumb question, but", "I was just wondering", "ugh") are framing, dropped.

A candidate is served only when all of these agree. Any content word present on one side only (another entity, an
antonym, a comparative, a constraint, another language) or the same words in another order is a conflict. Precision
comes first: a paraphrase the rules cannot align is a miss (it costs one generation), never a wrong answer.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

LEXICON_FILE = Path(__file__).resolve().parent / "data" / "wordnet_lexicon.tsv"
EXCEPTIONS_FILE = LEXICON_FILE.with_name("wordnet_exceptions.tsv")  # irregular forms (wrote -> write)

# Request framing: dropped wherever it appears ("Could you please tell me ...", "..., thanks").
_FRAMING = [
    "can you", "could you", "would you", "will you", "can u", "would you mind", "please", "pls", "kindly",
    "tell me", "let me know", "show me", "explain to me", "explain", "describe", "i want to know", "i would like to know",
    "i need to know", "i wonder", "i am wondering", "i was wondering", "do you know", "does anyone know",
    "any idea", "quick question", "question", "help me understand", "help me", "i need help", "hey", "hi", "hello",
    "thanks", "thank you", "right now", "in simple terms", "briefly", "give me", "i need", "i want", "in detail",
    "would you mind telling me", "would you mind", "telling me", "thanks in advance", "in advance",
    # hedges and interjections around a question
    "sorry if this is a dumb question", "sorry if this is a stupid question", "sorry if this is a silly question",
    "this might be a dumb question", "this may be a dumb question", "dumb question", "stupid question",
    "silly question", "random question", "random one", "quick one", "a question for you", "question for you",
    "one for you", "out of curiosity", "just curious", "i am curious", "i am just curious", "i have always been curious",
    "i have always wondered", "i always wondered", "i was just wondering", "just wondering", "i would love to know",
    "i would like to understand", "i am trying to figure out", "i am trying to understand", "i would love to learn",
    "do you happen to know", "happen to know", "does anybody know", "anyone know", "remind me", "can you remind me",
    "help me out", "could you help me out", "can you help", "if you can", "if possible", "real quick",
    "by the way", "btw", "ugh", "oh", "hmm", "um", "uh", "okay", "ok so", "so", "well", "hey there", "hi there",
    "good morning", "good evening", "cheers", "much appreciated", "appreciate it", "i appreciate it",
]
# Ways to ask "how": each reads as one question word.
_HOW = [
    "how do i", "how can i", "how should i", "how would i", "how could i", "how do you", "how can you", "how does one",
    "how can one", "how do we", "how can we", "how to", "how", "what is the way to", "what is the best way to",
    "what is the right way to", "what is the easiest way to", "what is the proper way to", "what is a good way to",
    "what is the correct way to", "what is the process to", "what is the process for", "what are the steps to",
    "what steps do i take to", "what steps should i take to", "what do i do to", "what should i do to", "the way to",
    "the best way to", "ways to", "steps to", "the steps to", "a way to", "a good way to", "good way to",
    "an easy way to", "easiest way to", "best way to", "best method to", "the best method to", "method to",
    "is there a way to", "is it possible to", "tips for", "tips on", "tips to", "some tips for", "advice on",
    "advice for", "a guide to", "guide to",
]
# Question frames rewritten to one form before reading (on lower-case text with contractions expanded).
_ATTRIBUTES = {"tall": "height", "high": "height", "old": "age", "long": "length", "far": "distance",
               "deep": "depth", "heavy": "weight", "big": "size", "large": "size", "fast": "speed", "wide": "width"}
_POINTS = {"boil": "boiling", "freeze": "freezing", "melt": "melting"}
_ATTRIBUTE_NOUNS = sorted({*_ATTRIBUTES.values(), "price", "cost", "population", "meaning"})
_AGENT_VERBS = {"author": "wrote", "writer": "wrote"}  # others are the verb + -er / -or (painter, inventor)
_FRAMES = [
    (r"\bhow much (?:(?:does|do|did|will|would|should) )?(.+?) costs?\b", r"what is the price of \1"),
    (r"\bwhat (?:does|do|did|will|would) (.+?) cost\b", r"what is the price of \1"),
    (r"\bhow (?:much|expensive) (?:is|are)\b(?![^?.!]*\d)", "what is the price of"),  # not "how much is 2 + 2"
    (r"\bhow much (?:(?:does|do|did) )?(.+?) weighs?\b", r"what is the weight of \1"),
    (rf"\bhow ({'|'.join(_ATTRIBUTES)}) (?:is|are|was|were)\b", lambda match: f"what is the "
                                                                       f"{_ATTRIBUTES[match.group(1)]} of"),
    (r"\bhow many people live in\b", "what is the population of"),
    (r"\bhow many (\w+) (?:are in|is in|is|are|in|make) ([^?.!]*\d[^?.!]*)",  # "how many km are 5 miles"
     lambda match: f"convert {match.group(2)} to {match.group(1)}" if match.group(1) in _UNITS else match.group(0)),
    (r"\bwhat (?:does|do|did) (.+?) (?:mean|stand for)\b", r"what is the meaning of \1"),
    (r"\bwhat is (.+?) short for\b", r"what is the meaning of \1"),
    (r"\b(?:meaning|definition) of the (?:word|term|phrase|acronym|abbreviation)\b", "meaning of"),
    (r"\bdefinition\b", "meaning"),
    (r"\b(?:in )?(?:what|which) year\b", "when"),
    (r"\b(?:on )?(?:what|which) (?:date|day)\b(?= (?:did|was|were|is|does|will)\b)", "when"),
    (r"\b(?:what is the reason|for what reason|how come)(?: that| why)?\b", "why"),
    (r"\bat what temperature( in \w+)? (?:does|do|will|can) (.+?) (boil|freeze|melt)s?\b",
     lambda match: f"what is the {_POINTS[match.group(3)]} point of {match.group(2)}{match.group(1) or ''}"),
    (r"\b(?:what|which) (?:city|town) is the capital\b", "what is the capital"),
    (r"\bcapital city\b", "capital"),
    (r"\bthe (?:greatest|largest|highest|biggest) number of\b", "the most"),
    (r"\bhow (?:does|do|is|are) (.+?) (?:differ|different) from (.+?)(?=[?.!]|$)",
     r"what is the difference between \1 and \2"),
    (r"\bwhat is ([\d.,]+ (?:degrees? )?(\w+)) in (\w+)\b",  # "what is 100 degrees fahrenheit in celsius"
     lambda match: f"convert {match.group(1)} to {match.group(3)}" if {match.group(2), match.group(3)} <= _UNITS.keys()
     else match.group(0)),
    # a request in the imperative asks what the thing is: "list the planets", "define photosynthesis"
    (r"(?:^|(?<=[.?!:] )|(?<=please ))(?:list|name|define|identify|calculate|compute)\b(?! of\b)", "what is"),
    (r"\bwhere (is|are|was|were) (.+?) (?:located|situated)\b", r"where \1 \2"),
    (r"\bwho (?:is|was|are|were) the (\w+) of\b", lambda match: f"who {_agent_verb(match.group(1))}"),
    (rf"^(?!\W*(?:what|which|who|how|when|where|why)\b)(.+?) ({'|'.join(_ATTRIBUTE_NOUNS)})\W*$",
     r"what is the \2 of \1"),  # terse "iPhone 15 price?"
]
# "what" and "how" ask for the same thing more often than not ("what is the population" / "how many people live",
# "what does it cost" / "how much does it cost"); the content words still have to agree.
_QUESTION_WORDS = {"what": "what", "which": "what", "how": "what", "who": "who", "whom": "who", "whose": "who",
                   "when": "when", "where": "where", "why": "why"}
# Auxiliaries and modals: dropped too, but each ends the phrase before it (a subject may follow).
_AUXILIARIES = set("is are was were am be been being do does did have has had can could will would shall should may "
                   "might must".split())
# Closed-class words that do not change what is asked. Words that carry direction or polarity (to/from, on/off,
# in/out, up/down, before/after, with/without, more/less, than) are kept unless their counterpart is listed here:
# "to", "on", "in" and "with" are dropped, so "from", "off", "out" and "without" stand unmatched against them.
_FUNCTION_WORDS = set("""
a an the doing done having i me my mine myself you your yours yourself we us our ours they them their theirs it its
itself he him his she her hers this that these those there here so if then just really actually exactly basically
some any anything something someone anyone thing things get got getting go going gonna wanna also too very quite
pretty kind sort like well ok okay now currently but
""".split()) | _AUXILIARIES
# Prepositions start a phrase that may move. A direction word keeps its identity ("from X" is not "to X"); the others
# are one neutral marker ("on Windows" / "in Windows"), never equal to no preposition ("python in excel").
_DIRECTIONS = set("""
to from into onto than before after over under above below per vs versus against toward towards through via within
across behind beyond between without during until near
""".split())
_NEUTRAL_PREPOSITIONS = {"in", "on", "at", "of", "for", "with", "by", "about", "as", "using"}
_CONJUNCTIONS = {"and", "or"}  # the parts they join may swap
# Words that open a subordinate clause; in the middle of a sentence they end the clause before them.
_SUBORDINATORS = {"if", "when", "whenever", "while", "because", "unless", "although", "though", "whereas"}
_TIME_ADVERBS = {"today", "tomorrow", "tonight", "yesterday"}  # a phrase of their own: they move freely
# Spellings of one content word.
_CANONICAL = {"cost": "price", "costs": "price", "prices": "price", "pricing": "price"}
_NEGATIONS = {"not", "no", "never", "without", "nor", "none", "nothing", "neither", "nobody", "nowhere", "cannot"}
_CONTRACTIONS = [(r"\bcan't\b", "can not"), (r"\bwon't\b", "will not"), (r"\bshan't\b", "shall not"),
                 (r"n't\b", " not"), (r"'re\b", " are"), (r"'m\b", " am"), (r"'ll\b", " will"), (r"'d\b", " would"),
                 (r"'ve\b", " have"), (r"\b(what|who|where|when|why|how|it|that|there|here|he|she|this)'s\b", r"\1 is")]
# "one" is left out: it is mostly a pronoun ("how do I write one?").
_NUMBER_WORDS = {word: str(value) for value, word in enumerate(
    "zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
                      "ninety": "90", "hundred": "100", "thousand": "1000", "million": "1e6", "billion": "1e9",
                      "dozen": "12", "half": "0.5", "twice": "x2", "double": "x2", "triple": "x3", "noon": "12:00",
                      "midday": "12:00", "midnight": "0:00"})
_ORDINALS = {"first": "1", "second": "2", "third": "3", "fourth": "4", "fifth": "5", "sixth": "6", "seventh": "7",
             "eighth": "8", "ninth": "9", "tenth": "10"}
# Unit spellings and abbreviations of the same unit (SI, imperial, time, currency symbols).
_UNITS = {}
for _canonical, _spellings in {
    "km": "km kms kilometer kilometers kilometre kilometres", "m": "meter meters metre metres",
    "cm": "cm centimeter centimeters centimetre centimetres", "mm": "mm millimeter millimeters millimetre millimetres",
    "mi": "mi mile miles", "ft": "ft foot feet", "inch": "inch inches", "yd": "yd yard yards",
    "kg": "kg kgs kilogram kilograms kilo kilos", "g": "gram grams gr", "mg": "mg milligram milligrams",
    "lb": "lb lbs pound pounds", "oz": "oz ounce ounces", "l": "liter liters litre litres", "ml": "ml milliliter "
    "milliliters millilitre millilitres", "gal": "gal gallon gallons", "s": "sec secs second seconds",
    "min": "min mins minute minutes", "h": "hr hrs hour hours", "day": "day days", "week": "week weeks wk wks",
    "month": "month months", "year": "year years yr yrs", "percent": "percent percentage %", "celsius": "celsius °c",
    "fahrenheit": "fahrenheit °f", "usd": "$ dollar dollars usd", "eur": "€ euro euros eur", "gbp": "£ gbp",
    "kb": "kb kilobyte kilobytes", "mb": "mb megabyte megabytes", "gb": "gb gigabyte gigabytes",
    "tb": "tb terabyte terabytes", "mph": "mph", "kmh": "kmh kph",
}.items():
    for _spelling in _spellings.split():
        _UNITS[_spelling] = _canonical
_MONTHS = {"jan": "january", "feb": "february", "mar": "march", "apr": "april", "jun": "june", "jul": "july",
           "aug": "august", "sep": "september", "sept": "september", "oct": "october", "nov": "november",
           "dec": "december"}
_TOKEN = re.compile(r"""
    (?P<time>\d{1,2}(?::\d{2})?\s*[ap]\.?m\.?(?![a-z]) | \d{1,2}:\d{2})
  | (?P<number>\d+(?:[.,]\d+)*(?:st|nd|rd|th)?)
  | (?P<word>[^\W\d_]+(?:[+#]+|(?:'[^\W\d_]+)?))
  | (?P<symbol>[$€£%])
  | (?P<sentence_end>[?!.])
  | (?P<separator>[,;:()\[\]])
""", re.VERBOSE)


@dataclass(frozen=True)
class Reading:
    """What a prompt asks, in the parts the verifier compares."""

    question: tuple[str, ...]  # sorted question words
    numbers: tuple[str, ...]  # sorted normalised numbers and times
    negated: bool
    content: tuple[str, ...]  # content words (numbers as "#7", units canonical) in order
    # ("word", w) | ("preposition", p) | ("and", "") | ("break", "") | ("clause", ""), in order
    layout: tuple[tuple[str, str], ...]
    acronyms: frozenset[str] = frozenset()  # content words written in capitals ("US", "GDP")


@lru_cache(maxsize=65536)  # a cached prompt is read once per lookup that finds it; prompts repeat
def read(prompt: str) -> Reading:
    text = unicodedata.normalize("NFKC", prompt)
    acronyms = _acronyms(text)
    text = text.lower().replace("\u2019", "'").replace("`", "'")
    for pattern, replacement in _CONTRACTIONS:
        text = re.sub(pattern, replacement, text)
    for pattern, replacement in _FRAME_PATTERNS:
        text = pattern.sub(replacement, text)
    tokens = _possessives_as_of(_tokens(text))
    question: list[str] = []
    numbers: list[str] = []
    negations = 0
    layout: list[tuple[str, str]] = []
    leading_subordinate = False  # the clause now read opened with "if" / "when" / ...: a comma ends it
    position = 0
    while position < len(tokens):
        how = _match_phrase(tokens, position, _HOW_PHRASES)
        if how:
            question.append("what")
            layout.append(("break", ""))
            position += how
            continue
        framing = _match_phrase(tokens, position, _FRAMING_PHRASES)
        if framing:
            position += framing
            continue
        kind, token = tokens[position]
        position += 1
        if kind in ("time", "number"):
            numbers.append(token)
            layout.append(("word", f"#{token}"))  # where the number stands matters ("5 km to miles")
        elif token in acronyms:  # "US" is no pronoun, "WHO" no question
            layout.append(("word", token))
        elif kind == "sentence_end" or (kind == "separator" and leading_subordinate):
            layout.append(("clause", ""))  # "When visiting Japan, | is tipping expected?"
            leading_subordinate = False
        elif kind == "separator":
            layout.append(("break", ""))
        elif token in _SUBORDINATORS and _clause_has_content(layout):
            if token in _QUESTION_WORDS:
                question.append(_QUESTION_WORDS[token])
            layout.append(("clause", ""))
        elif token in _QUESTION_WORDS:
            leading_subordinate = token in _SUBORDINATORS
            question.append(_QUESTION_WORDS[token])
            layout.append(("break", ""))
        elif token in _SUBORDINATORS:
            leading_subordinate = True
        elif token in _NEGATIONS:
            negations += 1
            if token == "without":
                layout.append(("preposition", token))
        elif token in _NUMBER_WORDS:
            numbers.append(_NUMBER_WORDS[token])
            layout.append(("word", f"#{_NUMBER_WORDS[token]}"))
        elif token in _DIRECTIONS or token in _NEUTRAL_PREPOSITIONS:
            layout.append(("preposition", token if token in _DIRECTIONS else "~"))
        elif token in _CONJUNCTIONS:
            layout.append(("and", ""))
        elif token in _TIME_ADVERBS:
            layout += [("break", ""), ("word", token), ("break", "")]
        elif token in _UNITS:
            layout.append(("word", _UNITS[token]))
        elif token in _AUXILIARIES:  # a subject starts after it: "protein | should an adult eat per day"
            layout.append(("break", ""))
        elif token not in _FUNCTION_WORDS:
            layout.append(("word", _CANONICAL.get(token) or _MONTHS.get(token) or _ORDINALS.get(token) or token))
    content = tuple(word for kind, word in layout if kind == "word")
    return Reading(tuple(sorted(question)), tuple(sorted(numbers)), negations % 2 == 1, content, tuple(layout),
                   frozenset(acronyms))


def _acronyms(text: str) -> set[str]:
    """Words of 2 to 6 capitals ("NYC", "GPUs" as "gpu"), lower-cased; none when the prompt is written in capitals."""
    words = re.findall(r"[^\W\d_]+", text)
    capitals = re.findall(r"\b([A-Z]{2,6})s?\b", text)
    return {word.lower() for word in capitals} if len(capitals) * 2 < len(words) else set()


def _abbreviation_candidates(reading: Reading) -> set[str]:
    """Content words that may abbreviate words of the other prompt: capitals, and short words WordNet lacks."""
    return set(reading.acronyms) | {word for word in reading.content
                                     if 2 <= len(word) <= 6 and word.isalpha() and word not in _lexicon()}


def _spelled_out(reading: Reading, abbreviations: set[str]) -> Reading:
    """`reading` with each run of words whose initials spell one of `abbreviations` read as that abbreviation
    ("New York City" as "nyc" against "NYC", "gross domestic product" as "gdp")."""
    if not abbreviations:
        return reading
    layout, position = [], 0
    while position < len(reading.layout):
        for length in range(6, 1, -1):
            run = reading.layout[position:position + length]
            if (len(run) == length and all(kind == "word" for kind, _ in run)
                    and "".join(word[0] for _, word in run) in abbreviations):
                layout.append(("word", "".join(word[0] for _, word in run)))
                position += length
                break
        else:
            layout.append(reading.layout[position])
            position += 1
    if len(layout) == len(reading.layout):
        return reading
    return Reading(reading.question, reading.numbers, reading.negated,
                   tuple(word for kind, word in layout if kind == "word"), tuple(layout), reading.acronyms)


def conflict(cached_prompt: str, prompt: str) -> str | None:
    """Why `prompt` must not get `cached_prompt`'s answer, or None when both ask for the same answer."""
    cached, new = read(cached_prompt), read(prompt)
    cached, new = (_spelled_out(cached, _abbreviation_candidates(new) - set(cached.content)),
                   _spelled_out(new, _abbreviation_candidates(cached) - set(new.content)))
    if cached.numbers != new.numbers:
        return f"different numbers ({', '.join(cached.numbers) or 'none'} vs {', '.join(new.numbers) or 'none'})"
    if cached.negated != new.negated:
        return "different polarity (negation)"
    if cached.question != new.question and cached.question and new.question:  # "formula of water?" asks "what"
        return f"asks another question ({' '.join(cached.question) or '-'} vs {' '.join(new.question) or '-'})"
    if cached.layout == new.layout:
        return None
    aligned = _aligned(new.content, cached.content)
    only_cached = sorted(set(cached.content) - set(aligned))
    only_new = sorted({word for word, mate in zip(new.content, aligned) if mate not in cached.content})
    if only_cached or only_new or sorted(cached.content) != sorted(aligned):
        return f"unmatched content words ({' '.join(only_cached) or '-'} vs {' '.join(only_new) or '-'})"
    renamed = iter(aligned)
    new_layout = tuple((kind, next(renamed) if kind == "word" else value) for kind, value in new.layout)
    if _phrases_of(cached.layout) != _phrases_of(new_layout) and not _terse_of(cached.layout, new_layout):
        return "same content words in another order"
    return None


def _terse_of(first: tuple[tuple[str, str], ...], second: tuple[tuple[str, str], ...]) -> bool:
    """Whether one side is a terse form of the other: no preposition at all against neutral ones only ("Berlin
    weather forecast" / "weather forecast for Berlin", "git undo last commit" / "undo the last commit in git"); the
    content words agree already, and without a direction word nothing can have swapped roles."""
    prepositions = [{value for kind, value in layout if kind == "preposition"} for layout in (first, second)]
    return (not prepositions[0]) != (not prepositions[1]) and prepositions[0] | prepositions[1] <= {"~"}


def normal_form(prompt: str) -> tuple:
    """What `read` makes of `prompt`, each word replaced by one lemma of it: prompts that differ only in contractions,
    framing, question frame, phrase order or inflection have the same normal form, so the cache can find them by hash
    without the embedder (and `conflict` still decides)."""
    reading = read(prompt)
    layout = tuple((kind, min(_lemmas(value)) if kind == "word" else value) for kind, value in reading.layout)
    return reading.question, reading.numbers, reading.negated, tuple(_phrases_of(layout))


def _aligned(content: tuple[str, ...], reference: tuple[str, ...]) -> list[str]:
    """`content` with each word that stands for a word of `reference` (the same lemma, else a WordNet synonym)
    replaced by that word, one for one: "changing my tires" reads as "change my tire" against the latter. A word
    with no mate stays as it is."""
    unmatched = list(reference)
    aligned: list[str | None] = [None] * len(content)
    for position, word in enumerate(content):  # the same word first, so a lemma or synonym cannot take its mate
        if word in unmatched:
            unmatched.remove(word)
            aligned[position] = word
    for same in (_same_lemma, _synonyms, _abbreviates):
        for position, word in enumerate(content):
            if aligned[position] is None:
                mate = next((other for other in unmatched if same(word, other)), None)
                if mate is not None:
                    unmatched.remove(mate)
                    aligned[position] = mate
    return [mate if mate is not None else word for mate, word in zip(aligned, content)]


def _phrases_of(layout: tuple[tuple[str, str], ...]) -> list[tuple]:
    """The layout as a sorted list of clauses, each a sorted tuple of phrases (preposition, sorted parts joined by
    and/or, each part's words in order): phrases may move within their clause, and so may the parts of "A and B"
    and the clauses themselves; the words inside a part may not, nor may a phrase move to another clause ("in
    London when it is 9 am in New York" / "in New York when it is 9 am in London")."""
    clauses: list[tuple] = []
    phrases: list[tuple] = []
    preposition, parts = "", [[]]

    def close() -> None:
        words = [tuple(part) for part in parts if part]
        if words:
            phrases.append((preposition, tuple(sorted(words))))

    for kind, value in layout:
        if kind in ("break", "preposition", "clause"):
            close()
            preposition, parts = (value if kind == "preposition" else ""), [[]]
            if kind == "clause" and phrases:
                clauses.append(tuple(sorted(phrases)))
                phrases = []
        elif kind == "and":
            parts.append([])
        else:
            parts[-1].append(value)
    close()
    if phrases:
        clauses.append(tuple(sorted(phrases)))
    return sorted(clauses)


def _clause_has_content(layout: list[tuple[str, str]]) -> bool:
    """Whether a content word stands since the last clause boundary: "if" / "when" there opens a second clause
    ("what time is it in London | when it is 9 am in New York"); at the start it opens the first."""
    for kind, _ in reversed(layout):
        if kind == "clause":
            return False
        if kind == "word":
            return True
    return False


def _same_lemma(first: str, second: str) -> bool:
    return bool(_lemmas(first) & _lemmas(second))


def _synonyms(first: str, second: str) -> bool:
    """Whether two content words share one of their common WordNet senses (in a lemma of each, of the same degree:
    "biggest" / "largest") and are no antonyms."""
    lexicon = _lexicon()
    for lemma in _graded(_lemmas(first)):
        base, _, degree = lemma.partition("+")
        entry = lexicon.get(base)
        if entry is None:
            continue
        synonyms, antonyms, _ = entry
        others = {other.partition("+")[0] for other in _graded(_lemmas(second)) if other.partition("+")[2] == degree}
        if others & synonyms and not others & antonyms:
            return True
    return False


def _abbreviates(first: str, second: str) -> bool:
    """Whether one word is a shortening of the other: a word WordNet lacks, of 3 letters or more, whose letters
    stand in order in a word it has, from its first ("tbsp" / "tablespoons", "pwd" / "password", "dict" /
    "dictionary"), or a name of 4 letters or more that begins another name ("postgres" / "postgresql")."""
    short, long = sorted((first, second), key=len)
    lexicon = _lexicon()
    if len(short) < 3 or short in lexicon or short[0] != long[0] or len(short) == len(long):
        return False
    if long not in lexicon and not _lemmas(long) & lexicon.keys():
        return len(short) >= 4 and long.startswith(short)
    letters = iter(long)
    return all(letter in letters for letter in short)


def _graded(lemmas: frozenset[str]) -> frozenset[str]:
    """A comparative or superlative as its graded lemma only: WordNet also lists "bigger" as an adjective similar to
    "big", which must not make "bigger" a synonym of "big"."""
    return frozenset(lemma for lemma in lemmas if "+" in lemma) or lemmas


# WordNet's morphy: suffix rules per part of speech; a rule counts only when it yields a lemma of that part.
_SUFFIX_RULES = {"n": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                       ("men", "man"), ("ies", "y")],
                 "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                       ("ing", "")],
                 "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")]}


@lru_cache(maxsize=65536)
def _lemmas(word: str) -> frozenset[str]:
    """The word and its WordNet lemmas; an adjective's comparative or superlative keeps its degree ("cheaper" ->
    "cheap+er", never "cheap"). A word WordNet lacks ("iphones") is read as its singular."""
    lexicon, irregular = _lexicon(), _exceptions()
    lemmas = {word}
    for part, bases in irregular.get(word, ()):
        degree = ("+est" if word.endswith("st") else "+er") if part in "ar" else ""
        lemmas |= {base + degree for base in bases}
    for part, rules in _SUFFIX_RULES.items():
        for suffix, ending in rules:
            if word.endswith(suffix) and len(word) > len(suffix) + 1:
                base = word[:-len(suffix)] + ending
                if part in lexicon.get(base, (None, None, ""))[2]:
                    lemmas.add(base + ("+" + suffix if part == "a" else ""))
    if len(lemmas) == 1 and word not in lexicon:
        lemmas.add(_singular(word))
    return frozenset(lemmas)


def load_lexicon() -> None:
    """Read the WordNet tables now (about a second), so that the first lookup does not wait for them."""
    _lexicon()
    _exceptions()


@lru_cache(maxsize=1)
def _lexicon() -> dict[str, tuple[frozenset[str], frozenset[str], str]]:
    """word -> (synonyms, antonyms, parts of speech), from WordNet 3.0 (benchmarks/make_wordnet_lexicon.py)."""
    entries = {}
    for line in LEXICON_FILE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            word, synonyms, antonyms, parts = line.split("\t")
            entries[word] = (frozenset(synonyms.split()), frozenset(antonyms.split()), parts)
    return entries


@lru_cache(maxsize=1)
def _exceptions() -> dict[str, list[tuple[str, list[str]]]]:
    """Irregular form -> [(part of speech, its lemmas)], from WordNet 3.0's exception lists."""
    entries: dict[str, list[tuple[str, list[str]]]] = {}
    for line in EXCEPTIONS_FILE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            form, part, lemmas = line.split("\t")
            entries.setdefault(form, []).append((part, lemmas.split()))
    return entries


def _agent_verb(noun: str) -> str:
    """"painter" -> "paint", "inventor" -> "invent", "composer" -> "compose" (who made it); other nouns unchanged."""
    if noun in _AGENT_VERBS:
        return _AGENT_VERBS[noun]
    for suffix in ("er", "or", "r"):
        if noun.endswith(suffix) and "v" in _lexicon().get(noun[:-len(suffix)], (None, None, ""))[2]:
            return noun[:-len(suffix)]
    return f"is the {noun} of"


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        token = match.group(kind)
        if kind == "time":
            tokens.append((kind, _time(token)))
        elif kind == "number":
            tokens.append((kind, _number(token)))
        elif kind == "symbol":
            tokens.append(("word", token))
        elif token.endswith("'s"):  # possessive (the verb "is" was expanded before): keep the marker for reordering
            tokens += [("word", token[:-2]), ("possessive", "'s")]
        elif kind == "word":
            tokens.append((kind, token.replace("'", "")))
        else:
            tokens.append((kind, token))
    return tokens


def _possessives_as_of(tokens: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """"X's Y" -> "Y X" (the order of "Y of X"), so "life's meaning" reads like "the meaning of life"."""
    result: list[tuple[str, str]] = []
    position = 0
    while position < len(tokens):
        if (position + 2 < len(tokens) and tokens[position + 1][0] == "possessive"
                and tokens[position + 2][0] == "word"):
            result += [tokens[position + 2], ("word", "of"), tokens[position]]
            position += 3
        else:
            if tokens[position][0] != "possessive":
                result.append(tokens[position])
            position += 1
    return result


def _time(token: str) -> str:
    """7 am, 7:00am, 07:00 -> 7:00; 7 pm, 19:00 -> 19:00; 12 am -> 0:00."""
    match = re.match(r"(\d{1,2})(?::(\d{2}))?\s*([ap])?", token)
    hour, minute, half = int(match.group(1)), match.group(2) or "00", match.group(3)
    if half == "p" and hour < 12:
        hour += 12
    elif half == "a" and hour == 12:
        hour = 0
    return f"{hour}:{minute}"


def _number(token: str) -> str:
    """1,000 -> 1000; 2.0 -> 2; 3rd -> 3 (a comma followed by three digits groups thousands, else it is a decimal)."""
    token = re.sub(r"(st|nd|rd|th)$", "", token)
    token = re.sub(r",(?=\d{3}\b)", "", token).replace(",", ".")
    if "." in token:
        token = token.rstrip("0").rstrip(".")
    return token.lstrip("0") or "0"


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and re.search(r"(ss|x|z|ch|sh)es$", word):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not re.search(r"(ss|us|is|ous)$", word):
        return word[:-1]
    return word


def _phrases(phrases: list[str]) -> dict[str, list[tuple[str, ...]]]:
    """Phrases by first word, longest first, so the longest match wins."""
    by_first: dict[str, list[tuple[str, ...]]] = {}
    for phrase in sorted(phrases, key=lambda text: -len(text.split())):
        words = tuple(phrase.split())
        by_first.setdefault(words[0], []).append(words)
    return by_first


def _match_phrase(tokens: list[tuple[str, str]], position: int, phrases: dict[str, list[tuple[str, ...]]]) -> int:
    """Length in tokens of the longest phrase starting at `position` (0 when none)."""
    for words in phrases.get(tokens[position][1], ()):
        if tuple(token for _, token in tokens[position:position + len(words)]) == words:
            return len(words)
    return 0


_FRAMING_PHRASES = _phrases(_FRAMING)
_FRAME_PATTERNS = [(re.compile(pattern), replacement) for pattern, replacement in _FRAMES]
_HOW_PHRASES = _phrases(_HOW)
