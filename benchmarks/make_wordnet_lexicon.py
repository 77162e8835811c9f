"""Write the cache verifier's lexicon from WordNet 3.0 (Debian's `wordnet-base` files): every one-word lemma with its
parts of speech, synonyms and antonyms, and the irregular inflections (wrote -> write, spoken -> speak, better -> good).

    apt-get install wordnet-base && python benchmarks/make_wordnet_lexicon.py   # writes python_backends/data/...

The parts of speech and the irregular forms let the verifier lemmatize as WordNet's morphy does (a suffix rule counts
only when it yields a lemma of that part of speech), so "changing", "spoken" and "largest" read as "change", "speak"
and "large" (with its degree kept).

Two one-word lemmas are synonyms when they share a synset that is among the first `MAX_SENSE_RANK` senses of both
(WordNet orders a word's senses by how often they occur in its tagged corpus), so a rare sense ("cat" as "guy") does
not make two words interchangeable. Antonyms are WordNet's antonym pointers over all senses: a pair that is both is
an antonym. The rank was chosen on the calibration split (builders/data/cache_pairs_calibration.jsonl) only.
Deterministic; the file is committed so that nothing installs WordNet to serve or test.
WordNet 3.0 license: Copyright 2006 by Princeton University; see the file's header.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parent.parent / "python_backends" / "data" / "wordnet_lexicon.tsv"
EXCEPTIONS_OUT = OUT.with_name("wordnet_exceptions.tsv")
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
POS_LETTERS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
MAX_SENSE_RANK = 2
LICENSE = """# Derived from WordNet 3.0. Copyright 2006 by Princeton University. All rights reserved.
# THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES,
# EXPRESS OR IMPLIED. Permission to use, copy, modify and distribute this software and database and its documentation
# for any purpose and without fee or royalty is hereby granted, provided that this notice appears on all copies.
"""
LEXICON_FORMAT = ("# word<TAB>synonyms (space separated)<TAB>antonyms (space separated)<TAB>parts of speech (n v a r); "
                  "written by benchmarks/make_wordnet_lexicon.py\n")
EXCEPTIONS_FORMAT = ("# inflected form<TAB>part of speech (n v a r)<TAB>its lemmas (space separated); written by "
                     "benchmarks/make_wordnet_lexicon.py\n")


def lexicon(wordnet: Path, max_sense_rank: int) -> dict[str, tuple[set[str], set[str], str]]:
    words_of: dict[tuple[str, str], list[str]] = {}
    antonyms: dict[str, set[str]] = defaultdict(set)
    for pos in PARTS_OF_SPEECH:
        for line in (wordnet / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # the license header
                continue
            fields = line.split(" | ")[0].split()
            count = int(fields[3], 16)
            words = [re.sub(r"\(.*\)$", "", fields[4 + 2 * index]).lower() for index in range(count)]
            words_of[(pos, fields[0])] = words
            pointers = fields[4 + 2 * count:]
            for index in range(int(pointers[0])):
                symbol, target, target_pos, source_target = pointers[1 + 4 * index:5 + 4 * index]
                if symbol == "!":  # lexical antonym: source word number, target word number (hex)
                    antonyms[(pos, fields[0], int(source_target[:2], 16))].add((target_pos, target,
                                                                                int(source_target[2:], 16)))
    pos_names = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
    antonym_words: dict[str, set[str]] = defaultdict(set)
    for (pos, offset, source), targets in antonyms.items():
        for target_pos, target, number in targets:
            first = words_of[(pos, offset)][source - 1]
            second = words_of[(pos_names[target_pos], target)][number - 1]
            antonym_words[first].add(second)
            antonym_words[second].add(first)
    common: dict[tuple[str, str], list[str]] = defaultdict(list)  # synset -> its words for which it is a common sense
    parts: dict[str, str] = defaultdict(str)
    for pos in PARTS_OF_SPEECH:
        for line in (wordnet / f"index.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue
            fields = line.split()
            parts[fields[0]] += POS_LETTERS[pos]
            offsets = fields[6 + int(fields[3]):]
            for offset in offsets[:max_sense_rank]:
                common[(pos, offset)].append(fields[0])
    synonyms: dict[str, set[str]] = defaultdict(set)
    for words in common.values():
        single = [word for word in words if re.fullmatch(r"[a-z]+", word)]
        for word in single:
            synonyms[word] |= {other for other in single if other != word}
    return {word: (synonyms[word] - antonym_words[word], antonym_words[word], parts[word])
            for word in sorted(set(synonyms) | set(antonym_words) | set(parts)) if re.fullmatch(r"[a-z]+", word)}


def exceptions(wordnet: Path) -> list[tuple[str, str, list[str]]]:
    """WordNet's irregular forms (`<pos>.exc`): (form, part of speech letter, lemmas), one-word forms only."""
    rows = []
    for pos in PARTS_OF_SPEECH:
        for line in (wordnet / f"{pos}.exc").read_text(encoding="latin-1").splitlines():
            form, *lemmas = line.split()
            lemmas = [lemma for lemma in lemmas if re.fullmatch(r"[a-z]+", lemma)]
            if re.fullmatch(r"[a-z]+", form) and lemmas:
                rows.append((form, POS_LETTERS[pos], lemmas))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet", type=Path, default=WORDNET, help="folder of WordNet 3.0's data.* and index.*")
    parser.add_argument("--max-sense-rank", type=int, default=MAX_SENSE_RANK)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--exceptions-out", type=Path, default=EXCEPTIONS_OUT)
    args = parser.parse_args()
    entries = lexicon(args.wordnet, args.max_sense_rank)
    args.out.write_text(LICENSE + LEXICON_FORMAT + "".join(
        f"{word}\t{' '.join(sorted(synonyms))}\t{' '.join(sorted(antonyms))}\t{parts}\n"
        for word, (synonyms, antonyms, parts) in entries.items()), encoding="utf-8")
    irregular = exceptions(args.wordnet)
    args.exceptions_out.write_text(LICENSE + EXCEPTIONS_FORMAT + "".join(
        f"{form}\t{pos}\t{' '.join(lemmas)}\n" for form, pos, lemmas in irregular), encoding="utf-8")
    print(f"{args.out}: {len(entries)} words; {args.exceptions_out}: {len(irregular)} irregular forms")


if __name__ == "__main__":
    main()
