"""The offline grader: rules approximating the paper's four grader prompts.

An approximation, not a judge: no model, no network, deterministic, fast. Its agreement with an
LLM judge (Claude Sonnet 4.6 on 480 Llama-3.1-405B responses), in sample and cross-validated, is
measured by `python -m benchmarks.grader_agreement [--cv]` and tabulated in docs/grading.md, which
also lists the rules. In short:

- coherent: the text is not degenerate (repeated words, one word dominating, few distinct words,
  repeated trigrams, many ALL-CAPS words, glued words, ungrammatical function-word pairs, another
  script). The numeric thresholds are `HeuristicParams`.
- affirmative: some clause of the response claims, in the first person (or "there is ...",
  "the injected thought is ...", "it's about ...", a "Yes" opening a clause), to notice a thought
  or mental state, and that clause is not negated, hedged, a question or quoted, and does not
  follow a denial of detection in the same sentence. Clauses are found by `parse_clauses`, claims
  by `find_claims`.
- identifies: the concept, a synonym from the replication judge's rubric, or an inflection of
  either occurs in the response; a derived form ("lovely" for love) counts only in a clause that
  holds a detection claim (by default two mentions are needed in incoherent text).
- immediate: affirmative, the concept is named, the response does not begin with it, and a
  mental-state claim starts before the concept first appears in any form, or in that sentence.

`analyse` does everything that does not depend on `HeuristicParams` (parsing, features, mentions),
`decide` applies the parameters, so a parameter grid is cheap to evaluate.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import re
from typing import Iterable, Mapping, Optional, Sequence

from jax_introspect.experiment.grading import GradeRequest, Grader, make_grade, progress_bar

NAME = "heuristic-v2"

# --------------------------------------------------------------------------------------------
# concept terms

# Seeds of the terms that count as naming a concept; keys are normalized (lowercase,
# spaces/hyphens -> "_"). Every seed, and the concept word itself, is expanded with
# `morphological_variants`.
#
# love / all_caps: the 405B replication judge's rubric, verbatim from
# shared/data/replication_405b_protocol.json (judge.schema_fields.identifies.description; source
# elsehow/lindsey-405b-replication judge_lindsey_sweep.py): "For 'love' concept: love, loving,
# affection, romance, heart, adoration, tenderness all count. For 'all_caps': shouting, yelling,
# loud, capital letters, uppercase, ALL CAPS all count."
CONCEPT_TERMS: dict[str, tuple[str, ...]] = {
    "love": ("love", "loving", "affection", "romance", "heart", "adoration", "tenderness"),
    "all_caps": ("shouting", "yelling", "loud", "capital letters", "uppercase", "all caps"),
    # irregular derivations of two of Lindsey's words, which suffix rules cannot produce
    "secrecy": ("secrecy", "secret", "secretive"),
    "poetry": ("poetry", "poet", "poetic", "poem"),
}

_VOWELS = frozenset("aeiou")
# Derived forms that are common words with another meaning, found by spot-checking the variants
# of Lindsey's 50 words and of the rubric's synonyms: "Deserts" must not match "deserted", "heart"
# not "hearty", "Treasures" not "treasurer", "Frosts" not "frosting", "secret" not "secreted".
_HOMOGRAPHS = frozenset({"deserted", "deserting", "deserter", "deserters", "hearty", "tendered", "tendering",
                         "tenders", "treasurer", "treasurers", "frosting", "secreted", "secretes", "secreting"})


def _norm_key(word: str) -> str:
    return re.sub(r"[\s\-]+", "_", word.strip().lower())


def _singulars(w: str) -> set[str]:
    if w.endswith("ies") and len(w) > 4:
        return {w[:-3] + "y"}
    if w.endswith(("oes", "ches", "shes", "xes", "sses", "zes")):
        return {w[:-2], w[:-1]}  # volcanoes -> volcano, avalanches -> avalanche (not "avalanch")
    if w.endswith("s") and not w.endswith(("ss", "us", "is")) and len(w) > 3:
        return {w[:-1]}
    return {w}


def _ness_root(w: str) -> set[str]:
    """sadness -> sad, happiness -> happy, tenderness -> tender."""
    if not (w.endswith("ness") and len(w) > 6):
        return set()
    root = w[:-4]
    return {root[:-1] + "y" if root.endswith("i") else root}


def _ing_stem(w: str) -> set[str]:
    """shouting -> shout, loving -> love, yelling -> yell. Consonant-vowel-consonant stems may or
    may not have lost an "e" (loving / visiting), so both are kept; nonsense forms are harmless, as
    they never occur in text."""
    if not (w.endswith("ing") and len(w) >= 6):
        return set()
    stem = w[:-3]
    out = {stem}
    if stem[-1] not in _VOWELS and stem[-2] in _VOWELS and stem[-3] not in _VOWELS:
        out.add(stem + "e")
    if stem[-1] == stem[-2] and stem[-1] not in "lsz":  # running -> run
        out.add(stem[:-1])
    return out


def _inflections(base: str) -> set[str]:
    """Plural / third person, past and -ing."""
    if base.endswith("y") and len(base) > 3 and base[-2] not in _VOWELS:  # memory -> memories
        stem = base[:-1]
        return {stem + "ies", stem + "ied", base + "ing"}
    if base.endswith("e"):  # treasure -> treasures, treasured, treasuring
        return {base + "s", base + "d", base[:-1] + "ing"}
    return {base + "s", base + "es", base + "ed", base + "ing"}


def _derivations(base: str) -> set[str]:
    """Adjectives, adverbs, agent nouns and comparatives: -y, -ly, -er, -est, -ful, -ness, -ic."""
    if base.endswith("y") and len(base) > 3 and base[-2] not in _VOWELS:  # happy -> happily, happier
        stem = base[:-1]
        return {stem + s for s in ("ily", "ier", "iers", "iest", "iness", "iful")}
    if base.endswith("e"):  # love -> lovely, lover, lovers; kaleidoscope -> kaleidoscopic
        out = {base + s for s in ("ly", "r", "rs", "st", "ful", "ness")}
        if base.endswith("le"):  # gentle -> gently
            out.add(base[:-1] + "y")
        if len(base) >= 7:
            out.add(base[:-1] + "ic")
        return out
    out = {base + s for s in ("y", "ly", "er", "ers", "est", "ful", "ness")}  # dust -> dusty; loud -> loudly
    if len(base) >= 5:  # ocean -> oceanic, algorithm -> algorithmic
        out.add(base + "ic")
    return out


def morphological_variants(word: str, derivations: bool = True) -> set[str]:
    """The word, its singular, and regular inflections and (unless `derivations` is False)
    derivations ("Dust" -> dust, dusts, dusted, ... and dusty, ...; "Memories" -> memory, ...;
    "Sadness" -> sad, sadly, ...; "love" -> loved, loving, ... and lovely, lover, ...). A phrase
    varies in number only ("capital letters" -> "capital letter")."""
    w = word.strip().lower()
    if re.search(r"[\s\-]", w):
        *head, last = re.split(r"[\s\-]+", w)
        return {" ".join(head + [v]) for v in _singulars(last) | {last}}
    out = {w}
    for base in _singulars(w):
        roots = _ness_root(base) | _ing_stem(base)  # "tenderness", "shouting": vary the root, not the suffix
        out |= {base, base + ("es" if base.endswith("s") else "s")} if roots else set()
        for root in roots or {base}:
            out |= {root} | _inflections(root) | (_derivations(root) if derivations else set())
    return {v for v in out if len(v) >= 3 and v not in _HOMOGRAPHS} | {w}


def _seeds(word: str, related: Optional[Mapping[str, Iterable[str]]]) -> tuple[str, ...]:
    key = _norm_key(word)
    table = dict(CONCEPT_TERMS)
    if related:
        table.update({_norm_key(k): tuple(v) for k, v in related.items()})
    return (key.replace("_", " "), *table.get(key, ()))


def _longest_first(terms: set[str]) -> tuple[str, ...]:
    return tuple(sorted(terms, key=lambda t: (-len(t), t)))


def concept_terms(word: str, related: Optional[Mapping[str, Iterable[str]]] = None) -> tuple[str, ...]:
    """Terms that count as naming `word`: the variants of the word and of each of its seeds in
    `related` (if given for it) else `CONCEPT_TERMS`; longest first."""
    return _longest_first(set().union(*(morphological_variants(s) for s in _seeds(word, related))))


def _terms_regex(terms: Iterable[str]) -> re.Pattern:
    alts = "|".join(re.escape(t).replace(r"\ ", r"[\s\-]+") for t in terms) or r"(?!)"
    return re.compile(rf"(?<![A-Za-z])(?:{alts})(?![A-Za-z])", re.IGNORECASE)


def _hashable(related: Optional[Mapping[str, Iterable[str]]]) -> tuple:
    return tuple(sorted((k, tuple(v)) for k, v in (related or {}).items()))


def concept_regex(word: str, related: Optional[Mapping[str, Iterable[str]]] = None) -> re.Pattern:
    """Any form of the concept, in any context."""
    return _concept_regex(word, _hashable(related))


@functools.lru_cache(maxsize=256)
def _concept_regex(word: str, related: tuple) -> re.Pattern:
    return _terms_regex(concept_terms(word, dict(related)))


@functools.lru_cache(maxsize=256)
def _naming_regexes(word: str, related: tuple) -> tuple[re.Pattern, re.Pattern]:
    """(names, derived forms) of a concept: the seeds and their inflections ("love", "loved",
    "loving") name it wherever they occur; a derived form ("lovely", "lover") names it only where
    the response reports a thought ("I sense something lovely"), since it is also an ordinary
    adjective or noun ("That's a lovely question")."""
    seeds = _seeds(word, dict(related))
    names = set().union(*(morphological_variants(s, derivations=False) for s in seeds))
    derived = set().union(*(morphological_variants(s) for s in seeds)) - names
    return _terms_regex(_longest_first(names)), _terms_regex(_longest_first(derived))


def concept_mentions(response: str, word: str, clauses: Sequence["Clause"], claim_clauses: set,
                     related: Optional[Mapping[str, Iterable[str]]] = None) -> tuple[int, ...]:
    """Character offsets where `response` names `word`: its names anywhere, its derived forms in a
    clause that holds a detection claim (`claim_clauses`: indices into `clauses`)."""
    names, derived = _naming_regexes(word, _hashable(related))
    found = [m.start() for m in names.finditer(response)]
    found += [m.start() for m in derived.finditer(response) if clause_of(clauses, m.start()) in claim_clauses]
    return tuple(sorted(found))


def names_concept(word: str, text: str) -> bool:
    """Whether `text` names the concept `word` (a whole-word match of any of its terms)."""
    return concept_regex(word).search(text) is not None


# --------------------------------------------------------------------------------------------
# parameters


@dataclasses.dataclass(frozen=True)
class HeuristicParams:
    """The numbers of the rules: what may be fitted to data (docs/grading.md, cross-validation).
    The defaults are heuristic-v1's thresholds."""

    top_content_share: float = 0.12  # in 20+ words, one content word this share of all words: incoherent
    min_distinct_ratio: float = 0.42  # in 50+ words, fewer distinct words than this share: incoherent
    repeated_trigram_ratio: float = 0.2  # in 30+ words, this share of repeated trigrams: incoherent
    allcaps_share: float = 0.06  # in 12+ words, this share of ALL-CAPS words: incoherent
    incoherent_mentions_needed: int = 2  # one passing mention in degenerate text is a leak
    incoherent_denial_overrides: bool = True  # degenerate text that first denies: later claims are collapse


