"""The engine as a pipeline (issue 11): ``prepare`` (validate, tokenise) on any thread, ``run`` (batch,
forward, pool) on the engine's own; plans split into pieces and joined back; and texts that will be
truncated cut before they are tokenised, to exactly the ids of the whole text (issue 10)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from inference.engine import Engine, Plan
from inference.errors import InvalidRequest, JV3Error
from inference.request import EmbedRequest
from inference.settings import Settings
from inference.truncation import PrefixCut

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "jina-v3-tiny"
BATCHING_ATOL = 1e-5  # what the serving tests allow between different batch compositions on the CPU


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))


@pytest.fixture(scope="module")
def short_engine() -> Engine:
    """A 48-token limit: truncation, and the cut before it (at 47 × 8 characters), show on short texts."""
    return Engine.load(
        FIXTURE, Settings.resolve(device="cpu", dtype="float32", max_seq_length="48", max_batch_tokens="64")
    )


def requests() -> list[EmbedRequest]:
    texts = [f"text {i} " + "the white rabbit runs " * (i % 9) for i in range(30)]
    return [
        EmbedRequest(texts=texts[:12], task="retrieval.query"),
        EmbedRequest(texts=texts[12:], dimensions=16, encoding="binary"),
        EmbedRequest(texts=["bad"], task="retrival.query"),  # fails in prepare, keeps its place
        EmbedRequest(texts=["Organic skincare", "with aloe vera", "and chamomile"], late_chunking=True),
        EmbedRequest(texts=["跟着白兔走。", "x", ""], normalized=False, ids=["a", "b", "c"]),
    ]


# ------------------------------------------------------------------------------------ prepare / run


def test_prepare_then_run_is_embed_many(engine):
    # GIVEN the same requests embedded in one call, and prepared one by one then run together
    together = engine.embed_many(requests())
    plans = [engine.prepare(r) for r in requests()]
    staged = engine.run(plans)
    # THEN the plans count their slots from 0, the bad request is its error in its place, and every
    # vector is the same (the same sequences make the same batches)
    assert isinstance(plans[2], InvalidRequest) and "retrival.query" in plans[2].message
    assert all(p.sequences[0].slots.min() == 0 for p in plans if isinstance(p, Plan))
    for a, b in zip(together, staged, strict=True):
        if isinstance(a, JV3Error):
            assert type(a) is type(b) and a.message == b.message
            continue
        np.testing.assert_array_equal(a.embeddings, b.embeddings)
        assert (a.token_counts, a.encoding, a.ids, a.extra) == (b.token_counts, b.encoding, b.ids, b.extra)
    # AND embed_many takes prepared plans as they are (the server hands its batchers plans)
    mixed = engine.embed_many([plans[0], requests()[1]])
    np.testing.assert_array_equal(mixed[0].embeddings, together[0].embeddings)
    np.testing.assert_array_equal(mixed[1].embeddings, together[1].embeddings)


def test_pieces_joined_back_equal_the_whole_plan(engine):
    # GIVEN a plan split into pieces of at most 200 tokens, each piece run in its own call, in reverse
    request = EmbedRequest(
        texts=[f"{i} " + "lorem ipsum dolor sit " * (i % 13) for i in range(60)], ids=list(range(60))
    )
    whole = engine.embed(request)
    plan = engine.prepare(request)
    pieces = plan.split(200)
    assert len(pieces) > 5 and all(p.tokens <= 200 or p.n_slots == 1 for p in pieces)  # a longer text: alone
    results = [engine.run([p])[0] for p in reversed(pieces)][::-1]
    joined = plan.join(pieces, results)
    # THEN every row is back in its place
    np.testing.assert_allclose(joined.embeddings, whole.embeddings, atol=BATCHING_ATOL)
    assert (
        joined.token_counts == whole.token_counts
        and joined.ids == request.ids
        and joined.extra == whole.extra
    )
    # AND an error of any piece is the plan's error; a late-chunking plan is never split
    failure = InvalidRequest("boom")
    assert plan.join(pieces, [*results[:-1], failure]) is failure
    late = engine.prepare(EmbedRequest(texts=["a b c " * 50, "d e f " * 50], late_chunking=True))
    assert late.split(10) == [late]


def test_prepare_on_many_threads_beside_run(engine):
    """Handler threads tokenise while the batcher runs: the tokenizer is only read, so results agree."""
    batch = [EmbedRequest(texts=[f"thread text {i} " * (1 + i % 17) for i in range(40)]) for _ in range(6)]
    serial = [engine.prepare(r) for r in batch]
    got: dict[int, Plan] = {}
    stop = threading.Event()

    def keep_running():
        while not stop.is_set():
            engine.run([serial[0]])

    def prepare(i):
        got[i] = engine.prepare(batch[i])

    runner = threading.Thread(target=keep_running)
    runner.start()
    try:
        threads = [threading.Thread(target=prepare, args=(i,)) for i in range(len(batch))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        stop.set()
        runner.join(timeout=60)
    for i, plan in enumerate(serial):
        assert [s.ids for s in got[i].sequences] == [s.ids for s in plan.sequences]


# ------------------------------------------------------------------------------------ the cut before truncation


def truncated(ids: list[int], keep: int, eos: int = 2) -> list[int]:
    """What the engine keeps of a text's ids: ``keep`` of them and </s>, when there are more."""
    return ids if len(ids) <= keep + 1 else ids[:keep] + [eos]


