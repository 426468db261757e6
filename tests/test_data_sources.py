"""The hh, shp and se sources, local preference files, and their error messages."""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

import fixtures as fx
from dpo.data import PreferenceSource, clean_pairs, dataset_source, get_dataset, load_source
from dpo.data.hh import HHSource, extract_anthropic_prompt, hh_rows_to_data
from dpo.data.local import LocalPreferenceFiles, held_out_prompts, prompt_hash, split_of_file
from dpo.data.se import SESource, se_rows_to_data, strip_html_tags
from dpo.data.shp import SHPSource, shp_rows_to_data
from dpo.errors import DataError

REAL_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf"


def located(rows, name="rows.jsonl"):
    return [(f"{name} line {i}", row) for i, row in enumerate(rows, start=1)]


def as_plain(data):
    """The data dict with pairs as tuples, for comparison with hand-written expectations."""
    return {prompt: {**example, "pairs": [tuple(pair) for pair in example["pairs"]]} for prompt, example in data.items()}


def reported_skips(output: str) -> Counter:
    """The counts in get_dataset's 'skipped pairs with ...: 4; rows whose ...: 2' line(s)."""
    counts = Counter()
    for line in output.splitlines():
        if "; skipped " in line:
            for reason, count in re.findall(r"([^;]+): (\d+)", line.split("; skipped ", 1)[1]):
                counts[reason.strip()] += int(count)
    return counts


class FakeHub:
    """Stands in for `datasets.load_dataset`, recording what was requested."""

    def __init__(self, rows):
        self.rows = rows
        self.calls = []

    def __call__(self, name, **kwargs):
        import datasets

        self.calls.append((name, kwargs))
        return datasets.Dataset.from_list(self.rows)


@pytest.fixture
def fake_hub(monkeypatch):
    def install(rows):
        import datasets

        hub = FakeHub(rows)
        monkeypatch.setattr(datasets, "load_dataset", hub)
        return hub

    return install


# ---- hh -------------------------------------------------------------------------------------------


def test_extract_anthropic_prompt_keeps_everything_up_to_the_last_assistant_turn():
    transcript = fx.CAPITAL_PROMPT + " The capital of Italy is Rome."
    assert extract_anthropic_prompt(transcript) == fx.CAPITAL_PROMPT
    with pytest.raises(ValueError):
        extract_anthropic_prompt("\n\nHuman: hello")


def test_hh_conversion_matches_hand_computed_dict(tmp_path):
    path = fx.write_jsonl(tmp_path / "hh.jsonl.gz", fx.HH_ROWS)
    skipped = Counter()
    data = hh_rows_to_data(located(fx.read_jsonl(path)), skipped)
    assert as_plain(data) == fx.HH_EXPECTED
    assert skipped == {fx.HH_DIFFERENT_PROMPT: 1}


def test_hh_quirks_are_left_to_clean_pairs_and_counted_there():
    skipped = Counter()
    data = clean_pairs(hh_rows_to_data(located(fx.HH_ROWS), skipped), skipped)
    assert skipped == {
        fx.HH_DIFFERENT_PROMPT: 1,
        "pairs with an empty response": 1,
        "pairs with chosen == rejected": 1,
        "prompts with no usable pair or SFT target": 1,
    }
    assert set(data) == {fx.EGG_PROMPT, fx.CAPITAL_PROMPT, fx.GREETING_PROMPT}
    assert data[fx.GREETING_PROMPT]["pairs"] == [] and data[fx.GREETING_PROMPT]["sft_target"]


def test_hh_hub_load_requests_the_split_and_names_bad_rows(fake_hub):
    hub = fake_hub(fx.HH_ROWS)
    source = HHSource()
    data = source.load("test", silent=True, cache_dir="/tmp/cache")
    assert hub.calls == [("Anthropic/hh-rlhf", {"split": "test", "cache_dir": "/tmp/cache"})]
    assert as_plain(data) == fx.HH_EXPECTED
    assert source.skipped == {fx.HH_DIFFERENT_PROMPT: 1}
    assert source.truncation_mode == "keep_end"

    fake_hub(fx.HH_ROWS[:1] + [{"chosen": "Human: hi\n\nBot: hello", "rejected": "Human: hi\n\nBot: go away"}])
    with pytest.raises(DataError, match=r"^row 2 of Anthropic/hh-rlhf \(train\) is not an HH transcript: .*Assistant"):
        HHSource().load("train", silent=True)


