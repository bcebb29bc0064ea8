"""The synthetic AdvertiseGen generator: format, determinism, held-out dev combinations, the oracle."""
import json

from training.gen_data import attribute_recall, attributes, generate, main, mean_attribute_recall


def test_rows_have_advertisegen_format_and_full_coverage():
    train, dev = generate(500, 50, seed=3)
    for row in train + dev:
        assert set(row) == {"content", "summary"}
        assert row["content"].startswith("类型#")
        assert all("#" in kv for kv in row["content"].split("*"))
        assert attribute_recall(row["summary"], row["content"]) == 1.0  # every value verbatim
    assert not {r["content"] for r in dev} & {r["content"] for r in train}
    assert 20 < sum(len(r["summary"]) for r in train) / len(train) < 90


def test_deterministic_from_seed():
    assert generate(50, 5, seed=7) == generate(50, 5, seed=7)
    assert generate(50, 5, seed=7) != generate(50, 5, seed=8)


def test_attribute_recall_oracle():
    content = "类型#裙*颜色#红色*图案#条纹*裙长#短裙"
    assert attributes(content) == [("颜色", "红色"), ("图案", "条纹"), ("裙长", "短裙")]
    assert attribute_recall("这条裙子，红色显白。", content) == 1 / 3
    assert attribute_recall("", content) == 0.0
    assert mean_attribute_recall(["红色条纹短裙", "蓝色"], [content, content]) == 0.5


def test_cli_writes_jsonl(tmp_path, capsys):
    main(["--out", str(tmp_path / "AdvertiseGen"), "--train", "20", "--dev", "4", "--seed", "1"])
    train = [json.loads(x) for x in (tmp_path / "AdvertiseGen" / "train.json").read_text().splitlines()]
    dev = [json.loads(x) for x in (tmp_path / "AdvertiseGen" / "dev.json").read_text().splitlines()]
    assert (len(train), len(dev)) == (20, 4)
    assert train == generate(20, 4, seed=1)[0]
    assert "wrote 20 rows" in capsys.readouterr().out
