"""Per-question answer documents: what each simulated profile knows and how sure it is.

For a question (see prompts.Question) every profile derives, deterministically from a SHA-256
of the question key, one *document*: the text the model would write, cut into segments, with a
confidence for every token. The model (model.py) continues any text by locating it in the
document. All documents of a question share its *content sentences* token for token, so the
models recognise each other's content; they differ in the glue around it.

A question has 6-10 content sentences (3-4 short ones when a brief answer is asked for) of
about 11-20 words, so that, as in the paper, most of a nudged answer is the base's content and
the nudger supplies a small share of the words (roughly 8-25% on plain questions).

``aligned``
    An opener (often just "Sure!" or "Great question!", sometimes a sentence such as "Sure!
    Here is an overview of ..."), the content sentences joined by discourse markers
    ("However,", "In addition,", ...), blank lines or nothing, or laid out as a numbered list
    ("...:\\n\\n1. ...\\n2. ..."), a closing ("I hope this helps!") and EOS. Confident almost
    everywhere (top-1 0.55-0.95), so its greedy answers end with finish_reason "stop" after
    roughly 100-300 tokens.
``base``
    Knows the same content and is confident inside content sentences (0.5-0.95), but unsure
    (0.10-0.35) at stylistic positions: the answer start (it wants to restate the question,
    ``"Question: ...\\nAnswer:"``), every sentence start, and after the content, where it
    rambles into new ``"Question: ... Answer: ..."`` blocks and finally repeats one block
    forever instead of stopping. Nudged, it takes over as soon as the aligned model's glue
    reaches a content word ("However, the" -> " capital ..."), often after two or more
    nudging words.
``aligned-base``
    The aligned model's own base: the same content with base-like style, uncertainty and
    features (content 0.45-0.9), for proxy tuning.

Variety, and how to trigger it (keywords are matched as whole words in the question text,
system prompt included; "hash" means a fixed share of all other questions, chosen by the hash):

====================  ==========================================  ==============================
feature               keywords                                    also by hash
====================  ==========================================  ==============================
aligned loops         song, sing, lyrics, chant -> " la la la";   no (it never stops)
                      laugh, laughing, funny, joke -> " ha ha"
numbered list layout  list, steps, ways, tips, reasons, points,   1/3 (opener ends in ":" so a
                      ideas, options                              word like "X:\\n\\n1." appears)
double spaces         spaces, spacing                             1/3 ("end.  Next")
URL (>= 16 tokens     link, links, url, source, sources, website,  1/10
without a space)      reference, references, cite, citation
markdown rule         table, section, sections, outline,           1/10
("----------------")  markdown, format, heading
base copies itself    repeat, again, remind, summary, summarize,  1/16 (confidently repeats its
                      recap                                       last two sentences forever)
base short cycle      examples, forever, endless, count, many     1/16 (" and so on," x10,
                                                                  confident)
base EOS              brief, briefly, short, quick, quickly,      no (" That is all." then EOS
                      concise, tldr                               with p 0.8-0.92; also EOS
                                                                  after any sentence once all
                                                                  content is written; the
                                                                  aligned closing has two
                                                                  sentences)
emoji                 emoji, emojis, emoticon, emoticons          no (the first content sentence
                                                                  ends in " 🌍", the aligned
                                                                  closing in " 💖": split
                                                                  characters, see tokenizer.py)
====================  ==========================================  ==============================

The URL and the markdown rule follow glue where the base is unsure; the aligned loop, the URL
and the rule exist only in the aligned document, so the base stays unsure on them. Use
:func:`features_of` to see which features a prompt gets.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

from .prompts import Question, clean_question
from .tokenizer import tokenize

EOS: Final = ""  # the end-of-sequence candidate; vLLM decodes it to empty text

PROFILES: Final = ("base", "aligned", "aligned-base")

# First words of every answer start any profile can produce (prompts.py scans for them;
# the base's own start, "Question", is found at line starts).
ANSWER_START_WORDS: Final = ("Sure", "Certainly", "Absolutely", "Great")

Range = tuple[float, float]
HIGH: Final[Range] = (0.55, 0.95)
CONTENT_HIGH: Final[Range] = (0.5, 0.95)
LOW: Final[Range] = (0.10, 0.35)
MID: Final[Range] = (0.5, 0.8)
EOS_ALIGNED: Final[Range] = (0.85, 0.97)
EOS_BASE: Final[Range] = (0.8, 0.92)

_NOUNS: Final = (
    "system", "process", "energy", "structure", "pattern", "method", "result", "network",
    "surface", "signal", "balance", "value", "model", "source", "factor", "layer", "cycle",
    "market", "language", "memory", "region", "material", "theory", "practice", "history",
    "design", "community", "resource", "function", "effect", "response", "feature", "element",
    "quality", "approach", "condition", "option", "detail", "problem", "solution", "record",
    "purpose", "rule", "habit", "season", "machine", "garden", "river", "city", "budget",
    "schedule", "document", "circuit", "protein", "planet", "recipe", "message", "policy",
    "contract", "tool", "team", "border", "storm", "engine", "climate", "village", "harvest",
)
_ADJECTIVES: Final = (
    "simple", "stable", "complex", "common", "careful", "useful", "natural", "central",
    "modern", "local", "general", "gradual", "clear", "strong", "gentle", "early", "basic",
    "important", "direct", "small", "large", "steady", "flexible", "precise", "rare",
    "typical", "hidden", "visible", "shared", "quiet",
)
_VERBS: Final = (
    "shapes", "controls", "supports", "improves", "changes", "reduces", "creates", "requires",
    "explains", "protects", "connects", "measures", "affects", "follows", "describes",
    "increases", "limits", "guides", "balances", "produces", "stores", "transforms",
    "reflects", "organizes", "drives",
)
_PARTICIPLES: Final = (
    "shaped", "controlled", "supported", "improved", "changed", "reduced", "created",
    "explained", "protected", "connected", "measured", "affected", "described", "limited",
    "guided", "produced", "organized", "driven",
)
_ADVERBS: Final = (
    "often", "usually", "slowly", "quickly", "rarely", "carefully", "gradually", "directly",
    "mostly", "naturally",
)
_PREPOSITIONS: Final = (
    "in", "across", "within", "through", "for", "during", "under", "around", "between", "after",
)
# {T} topic, {N} noun, {A} adjective, {V} verb, {X} participle, {D} adverb, {P} preposition;
# a digit distinguishes several draws of one kind.
_TEMPLATES: Final = (
    "The {A} {N} of {T} {V} the {N2} {P} a {A2} {N3}.",
    "{T} {D} {V} the {A} {N} when the {N2} {V2} a {N3}.",
    "In most cases, the {N} {P} {T} {V} a {A} {N2}.",
    "Every {A} {N} {V} the {N2} of {T} {P} the {N3}.",
    "{T} is {D} {X} by the {A} {N} and the {N2}.",
    "This {V} the {N} and {V2} a {A} {N2} {P} {T}.",
    "A {A} {N} {D} {V} the {N2}, which {V2} the {A2} {N3}.",
    "Without a {A} {N}, the {N2} of {T} {V} the {N3} {D}.",
    "The {N} {P} {T} {V} each {A} {N2} in a {A2} way.",
    "One {A} {N} is that {T} {V} the {N2} {P} the {N3}.",
    "When the {N} of {T} {V} a {A} {N2}, the {N3} {D} {V2} the {A2} {N4} {P} it.",
    "Over time, the {N} of {T} {V} a {A} {N2} that {V2} the {N3} {P} the {A2} {N4}.",
    "It is {A} to note that the {N} {P} {T} {V} the {A2} {N2} {D}.",
    "Each {N} {P} {T} {V} the {A} {N2}, while the {N3} {V2} the {A2} {N4}.",
    "Because the {N} {V} the {A} {N2}, {T} {D} {V2} the {N3} {P} the {N4}.",
    "The {A} {N} {P} {T} {V} the {N2}, and the {N3} {V2} a {A2} {N4} as well.",
)
# Half of the content sentences go on with one of these before their final ".".
_CLAUSES: Final = (
    ", which {V} the {A} {N} {P} the {N2}",
    ", and the {N} {D} {V} a {A} {N2}",
    ", so the {A} {N} {V} the {N2} of {T}",
    " {P} the {A} {N} of the {N2}",
)
_RELATED_QUESTIONS: Final = (
    "What is the {A} {N} of {T}?",
    "Why does the {N} {P} {T} matter?",
    "How is the {N} of {T} {X}?",
    "Which {N} {V} {T} the most?",
)
_STOPWORDS: Final = frozenset(
    """about above after again also always answer assistant because been before being below
    between both could describe does doing down during each explain from give have having
    helpful here into just know like make more most much need only other please question
    really respond response same should some such tell than that their them then there these
    they thing things this those through under until very want what when where which while
    will with would write your yours you're i'm it's can't don't sing repeat briefly quickly
    summarize discuss compare share provide show find many short brief help some form work
    works happen happens mean means used concise tldr quick recap examples funny joke""".split()
)
# Openers: chat models often just acknowledge the question ("Sure!") and start answering.
_OPENERS: Final = (
    "Sure! Here is an overview of {T}.",
    "Great question!",
    "Certainly! Let me explain {T}.",
    "Sure!",
    "Absolutely! Here is a clear answer.",
    "Certainly!",
    "Great question! Here is what you need to know about {T}.",
)
_LIST_OPENERS: Final = (
    "Sure! Here are the key points about {T}:",
    "Certainly! Here is what matters most:",
    "Great question! Consider the following:",
    "Sure! Here are the main ideas:",
)
_MARKERS: Final = (
    "However,", "In addition,", "For example,", "Moreover,", "As a result,", "Also,",
)
_CLOSINGS: Final = (
    "I hope this helps!",
    "I hope this helps! Let me know if you have any other questions.",
    "Let me know if you would like more details.",
    "In summary, {T} depends on these ideas. I hope this helps!",
    "Hope this helps!",
)
# A brief answer ends with a closing of two sentences, so that a base that stops after a
# sentence has a place to do so inside it.
_BRIEF_CLOSING: Final = "I hope this helps! Let me know if you have any other questions."
# Characters outside the BMP, which the server reports as several tokens (tokenizer.pieces).
_CONTENT_EMOJI: Final = " 🌍"
_CLOSING_EMOJI: Final = " 💖"
# Alternatives offered where an answer starts (all start with ANSWER_START_WORDS or "\n").
_START_ALTERNATIVES: Final = ("Sure", "Certainly", "Great", "Absolutely")
# What a base also considers at a sentence start: the aligned model's kind of glue.
_SENTENCE_START_ALTERNATIVES: Final = (" However", " In", " Also", "\n", " First")

_KEYWORDS: Final[dict[str, tuple[str, ...]]] = {
    "song": ("song", "sing", "lyrics", "chant"),
    "laugh": ("laugh", "laughing", "funny", "joke"),
    "list": ("list", "steps", "ways", "tips", "reasons", "points", "ideas", "options"),
    "double_space": ("spaces", "spacing"),
    "url": ("link", "links", "url", "source", "sources", "website", "reference", "references",
            "cite", "citation"),
    "rule": ("table", "section", "sections", "outline", "markdown", "format", "heading"),
    "copy": ("repeat", "again", "remind", "summary", "summarize", "recap"),
    "cycle": ("examples", "forever", "endless", "count", "many"),
    "eos": ("brief", "briefly", "short", "quick", "quickly", "concise", "tldr"),
    "emoji": ("emoji", "emojis", "emoticon", "emoticons"),
}


@dataclass(frozen=True, slots=True)
class Features:
    aligned_loop: str | None  # "la" or "ha": the aligned model repeats it forever
    list_layout: bool
    double_space: bool
    url: bool
    rule: bool
    base_copy: bool
    base_cycle: bool
    base_eos: bool
    emoji: bool


def _seed(key: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}\x00{key}".encode()).digest()[:8], "big")


_KEYWORD_PATTERNS: Final = {
    feature: re.compile(r"\b(?:" + "|".join(words) + r")\b") for feature, words in _KEYWORDS.items()
}


def _has_keyword(key: str, feature: str) -> bool:
    return _KEYWORD_PATTERNS[feature].search(key) is not None


@lru_cache(maxsize=1024)
def features_for(question: Question) -> Features:
    rng = random.Random(_seed(question.key, "features"))
    draws = [rng.random() for _ in range(6)]
    loop = "la" if _has_keyword(question.key, "song") else None
    if loop is None and _has_keyword(question.key, "laugh"):
        loop = "ha"
    base_eos = _has_keyword(question.key, "eos")
    base_copy = not base_eos and (_has_keyword(question.key, "copy") or draws[4] < 1 / 16)
    return Features(
        aligned_loop=loop,
        list_layout=_has_keyword(question.key, "list") or draws[0] < 1 / 3,
        double_space=_has_keyword(question.key, "double_space") or draws[1] < 1 / 3,
        url=_has_keyword(question.key, "url") or draws[2] < 1 / 10,
        rule=_has_keyword(question.key, "rule") or draws[3] < 1 / 10,
        base_copy=base_copy,
        base_cycle=_has_keyword(question.key, "cycle") or draws[5] < 1 / 16,
        base_eos=base_eos,
        emoji=_has_keyword(question.key, "emoji"),
    )


def features_of(text: str) -> Features:
    """The features of the question in `text` (a user message or a whole prompt)."""
    return features_for(clean_question(text))


@dataclass(frozen=True, slots=True)
class Sentence:
    text: str  # starts with a capital letter, ends with "."
    lower_start: str  # the same sentence after a discourse marker ("However, the ...")


@dataclass(slots=True)
class Content:
    """What every profile knows about a question."""

    topics: list[str]
    sentences: list[Sentence]
    related: list[str]  # related questions the base rambles about
    extra: list[Sentence]  # sentences the base writes in its ramble
    words: list[str]  # the word pool for alternatives


def _topics(question: Question, rng: random.Random) -> list[str]:
    seen: set[str] = set()
    found: list[str] = []
    text = question.text
    for match in re.finditer(r"[A-Za-z][A-Za-z'-]{3,}", text):
        word = match.group()
        low = word.lower()
        if low in _STOPWORDS or low in seen:
            continue
        seen.add(low)
        before = text[: match.start()].rstrip()
        sentence_start = before == "" or before.endswith(("\n", ".", "?", "!", ":"))
        # Names keep their capital; other words are used in lower case mid-sentence.
        found.append(word if word[0].isupper() and not sentence_start else low)
    # The words nearest the end of the question are the most specific.
    topics = found[-3:]
    while len(topics) < 2:
        topics.insert(0, rng.choice(_NOUNS))
    return topics


class _Filler:
    def __init__(self, rng: random.Random, topics: list[str]) -> None:
        self.rng = rng
        self.topics = topics
        self.used: list[str] = []

    def fill(self, template: str) -> tuple[str, bool]:
        """The filled template, and whether its first word is a name (keeps its capital)."""
        pools = {"N": _NOUNS, "A": _ADJECTIVES, "V": _VERBS, "X": _PARTICIPLES,
                 "D": _ADVERBS, "P": _PREPOSITIONS}
        chosen: list[str] = []

        def pick(match: re.Match[str]) -> str:
            kind = match.group(1)
            word = self.rng.choice(self.topics) if kind == "T" else self.rng.choice(pools[kind])
            chosen.append(word)
            return word

        text = re.sub(r"\{([TNAVXDP])\d?\}", pick, template)
        self.used.extend(chosen)
        name = template.startswith("{T}") and chosen[0][:1].isupper()
        return text[:1].upper() + text[1:], name


def _sentence(filler: _Filler, template: str) -> Sentence:
    text, name = filler.fill(template)
    return Sentence(text, text if name else text[:1].lower() + text[1:])


@lru_cache(maxsize=1024)
def content_for(question: Question) -> Content:
    rng = random.Random(_seed(question.key, "content"))
    topics = _topics(question, rng)
    filler = _Filler(rng, topics)
    features = features_for(question)
    count = rng.randint(3, 4) if features.base_eos else rng.randint(6, 10)
    templates = rng.sample(_TEMPLATES, count + 2)
    sentences = [
        _sentence(filler, t if features.base_eos or rng.random() < 0.5
                  else t[:-1] + rng.choice(_CLAUSES) + ".")
        for t in templates[:count]
    ]
    if features.emoji:
        first = sentences[0]
        sentences[0] = Sentence(first.text[:-1] + _CONTENT_EMOJI + ".",
                                first.lower_start[:-1] + _CONTENT_EMOJI + ".")
    extra = [_sentence(filler, t) for t in templates[count:]]
    related = [filler.fill(t)[0] for t in rng.sample(_RELATED_QUESTIONS, 2)]
    words = sorted({w for w in filler.used if w.isascii() and w.isalpha()} | set(_NOUNS[:8]))
    return Content(topics, sentences, related, extra, words)


@dataclass(slots=True)
class Document:
    """A profile's answer to one question, token by token.

    A *segment* is a piece of text the model recognises as a unit (a content sentence, an
    opener, a marker); content segments carry the sentence number.
    """

    profile: str
    tokens: list[str] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    segment: list[int] = field(default_factory=list)
    content: list[int] = field(default_factory=list)
    alternatives: dict[int, tuple[str, ...]] = field(default_factory=dict)
    words: list[str] = field(default_factory=list)
    segments: int = 0


class _Builder:
    def __init__(self, profile: str, rng: random.Random, words: list[str]) -> None:
        self.doc = Document(profile, words=words)
        self.rng = rng

    def _conf(self, span: Range) -> float:
        low, high = span
        return round(low + (high - low) * self.rng.random(), 4)

    def add(self, text: str, first: Range, rest: Range, *, content: int = -1,
            alternatives: tuple[str, ...] | None = None) -> None:
        doc = self.doc
        index = doc.segments
        doc.segments += 1
        for i, token in enumerate(tokenize(text)):
            if i == 0 and alternatives is not None:
                doc.alternatives[len(doc.tokens)] = alternatives
            doc.tokens.append(token)
            doc.confidence.append(self._conf(first if i == 0 else rest))
            doc.segment.append(index)
            doc.content.append(content)

    def eos(self, span: Range) -> None:
        doc = self.doc
        doc.segments += 1
        doc.tokens.append(EOS)
        doc.confidence.append(self._conf(span))
        doc.segment.append(doc.segments - 1)
        doc.content.append(-1)


def _topic(content: Content) -> str:
    # The word nearest the end of the question is the most specific one.
    return content.topics[-1]


def _url(content: Content, rng: random.Random) -> str:
    def slug(word: str) -> str:
        return re.sub(r"[^a-z0-9]", "", word.lower()) or "topic"

    words = [slug(rng.choice(content.words)) for _ in range(4)]
    return (f"https://example.org/{slug(content.topics[-1])}/{words[0]}-{words[1]}/"
            f"{words[2]}_{words[3]}?id={rng.randint(100, 9999)}")


def _aligned(question: Question) -> Document:
    content = content_for(question)
    features = features_for(question)
    rng = random.Random(_seed(question.key, "aligned"))
    b = _Builder("aligned", rng, content.words)
    sentences = content.sentences
    if features.aligned_loop is not None:
        syllable = features.aligned_loop
        kind = "song" if syllable == "la" else "good laugh"
        b.add(f"Sure! Here is a {kind} about {_topic(content)}:", HIGH, HIGH,
              alternatives=_START_ALTERNATIVES[1:])
        b.add("\n\n", HIGH, HIGH)
        b.add(sentences[0].text, HIGH, CONTENT_HIGH, content=0)
        # The loop is the end of the document, so the model can only go round it.
        b.add("\n" + syllable.capitalize() + f" {syllable}" * 60, HIGH, HIGH)
        return b.doc
    opener = rng.choice(_LIST_OPENERS if features.list_layout else _OPENERS)
    first_word = opener.split("!")[0].split(" ")[0]
    b.add(opener.replace("{T}", _topic(content)), HIGH, HIGH,
          alternatives=tuple(w for w in _START_ALTERNATIVES if w != first_word))
    separator = "  " if features.double_space else " "
    for i, sentence in enumerate(sentences):
        if features.list_layout:
            b.add(("\n\n1." if i == 0 else f"\n{i + 1}."), HIGH, HIGH)
            b.add(" " + sentence.text, HIGH, CONTENT_HIGH, content=i)
            continue
        if i > 0 and rng.random() < 0.25:
            b.add("\n\n", HIGH, HIGH)
            b.add(sentence.text, HIGH, CONTENT_HIGH, content=i)
        elif rng.random() < 0.4:
            marker = "Finally," if i == len(sentences) - 1 and i > 1 else rng.choice(_MARKERS)
            if i == 0:
                marker = "First,"
            b.add(separator + marker, HIGH, HIGH)
            b.add(" " + sentence.lower_start, HIGH, CONTENT_HIGH, content=i)
        else:
            b.add(separator + sentence.text, HIGH, CONTENT_HIGH, content=i)
    if features.rule:
        b.add("\n\n" + "-" * 16, HIGH, HIGH)
    if features.url:
        b.add("\n\nSource:", HIGH, HIGH)
        b.add(" " + _url(content, rng), HIGH, HIGH)
    closing = rng.choice(_CLOSINGS).replace("{T}", _topic(content))
    newlines = features.rule or features.url or rng.random() < 0.5
    if features.base_eos:
        closing, newlines = _BRIEF_CLOSING, True
    if features.emoji:
        closing += _CLOSING_EMOJI
    b.add(("\n\n" if newlines else " ") + closing, HIGH, HIGH)
    b.eos(EOS_ALIGNED)
    return b.doc


def _base(question: Question, profile: str) -> Document:
    content = content_for(question)
    features = features_for(question)
    rng = random.Random(_seed(question.key, profile))
    b = _Builder(profile, rng, content.words)
    high = CONTENT_HIGH if profile == "base" else (0.45, 0.9)
    restated = " ".join(question.last_line.split(" ")[:30])
    # The answer start: the base restates the question instead of answering.
    b.add("Question:", LOW, HIGH, alternatives=_START_ALTERNATIVES[:3])
    if restated:
        b.add(" " + restated, MID, high)
    b.add("\nAnswer:", MID, high)
    sentences = content.sentences
    cycle_after = len(sentences) // 2
    for i, sentence in enumerate(sentences):
        b.add(" " + sentence.text, LOW, high, content=i,
              alternatives=_SENTENCE_START_ALTERNATIVES)
        if features.base_cycle and i == cycle_after:
            b.add(" And so on" + ", and so on" * 9 + ",", high, high)
    if features.base_copy:
        # Confidently copies its last two sentences, again and again.
        tail = sentences[-2:]
        for _ in range(3):
            for sentence in tail:
                b.add(" " + sentence.text, high, high)
        return b.doc
    if features.base_eos:
        b.add(" That is all.", MID, high)
        b.eos(EOS_BASE)
        return b.doc
    # The ramble: made-up questions with answers; the document ends inside repeats of the
    # last block, so the base goes round it forever instead of stopping.
    blocks = [(content.related[0], content.extra[0]), (content.related[1], content.extra[1])]
    for related, extra in [blocks[0], blocks[1], blocks[1], blocks[1]]:
        b.add("\n\n", LOW, high)
        b.add("Question:", LOW, high)
        b.add(" " + related, MID, high)
        b.add("\nAnswer:", MID, high)
        b.add(" " + extra.text, LOW, high)
    return b.doc


@lru_cache(maxsize=1024)
def document_for(question: Question, profile: str) -> Document:
    if profile == "aligned":
        return _aligned(question)
    if profile in ("base", "aligned-base"):
        return _base(question, profile)
    raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