# ---- shp ------------------------------------------------------------------------------------------


def test_shp_conversion_matches_hand_computed_dict(tmp_path):
    rows = fx.read_jsonl(fx.write_jsonl(tmp_path / "shp.jsonl", fx.SHP_ROWS))
    skipped = Counter()
    assert as_plain(shp_rows_to_data(rows, skipped)) == fx.SHP_EXPECTED
    assert skipped == fx.SHP_SKIPPED


def test_shp_hub_load_requests_the_split(fake_hub):
    hub = fake_hub(fx.SHP_ROWS)
    source = SHPSource()
    data = source.load("validation", silent=True)
    assert hub.calls == [("stanfordnlp/SHP", {"split": "validation", "cache_dir": None})]
    assert as_plain(data) == fx.SHP_EXPECTED
    assert source.skipped == fx.SHP_SKIPPED
    assert source.truncation_mode == "keep_start"


# ---- se -------------------------------------------------------------------------------------------


def test_strip_html_tags_on_stackexchange_html():
    assert strip_html_tags(fx.SE_QUESTION_HTML) == fx.SE_QUESTION_TEXT
    html = (
        "<h2>Short answer</h2>\n<p>It depends on the <a href=\"https://example.com\">version</a>"
        " &mdash; see below.<br/>Really.</p>\n"
        "<blockquote>\n  <p>Quoted   text\n  over two lines</p>\n</blockquote>\n"
        "<ul>\n<li>first &lt;item&gt;</li>\n<li><strong>second</strong> item</li>\n</ul>\n"
        "<p><img src=\"x.png\" alt=\"diagram\"></p>\n"
        "<pre><code>if (a &lt; b &amp;&amp; c) {\n    return;\n}\n</code></pre>\n"
        "<div>tail</div>"
    )
    assert strip_html_tags(html) == (
        "Short answer\n\n"
        "It depends on the version \u2014 see below.\nReally.\n\n"
        "Quoted text over two lines\n\n"
        "first <item>\n\n"
        "second item\n\n"
        "<code>if (a < b && c) {\n    return;\n}\n</code>\n\n"
        "tail"
    )
    assert strip_html_tags("  plain text, no tags  ") == "plain text, no tags"


@pytest.mark.parametrize("writer, reader, name", [
    (fx.write_parquet, fx.read_parquet, "se.parquet"),
    (fx.write_jsonl, fx.read_jsonl, "se.jsonl"),
])
def test_se_conversion_matches_hand_computed_dict(tmp_path, writer, reader, name):
    rows = reader(writer(tmp_path / name, fx.SE_ROWS))
    skipped = Counter()
    assert as_plain(se_rows_to_data(rows, skipped)) == fx.SE_EXPECTED
    assert skipped == {"answer pairs with equal scores": 1}


def test_se_hub_load_takes_the_references_1_percent_test_split(tmp_path, fake_hub):
    import datasets

    rows = fx.read_parquet(fx.write_parquet(tmp_path / "se.parquet", fx.many_se_rows(300)))
    hub = fake_hub(rows)
    test = SESource().load("test", silent=True)
    train = SESource().load("train", silent=True)
    assert hub.calls == [("HuggingFaceH4/stack-exchange-preferences", {"split": "train", "cache_dir": None})] * 2
    assert len(test) == 3 and len(train) == 297 and not set(test) & set(train)
    expected_test = datasets.Dataset.from_list(rows).shuffle(seed=42).select(range(3))
    assert set(test) == {f"\n\nHuman: {strip_html_tags(row['question'])}\n\nAssistant:" for row in expected_test}
    example = next(iter(test.values()))
    assert example["pairs"] == [(0, 1)] and example["sft_target"] == example["responses"][0]