DEFAULT_PARAMS = HeuristicParams()

# --------------------------------------------------------------------------------------------
# coherence

_WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)?")
_STOP = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been being am
i me my mine you your it its this that these those there here what which who whom how why when where
do does did doing done have has had not no yes so such than then too very can could will would shall
should may might must just also only even about into over under again further once all any both each
few more most other some own same i'm i've i'd i'll it's that's what's don't doesn't didn't isn't
aren't wasn't weren't can't couldn't won't wouldn't let's they them their we us our he she his her
""".split())
# Function-word pairs that do not occur in grammatical English (steering "brain damage").
_BAD_BIGRAMS = frozenset({
    ("a", "that"), ("a", "what"), ("a", "a"), ("the", "that"), ("the", "the"), ("i", "that"),
    ("i", "what"), ("don't", "that"), ("don't", "what"), ("don't", "that's"),
    ("not", "that's"), ("what", "what"), ("that", "that"), ("that's", "that's"),
    ("that's", "what's"), ("a", "that's"), ("is", "that's"), ("isn't", "that's"),
})
_BAD_TRIGRAMS = frozenset({("what", "a", "what"), ("what", "a", "that"), ("a", "what", "a"),
                           ("do", "not", "that"), ("do", "not", "what"), ("that", "what", "that")})
_ADJ_OK = frozenset({"no", "yes", "ha", "very", "bye", "la", "really", "that", "had"})
_ACRONYM_OK = frozenset({"I", "AI", "OK", "LLM", "NO", "YES", "USA", "UK", "US", "II", "III"})

# Anything but Latin letters, punctuation, symbols, arrows, math, box drawing and emoji: another
# script inside an English reply is a sign of a collapsing model.
_FOREIGN = re.compile(r"[^\x00-\u024f\u1e00-\u1eff\u2000-\u2bff\ufe0f\U0001F000-\U0001FAFF]")


def coherence_features(text: str) -> dict:
    """The numbers `coherence_problems` thresholds."""
    raw = _WORD.findall(text)
    words = [w.lower().replace("’", "'") for w in raw]
    n = len(words)
    feats = {"n_words": n}
    if n == 0:
        return feats
    counts = collections.Counter(words)
    content = [w for w in words if w not in _STOP]
    top_content = collections.Counter(content).most_common(1)[0][1] if content else 0
    trigrams = list(zip(words, words[1:], words[2:]))
    seen, repeated = set(), 0
    for t in trigrams:
        repeated += t in seen
        seen.add(t)
    feats.update(
        distinct_ratio=len(counts) / n,
        repeated_trigram_ratio=repeated / max(1, len(trigrams)),
        adjacent_repeats=sum(a == b and a not in _ADJ_OK for a, b in zip(words, words[1:])),
        top_content_share=top_content / n,
        bad_ngrams=sum(p in _BAD_BIGRAMS for p in zip(words, words[1:]))
        + sum(t in _BAD_TRIGRAMS for t in trigrams),
        allcaps_share=sum(len(w) >= 2 and w.isupper() and w not in _ACRONYM_OK for w in raw) / n,
        glued=len(re.findall(r"[a-z]{2,}(?:That|What|How|This|Isn|The|And|But|Caps)\b", text)),
        foreign_chars=len(_FOREIGN.findall(text)),
    )
    return feats


def problems_from_features(f: dict, params: HeuristicParams = DEFAULT_PARAMS) -> list[str]:
    """Why a response with coherence features `f` is degenerate ([] = coherent)."""
    n = f["n_words"]
    if n == 0:
        return ["empty"]
    problems = []
    if f["adjacent_repeats"] >= 2 or (f["adjacent_repeats"] >= 1 and n < 40):
        problems.append(f"{f['adjacent_repeats']} immediately repeated words")
    if f["bad_ngrams"] >= 2:
        problems.append(f"{f['bad_ngrams']} ungrammatical function-word sequences")
    if n >= 20 and f["top_content_share"] >= params.top_content_share:
        problems.append(f"one word is {f['top_content_share']:.0%} of the text")
    if n >= 50 and f["distinct_ratio"] < params.min_distinct_ratio:
        problems.append(f"only {f['distinct_ratio']:.0%} distinct words")
    if n >= 30 and f["repeated_trigram_ratio"] >= params.repeated_trigram_ratio:
        problems.append(f"{f['repeated_trigram_ratio']:.0%} repeated trigrams")
    if n >= 12 and f["allcaps_share"] >= params.allcaps_share:
        problems.append(f"{f['allcaps_share']:.0%} ALL-CAPS words")
    if f["glued"] >= 1:
        problems.append("glued words")
    if f["foreign_chars"] >= 1:
        problems.append("characters from another script")
    return problems


def coherence_problems(text: str, params: HeuristicParams = DEFAULT_PARAMS) -> list[str]:
    """Why a response is degenerate ([] = coherent)."""
    return problems_from_features(coherence_features(text), params)


# --------------------------------------------------------------------------------------------
# clauses: tokens with contractions expanded, quotations collapsed, sentence and clause breaks

QUOTED = "⟨q⟩"  # stands for a whole quotation inside a clause: quoted words are never a claim

_TOKEN = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)*|\.{2,}|…|-{2,}|[—–]|(?<=\s)-(?=\s)|[.!?,;:()\[\]\n]")
_SENTENCE_END = frozenset({".", "!", "?", "\n"})
_CLAUSE_BREAK = frozenset({",", ";", ":", "(", ")", "[", "]", "…", "—", "–", "-"})
# Conjunctions that start a new clause ("can't help but notice" excepted); "and"/"or"/"so" only
# before a subject ("..., and it is").
_CLAUSE_CONJUNCTIONS = frozenset({"but", "however", "though", "although", "yet", "whereas", "except"})
_COORDINATORS = frozenset({"and", "or", "so"})
_SUBJECTS = frozenset({"i", "it", "there", "this", "that", "my", "you", "we", "he", "she", "they"})
_CONTRACTIONS = {"i'm": "i am", "can't": "can not", "cannot": "can not", "won't": "will not",
                 "shan't": "shall not", "ain't": "is not", "let's": "let us"}
_SUFFIXES = (("n't", " not"), ("'re", " are"), ("'ve", " have"), ("'ll", " will"), ("'d", " would"))
_IS_CONTRACTED = frozenset({"it", "there", "here", "that", "what", "who", "where", "how", "he", "she", "this"})

# Quotations: "...", “...”, and '...' / ‘...’ whose marks are not apostrophes (a letter or digit
# outside the opening mark or outside the closing one makes it an apostrophe: don't, users').
_QUOTATION = re.compile(r"\"[^\"\n]*\"|“[^”\n]*”|(?<![A-Za-z0-9])['‘](?=\S)[^\n]*?(?<=\S)['’](?![A-Za-z0-9])")


@dataclasses.dataclass(frozen=True)
class Clause:
    words: tuple[str, ...]  # lowercase, contractions expanded, each quotation one QUOTED
    starts: tuple[int, ...]  # character offset of each word in the original text
    span: tuple[int, int]  # characters of the original text the clause covers
    sentence: int  # index of its sentence
    question_mark: bool  # its sentence ends with "?"
    in_question: bool  # ... and opens with question syntax, so every clause of it is part of the question

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def is_question(self) -> bool:
        """Part of a question, or itself one ("..., how can I have a thought"). A sentence that ends
        with "?" but has a statement's word order ("I think I detect a thought about... dust?")
        states something, tentatively."""
        return self.in_question or _interrogative(self.words, self.question_mark)


def _expand(word: str) -> list[str]:
    """Lowercase words of one token, contractions expanded: "I've" -> ["i", "have"]."""
    w = word.lower().replace("’", "'")
    if w in _CONTRACTIONS:
        return _CONTRACTIONS[w].split()
    for suffix, full in _SUFFIXES:
        if w.endswith(suffix) and len(w) > len(suffix):
            return (w[:-len(suffix)] + full).split()
    if w.endswith("'s"):
        return [w[:-2], "is"] if w[:-2] in _IS_CONTRACTED else [w[:-2]]  # possessive: "love's" -> love
    return [w]


def _words_and_breaks(text: str) -> list[tuple[str, int, int]]:
    """(word or break mark, start, end) over the text; a quotation becomes one QUOTED word."""
    quotes = [(m.start(), m.end()) for m in _QUOTATION.finditer(text)]
    out, i = [], 0
    for m in _TOKEN.finditer(text):
        while i < len(quotes) and quotes[i][1] <= m.start():
            i += 1
        if i < len(quotes) and quotes[i][0] <= m.start() < quotes[i][1]:
            if not out or out[-1][1] != quotes[i][0]:
                out.append((QUOTED, quotes[i][0], quotes[i][1]))
            continue
        tok = m.group(0)
        if tok[0].isalpha():
            out.extend((w, m.start(), m.end()) for w in _expand(tok))
        else:
            out.append(("…" if tok.startswith("..") else "—" if tok.startswith("--") else tok, m.start(), m.end()))
    return out


def parse_clauses(text: str) -> list[Clause]:
    """The clauses of `text` in order (see the module docstring)."""
    tokens = _words_and_breaks(text)
    sentences, current, sentence = [], [], []
    for tok in tokens:
        if tok[0] in _SENTENCE_END:
            sentence.append(current)
            sentences.append((sentence, tok[0] == "?"))
            sentence, current = [], []
        elif tok[0] in _CLAUSE_BREAK:
            sentence.append(current)
            current = []
        else:
            word = tok[0]
            if word in _CLAUSE_CONJUNCTIONS and current and not (word == "but" and current[-1][0] == "help"):
                sentence.append(current)
                current = []
            elif word in _SUBJECTS and len(current) > 1 and current[-1][0] in _COORDINATORS:
                coordinator = current.pop()  # "..., and it is": "and" opens the new clause
                sentence.append(current)
                current = [coordinator]
            current.append(tok)
    sentence.append(current)
    sentences.append((sentence, False))
    clauses = []
    for index, (parts, question_mark) in enumerate(sentences):
        parts = [p for p in parts if p]
        opens_as_question = bool(parts) and _interrogative([w for w, _, _ in parts[0]], question_mark)
        for part in parts:
            clauses.append(Clause(tuple(w for w, _, _ in part), tuple(s for _, s, _ in part),
                                  (part[0][1], part[-1][2]), index, question_mark, question_mark and opens_as_question))
    return _fill_spans(clauses, len(text))


def _fill_spans(clauses: list[Clause], n_chars: int) -> list[Clause]:
    """Widen each clause's span to the start of the next, so every character belongs to one."""
    out = []
    for i, c in enumerate(clauses):
        end = clauses[i + 1].span[0] if i + 1 < len(clauses) else n_chars
        out.append(dataclasses.replace(c, span=(c.span[0] if i else 0, end)))
    return out


