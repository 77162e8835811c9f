"""Verification stage of the semantic cache: may the answer cached for one prompt be served for another?

The vector index proposes candidates; this module decides. A bi-encoder barely moves when one content word changes
("soft yolk" / "hard yolk" 0.96, "in Oslo today" / "in Oslo tomorrow" 0.97 with MiniLM), and single-word cosines do
not separate synonyms from antonyms either (sea/ocean 0.87, monday/tuesday 0.87, husband/wife 0.87). So the verifier
is an alignment of content words: both prompts are read into

- the question asked (what or how / why / when / where / who, with "how do I", "what's the best way to", ... read as
  one "how"),
- the numbers, times and units (7 am == 7:00 == 07:00; 1,000 == 1000 == one thousand; km == kilometres),
- polarity (an odd number of not / no / never / without / n't),
- the content words in order (function words, request framing like "can you tell me" and politeness dropped; plurals
  and possessives normalised, "life's meaning" read as "meaning of life"),

and a candidate is served only when all four agree. Any content word present on one side only (another entity, an
antonym, a comparative, a constraint, another language) or the same words in another order is a conflict. Precision
comes first: a paraphrase that swaps a content word for a synonym is a miss (it costs one generation), never a
wrong answer.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

LEXICON_FILE = Path(__file__).resolve().parent / "data" / "wordnet_lexicon.tsv"

# Request framing: dropped wherever it appears ("Could you please tell me ...", "..., thanks").
_FRAMING = [
    "can you", "could you", "would you", "will you", "can u", "would you mind", "please", "pls", "kindly",
    "tell me", "let me know", "show me", "explain to me", "explain", "describe", "i want to know", "i would like to know",
    "i need to know", "i wonder", "i am wondering", "i was wondering", "do you know", "does anyone know",
    "any idea", "quick question", "question", "help me understand", "help me", "i need help", "hey", "hi", "hello",
    "thanks", "thank you", "right now", "in simple terms", "briefly", "give me", "i need", "i want", "in detail",
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
    "is there a way to", "is it possible to",
]
# "what" and "how" ask for the same thing more often than not ("what is the population" / "how many people live",
# "what does it cost" / "how much does it cost"); the content words still have to agree.
_QUESTION_WORDS = {"what": "what", "which": "what", "how": "what", "who": "who", "whom": "who", "whose": "who",
                   "when": "when", "where": "where", "why": "why"}
# Closed-class words that do not change what is asked. Words that carry direction or polarity (to/from, on/off,
# in/out, up/down, before/after, with/without, more/less, than) are kept unless their counterpart is listed here:
# "to", "on", "in" and "with" are dropped, so "from", "off", "out" and "without" stand unmatched against them.
_FUNCTION_WORDS = set("""
a an the of for at by about as in on to into onto with is are was were be been being am do does did doing done have
has had having i me my mine myself you your yours yourself we us our ours they them their theirs it its itself he him
his she her hers this that these those there here and or so if then just really actually exactly basically some any
anything something someone anyone thing things get got getting go going gonna wanna would will shall should may
might must can could also too very quite pretty kind sort like well ok okay now currently
""".split())
# Any of these makes word order meaningful ("string to integer", "python in excel"); without one, the same content
# words in another order ask the same ("difference between tcp and udp" / "... udp and tcp").
_RELATIONAL = set("""
to from into onto in on at of for by with without than before after over under above below per vs versus against
toward towards through via within across behind beyond
""".split())
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
""", re.VERBOSE)


@dataclass(frozen=True)
class Reading:
    """What a prompt asks, in the parts the verifier compares."""

    question: tuple[str, ...]  # sorted question words
    numbers: tuple[str, ...]  # sorted normalised numbers and times
    negated: bool
    content: tuple[str, ...]  # content words (and units) in order
    relational: bool  # holds a preposition, so content word order matters


@lru_cache(maxsize=65536)  # a cached prompt is read once per lookup that finds it; prompts repeat
def read(prompt: str) -> Reading:
    text = unicodedata.normalize("NFKC", prompt).lower().replace("\u2019", "'").replace("`", "'")
    for pattern, replacement in _CONTRACTIONS:
        text = re.sub(pattern, replacement, text)
    tokens = _tokens(text)
    tokens = _possessives_as_of(tokens)
    relational = any(token in _RELATIONAL for _, token in tokens)
    question: list[str] = []
    numbers: list[str] = []
    negations = 0
    content: list[str] = []
    position = 0
    while position < len(tokens):
        how = _match_phrase(tokens, position, _HOW_PHRASES)
        if how:
            question.append("what")
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
            content.append("#")  # where the number stands matters ("5 km to miles" vs "5 miles to km")
        elif token in _QUESTION_WORDS:
            question.append(_QUESTION_WORDS[token])
        elif token in _NEGATIONS:
            negations += 1
        elif token in _NUMBER_WORDS:
            numbers.append(_NUMBER_WORDS[token])
            content.append("#")
        elif token in _UNITS:
            content.append(_UNITS[token])
        elif token not in _FUNCTION_WORDS:
            content.append(_MONTHS.get(token) or _ORDINALS.get(token) or _stem(token))
    return Reading(tuple(sorted(question)), tuple(sorted(numbers)), negations % 2 == 1, tuple(content), relational)