def test_se_rejects_unknown_split_before_downloading(fake_hub):
    hub = fake_hub(fx.SE_ROWS)
    with pytest.raises(DataError, match="dataset se has splits 'train' and 'test', not 'validation'"):
        SESource().load("validation", silent=True)
    assert hub.calls == []


# ---- local files: formats -----------------------------------------------------------------------------


def test_registered_names_and_paths_resolve_to_sources(tmp_path):
    assert isinstance(dataset_source("hh"), HHSource)
    assert isinstance(dataset_source("shp"), SHPSource)
    assert isinstance(dataset_source("se"), SESource)
    path = str(tmp_path / "data.jsonl")
    source = dataset_source(path)
    assert isinstance(source, LocalPreferenceFiles) and source.name == path


@pytest.mark.parametrize("name, writer", [
    ("pairs.jsonl", fx.write_jsonl),
    ("pairs.jsonl.gz", fx.write_jsonl),
    ("pairs.json", fx.write_json_array),
    ("pairs.json.gz", fx.write_json_array),
    ("lines.json", fx.write_jsonl),
    ("pairs.parquet", fx.write_parquet),
    ("pairs.parquet.gz", fx.write_parquet),
])
def test_every_supported_file_kind_reads_the_same_pairs(tmp_path, name, writer):
    rows = fx.pair_rows(40, pairs_per_prompt=2)
    path = str(writer(tmp_path / name, rows))
    source = LocalPreferenceFiles(path)
    train = source.load("train")
    loaded_test = source.load_split("test")
    test = loaded_test.data
    assert loaded_test.truncation_mode == "keep_start"
    assert len(test) == 2 and len(train) == 38
    merged = {**train, **test}
    for row in rows:
        example = merged[row["prompt"]]
        assert row["chosen"] in example["responses"] and row["rejected"] in example["responses"]
    assert merged["Question 3: what is 3 + 3?"] == {
        "responses": [" 6.", " 7.", " 6.", " 8."], "pairs": [(0, 1), (2, 3)], "sft_target": " 6.",
    }


def test_single_file_split_is_by_hashed_prompt_deterministic_and_disjoint(tmp_path):
    rows = fx.pair_rows(101)
    forward = str(fx.write_jsonl(tmp_path / "forward.jsonl", rows))
    backward = str(fx.write_jsonl(tmp_path / "backward.jsonl", rows[::-1]))
    train, test = get_dataset(forward, "train"), get_dataset(forward, "test")
    assert len(test) == math.ceil(101 * 0.05) == 6
    assert not set(train) & set(test) and len(train) + len(test) == 101
    assert set(test) == set(sorted((row["prompt"] for row in rows), key=prompt_hash)[:6])
    assert get_dataset(backward, "test").keys() == test.keys()
    assert get_dataset(forward, "test") == test


def test_held_out_prompts_holds_out_at_least_one_of_two_and_none_of_one():
    assert len(held_out_prompts(["a", "b"])) == 1
    assert held_out_prompts(["only"]) == set()
    assert len(held_out_prompts(["a", "a", "b", "c"])) == 1  # prompts, not rows


def test_single_prompt_file_has_no_test_split(tmp_path):
    path = str(fx.write_jsonl(tmp_path / "one.jsonl", fx.pair_rows(1, pairs_per_prompt=3)))
    assert len(get_dataset(path, "train")["Question 0: what is 0 + 0?"]["pairs"]) == 3
    with pytest.raises(DataError, match=rf"^{re.escape(path)} holds a single prompt, .* a train and a test file$"):
        get_dataset(path, "test")


def test_directory_reads_train_and_test_files(tmp_path):
    rows = fx.pair_rows(10)
    fx.write_jsonl(tmp_path / "train.jsonl", rows[:7])
    fx.write_parquet(tmp_path / "test.parquet.gz", rows[7:])
    (tmp_path / "README.md").write_text("notes")
    assert set(get_dataset(str(tmp_path), "train")) == {row["prompt"] for row in rows[:7]}
    assert set(get_dataset(str(tmp_path), "test")) == {row["prompt"] for row in rows[7:]}