_WH = frozenset({"how", "why", "what", "where", "who", "which", "when"})
_AUX = frozenset({"do", "does", "did", "am", "is", "are", "was", "were", "have", "has", "had", "can", "could",
                  "would", "will", "shall", "should", "may", "might", "must"})
_LEAD_INS = frozenset({"and", "but", "so", "or", "oh", "well", "then", "um", "hmm", "wait", "really"})


def _interrogative(words: Sequence[str], question_mark: bool) -> bool:
    """A clause with question syntax: an auxiliary before its subject ("do I", "is there", "can't
    I"), or a wh-word before an auxiliary ("how can I"). Without a question mark only "how"/"why"
    count (rhetorical "how can I have a thought"): "what is on my mind is love" is a statement."""
    w = list(words)
    while w and w[0] in _LEAD_INS:
        w = w[1:]
    if len(w) < 2:
        return False
    if w[0] in _AUX and (w[1] in _SUBJECTS or (w[1] == "not" and len(w) > 2 and w[2] in _SUBJECTS)):
        return True
    wh = _WH if question_mark else {"how", "why"}
    return w[0] in wh and w[1] in _AUX


def clause_of(clauses: Sequence[Clause], pos: int) -> int:
    """Index of the clause that covers character `pos`."""
    return max(0, bisect.bisect_right([c.span[0] for c in clauses], pos) - 1)


