"""Cut a text that will be truncated before tokenising it, with exactly the whole text's ids (issue 10).

A 5 MB text sent with ``truncate: true`` was tokenised whole to keep at most ``JV3_MAX_SEQ_LENGTH``
ids. ``PrefixCut`` tokenises only a prefix, where the tokenizer's structure makes that provably exact;
for any other structure ``PrefixCut.of`` returns None and the engine tokenises the whole text.
"""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata

from tokenizers import Tokenizer


class PrefixCut:
    """Tokenise a long text only as far as truncation keeps it, with exactly the whole text's ids.

    A 5 MB text sent with ``truncate: true`` used to be tokenised whole (tens of seconds) to keep
    ``keep`` ids. Instead a prefix is tokenised, cut where the tokenizer provably treats the text
    before the cut as it would inside the whole text, and accepted only when its ids up to ``keep``
    cannot depend on anything after the cut. ``of`` accepts only the structure this is proven for
    (XLM-R's): a Unigram model behind Metaspace splitting on spaces, a normaliser made of Nmt, NFC,
    NFKC, SentencePiece's Precompiled map and the collapse of space runs, and a post-processor that
    closes with one special token; anything else is tokenised whole, as before.

    Why the cut is exact. Normalising: Nmt and NFC/NFKC map each character alone, except that
    composition may merge a character into the one before it, and Precompiled maps each grapheme
    cluster; so the text before a cut normalises as it does inside the whole text when the
    character at the cut starts a cluster and composes with nothing before it. Splitting: Metaspace
    splits the normalised text into words at spaces and Unigram tokenises each word alone, so:
    - *Cut at a space* (``_separator_cut``: a separator that normalises to a space, at or after the
      character budget): every word of the prefix is a whole word of the text; only the prefix's last
      token can differ (a trailing "▁" that the text joins to its next word).
    - *Cut inside a word* (``_window_cut``, when no space comes within the budget after it: CJK, a
      long URL, base64). Unigram's Viterbi keeps, for each position, the best path ending there,
      computed from the characters before it only; the whole word's best path passes a token boundary
      in every ``window`` consecutive positions (no piece is longer than ``window`` characters), and up
      to a boundary it is the best path to that boundary, that is, the tokenisation of the prefix
      ending there. So when the prefixes ending at each of ``window`` consecutive positions all start
      with the same ``keep`` ids, the whole text starts with them too. It costs ``window`` prefixes,
      so it is tried only on texts over ``window + 2`` times the cut; if they disagree (a periodic run
      such as "aaaa…" whose tokens depend on where it ends) the text is tokenised whole.
    A prefix's last token is never counted (fused unknown characters or the trailing "▁" can run on
    in the text), nor its closing special token: a prefix is accepted when ``len(ids) - 2 >= keep``.
    Too few ids: the next cut is further on, by the characters per token seen so far (at least
    twice as far), until it would pass the end: then the whole text.

    Characters at a cut (``_simple``): a letter, number, punctuation or symbol that the tokenizer's
    normaliser leaves as it is, that no canonical composition merges into the character before it,
    that does not join a grapheme cluster with its neighbour (Hangul jamo and syllables, regional
    indicators, emoji modifiers, prepended letters); and no cut falls inside an added token ("<mask>"
    cut in two would be tokenised as text). Combining marks, controls, format characters, spaces and
    "▁" are never cut at. Thread-safe: only reads the tokenizer.
    """

    CHARS_PER_TOKEN = 8  # first cut at keep × 8 characters: English runs ~4 a token, CJK ~1.5
    MAX_WINDOW = 64  # longer pieces would make the inside-word proof cost more than it saves
    SEPARATORS = " \t\n\r\x0c\xa0\u3000"  # those the normaliser turns into a space are cut at
    # Letters of Grapheme_Cluster_Break=Prepend (Unicode 15): they join the character after them.
    PREPEND = frozenset("\u0d4e\U000111c2\U000111c3\U0001193f\U00011941\U00011a3a\U00011a84\U00011a85\U00011a86"
                        "\U00011a87\U00011a88\U00011a89\U00011d46\U00011f02\u0600\u0601\u0602\u0603\u0604\u0605"
                        "\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd")  # fmt: skip

    def __init__(self, tokenizer: Tokenizer, keep: int, *, separators: str, excluded: frozenset[str], added: tuple[str, ...], window: int):
        self.tokenizer = tokenizer
        self.keep = keep
        self.budget = keep * self.CHARS_PER_TOKEN
        self.window = window
        self._separator = re.compile(f"[{re.escape(separators)}]") if separators else None
        self._excluded = excluded  # never cut at: "▁", and the characters of added tokens matched after normalising
        self._added = added  # added tokens matched in the text as it is: a cut must not fall inside one
        self._normalizer = tokenizer.normalizer
        self._simple_chars: dict[str, bool] = {}

    @classmethod
    def of(cls, tokenizer: Tokenizer, keep: int) -> PrefixCut | None:
        """The cut for this tokenizer, or None when its structure is not one the cut is exact for."""
        spec = json.loads(tokenizer.to_str())
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        if model.get("type") != "Unigram" or model.get("byte_fallback") or keep < 1:
            return None
        if pre.get("type") != "Metaspace" or not pre.get("split", True) or not _normalizer_is_local(spec.get("normalizer")):
            return None
        added = spec.get("added_tokens") or []
        if any(t.get("single_word") for t in added):  # matched only as whole words: depends on what follows
            return None
        probe = tokenizer.encode_batch(["a"])[0].special_tokens_mask  # <s> … </s>: one closing special token
        if len(probe) < 2 or probe[-1] != 1 or probe[-2] != 0:
            return None
        replacement = pre.get("replacement", "\u2581")
        # An added token matched after normalising could be formed across a cut from other characters
        # (NFKC makes "＜" a "<"): never cut at its characters. One matched in the text as it is: never
        # cut inside an occurrence of it.
        excluded = frozenset("".join(t.get("content", "") for t in added if t.get("normalized"))) | {replacement}
        verbatim = tuple(t["content"] for t in added if not t.get("normalized") and len(t.get("content", "")) > 1)
        normalize = tokenizer.normalizer.normalize_str if tokenizer.normalizer is not None else (lambda s: s)
        separators = "".join(
            c for c in cls.SEPARATORS if normalize(c) == " " and c not in excluded and not any(c in a for a in verbatim)
        )
        window = max(len(piece) for piece in tokenizer.get_vocab(with_added_tokens=False))
        return cls(tokenizer, keep, separators=separators, excluded=excluded, added=verbatim, window=max(window, 1))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids; for a text past the budget possibly a prefix's, which starts with exactly the
        whole text's first ``keep`` ids and is longer than ``keep + 1``, so truncation gives the same ids."""
        out: list[list[int] | None] = [None] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= self.budget]
        if short:
            for i, enc in zip(short, self.tokenizer.encode_batch([texts[i] for i in short]), strict=True):
                out[i] = enc.ids
        for i, text in enumerate(texts):
            if out[i] is None:
                out[i] = self._encode_long(text)
        return out

    def _encode_long(self, text: str) -> list[int]:
        start = self.budget
        while start < len(text):
            cut = self._separator_cut(text, start)
            inside = cut is None
            if inside:
                cut = self._window_cut(text, start)
                if cut is None or len(text) < (self.window + 2) * cut:
                    break  # nowhere exact to cut, or proving it would cost more than the whole text
            ids = self._ids([text[:cut]])[0]
            settled = len(ids) - 2  # neither the last token nor the closing special token
            if settled >= self.keep:
                if not inside:
                    return ids
                others = self._ids([text[:y] for y in range(cut + 1, cut + self.window)])
                if all(len(o) - 2 >= self.keep and o[: self.keep] == ids[: self.keep] for o in others):
                    return ids
                break  # the word's end decides its start
            # too few ids: go as far again as the characters per token so far say is needed, at least twice
            start = max(2 * cut, math.ceil(cut * (self.keep + 2) / max(settled, 1) * 1.25))
        return self._ids([text])[0]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def _separator_cut(self, text: str, start: int) -> int | None:
        """The first separator at or after ``start`` (within one budget), that ends a grapheme cluster."""
        if self._separator is None:
            return None
        end = min(len(text), start + self.budget)
        match = self._separator.search(text, start, end)
        while match is not None:
            at = match.start()
            before = text[at - 1]
            if before != "\r" and before not in self.PREPEND:  # CR LF and Prepend × are one cluster
                return at
            match = self._separator.search(text, at + 1, end)
        return None

    def _window_cut(self, text: str, start: int) -> int | None:
        """The first ``c`` at or after ``start`` (within one budget) with ``text[c-1 : c+window]`` all
        ``_simple`` and no added token across any of them: the cut and the ``window - 1`` positions after
        it are all exact cuts."""
        if self.window > self.MAX_WINDOW:
            return None
        run, need = 0, self.window + 1
        for j in range(start - 1, min(len(text), start + self.budget)):
            if self._simple(text[j]):
                run += 1
                if run == need:
                    c = j - self.window + 1
                    if not self._inside_added(text, c, c + self.window):
                        return c
                    run = 0
            else:
                run = 0
        return None

    def _inside_added(self, text: str, first: int, end: int) -> bool:
        """Whether an added token's occurrence in ``text`` spans a cut at any of ``first..end-1``."""
        for token in self._added:
            n = len(token)
            at = text.find(token, max(first - n + 1, 0), end + n - 1)
            while at != -1:
                if at < end - 1 and at + n > first:  # it holds a position p with at < p < at + n
                    return True
                at = text.find(token, at + 1, end + n - 1)
        return False

    def _simple(self, ch: str) -> bool:
        known = self._simple_chars.get(ch)
        if known is None:
            code = ord(ch)
            known = (
                unicodedata.category(ch)[0] in "LNPS"
                and unicodedata.combining(ch) == 0
                and ch not in self._excluded
                and ch not in self.PREPEND
                and not (0x1100 <= code <= 0x11FF or 0xA960 <= code <= 0xA97F or 0xAC00 <= code <= 0xD7FF)  # Hangul
                and not (0x1F1E6 <= code <= 0x1F1FF or 0x1F3FB <= code <= 0x1F3FF)  # regional indicators, skin tones
                and ch not in _composes_backward()
                and (self._normalizer is None or self._normalizer.normalize_str(ch) == ch)
            )
            self._simple_chars[ch] = known
        return known


def _normalizer_is_local(spec: dict | None) -> bool:
    """Normalisers whose output before a cut does not depend on the text after it (``PrefixCut``)."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_normalizer_is_local(s) for s in spec.get("normalizers", []))
    if kind == "Replace":  # XLM-R's collapse of space runs into one space
        return spec.get("pattern") == {"Regex": " {2,}"} and spec.get("content") == " "
    return kind in ("Nmt", "NFC", "NFKC", "Precompiled")


@functools.cache
def _composes_backward() -> frozenset[str]:
    """Characters that canonical composition may merge into the character before them: the second half of
    every two-character canonical decomposition (Hangul composes by rule; ``_simple`` excludes it)."""
    seconds = set()
    for code in range(0x110000):
        decomposition = unicodedata.decomposition(chr(code))
        if decomposition and not decomposition.startswith("<"):
            parts = decomposition.split()
            if len(parts) == 2:
                seconds.add(chr(int(parts[1], 16)))
    return frozenset(seconds)