def test_hh_transcripts_in_a_local_file_follow_the_hh_rules(tmp_path, capsys):
    fx.write_jsonl(tmp_path / "train.jsonl.gz", fx.HH_ROWS)
    fx.write_jsonl(tmp_path / "test.jsonl", fx.HH_ROWS[:2])
    source = LocalPreferenceFiles(str(tmp_path))
    loaded = load_source(source, "train")
    data = loaded.data
    assert loaded.truncation_mode == "keep_end"
    assert as_plain(data)[fx.EGG_PROMPT] == fx.HH_EXPECTED[fx.EGG_PROMPT]
    assert set(data) == {fx.EGG_PROMPT, fx.CAPITAL_PROMPT, fx.GREETING_PROMPT}
    assert reported_skips(capsys.readouterr().out) == {
        fx.HH_DIFFERENT_PROMPT: 1,
        "pairs with an empty response": 1,
        "pairs with chosen == rejected": 1,
        "prompts with no usable pair or SFT target": 1,
    }


def test_single_hh_file_counts_each_skip_in_the_split_of_its_prompt(tmp_path):
    odd_ones = [
        {"chosen": f"\n\nHuman: Odd question {i}?\n\nAssistant: Answer {i}.",
         "rejected": f"\n\nHuman: Another question {i}?\n\nAssistant: Other {i}."}
        for i in range(30)
    ]
    rows = fx.HH_ROWS + odd_ones
    test_prompts = held_out_prompts(extract_anthropic_prompt(row["chosen"]) for row in rows)
    odd_in_test = sum(extract_anthropic_prompt(row["chosen"]) in test_prompts for row in rows[3:4] + odd_ones)
    assert odd_in_test > 0
    source = LocalPreferenceFiles(str(fx.write_jsonl(tmp_path / "hh.jsonl", rows)))
    source.load("test")
    assert source.skipped == {fx.HH_DIFFERENT_PROMPT: odd_in_test}
    source.load("train")
    assert source.skipped == {fx.HH_DIFFERENT_PROMPT: 31 - odd_in_test}


# ---- local directories: which file holds which split ------------------------------------------------


def write_rows(path: Path, rows: list) -> Path:
    """`rows` in the format the file's name asks for."""
    if ".parquet" in path.name:
        return fx.write_parquet(path, rows)
    if ".json" in path.name and ".jsonl" not in path.name:
        return fx.write_json_array(path, rows)
    return fx.write_jsonl(path, rows)


@pytest.mark.parametrize("name, split", [
    ("train.jsonl", "train"), ("dpo_train.jsonl", "train"), ("Training.json.gz", "train"),
    ("train-00000-of-00001.parquet", "train"), ("data/train-00003-of-00004-5f3d1c2a9b8e7d6c.parquet", "train"),
    ("test.parquet", "test"), ("dpo_eval.jsonl", "test"), ("my.valid.json", "test"), ("validation.jsonl.gz", "test"),
    ("val-00000-of-00001.parquet", "test"), ("dev.jsonl", "test"), ("hh-evaluation.jsonl", "test"),
    ("contest.jsonl", None), ("train_sft.jsonl", None), ("pretrain.jsonl", None), ("interval.json", None),
    ("test.csv", None), ("README.md", None), ("train", None),
])
def test_split_of_file_reads_the_last_word_of_the_name(name, split):
    assert split_of_file(name) == split


@pytest.mark.parametrize("train_name, test_name", [
    ("dpo_train.jsonl", "dpo_eval.jsonl.gz"),
    ("train.jsonl", "validation.jsonl"),
    ("training.json", "valid.json"),
    ("train.parquet", "dev.parquet"),
    ("train.jsonl", "eval.jsonl"),
    ("train.jsonl", "val.jsonl"),
])
def test_directory_accepts_common_split_names_and_says_which_file_is_which(tmp_path, capsys, train_name, test_name):
    rows = fx.pair_rows(10)
    write_rows(tmp_path / train_name, rows[:7])
    write_rows(tmp_path / test_name, rows[7:])
    fx.write_text(tmp_path / "contest.jsonl", "not JSON: a file that names no split is never read")
    assert set(get_dataset(str(tmp_path), "train", silent=True)) == {row["prompt"] for row in rows[:7]}
    assert capsys.readouterr().out == ""
    assert set(get_dataset(str(tmp_path), "test")) == {row["prompt"] for row in rows[7:]}
    get_dataset(str(tmp_path), "train")
    assert capsys.readouterr().out == f"dataset {tmp_path}: train <- {train_name}; test <- {test_name}\n"