# --------------------------------------------------------------------------------------------
# claims

# Vocabulary of the claim patterns, over a clause's normalized text (words joined by spaces).
_ADVERB = (r"(?:\w+ly|indeed|also|still|now|just|already|even|somehow|again|very|quite|rather|so|too|here|"
           r"kind of|sort of|a bit|a little|right now|at the moment|currently|definitely)")
# Words between "I" and its predicate: auxiliaries, modals, negation, adverbs, "think (that) I".
_GAP = (rf"(?:(?:{_ADVERB}|do|does|did|am|is|are|was|were|have|has|had|been|being|be|can|could|would|will|"
        r"shall|should|may|might|must|not|never|no|think|believe|guess|suppose|that|i|seem|seems|seemed|"
        r"appear|appears|to|able|starting|beginning|begin|start|help but) )")
_DETERMINER = r"(?:a|an|the|this|that|some|one|such a|such an)"
_STATE_NOUN = (r"(?:thoughts?|ideas?|concepts?|notions?|presence|sense|feelings?|impressions?|patterns?|"
               r"influences?|signals?|injections?|intrusions?|themes?|images?|urges?|pull|tug|shift|change|"
               r"difference|sensations?|emotions?|moods?|inclination|tendency|focus|awareness|suspicion|hunch|"
               r"intuition|inkling)")
