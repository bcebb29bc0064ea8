"""Synthetic AdvertiseGen-style data (attributes -> ad copy), deterministic from a seed.

`python -m training.gen_data --out DIR --train N --dev M --seed S` writes DIR/train.json and
DIR/dev.json as JSON lines `{"content": "类型#裙*颜色#红色*...", "summary": "..."}`, the format of
THUDM's AdvertiseGen. Every attribute value appears verbatim in its summary, so
`attribute_recall(prediction, content)` is an exact oracle. Dev rows never repeat a train content.
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# key -> (values, clause templates mentioning {v} verbatim)
SHARED: dict[str, tuple[list[str], list[str]]] = {
    "版型": (["宽松", "修身", "显瘦", "直筒", "收腰"],
           ["{v}的版型穿着舒适", "{v}版型修饰身形", "采用{v}的剪裁，上身利落"]),
    "材质": (["牛仔布", "雪纺", "棉", "针织", "蕾丝", "羊毛", "真丝"],
           ["{v}面料亲肤透气", "选用{v}材质，手感柔软", "{v}的质地轻盈舒适"]),
    "颜色": (["红色", "蓝色", "白色", "黑色", "粉色", "绿色", "黄色", "灰色"],
           ["{v}的配色衬托好气色", "经典的{v}百搭耐看", "清新的{v}给人宁静之感"]),
    "风格": (["简约", "复古", "性感", "休闲", "街头", "文艺", "通勤", "甜美"],
           ["{v}的风格彰显品味", "整体走{v}路线", "{v}气息扑面而来"]),
    "图案": (["条纹", "格子", "刺绣", "印花", "波点", "线条", "字母"],
           ["{v}元素充满活力", "点缀{v}图案，俏皮有趣", "{v}的设计增添看点"]),
}


@dataclass(frozen=True)
class GarmentType:
    name: str
    measure: str  # 件 / 条
    noun_key: str  # the attribute whose value names the garment ("这条百褶裙")
    keys: dict[str, tuple[list[str], list[str]]]


TYPES = (
    GarmentType("上衣", "件", "衣样式", {
        "衣样式": (["衬衫", "卫衣", "毛衣", "外套", "T恤", "针织衫"], ["{v}的款式百搭实穿"]),
        "衣领型": (["圆领", "翻领", "V领", "立领", "高领"], ["{v}设计修饰颈部线条", "{v}的领口精致大方"]),
        "衣袖型": (["灯笼袖", "泡泡袖", "喇叭袖", "落肩袖"], ["{v}增添浪漫感", "{v}的袖型遮肉显瘦"]),
        "衣款式": (["破洞", "口袋", "拼接", "系带", "纽扣"], ["{v}细节别出心裁", "{v}的点缀彰显个性"]),
    }),
    GarmentType("裙", "条", "裙型", {
        "裙型": (["百褶裙", "A字裙", "连衣裙", "半身裙", "包臀裙"], ["{v}的裙型灵动飘逸"]),
        "裙长": (["短裙", "中长裙", "长裙", "及膝裙"], ["{v}的长度秀出美腿", "{v}的设计优雅得体"]),
        "裙款式": (["荷叶边", "开叉", "腰带", "木耳边", "不规则"], ["{v}装饰浪漫灵动", "{v}的细节增添层次"]),
    }),
    GarmentType("裤", "条", "裤型", {
        "裤型": (["阔腿裤", "直筒裤", "哈伦裤", "牛仔裤", "打底裤"], ["{v}的裤型利落有型"]),
        "裤长": (["九分裤", "七分裤", "长裤", "短裤"], ["{v}的长度露出脚踝", "{v}的设计清爽利落"]),
        "裤腰型": (["高腰", "中腰", "松紧腰"], ["{v}设计拉长腿部比例", "{v}的腰型舒适贴合"]),
        "裤款式": (["破洞", "口袋", "卷边", "拉链", "抽绳"], ["{v}细节时髦有型", "{v}的设计实用又好看"]),
    }),
)
CLOSERS = ("尽显女性独特魅力。", "轻松穿出时尚感。", "日常出街回头率满满。", "让你美得与众不同。", "舒适又有型。")


def make_row(rng: random.Random) -> dict[str, str]:
    t = rng.choice(TYPES)
    keys = {**SHARED, **t.keys}
    chosen = rng.sample(list(keys), rng.randint(2, min(6, len(keys))))
    pairs = [(k, rng.choice(keys[k][0])) for k in keys if k in chosen]  # fixed key order
    content = "*".join([f"类型#{t.name}"] + [f"{k}#{v}" for k, v in pairs])
    noun = dict(pairs).get(t.noun_key, t.name)
    clauses = [rng.choice(keys[k][1]).format(v=v) for k, v in pairs if k != t.noun_key]
    rng.shuffle(clauses)
    summary = f"这{t.measure}{noun}，" + "，".join(clauses) + ("。" if clauses else "") + rng.choice(CLOSERS)
    return {"content": content, "summary": summary}


def generate(n_train: int, n_dev: int, seed: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train rows, then dev rows whose content never occurs in train (held-out combinations)."""
    rng = random.Random(seed)
    train = [make_row(rng) for _ in range(n_train)]
    seen = {r["content"] for r in train}
    dev: list[dict[str, str]] = []
    for _ in range(1000 * max(n_dev, 1)):
        if len(dev) == n_dev:
            break
        row = make_row(rng)
        if row["content"] not in seen:
            seen.add(row["content"])
            dev.append(row)
    if len(dev) < n_dev:
        raise ValueError(f"could not find {n_dev} unseen attribute combinations for dev")
    return train, dev


def attributes(content: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a content string, without 类型."""
    pairs = [tuple(kv.split("#", 1)) for kv in content.split("*") if "#" in kv]
    return [(k, v) for k, v in pairs if k != "类型"]


def attribute_recall(prediction: str, content: str) -> float:
    """Fraction of the content's attribute values that appear verbatim in the prediction."""
    pairs = attributes(content)
    return sum(v in prediction for _, v in pairs) / len(pairs) if pairs else 1.0


def mean_attribute_recall(predictions: Iterable[str], contents: Iterable[str]) -> float:
    scores = [attribute_recall(p, c) for p, c in zip(predictions, contents, strict=True)]
    return sum(scores) / len(scores) if scores else 0.0


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for train.json and dev.json")
    p.add_argument("--train", type=int, default=1000, help="number of train rows")
    p.add_argument("--dev", type=int, default=100, help="number of dev rows")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    train, dev = generate(a.train, a.dev, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, a.out / "train.json")
    write_jsonl(dev, a.out / "dev.json")
    print(f"wrote {len(train)} rows to {a.out / 'train.json'} and {len(dev)} rows to {a.out / 'dev.json'}")


if __name__ == "__main__":
    main()