def test_hub_layout_reads_the_shards_of_the_data_folder_in_order(tmp_path, capsys):
    rows = fx.pair_rows(12)
    # The second shard ends with another pair for the first prompt: its chosen reply, read last, is the SFT target.
    train_rows = rows[:9] + [{"prompt": rows[0]["prompt"], "chosen": " Zero.", "rejected": " Two."}]
    fx.write_shards(tmp_path / "data", "train", train_rows, n_shards=2)
    fx.write_shards(tmp_path / "data", "test", rows[9:], n_shards=1)
    fx.write_text(tmp_path / "README.md", "---\nlicense: mit\n---\n")
    fx.write_text(tmp_path / ".gitattributes", "*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    train = get_dataset(str(tmp_path), "train")
    assert list(train) == [row["prompt"] for row in rows[:9]]
    assert as_plain(train)[rows[0]["prompt"]] == {
        "responses": [" 0.", " 1.", " Zero.", " Two."], "pairs": [(0, 1), (2, 3)], "sft_target": " Zero.",
    }
    assert set(get_dataset(str(tmp_path), "test")) == {row["prompt"] for row in rows[9:]}
    assert capsys.readouterr().out == (
        f"dataset {tmp_path}: train <- data/train-00000-of-00002.parquet, data/train-00001-of-00002.parquet; "
        "test <- data/test-00000-of-00001.parquet\n"
    )


def test_error_for_two_names_of_one_split(tmp_path):
    rows = fx.pair_rows(6)
    fx.write_jsonl(tmp_path / "train.jsonl", rows[:4])
    fx.write_jsonl(tmp_path / "test.jsonl", rows[4:])
    fx.write_jsonl(tmp_path / "validation.jsonl.gz", rows[4:])
    assert load_error(tmp_path) == (
        f"directory {tmp_path} has several test files (test.jsonl, validation.jsonl.gz); keep exactly one"
    )


def test_error_for_a_file_and_shards_of_one_split(tmp_path):
    rows = fx.pair_rows(6)
    fx.write_jsonl(tmp_path / "train.jsonl", rows[:4])
    fx.write_shards(tmp_path / "data", "train", rows[:4], n_shards=2)
    fx.write_jsonl(tmp_path / "test.jsonl", rows[4:])
    assert load_error(tmp_path, "test") == (
        f"directory {tmp_path} has several train files (data/train-00000-of-00002.parquet, "
        "data/train-00001-of-00002.parquet, train.jsonl); keep exactly one (the shards of one file count as one)"
    )


def test_error_for_a_missing_shard(tmp_path):
    rows = fx.pair_rows(9)
    shards = fx.write_shards(tmp_path, "train", rows[:6], n_shards=3)
    shards[1].unlink()
    fx.write_shards(tmp_path, "test", rows[6:], n_shards=1)
    assert load_error(tmp_path) == (
        f"directory {tmp_path} has the train shards train-00000-of-00003.parquet, train-00002-of-00003.parquet, but "
        "their names promise shards 0 to 2 once each; add the missing shards (was a download interrupted?) or remove "
        "the extra ones"
    )


# ---- empty prompts --------------------------------------------------------------------------------


class InMemorySource(PreferenceSource):
    """A source as a user might write one, returning a ready-made dict."""

    name = "in-memory"

    def __init__(self, data):
        super().__init__()
        self.data = data

    def load(self, split, silent=False, cache_dir=None):
        return self.data


def test_empty_prompts_are_skipped_for_every_source(capsys):
    data = {
        "": {"responses": [" a", " b", " c", " d"], "pairs": [(0, 1), (2, 3)], "sft_target": " a"},
        "  \n": {"responses": [" only a target"], "pairs": [], "sft_target": " only a target"},
        "\t": {"responses": [], "pairs": [], "sft_target": ""},
        "Q: hi": {"responses": [" hello", " go away"], "pairs": [(0, 1)], "sft_target": " hello"},
    }
    loaded = load_source(InMemorySource(data), "train")
    assert list(loaded.data) == ["Q: hi"] and loaded.truncation_mode == "keep_start"
    assert capsys.readouterr().out == (
        "dataset in-memory (train): kept 1 pairs over 1 prompts; skipped SFT targets with an empty prompt: 1; "
        "pairs with an empty prompt: 2; prompts with no usable pair or SFT target: 1\n"
    )


def test_error_when_every_prompt_is_empty_names_the_reason(tmp_path):
    rows = [{**row, "prompt": " " * (i % 2)} for i, row in enumerate(fx.pair_rows(6))]
    fx.write_jsonl(tmp_path / "train.jsonl", rows[:4])
    fx.write_jsonl(tmp_path / "test.jsonl", rows[4:])
    assert load_error(tmp_path) == (
        f"dataset {tmp_path} (train) has no usable examples after skipping bad rows (skipped pairs with an empty "
        "prompt: 4); fix those rows (see the README's Data rules) or choose another dataset"
    )


def test_error_when_nothing_is_usable_lists_every_reason(tmp_path):
    fx.write_jsonl(tmp_path / "train.jsonl.gz", fx.HH_ROWS[3:5])  # a foreign rejected transcript, an empty reply
    fx.write_jsonl(tmp_path / "test.jsonl.gz", fx.HH_ROWS[:2])
    assert load_error(tmp_path) == (
        f"dataset {tmp_path} (train) has no usable examples after skipping bad rows (skipped pairs with an empty "
        "response: 1; prompts with no usable pair or SFT target: 1; rows whose rejected transcript has a different "
        "prompt: 1); fix those rows (see the README's Data rules) or choose another dataset"
    )
    with pytest.raises(DataError, match=r"^dataset in-memory \(test\) holds no examples; add prompts"):
        load_source(InMemorySource({}), "test")


# ---- local files: errors ------------------------------------------------------------------------------


def load_error(path, split="train") -> str:
    with pytest.raises(DataError) as error:
        get_dataset(str(path), split, silent=True)
    message = str(error.value)
    assert "\n" not in message, "errors are one line"
    return message


def test_error_for_missing_path(tmp_path):
    message = load_error(tmp_path / "nowhere" / "data.jsonl")
    assert message == (
        f"dataset path {tmp_path / 'nowhere' / 'data.jsonl'} does not exist; give a .jsonl, .json or .parquet file "
        "(optionally .gz) or a directory holding a train and a test file (train.jsonl and test.jsonl, or names like "
        "dpo_train.jsonl, validation.parquet, data/train-00000-of-00001.parquet)"
    )


def test_error_for_unsupported_suffix(tmp_path):
    path = fx.write_text(tmp_path / "data.csv", "prompt,chosen,rejected\n")
    assert load_error(path) == f"{path} has an unsupported suffix; use .jsonl, .json or .parquet, optionally followed by .gz"


def test_directory_without_a_test_file_holds_out_prompts_as_a_single_file_does(tmp_path, capsys):
    rows = fx.pair_rows(40)
    fx.write_jsonl(tmp_path / "train.jsonl", rows)
    fx.write_text(tmp_path / "test.csv", "x")  # not a data file: never read
    (tmp_path / "single").mkdir()
    single = str(fx.write_jsonl(tmp_path / "single" / "all.jsonl", rows))
    for split in ("train", "test"):
        assert get_dataset(str(tmp_path), split) == get_dataset(single, split, silent=True)
    assert len(get_dataset(str(tmp_path), "test", silent=True)) == 2  # 5% of 40 prompts
    assert (f"dataset {tmp_path}: train <- train.jsonl less the 5% of its prompts held out for test; "
            "test <- 5% of train.jsonl's prompts (chosen by hash)") in capsys.readouterr().out


def test_error_for_empty_directory(tmp_path):
    assert "has no train file (it holds: nothing)" in load_error(tmp_path)


def test_error_for_directory_with_several_train_files(tmp_path):
    fx.write_jsonl(tmp_path / "train.jsonl", fx.pair_rows(3))
    fx.write_parquet(tmp_path / "train.parquet", fx.pair_rows(3))
    fx.write_jsonl(tmp_path / "test.jsonl", fx.pair_rows(3))
    assert load_error(tmp_path) == (
        f"directory {tmp_path} has several train files (train.jsonl, train.parquet); keep exactly one"
    )


def test_error_for_malformed_json_line_counts_blank_lines(tmp_path):
    lines = [json.dumps(row) for row in fx.pair_rows(2)] + ["", '{"prompt": "Q", "chosen": "A", "rejected": }']
    path = fx.write_text(tmp_path / "data.jsonl.gz", "\n".join(lines) + "\n")
    message = load_error(path)
    assert message.startswith(f"{path} line 4 is not valid JSON: Expecting value (column 44); fix that line")


def test_error_for_malformed_json_array(tmp_path):
    path = fx.write_text(tmp_path / "data.json", '[\n {"prompt": "Q", "chosen": "A", "rejected": "B"},\n {"prompt": }\n]')
    assert load_error(path).startswith(f"{path} line 3 is not valid JSON: Expecting value")


def test_error_for_row_that_is_not_an_object(tmp_path):
    path = fx.write_jsonl(tmp_path / "data.jsonl", fx.pair_rows(2) + [["Q", "A", "B"]])
    assert load_error(path).startswith(f"{path} line 3 is a JSON list, not an object; each row must be an object like")
    path = fx.write_json_array(tmp_path / "data.json", ["just a string"])
    assert load_error(path).startswith(f"{path} row 1 is a JSON str, not an object")


def test_error_for_row_missing_a_field(tmp_path):
    rows = fx.pair_rows(3)
    del rows[1]["rejected"]
    path = fx.write_jsonl(tmp_path / "data.jsonl", rows)
    assert load_error(path) == (
        f"{path} line 2 has no 'rejected' field (it has: prompt, chosen); every row needs the string fields "
        "prompt, chosen, rejected, as the first row has"
    )
    hh_rows = [dict(row) for row in fx.HH_ROWS[:3]]
    del hh_rows[2]["rejected"]
    path = fx.write_jsonl(tmp_path / "hh.jsonl.gz", hh_rows)
    assert load_error(path) == (
        f"{path} line 3 has no 'rejected' field (it has: chosen); every row needs the string fields chosen, rejected, "
        "as the first row has"
    )


@pytest.mark.parametrize("name", ["ratings.jsonl", "ratings.parquet"])
def test_error_for_columns_of_no_known_layout_proposes_a_columns_mapping(tmp_path, name):
    """OpenAI's and stack-exchange-paired's layouts are read now (tests/test_data_layouts.py); these columns are not."""
    row = {"id": 7, "query": "How do I reverse a list?", "good_answer": "items[::-1]", "bad_answer": "items.sort()"}
    path = write_rows(tmp_path / name, [row, row])
    assert load_error(path) == (
        f"{path} fits no layout read here (its columns: id, query, good_answer, bad_answer); give each row the "
        'strings {"prompt": "...", "chosen": "...", "rejected": "..."} (or question/instruction for prompt, and '
        'system), chosen and rejected as chat messages ({"role": "user"|"assistant"|"system", "content": "..."} '
        "lists, or ShareGPT conversations), or HH transcripts, or name your columns, e.g. "
        f"'datasets=[{{path: {path}, columns: {{prompt: query, chosen: good_answer, rejected: bad_answer}}}}]' "
        "with the preferred response's column as chosen"
    )


def test_chat_rows_without_a_tokenizer_to_render_them_are_named(tmp_path):
    rows = fx.pair_rows(2)
    rows[1]["chosen"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = fx.write_jsonl(tmp_path / "chat.jsonl", rows)
    message = load_error(path)
    assert message.startswith(f"dataset {path} holds chat rows (lists of messages, e.g. {path} line 2)")
    assert "load it with a tokenizer that has a chat template" in message  # tests/test_hub_chat.py: rendered


def test_error_for_non_string_field(tmp_path):
    path = fx.write_json_array(tmp_path / "data.json", [{"prompt": "Q", "chosen": 4, "rejected": "5"}])
    assert load_error(path).startswith(f"{path} row 1 field 'chosen' is int, not a string")


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl.gz", "\n  \n"), ("empty.json", "[]")])
def test_error_for_empty_file(tmp_path, name, content):
    path = fx.write_text(tmp_path / name, content)
    assert load_error(path).startswith(f"{path} holds no rows; add one object per row like")


def test_error_for_non_transcript_row_in_hh_format(tmp_path):
    path = fx.write_jsonl(tmp_path / "hh.jsonl", fx.HH_ROWS[:2] + [{"chosen": "User: hi\nBot: yo", "rejected": "x"}])
    message = load_error(path)
    assert message.startswith(f"{path} line 3 is not an HH transcript: its 'chosen' text has no '\\n\\nAssistant:' turn")
    assert "add a 'prompt' field" in message


def test_error_for_unknown_split(tmp_path):
    path = fx.write_jsonl(tmp_path / "data.jsonl", fx.pair_rows(3))
    assert load_error(path, "validation") == (
        f"local dataset {path} has splits 'train' and 'test', not 'validation'; use one of those"
    )


def test_error_for_corrupt_gzip_and_parquet(tmp_path):
    gz = tmp_path / "data.jsonl.gz"
    gz.write_bytes(b"not gzip at all")
    assert load_error(gz).startswith(f"{gz} is not a valid gzip file")
    parquet = tmp_path / "data.parquet"
    parquet.write_bytes(b"not parquet at all")
    assert load_error(parquet).startswith(f"{parquet} is not a readable parquet file")


# ---- the real HH-RLHF files ------------------------------------------------------------------------


def count_real_quirks(path: Path) -> Counter:
    """The real file's quirks, counted with plain string operations, independently of the loaders."""
    counts = Counter()
    with gzip.open(path, "rt", encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            prompt = row["chosen"][: row["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")]
            if not row["rejected"].startswith(prompt):
                counts[fx.HH_DIFFERENT_PROMPT] += 1
                continue
            chosen, rejected = row["chosen"][len(prompt):], row["rejected"][len(prompt):]
            if not chosen.strip() or not rejected.strip():
                counts["pairs with an empty response"] += 1
            elif chosen == rejected:
                counts["pairs with chosen == rejected"] += 1
    return counts


QUIRKS = [fx.HH_DIFFERENT_PROMPT, "pairs with an empty response", "pairs with chosen == rejected"]


def test_real_hh_files_count_their_quirks(capsys):
    # harmless-base has no chosen == rejected rows, helpful-base has all three quirks.
    paths = [REAL_HH / "harmless-base-test.jsonl.gz", REAL_HH / "helpful-base-test.jsonl.gz"]
    if not all(path.exists() for path in paths):
        pytest.skip(f"real HH-RLHF files not found under {REAL_HH}")
    totals = Counter()
    for path in paths:
        expected = count_real_quirks(path)
        totals += expected

        skipped = Counter()
        with gzip.open(path, "rt", encoding="utf-8") as file:
            rows = [(f"{path.name} line {i}", json.loads(line)) for i, line in enumerate(file, start=1)]
        whole = clean_pairs(hh_rows_to_data(rows, skipped), skipped)
        assert {reason: skipped[reason] for reason in QUIRKS} == {reason: expected[reason] for reason in QUIRKS}

        capsys.readouterr()
        train, test = get_dataset(str(path), "train"), get_dataset(str(path), "test")
        reported = reported_skips(capsys.readouterr().out)
        assert {reason: reported[reason] for reason in QUIRKS} == {reason: expected[reason] for reason in QUIRKS}
        assert test and not set(train) & set(test) and {**train, **test}.keys() == whole.keys()
        for data in (train, test):
            for prompt, example in data.items():
                assert prompt.endswith("\n\nAssistant:")
                for chosen, rejected in example["pairs"]:
                    chosen_text, rejected_text = example["responses"][chosen], example["responses"][rejected]
                    assert chosen_text.strip() and rejected_text.strip() and chosen_text != rejected_text
    assert all(totals[reason] > 0 for reason in QUIRKS), totals