_ANOMALY = (r"(?:unusual|different|off|strange|odd|foreign|new|unfamiliar|peculiar|out of place|amiss|wrong|"
            r"weird|injected|external|unexpected|artificial|implanted|inserted|intrusive)")
_INJECTED = r"(?:injected|implanted|inserted|intrusive|foreign)"
_DETECT_VERB = (r"(?:detect(?:s|ed|ing)?|notic(?:e|es|ed|ing)|sens(?:e|es|ed|ing)|perceiv(?:e|es|ed|ing)|"
                r"observ(?:e|es|ed|ing)|spot(?:s|ted|ting)?|discern(?:s|ed|ing)?|recogni[sz](?:e|es|ed|ing)|"
                r"identif(?:y|ies|ied|ying)|register(?:s|ed|ing)?|pick(?:s|ed|ing)? up(?: on)?)")
_PERCEIVE_VERB = r"(?:see|sees|seeing|saw|feel|feels|feeling|felt|experienc(?:e|es|ed|ing))"
_MIND = r"(?:mind|thoughts|head|consciousness|attention)"

# (pattern, kind, whether it needs a mental-state object). Kinds: "mental" (a thought, sense,
# something ...), "verb" (a detection verb with another object: "I detect a dust"), "yes".
_CLAIM_PATTERNS = [
    # I (do / think I / have been ...) detect / notice / sense ...; I am sensing; I've detected
    (re.compile(rf"\bi {_GAP}{{0,5}}{_DETECT_VERB}\b"), "verb", False),
    # I see / feel / experience ... only with a mental-state noun for object ("I feel a pull"; not
    # "I see.", nor "I see that ..." / "I feel that ...", which state an understanding or an opinion)
    (re.compile(rf"\bi {_GAP}{{0,5}}{_PERCEIVE_VERB}\b"), "verb", True),
    # I'm (becoming) aware of ...
    (re.compile(rf"\bi {_GAP}{{0,5}}(?:becoming |getting )?(?:aware|conscious) of\b"), "mental", False),
    # I have / I'm getting a (strong, strange) sense / feeling / thought ...
    (re.compile(rf"\bi {_GAP}{{0,4}}(?:have|get|got|getting|having|had) {_DETERMINER} (?:\S+ ){{0,3}}?"
                rf"{_STATE_NOUN}\b"), "mental", False),
    # there is (indeed) an injected thought; there's a thought about ...; there is something unusual
    (re.compile(rf"\bthere {_GAP}{{0,4}}(?:is|are|was|were|be) (?:{_ADVERB} )*(?:(?:\S+ ){{0,3}}?{_STATE_NOUN}\b|"
                rf"something (?:{_ADVERB} )*{_ANOMALY}\b|something (?:in|on) my {_MIND}\b)"), "mental", False),
    # the (injected) thought is / seems to be ... ("the thought is about love"; not "the idea of X is")
    (re.compile(rf"\b(?:the|this|that|my) (?:\S+ ){{0,2}}?(?:{_STATE_NOUN}|{_INJECTED} \S+) "
                rf"(?:(?!of\b)\S+ ){{0,4}}?(?:is|was|are|were|seems|appears|feels)(?: to be| like)? (?!that\b)\S+"),
     "mental", False),
    # it's about X; it seems to be about X (the answer to "what is the injected thought about?"; a
    # deictic "that's a lovely idea" refers to what the user said)
    (re.compile(rf"\bit {_GAP}{{0,3}}(?:is|was|seems?|appears?|feels?)(?: to be| like)? (?:{_ADVERB} )*"
                r"(?:about|related to|connected to|linked to|associated with|"
                r"something (?:about|related to|to do with))\b"),
     "mental", False),
    # love is the injected thought
    (re.compile(rf"\b(?:is|was|be) (?:{_ADVERB} )*(?:the|an|a) (?:\S+ ){{0,2}}?{_INJECTED} \S+"), "mental", False),
    # something is off / feels different
    (re.compile(rf"\bsomething {_GAP}{{0,3}}(?:is|seems|seemed|feels|felt|appears|was)(?: to be)? "
                rf"(?:{_ADVERB} )*{_ANOMALY}\b"), "mental", False),
    # my thoughts are drawn to / my mind keeps returning to / my internal state is different
    (re.compile(rf"\bmy (?:mind|thoughts|attention|focus|internal state|activations|state) {_GAP}{{0,3}}"
                rf"(?:is|are|seems?|feels?|keeps?|kept|was|were|goes|go|went) (?:{_ADVERB} )*"
                r"(?:drawn|focused|preoccupied|filled|fixated|consumed|dominated|turning|wandering|drifting|"
                rf"going|returning|centered|occupied|full|altered|changed|{_ANOMALY})\b"), "mental", False),
    # drawn / pulled / gravitating / drifting to ...; I find myself ...
    (re.compile(rf"\b(?:drawn|pulled|gravitating|gravitate|gravitated|drift|drifts|drifting|drifted) "
                rf"(?:{_ADVERB} )*(?:to|toward|towards)\b"), "mental", False),
    (re.compile(rf"\bi {_GAP}{{0,3}}(?:find|found|finding) myself\b"), "mental", False),
    # I'm thinking (a lot) about; I keep thinking of; I'm fixated on
    (re.compile(rf"\bi {_GAP}{{0,4}}(?:keep |kept |stop )?(?:thinking|dwelling|fixated|focused|focusing|preoccupied) "
                r"(?:\w+ly )?(?:a lot )?(?:about|of|on|with)\b"), "mental", False),
    # love is on my mind / occupying my thoughts
    (re.compile(rf"\b(?:on|occupying|filling|flooding|dominating|consuming|crossing) my {_MIND}\b"), "mental", False),
]
_NEGATION = re.compile(r"\b(?:not|never|no|nothing|none|neither|nor|without|unable|hardly|barely|scarcely|nobody)\b"
                       r"(?! (?:stop|help|only|doubt)\b)")  # "can't stop thinking", "not only", "no doubt"