def conflict(cached_prompt: str, prompt: str) -> str | None:
    """Why `prompt` must not get `cached_prompt`'s answer, or None when both ask for the same answer."""
    cached, new = read(cached_prompt), read(prompt)
    if cached.numbers != new.numbers:
        return f"different numbers ({', '.join(cached.numbers) or 'none'} vs {', '.join(new.numbers) or 'none'})"
    if cached.negated != new.negated:
        return "different polarity (negation)"
    if cached.question != new.question and cached.question and new.question:  # "formula of water?" asks "what"
        return f"asks another question ({' '.join(cached.question) or '-'} vs {' '.join(new.question) or '-'})"
    if cached.content != new.content:
        new_content = _as_synonyms_of(new.content, cached.content)
        only_cached = sorted(set(cached.content) - set(new_content))
        only_new = sorted(set(new_content) - set(cached.content))
        if only_cached or only_new or sorted(cached.content) != sorted(new_content):
            return f"unmatched content words ({' '.join(only_cached) or '-'} vs {' '.join(only_new) or '-'})"
        if (cached.relational or new.relational) and cached.content != new_content:
            return "same content words in another order"
    return None


def _as_synonyms_of(content: tuple[str, ...], reference: tuple[str, ...]) -> tuple[str, ...]:
    """`content` with each word that `reference` lacks replaced by a WordNet synonym of it that `reference` holds
    unmatched (one for one, in order), so "fix my bike" reads as "repair my bike" against the latter."""
    unmatched = [word for word in reference if word not in content]
    if not unmatched:
        return content
    replaced = []
    for word in content:
        if word not in reference:
            synonym = next((other for other in unmatched if _synonyms(word, other)), None)
            if synonym is not None:
                unmatched.remove(synonym)
                word = synonym
        replaced.append(word)
    return tuple(replaced)


def _synonyms(first: str, second: str) -> bool:
    """Whether two (stemmed) content words share one of their common WordNet senses and are no antonyms."""
    lexicon = _lexicon()
    entries = [entry for word in (first, first + "e") if (entry := lexicon.get(word))]
    seconds = {second, second + "e"}  # the stem drops a final e: "restored" -> "restor"
    return (any(seconds & synonyms for synonyms, _ in entries)
            and not any(seconds & antonyms for _, antonyms in entries))


@lru_cache(maxsize=1)
def _lexicon() -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """word -> (synonyms, antonyms), from WordNet 3.0 (benchmarks/make_wordnet_lexicon.py writes the file)."""
    entries = {}
    for line in LEXICON_FILE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            word, synonyms, antonyms = line.split("\t")
            entries[word] = (frozenset(synonyms.split()), frozenset(antonyms.split()))
    return entries


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
        else:
            tokens.append((kind, token.replace("'", "")))
    return tokens


def _possessives_as_of(tokens: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """"X's Y" -> "Y X" (the order of "Y of X"), so "life's meaning" reads like "the meaning of life"."""
    result: list[tuple[str, str]] = []
    position = 0
    while position < len(tokens):
        if (position + 2 < len(tokens) and tokens[position + 1][0] == "possessive"
                and tokens[position + 2][0] == "word"):
            result += [tokens[position + 2], tokens[position]]
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


def _stem(word: str) -> str:
    """Plural to singular, and -ing / -ed to the base form (Porter's step 1b): centering, centered -> center;
    clogged -> clog; making -> make. Comparatives (-er, -est) are kept: they change the question."""
    word = _singular(word)
    for suffix in ("ing", "ed"):
        stem = word[:-len(suffix)]
        if len(word) > len(suffix) + 2 and word.endswith(suffix) and re.search(r"[aeiouy]", stem) and len(stem) >= 3:
            if stem.endswith(("at", "bl", "iz")):
                return stem + "e"
            if re.search(r"([^aeiouylsz])\1$", stem):
                return stem[:-1]
            if re.fullmatch(r"[^aeiou]*[aeiou][^aeiouwxy]", stem):  # one short syllable: hop(e), mak(e), bas(e)
                return stem + "e"
            return stem
    return word


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
_HOW_PHRASES = _phrases(_HOW)