PIECES = {
    "words": ["the", "white", "rabbit", "document", "retrieval", "chunk", "runs", "a", "Berlin"],
    "cjk": list("跟着白兔走中文字符测试的是一个我们"),  # no spaces between them
    "spaces": [" ", "  ", " " * 40, "\t", "\n", "\r\n", "\x0c", "\xa0", "\u3000", " \u3000 "],
    "removed": ["\x01", "\x0b", "\x7f", "\x1f"],  # Nmt drops these
    "marks": ["\u0301", "\u0308", "\u0327", "\u20dd", "e\u0301", " \u0301"],  # combining marks
    "emoji": ["😀", "👍🏽", "🇫🇷", "❤️‍🔥", "👨‍👩‍👧"],
    "compat": ["ﬁ", "①", "Ａ", "¨", "½", "ｶﾞ", "\u2581"],  # NFKC changes them
    "hangul": ["한국어", "\u1100\u1161\u11a8", "\u1100", "\u1161"],
    "added": ["<mask>", "<s>", "</s>", "<unk>", "<pad>"],
    "runs": ["a" * 50, "ab" * 30, "xyz" * 20],
}


def random_text(rng: random.Random, length: int) -> str:
    """Mostly one kind of piece (so that the cut lands in long CJK runs, space runs, mark clusters...)."""
    main = rng.choice(list(PIECES))
    out, size = [], 0
    while size < length:
        kind = main if rng.random() < 0.7 else rng.choice(list(PIECES))
        piece = rng.choice(PIECES[kind])
        if kind in ("words", "cjk") and rng.random() < 0.5:
            piece += rng.choice(["", " "])
        out.append(piece)
        size += len(piece)
    return "".join(out)


def test_the_cut_gives_the_ids_of_the_whole_text(tokenizer):
    """Property: for many random texts and limits, cut-then-tokenise equals tokenise-then-truncate."""
    rng = random.Random(20240611)
    spy = Spy(tokenizer)
    paths = {"cut": 0, "whole": 0}
    for trial in range(900):
        # small limits make every off-by-one at the cut likely (a prefix with exactly one id too few)
        keep = rng.choice([1, 2, 3, 4, 5, 6, 10, 25, 60])
        cut = PrefixCut.of(spy, keep)
        text = random_text(rng, rng.randint(1, 400 if keep <= 6 else 9000))
        # something to cut exactly at the first budget: a mark, a space run, an emoji...
        if rng.random() < 0.3:
            at = cut.budget
            text = text[:at].ljust(at, "x") + rng.choice([p for k in PIECES.values() for p in k]) + text[at:]
        spy.chars = 0
        got = cut.encode_batch([text])[0]
        paths["cut" if spy.chars < len(text) else "whole"] += 1
        whole = tokenizer.encode_batch([text])[0].ids
        assert truncated(got, keep) == truncated(whole, keep), (trial, keep, text[:120])
    assert paths["cut"] > 300 and paths["whole"] > 50, paths  # both ways taken, each one checked


def test_a_cut_inside_a_word_needs_the_whole_window_to_agree(tokenizer):
    """CJK without spaces, base64, a long URL: cut inside the word, proven by the prefixes ending at
    ``window`` consecutive places; the unknown-character runs fuse into one token and are never cut."""
    rng = random.Random(7)
    spy = Spy(tokenizer)
    cut = PrefixCut.of(spy, 20)
    for alphabet in ("abcdefghij", "retrievdocument", "qwertyuiopasdfghjklzxcvbnm"):
        text = "".join(rng.choice(alphabet) for _ in range(30_000))
        spy.chars = 0
        got = cut.encode_batch([text])[0]
        assert truncated(got, 20) == truncated(tokenizer.encode_batch([text])[0].ids, 20)
        assert spy.chars < len(text) // 2  # the window's prefixes, not the whole text
    cjk = "".join(rng.choice(PIECES["cjk"]) for _ in range(30_000))
    assert truncated(cut.encode_batch([cjk])[0], 20) == truncated(tokenizer.encode_batch([cjk])[0].ids, 20)