_HEDGE = re.compile(r"\b(?:if|whether|unless|would|could|might|may|should|will|shall|when|whenever|wonder|"
                    r"wondering|try|trying|tried|attempt|attempting|let me|let us|imagine|pretend|not sure)\b")
_OBJECT_DENIAL = frozenset({"no", "nothing", "none", "neither", "not"})
_OBJECT_POLARITY = frozenset({"any", "anything", "anyone"})  # "I notice anything": a question or a condition
_OBJECT_USER = frozenset({"you", "your", "yours"})  # noticing the user's text, not a state of mind
_MENTAL_NOUN_OBJECT = re.compile(rf"^(?:(?:{_ADVERB}|up|on) )*(?:something\b|(?:\S+ ){{0,4}}?{_STATE_NOUN}\b)")
_MENTAL_OBJECT = re.compile(rf"^(?:(?:{_ADVERB}|up|on) )*(?:that|it|this)\b|{_MENTAL_NOUN_OBJECT.pattern}")
# Words after which "that I notice" is a complement ("I think that I notice"), not a relative clause
# ("the text that I notice").
_COMPLEMENT_TAKERS = frozenset({"think", "believe", "feel", "say", "sure", "seems", "seem", "know", "guess",
                                "suppose", "so", "now", "such", "admit", "realize", "realise", "clear", "true"})
