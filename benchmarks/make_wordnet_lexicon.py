"""Write the cache verifier's synonym and antonym lexicon from WordNet 3.0 (Debian's `wordnet-base` files).

    apt-get install wordnet-base && python benchmarks/make_wordnet_lexicon.py   # writes python_backends/data/...

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
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
MAX_SENSE_RANK = 2
LICENSE = """# Derived from WordNet 3.0. Copyright 2006 by Princeton University. All rights reserved.
# THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES,
# EXPRESS OR IMPLIED. Permission to use, copy, modify and distribute this software and database and its documentation
# for any purpose and without fee or royalty is hereby granted, provided that this notice appears on all copies.
# word<TAB>synonyms (space separated)<TAB>antonyms (space separated); written by benchmarks/make_wordnet_lexicon.py
"""


def lexicon(wordnet: Path, max_sense_rank: int) -> dict[str, tuple[set[str], set[str]]]:
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
    for pos in PARTS_OF_SPEECH:
        for line in (wordnet / f"index.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue
            fields = line.split()
            offsets = fields[6 + int(fields[3]):]
            for offset in offsets[:max_sense_rank]:
                common[(pos, offset)].append(fields[0])
    synonyms: dict[str, set[str]] = defaultdict(set)
    for words in common.values():
        single = [word for word in words if re.fullmatch(r"[a-z]+", word)]
        for word in single:
            synonyms[word] |= {other for other in single if other != word}
    return {word: (synonyms[word] - antonym_words[word], antonym_words[word])
            for word in sorted(set(synonyms) | set(antonym_words))
            if re.fullmatch(r"[a-z]+", word) and (synonyms[word] - antonym_words[word] or antonym_words[word])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wordnet", type=Path, default=WORDNET, help="folder of WordNet 3.0's data.* and index.*")
    parser.add_argument("--max-sense-rank", type=int, default=MAX_SENSE_RANK)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    entries = lexicon(args.wordnet, args.max_sense_rank)
    args.out.write_text(LICENSE + "".join(
        f"{word}\t{' '.join(sorted(synonyms))}\t{' '.join(sorted(antonyms))}\n"
        for word, (synonyms, antonyms) in entries.items()), encoding="utf-8")
    print(f"{args.out}: {len(entries)} words")


if __name__ == "__main__":
    main()
