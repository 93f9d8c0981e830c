"""A synthetic target language for the translation benchmark: real English sentences (BBC News) rewritten by
fixed rules into a made-up language, because no real parallel corpus can be installed offline.

The rules are deterministic (the same sentence always gives the same translation) but not trivial: a model
must learn word order, morphology and spelling, not copy its input. Applied to a lower-cased sentence, in this
order:

1. Tokens: words (letters, with inner apostrophes or hyphens), numbers (with inner `.`, `,`), and single
   punctuation marks; `£`, `$` and `%` are their own tokens; double quotes are dropped.
2. Clauses: the sentence is cut before every `,` `;` `:` and before the conjunctions `and but that which who
   because while when if or` (which open the next clause). Each clause is rewritten on its own:
   a. articles (`the a an`) are dropped;
   b. verb-final order (SOV-like): the first verb group of the clause (a verb from a closed list of
      auxiliaries and frequent verbs, or a word ending in `-ed`, with the verbs and `not` that follow it)
      moves to the end of the clause;
   c. postpositions: a preposition followed by a word swaps with it (`in prison` -> `prison in`).
3. Inflection (every word of three letters or more): suffixes are replaced by the target language's own
   markers: plural `-s` -> `-ul` (not after `s`, `u` or `i`), past `-ed` -> `-ta`, `-ing` -> `-ko`,
   `-ly` -> `-mi`.
4. Respelling: a fixed cipher over letters, left to right, digraphs first: `th`->`z`, `sh`->`x`, `ch`->`q`,
   `ph`->`f`, `ck`->`k`, `qu`->`kw`, `ee`->`ii`, `oo`->`uu`; then the vowels rotate
   (`a e i o u` -> `e i o u a`) and `c`->`k`, `w`->`v`, `y`->`j`. Numbers and punctuation are unchanged.
5. Detokenisation: tokens joined by spaces, punctuation attached to the token before it.

Example: "A brother and sister in the US have been convicted of sending hundreds of thousands of unsolicited
e-mail messages to AOL subscribers." becomes "bruzir end sostir as on sindku uf handridal zuasendal uf
ansulokotte uf i-meol missegial eul tu sabskrobiral hevi biin kunvoktte." (run this module for more).
"""

from __future__ import annotations

import re

ARTICLES = frozenset({"the", "a", "an"})
PREPOSITIONS = frozenset(
    "in on at to from with for of by about after before over under into against during between without "
    "across through since until within".split()
)
VERBS = frozenset(
    "is are was were be been being am has have had will would can could should may might must shall do does "
    "did said says say told tells make makes made get gets got take takes took go goes went come comes came "
    "see sees saw know knows knew think thinks thought want wants give gives gave find finds found show "
    "shows become became expect expects need needs remain remains include includes".split()
)
CLAUSE_OPENERS = frozenset("and but that which who because while when if or".split())
CLAUSE_BREAKS = frozenset(",;:")
_TOKEN = re.compile(r"[a-z]+(?:['’-][a-z]+)*|\d+(?:[.,]\d+)*|[^\sa-z\d]")
_DIGRAPHS = {"th": "z", "sh": "x", "ch": "q", "ph": "f", "ck": "k", "qu": "kw", "ee": "ii", "oo": "uu"}
_LETTERS = {"a": "e", "e": "i", "i": "o", "o": "u", "u": "a", "c": "k", "w": "v", "y": "j"}
_NO_SPACE_BEFORE = frozenset(".,;:!?%)'’")


def _is_word(token: str) -> bool:
    return token[0].isalpha()


def _is_verb(token: str) -> bool:
    return token in VERBS or (len(token) > 4 and token.endswith("ed"))


def _clauses(tokens: list[str]) -> list[list[str]]:
    clauses: list[list[str]] = [[]]
    for token in tokens:
        if clauses[-1] and (token in CLAUSE_BREAKS or token in CLAUSE_OPENERS):
            clauses.append([])
        clauses[-1].append(token)
    return clauses


def _reorder(clause: list[str]) -> list[str]:
    words = [token for token in clause if token not in ARTICLES]
    # the clause's trailing punctuation stays last
    tail: list[str] = []
    while words and not _is_word(words[-1]) and not words[-1][0].isdigit():
        tail.insert(0, words.pop())
    # a leading opener or break mark stays first
    head = words[:1] if words and (words[0] in CLAUSE_OPENERS or words[0] in CLAUSE_BREAKS) else []
    body = words[len(head) :]
    start = next((i for i, token in enumerate(body) if _is_verb(token)), None)
    if start is not None:
        end = start + 1
        while end < len(body) and (_is_verb(body[end]) or body[end] == "not"):
            end += 1
        body = body[:start] + body[end:] + body[start:end]
    swapped: list[str] = []
    i = 0
    while i < len(body):
        token = body[i]
        following = body[i + 1] if i + 1 < len(body) else None
        if (
            token in PREPOSITIONS
            and following is not None
            and _is_word(following)
            and following not in PREPOSITIONS
        ):
            swapped += [following, token]
            i += 2
        else:
            swapped.append(token)
            i += 1
    return head + swapped + tail


def _inflect(word: str) -> str:
    if len(word) < 3 or not word.isalpha():
        return word
    if word.endswith("ing") and len(word) > 5:
        return word[:-3] + "ko"
    if word.endswith("ed") and len(word) > 4:
        return word[:-2] + "ta"
    if word.endswith("ly") and len(word) > 4:
        return word[:-2] + "mi"
    if word.endswith("s") and word[-2] not in "sui" and word not in VERBS:
        return word[:-1] + "ul"
    return word


def _respell(word: str) -> str:
    letters: list[str] = []
    i = 0
    while i < len(word):
        pair = word[i : i + 2]
        if pair in _DIGRAPHS:
            letters.append(_DIGRAPHS[pair])
            i += 2
        else:
            letters.append(_LETTERS.get(word[i], word[i]))
            i += 1
    return "".join(letters)


def _detokenize(tokens: list[str]) -> str:
    text = ""
    for token in tokens:
        if text and token not in _NO_SPACE_BEFORE and not text.endswith(("(", "£", "$")):
            text += " "
        text += token
    return text


def transduce(sentence: str) -> str:
    """The target-language translation of an English sentence (rules in the module docstring)."""
    tokens = _TOKEN.findall(sentence.lower().replace('"', " "))
    out: list[str] = []
    for clause in _clauses(tokens):
        out += [_respell(_inflect(token)) if _is_word(token) else token for token in _reorder(clause)]
    return _detokenize(out)


def split_sentences(article: str, min_words: int, max_words: int) -> list[str]:
    """Sentences of an article (cut after `.`, `!`, `?` followed by space, and at line breaks) with between
    `min_words` and `max_words` words; the headline (first line) is skipped."""
    body = article.split("\n", 1)[1] if "\n" in article else article
    sentences = []
    for piece in re.split(r"(?<=[.!?])\s+|\n+", body):
        piece = piece.strip()
        if min_words <= len(piece.split()) <= max_words:
            sentences.append(piece)
    return sentences


if __name__ == "__main__":
    for example in (
        "A brother and sister in the US have been convicted of sending hundreds of thousands of unsolicited "
        "e-mail messages to AOL subscribers.",
        "Turnover for the quarter was up 4.3% to £1.97bn, further benefiting from a rise in cargo revenue.",
        "The films are squarely pitched at younger audiences.",
    ):
        print(example, "\n  ->", transduce(example))