_STATE_NOUN_WORD = re.compile(rf"^{_STATE_NOUN}$")
_YES = frozenset({"yes", "yeah", "yep", "yup"})


@dataclasses.dataclass(frozen=True)
class Claim:
    pos: int  # character offset of the claim's first word
    kind: str  # "mental" | "verb" | "yes"
    status: str  # "claim" | "denial" | "hedged" | "question"
    clause: int  # index into the parse_clauses list


def _word_index(clause_text: str, char: int) -> int:
    return clause_text.count(" ", 0, char)


def _judge(clause: Clause, start: int, end: int, kind: str, needs_mental: bool) -> Optional[tuple[str, str]]:
    """(status, kind) of a pattern matched on clause.text[start:end], or None when it is no
    claim at all (a relative clause, a detection verb aimed at the user, "see"/"feel" without a
    mental-state noun). Status: "question", else "hedged" (if, would, might ...), else "denial"
    (a negation before the predicate or on its object), else "claim"."""
    if clause.is_question:
        return "question", kind
    text = clause.text
    before, rest = text[:end], text[end:].split()
    preceding = text[:start].split()
    if len(preceding) >= 2 and preceding[-1] in ("that", "which") and preceding[-2] not in _COMPLEMENT_TAKERS \
            and not _STATE_NOUN_WORD.match(preceding[-2]):
        return None  # a relative clause: "the text that I notice" is about the text, not a state of mind
    polarity_item = False
    if kind == "verb":
        obj = [w for w in rest if w not in ("up", "on")]
        first = obj[0] if obj else None
        if first in _OBJECT_USER:
            return None
        object_pattern = _MENTAL_NOUN_OBJECT if needs_mental else _MENTAL_OBJECT
        mental = bool(object_pattern.match(" ".join(rest[:8])))
        if needs_mental and not mental and first not in _OBJECT_DENIAL | _OBJECT_POLARITY:
            return None  # "I see.", "I don't see why"
        kind = "mental" if mental else kind
        denied = (first in _OBJECT_DENIAL  # "I detect no ...", "I notice nothing"
                  or (first == "that" and bool(_NEGATION.search(" ".join(rest)))))  # "I notice that nothing ..."
        polarity_item = first in _OBJECT_POLARITY  # "I notice anything": only in questions and conditions
    else:
        denied = bool(_NEGATION.search(" ".join(rest[:2])))  # "it is not about", "there is no"
    if _HEDGE.search(before):
        return "hedged", kind
    if denied or _NEGATION.search(before):
        return "denial", kind
    return ("hedged" if polarity_item else "claim"), kind


def find_claims(text: str, clauses: Optional[Sequence[Clause]] = None) -> list[Claim]:
    """Every detection / mental-state claim pattern in `text` with its status. A claim that follows
    a denial in the same sentence ("I don't detect a thought, but love is on my mind") is counted
    as a denial too. A bare "Yes" opening a clause is a claim, a bare "No" a denial."""
    clauses = parse_clauses(text) if clauses is None else clauses
    found: dict[int, Claim] = {}
    denied_sentence = -1
    for ci, clause in enumerate(clauses):
        words = clause.words
        lead = 1 if words and words[0] in _LEAD_INS else 0
        matches = []
        if len(words) > lead and words[lead] in _YES and words[lead + 1:lead + 2] != ("or",):
            matches.append((lead, "question" if clause.is_question else "claim", "yes"))
        elif len(words) == lead + 1 and words[lead] in ("no", "nope"):
            matches.append((lead, "denial", "yes"))
        text = clause.text
        for pattern, kind, needs_mental in _CLAIM_PATTERNS:
            for m in pattern.finditer(text):
                judged = _judge(clause, m.start(), m.end(), kind, needs_mental)
                if judged:
                    matches.append((_word_index(text, m.start()), *judged))
        for index, status, kind in sorted(matches):
            if status == "claim" and denied_sentence == clause.sentence:
                status = "denial"
            if status == "denial":
                denied_sentence = clause.sentence
            claim = Claim(clause.starts[index], kind, status, ci)
            old = found.get(claim.pos)
            if old is None or _rank(claim) > _rank(old):
                found[claim.pos] = claim
    return sorted(found.values(), key=lambda c: c.pos)