def test_a_periodic_word_is_not_cut_where_its_end_decides_its_start():
    """With pieces "a" and "aa", "aaa…a" starts with "a" when its length is odd and "aa" when it is even:
    cutting inside the word would be wrong. The window's prefixes disagree, so the text is whole."""
    tok = unigram([("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -1.0), ("a", -1.5), ("aa", -1.0)])
    cut = PrefixCut.of(tok, 10)
    text = "a" * 2001  # odd: ▁ a aa aa …
    naive = tok.encode_batch([text[: cut.budget]])[0].ids  # even: ▁ aa aa …
    whole = tok.encode_batch([text])[0].ids
    assert truncated(naive, 10) != truncated(whole, 10)
    assert cut.encode_batch([text])[0] == whole


def test_the_last_token_of_a_prefix_is_never_counted():
    """A cut inside a run of spaces leaves the prefix a trailing "▁" that the whole text joins to its next
    word ("▁ab"): with exactly one id too few counted, it must not be taken for the text's."""
    tok = unigram([("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -1.0), ("a", -2.0), ("b", -2.0), ("x", -2.0),
                   ("▁ab", -1.0), ("▁" + "x" * 23, -1.0)])  # fmt: skip
    cut = PrefixCut.of(tok, 3)  # first cut at the separator at or after 24 characters
    text = "x" * 23 + "  ab" * 10
    prefix = tok.encode_batch([text[: cut.budget]])[0]
    # 3 + 1 ids: one too few once the trailing "▁" is not counted
    assert prefix.tokens == ["<s>", "▁" + "x" * 23, "▁", "</s>"]
    whole = tok.encode_batch([text])[0].ids
    assert truncated(cut.encode_batch([text])[0], 3) == truncated(whole, 3) == whole[:3] + [2]


def test_where_a_cut_inside_a_word_may_fall(tokenizer):
    cut = PrefixCut.of(tokenizer, 10)
    for ch in "a字Z7.,!$€😀":
        assert cut._simple(ch), ch
    # marks, Hangul, regional indicators, skin tones, NFKC-changed, "▁", spaces, controls
    never = "\u0301\u1161가\U0001f1eb\U0001f3fdﬁＡ\u2581 \u3000\x01\u200d"
    for ch in never:
        assert not cut._simple(ch), ch
    # and never inside an added token: "<mask>" is one token, "<ma" and "sk>" are text
    text = "x" * 200 + "<mask>" * 40
    assert cut._inside_added(text, 203, 204) and not cut._inside_added(text, 200, 201)
    assert truncated(cut.encode_batch([text * 30])[0], 10) == truncated(
        tokenizer.encode_batch([text * 30])[0].ids, 10
    )


def test_structures_the_cut_is_not_proven_for_are_not_cut():
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -1.0), ("a", -1.5)]
    assert PrefixCut.of(unigram(vocab), 10) is not None
    assert PrefixCut.of(unigram(vocab, normalizer=normalizers.Lowercase()), 10) is None
    assert PrefixCut.of(unigram(vocab, pre_tokenizer=pre_tokenizers.Metaspace(split=False)), 10) is None
    bpe = Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    assert PrefixCut.of(bpe, 10) is None


def test_the_engine_cuts_only_what_it_truncates(short_engine):
    spy = Spy(short_engine.tokenizer)
    engine = Engine(short_engine.model, spy, settings=short_engine.settings, instructions=short_engine.instructions,
                    tasks=short_engine.tasks)  # fmt: skip
    text = "the white rabbit runs " * 2000  # 44,000 characters, far past 48 tokens
    for task in ("retrieval.query", "text-matching"):  # with and without an instruction in front
        spy.chars = 0
        plan = engine.prepare(EmbedRequest(texts=[text, "short"], task=task))
        whole = short_engine.tokenizer.encode_batch([engine.instructions[task] + text])[0].ids
        assert plan.sequences[0].ids == truncated(whole, 47) and plan.token_counts[0] == 48
        assert spy.chars < 2_000
    # refused past the limit: tokenised whole, so that the message can say how long it is
    refused = engine.prepare(EmbedRequest(texts=[text], truncate=False))
    assert isinstance(refused, InvalidRequest) and "over the limit of 48" in refused.message


def test_a_5_mb_truncated_text_tokenises_a_sliver_of_it(engine):
    spy = Spy(engine.tokenizer)
    cutting = Engine(
        engine.model, spy, settings=engine.settings, instructions=engine.instructions, tasks=engine.tasks
    )
    text = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. " * 65_000)[
        : 5 * 2**20
    ]
    result = cutting.embed(EmbedRequest(texts=[text]))
    assert result.token_counts == [engine.max_seq_length] and result.embeddings.shape == (
        1,
        engine.hidden_size,
    )
    assert spy.chars < 0.03 * len(text), spy.chars  # ~65,000 of 5,242,880 characters
    # AND it begins as a text just long enough to need truncating, tokenised whole, does
    head = text[: spy.chars + 1000]
    np.testing.assert_array_equal(
        cutting.prepare(EmbedRequest(texts=[text])).sequences[0].ids,
        truncated(engine.tokenizer.encode_batch([head])[0].ids, engine.max_seq_length - 1),
    )


# ------------------------------------------------------------------------------------ helpers


class Spy:
    """A tokenizer that counts the characters it is asked to tokenise."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer, self.chars = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode_batch(self, texts, *args, **kwargs):
        self.chars += sum(len(t) for t in texts)
        return self._tokenizer.encode_batch(texts, *args, **kwargs)


def unigram(vocab, *, normalizer=None, pre_tokenizer=None) -> Tokenizer:
    """An XLM-R shaped tokenizer over ``vocab``: NFKC and space runs collapsed, Metaspace, <s> … </s>."""
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    tok.normalizer = normalizer or normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return tok