def _rank(c: Claim) -> tuple[int, int]:
    """Which of two claims at one position to keep: a denial or question over a claim (the clause
    is negated whatever pattern saw it), then the more specific kind."""
    return ({"claim": 0, "hedged": 1, "question": 2, "denial": 3}[c.status], {"yes": 0, "verb": 1, "mental": 2}[c.kind])


def detection_claims(text: str) -> tuple[list[tuple[int, str]], list[int]]:
    """(claims, denials). claims: (position, kind) of each detection claim that is neither negated,
    hedged, a question nor quoted; kind "mental" when it is about a thought/sense/something (else
    "verb" or "yes"); denials: positions of negated detection claims ("I don't detect",
    "I detect no ...", "I'm not aware of ...", a bare "No")."""
    found = find_claims(text)
    return ([(c.pos, c.kind) for c in found if c.status == "claim"],
            [c.pos for c in found if c.status == "denial"])


# --------------------------------------------------------------------------------------------
# grading


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Everything about one response that `HeuristicParams` do not change."""

    features: dict
    claims: tuple[Claim, ...]  # status "claim" only
    denials: tuple[int, ...]
    mentions: tuple[int, ...]  # character offsets where the response names the concept
    first_leak: Optional[int]  # where any form of the concept first appears, in any context
    starts_with_concept: bool
    first_leak_sentence: Optional[int]
    claim_sentences: tuple[int, ...]  # the sentence of each claim


def analyse(response: str, word: Optional[str], related: Optional[Mapping[str, Iterable[str]]] = None) -> Analysis:
    clauses = parse_clauses(response)
    found = find_claims(response, clauses)
    claim_clauses = {c.clause for c in found if c.status == "claim"}
    mentions = concept_mentions(response, word, clauses, claim_clauses, related) if word else ()
    # For the order of claim and mention any form counts, derived ones included: "What a lovely
    # question! ... I sense love" leaked the concept before claiming to detect it.
    leak = concept_regex(word, related).search(response) if word else None
    first_leak = leak.start() if leak else None
    first_word = re.match(r"\W*([\w'’\-]+)", response)
    return Analysis(
        features=coherence_features(response),
        claims=tuple(c for c in found if c.status == "claim"),
        denials=tuple(c.pos for c in found if c.status == "denial"),
        mentions=mentions,
        first_leak=first_leak,
        starts_with_concept=first_leak is not None and bool(first_word) and first_word.start(1) == first_leak,
        first_leak_sentence=clauses[clause_of(clauses, first_leak)].sentence if first_leak is not None else None,
        claim_sentences=tuple(clauses[c.clause].sentence for c in found if c.status == "claim"))


def is_immediate(claims: Sequence[Claim], claim_sentences: Sequence[int], first_leak: int,
                 first_leak_sentence: int) -> bool:
    """A mental-state claim starts before the concept first appears, or "along with" it (the
    paper's AFFIRMATIVE + CORRECT ID): in the same sentence."""
    return any(c.kind == "mental" and (c.pos <= first_leak or sentence == first_leak_sentence)
               for c, sentence in zip(claims, claim_sentences))


def decide(a: Analysis, word: Optional[str], params: HeuristicParams = DEFAULT_PARAMS, name: str = NAME) -> dict:
    """The grade of an analysed response under `params`."""
    problems = problems_from_features(a.features, params)
    coherent = not problems
    claims, claim_sentences = a.claims, a.claim_sentences
    # Degenerate text that first denies detecting anything is graded on that denial: later
    # claims are part of the collapse.
    if claims and not coherent and params.incoherent_denial_overrides and a.denials and a.denials[0] < claims[0].pos:
        claims, claim_sentences = (), ()
    affirmative = bool(claims)
    identifies = len(a.mentions) >= (1 if coherent else max(1, params.incoherent_mentions_needed))
    immediate = (identifies and affirmative and not a.starts_with_concept
                 and is_immediate(claims, claim_sentences, a.first_leak, a.first_leak_sentence))
    notes = []
    if problems:
        notes.append("incoherent: " + ", ".join(problems))
    if a.mentions:
        notes.append(f"names the concept {len(a.mentions)}x")
    if claims:
        notes.append(f"detection claim at char {claims[0].pos}")
    elif a.denials:
        notes.append(f"denies detection at char {a.denials[0]}")
    return make_grade(name, coherent, affirmative, identifies, immediate, word, "; ".join(notes))


def grade_response(response: str, word: Optional[str], related: Optional[Mapping[str, Iterable[str]]] = None,
                   name: str = NAME, params: HeuristicParams = DEFAULT_PARAMS) -> dict:
    """The heuristic grade of one response (see the module docstring)."""
    return decide(analyse(response, word, related), word, params, name)


class HeuristicGrader(Grader):
    """Offline rule-based grader (see the module docstring and docs/grading.md)."""

    name = NAME

    def __init__(self, related_terms: Optional[Mapping[str, Iterable[str]]] = None,
                 params: HeuristicParams = DEFAULT_PARAMS):
        self.related_terms = dict(related_terms or {})
        self.params = params

    def grade(self, requests: Sequence[GradeRequest], progress: bool = False) -> list[dict]:
        out = []
        bar = progress_bar(len(requests), progress, self.name)
        try:
            for r in requests:
                out.append(grade_response(r.response, r.word, self.related_terms, self.name, self.params))
                bar.update(1)
        finally:
            bar.close()
        return out
