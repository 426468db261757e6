"""Mapping entries (`datasets=[{path: ..., split: ..., columns: {...}}]`), named entries, and chat rows.

Every dataset here is written by the test itself: `save_to_disk` directories, local .jsonl files and
parquet folders; nothing is downloaded. The chat rows render with the built-in `char` tokenizer's
HH-style template, so their expected texts are the transcripts the hh and toy data hold.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train as train_script  # noqa: E402
from dpo.batching import flatten_examples, get_batch_iterator  # noqa: E402
from dpo.config import _check_datasets  # noqa: E402
from dpo.data import PreferenceSource, dataset_source, get_dataset, load_source  # noqa: E402
from dpo.data import hub  # noqa: E402
from dpo.data.local import held_out_prompts  # noqa: E402
from dpo.errors import ConfigError, DataError  # noqa: E402
from dpo.models import build_char_tokenizer  # noqa: E402

GPT2 = REPO.parent / "shared" / "tokenizers" / "gpt2"
WORDS = ("yes", "no", "maybe", "always", "never", "often", "seldom", "twice")

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def char():
    return build_char_tokenizer()


def hh(question: str) -> str:
    return f"\n\nHuman: {question}\n\nAssistant:"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def chat_rows(words=WORDS):
    """Implicit-prompt chat rows: both conversations open with the same user turn."""
    return [{"chosen": [user(f"say {w}"), assistant(w)], "rejected": [user(f"say {w}"), assistant(f"not {w}")]}
            for w in words]


def column_rows(words=WORDS):
    """Pair rows under other column names, with a column that is not read."""
    return [{"question": hh(f"say {w}"), "good": f" {w}", "bad": f" not {w}", "score": 1.0} for w in words]


def save(path: Path, rows: list[dict]) -> str:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def save_splits(path: Path, splits: dict[str, list[dict]]) -> str:
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(path))
    return str(path)


def load(entry, char_tokenizer, split="train"):
    return get_dataset(entry, split, silent=True, tokenizer=char_tokenizer)


def responses(data, prompt):
    return data[prompt]["responses"]


def load_error(entry, tokenizer, split="train") -> str:
    with pytest.raises(DataError) as error:
        get_dataset(entry, split, silent=True, tokenizer=tokenizer)
    message = str(error.value)
    assert "\n" not in message, "errors are one line"
    return message


# ---- the char tokenizer's template ------------------------------------------------------------------

def test_char_template_writes_hh_transcripts(char):
    prompt = [{"role": "system", "content": "Be brief."}, user("hi")]
    assert char.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == \
        "Be brief.\n\nHuman: hi\n\nAssistant:"
    assert char.apply_chat_template([user("hi"), assistant("hello")], tokenize=False) == \
        "\n\nHuman: hi\n\nAssistant: hello"


# ---- mapping entries: columns and splits ---------------------------------------------------------------

def test_mapped_columns_are_read_under_our_field_names(tmp_path, char):
    path = save_splits(tmp_path / "renamed", {"train": column_rows(WORDS[:6]), "test": column_rows(WORDS[6:])})
    entry = {"path": path, "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}}
    train, test = load(entry, char), load(entry, char, "test")
    assert set(train) == {hh(f"say {w}") for w in WORDS[:6]} and set(test) == {hh(f"say {w}") for w in WORDS[6:]}
    assert responses(train, hh("say yes")) == [" yes", " not yes"]
    assert dataset_source(entry).name == "renamed"


def test_fields_not_mapped_keep_their_own_column_names(tmp_path, char):
    rows = [{"question": hh(f"say {w}"), "chosen": f" {w}", "rejected": f" not {w}"} for w in WORDS]
    data = load({"path": save(tmp_path / "ds", rows), "columns": {"prompt": "question"}}, char)
    assert responses(data, hh("say no")) == [" no", " not no"]


def test_a_local_jsonl_file_takes_a_column_mapping_too(tmp_path, char):
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in column_rows()))
    entry = {"path": str(path), "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}}
    train, test = load(entry, char), load(entry, char, "test")
    assert len(train) == 7 and len(test) == 1 and responses({**train, **test}, hh("say no")) == [" no", " not no"]
    path.write_text(json.dumps(column_rows()[0]) + "\n" + json.dumps({"question": hh("hm"), "good": " a"}) + "\n")
    assert load_error(entry, char).startswith(f"{path} line 2 has no 'rejected' field")


def test_split_and_test_split_choose_the_datasets_splits(tmp_path, char):
    path = save_splits(tmp_path / "prefs", {"train_prefs": chat_rows(WORDS[:5]), "test_prefs": chat_rows(WORDS[5:7]),
                                            "test": chat_rows(WORDS[7:])})
    entry = {"path": path, "split": "train_prefs", "test_split": "test_prefs"}
    assert set(load(entry, char)) == {hh(f"say {w}") for w in WORDS[:5]}
    assert set(load(entry, char, "test")) == {hh(f"say {w}") for w in WORDS[5:7]}
    # by default the train split's partner, not the split named test
    assert set(load({"path": path, "split": "train_prefs"}, char, "test")) == {hh(f"say {w}") for w in WORDS[5:7]}
    assert dataset_source(entry).name == "prefs:train_prefs"


@pytest.mark.parametrize("layout", ["Dataset", "DatasetDict without test"])
def test_without_a_test_split_prompts_are_held_out_of_train_by_hash(tmp_path, char, layout):
    words = [f"word{i}" for i in range(40)]
    rows = chat_rows(words)
    path = save(tmp_path / "ds", rows) if layout == "Dataset" else save_splits(tmp_path / "ds", {"train": rows})
    train, test = load({"path": path}, char), load({"path": path}, char, "test")
    prompts = {hh(f"say {w}") for w in words}
    assert len(test) == 2 and not set(train) & set(test) and set(train) | set(test) == prompts  # 5% of 40
    # The same prompts as for a local file: the hash of the prompt's messages, whatever the tokenizer.
    keys = {json.dumps([user(f"say {w}")], sort_keys=True): hh(f"say {w}") for w in words}
    assert set(test) == {keys[key] for key in held_out_prompts(keys)}


def test_a_split_the_dataset_lacks_is_named_with_the_splits_it_has(tmp_path, char):
    path = save_splits(tmp_path / "ds", {"train": chat_rows(), "test": chat_rows()})
    assert load_error({"path": path, "split": "train_prefs"}, char) == (
        "dataset ds:train_prefs has no split 'train_prefs' (its splits are: train, test); set split to one of them")
    assert "test_split: dev names none of it" in load_error({"path": save(tmp_path / "one", chat_rows()),
                                                             "test_split": "dev"}, char, "test")


def test_a_local_data_folder_is_read_by_split_names_in_its_file_names(tmp_path, char, monkeypatch):
    folder = tmp_path / "snapshot" / "data"
    folder.mkdir(parents=True)
    datasets.Dataset.from_list(column_rows(WORDS[:6])).to_parquet(str(folder / "train_prefs-00000-of-00001.parquet"))
    datasets.Dataset.from_list(column_rows(WORDS[6:])).to_parquet(str(folder / "test_prefs-00000-of-00001.parquet"))
    entry = {"path": str(tmp_path / "snapshot"), "split": "train_prefs", "test_split": "test_prefs",
             "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}}
    test = get_dataset(entry, "test", silent=True, cache_dir=str(tmp_path / "cache"))
    assert set(test) == {hh(f"say {w}") for w in WORDS[6:]}


def test_a_hub_id_is_loaded_with_its_config_and_a_failure_is_one_sentence(tmp_path, char, monkeypatch):
    calls = []

    def fake_hub(path, **options):
        calls.append((path, options))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(chat_rows())})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    entry = {"path": "someone/prefs", "name": "english"}
    assert hh("say often") in load(entry, char)
    assert calls == [("someone/prefs", {"split": None, "cache_dir": None, "name": "english"})]
    assert dataset_source(entry).name == "prefs/english"

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/prefs' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert load_error(entry, char).startswith(
        "could not load someone/prefs (subset english) from the Hugging Face hub: Couldn't reach 'someone/prefs'")


# ---- chat rows --------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["implicit prompt", "prompt string", "prompt messages", "prompt repeated",
                                  "sharegpt", "single message"])
def test_chat_rows_in_every_form_render_the_same_transcripts(tmp_path, char, form):
    def row(w):
        conversation = {"chosen": [user(f"say {w}"), assistant(w)], "rejected": [user(f"say {w}"), assistant(f"x{w}")]}
        if form == "prompt string":
            return {"prompt": f"say {w}", "chosen": [assistant(w)], "rejected": [assistant(f"x{w}")]}
        if form == "prompt messages":
            return {"prompt": [user(f"say {w}")], "chosen": [assistant(w)], "rejected": [assistant(f"x{w}")]}
        if form == "prompt repeated":  # HuggingFaceH4/ultrafeedback_binarized's form
            return {"prompt": f"say {w}", **conversation}
        if form == "sharegpt":
            return {key: [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                          for m in messages] for key, messages in conversation.items()}
        if form == "single message":  # LLaMA-Factory's ShareGPT preference form
            return {"prompt": [{"from": "human", "value": f"say {w}"}], "chosen": {"from": "gpt", "value": w},
                    "rejected": {"from": "gpt", "value": f"x{w}"}}
        return conversation

    data = load({"path": save(tmp_path / "chat", [row(w) for w in WORDS])}, char)
    assert {prompt: responses(data, prompt) for prompt in data} == \
        {hh(f"say {w}"): [f" {w}", f" x{w}"] for w in WORDS if hh(f"say {w}") in data}
    assert len(data) == 7  # one of 8 prompts held out for test


def test_system_turns_and_shared_earlier_turns_belong_to_the_prompt(tmp_path, char):
    opening = [{"role": "system", "content": "Be brief."}, user("hi"), assistant("hello"), user("and?")]
    rows = [{"chosen": opening + [assistant(f"{w}!")], "rejected": opening + [assistant(f"{w}?")]} for w in WORDS]
    rows[0] = {"chosen": opening + [assistant("same")], "rejected": opening + [assistant("same")]}
    source = dataset_source({"path": save(tmp_path / "multi", rows)}, char)
    loaded = load_source(source, "train", silent=True, tokenizer=char)
    prompt = "Be brief.\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    assert list(loaded.data) == [prompt] and loaded.truncation_mode == "keep_end"
    assert loaded.skipped == Counter({"pairs with chosen == rejected": 1})  # a tie is skipped, not an error


def test_a_trailing_eos_of_the_template_is_cut_from_responses(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ '\\n\\n' + m['role'] + ': ' + m['content'] }}"
                               "{% if m['role'] == 'assistant' %}{{ eos_token + '\\n' }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}{{ '\\n\\nassistant:' }}{% endif %}")
    data = load({"path": save(tmp_path / "eos", chat_rows())}, tokenizer)
    assert responses(data, "\n\nuser: say no\n\nassistant:") == [" no", " not no"]


def test_templates_that_end_every_turn_with_eos_batch_and_keep_those_eos_tokens(tmp_path):
    """Zephyr-, Qwen- and Llama-3-style templates close each earlier turn with EOS: that is not EOS in the data."""
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + eos_token }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
    rows = [{"chosen": [user("hi"), assistant("hello"), user(f"say {w}"), assistant(w)],
             "rejected": [user("hi"), assistant("hello"), user(f"say {w}"), assistant(f"not {w}")]} for w in WORDS]
    entry = {"path": save(tmp_path / "turns", rows)}
    batch = next(get_batch_iterator([entry], tokenizer, batch_size=4, n_epochs=1, silent=True))
    eos = tokenizer.eos_token_id
    for ids, labels in zip(batch["chosen_input_ids"].tolist(), batch["chosen_labels"].tolist()):
        response = [token for token, label in zip(ids, labels) if label != -100]
        prompt = [token for token, label in zip(ids, labels) if label == -100 and token != tokenizer.pad_token_id]
        assert prompt.count(eos) == 3 and response.count(eos) == 1 and response[-1] == eos
    with pytest.raises(DataError, match="EOS"):  # EOS text the user wrote into a message is still refused
        bad = [{**rows[0], "chosen": [user("hi"), assistant(f"hel{tokenizer.eos_token}lo")]}]
        get_dataset({"path": save(tmp_path / "bad", bad)}, "train", silent=True, tokenizer=tokenizer)


def test_local_files_hold_chat_rows_too(tmp_path, char):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chat_rows(WORDS[:6])))
    pair_then_chat = [{"prompt": hh("say hi"), "chosen": " hi", "rejected": " bye"},
                      {"prompt": "say ho", "chosen": [assistant("ho")], "rejected": [assistant("hum")]}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pair_then_chat))
    train = load_source(dataset_source(str(tmp_path), char), "train", silent=True, tokenizer=char)
    assert responses(train.data, hh("say maybe")) == [" maybe", " not maybe"] and train.truncation_mode == "keep_end"
    test = load(str(tmp_path), char, "test")
    assert responses(test, hh("say hi")) == [" hi", " bye"] and responses(test, hh("say ho")) == [" ho", " hum"]


# ---- errors -----------------------------------------------------------------------------------------

def test_a_dataset_with_no_usable_rows_is_refused(tmp_path, char):
    empty = datasets.Dataset.from_list(chat_rows()).filter(lambda row: False)
    empty.save_to_disk(str(tmp_path / "empty"))
    assert load_error({"path": str(tmp_path / "empty")}, char) == (
        "dataset empty has no rows in its 'train' split; choose a split with preference rows (set split or test_split)")
    mute = [{"chosen": [user(w), assistant("")], "rejected": [user(w), assistant(" ")]} for w in WORDS]
    assert load_error({"path": save(tmp_path / "mute", mute)}, char).startswith(
        "dataset mute (train) has no usable examples after skipping bad rows (skipped pairs with an empty response: 7")


def test_column_errors_name_the_datasets_columns(tmp_path, char):
    path = save(tmp_path / "renamed", column_rows())
    assert load_error({"path": path, "columns": {"prompt": "query"}}, char) == (
        "dataset renamed: columns maps prompt to 'query', which is not one of its columns (question, good, bad, "
        "score); set columns.prompt to one of those")
    assert load_error({"path": path, "columns": {"prompt": "question", "rejected": "bad"}}, char) == (
        "dataset renamed has no 'chosen' column for chosen (its columns are: question, good, bad, score); map the "
        "column that holds it with columns: {chosen: <column>}")


@pytest.mark.parametrize("chosen, message", [
    ([user("say no")], "row 2 of chat (train): the chosen response has no assistant turn at its end (its turns "
                       "after the prompt: none); end chosen and rejected with the assistant's reply"),
    ([user("say no"), {"role": "assistant"}], "row 2 of chat (train) field 'chosen' message 2 has no 'content' "
                                              "(its keys: role); give every message a role and content"),
    ([{"from": "human", "value": "say no"}, {"from": "gpt"}], "field 'chosen' message 2 has no 'value' (its keys: "
                                                              "from)"),
    ([user("say no"), {"role": "robot", "content": "no"}], "row 2 of chat (train) field 'chosen' message 2 has the "
                                                           "unknown role 'robot'; use user, assistant or system"),
    ([user("say no"), assistant("no<|endoftext|>")], "row 2 of chat (train): the chosen response's assistant turn "
                                                     "contains the tokenizer's EOS text '<|endoftext|>'"),
])
def test_malformed_chat_rows_are_named(tmp_path, char, chosen, message):
    rows = chat_rows(WORDS[:3])
    rows[1] = {"chosen": chosen, "rejected": [user("say no"), assistant("not no")]}
    assert message in load_error({"path": save(tmp_path / "chat", rows)}, char)


def test_chat_rows_need_a_tokenizer_with_a_chat_template(tmp_path):
    entry = {"path": save(tmp_path / "chat", chat_rows())}
    assert load_error(entry, None).startswith("dataset chat holds chat rows (lists of messages, e.g. row 1 of chat "
                                              "(train)), which a tokenizer's chat template renders to text, but no "
                                              "tokenizer was given")
    if not GPT2.is_dir():
        pytest.skip("../shared/tokenizers/gpt2 is absent")
    from transformers import AutoTokenizer

    message = load_error(entry, AutoTokenizer.from_pretrained(str(GPT2)))
    assert message.startswith("dataset chat holds chat rows (lists of messages, e.g. row 1 of chat (train)), but "
                              f"tokenizer {GPT2} has no chat template to render them; choose a tokenizer that has one")
    assert message.endswith("or set model.chat_template to a template file or string")


@pytest.mark.parametrize("entry, message", [
    ({"path": "x", "splits": "train"}, "has the unknown key 'splits'; the valid keys are path, name, split, "
                                       "test_split, columns"),
    ({"split": "train"}, "datasets entry {split: train} needs a 'path': a Hugging Face hub dataset id"),
    ({"path": "x", "columns": {"response": "text"}}, "maps the unknown field 'response' in columns; the fields are "
                                                     "prompt, chosen, rejected"),
    ({"path": "x", "split": "all", "test_split": "all"}, "evaluates on its training split 'all'"),
])
def test_bad_entries_are_refused_before_anything_is_loaded(entry, message):
    with pytest.raises(DataError) as error:
        dataset_source(entry)
    assert message in str(error.value)


def test_a_missing_local_path_is_named(tmp_path, char):
    assert load_error({"path": str(tmp_path / "nowhere")}, char).startswith(
        f"dataset path {tmp_path / 'nowhere'} does not exist; give a Hugging Face hub dataset id")


# ---- named entries, config checks, batches -----------------------------------------------------------

def test_a_named_entry_is_read_from_its_yaml(tmp_path, char, monkeypatch):
    (tmp_path / "my_named.yaml").write_text(f"path: {save(tmp_path / 'renamed', column_rows())}\n"
                                            "columns: {prompt: question, chosen: good, rejected: bad}\n")
    monkeypatch.setattr(hub, "named_entries_dir", lambda: str(tmp_path))
    source = dataset_source("my_named", char)
    assert source.name == "my_named" and responses(load("my_named", char), hh("say no")) == [" no", " not no"]
    with pytest.raises(DataError, match=r"the entries of config/dataset/ \(my_named\)"):
        dataset_source("my_nameless")
    (tmp_path / "broken.yaml").write_text("path: x\nsplitt: train\n")
    with pytest.raises(DataError, match=r"broken.yaml has the unknown key 'splitt'"):
        dataset_source("broken")


def test_the_shipped_ultrafeedback_entry_names_its_preference_splits():
    source = dataset_source("ultrafeedback_binarized")
    assert source.name == "ultrafeedback_binarized"
    assert (source.entry.path, source.entry.split, source.entry.test_split) == (
        "HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs")


def make_config(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_config_check_accepts_mapping_and_named_entries_and_refuses_bad_ones(capsys):
    config = make_config("datasets=[toy,ultrafeedback_binarized,{path: /data/prefs, split: train, "
                         "columns: {prompt: question, chosen: good}},toy]")
    _check_datasets(config.datasets)
    assert "warning: datasets lists toy 2 times" in capsys.readouterr().out
    with pytest.raises(DataError, match="has the unknown key 'colums'"):
        _check_datasets(make_config("datasets=[{path: /data/prefs, colums: {prompt: q}}]").datasets)
    with pytest.raises(DataError, match="needs a 'path'"):
        _check_datasets(make_config("datasets=[{split: train}]").datasets)
    for refused in ("toy", []):
        with pytest.raises(ConfigError, match="datasets must be a non-empty list"):
            _check_datasets(refused)


class Greetings(PreferenceSource):
    """An in-memory source, as the Python API passes one."""

    name = "greetings"

    def load(self, split, silent=False, cache_dir=None):
        return {hh(f"greet {w}"): {"responses": [f" hi {w}", f" go {w}"], "pairs": [(0, 1)], "sft_target": ""}
                for w in WORDS}


def test_batches_carry_each_sources_short_label(tmp_path, char):
    entry = {"path": save(tmp_path / "chat_ds", chat_rows())}
    examples = flatten_examples([entry, Greetings()], "train", char, silent=True)
    assert Counter(example.dataset for example in examples) == {"chat_ds": 7, "greetings": 8}
    batch = next(get_batch_iterator([entry, Greetings()], char, batch_size=15, n_epochs=1, silent=True))
    assert sorted(set(batch["dataset"])) == ["chat_ds", "greetings"]


# ---- end to end ---------------------------------------------------------------------------------------

def train_tiny(run_dir, dataset_override):
    config = make_config(f"local_run_dir={run_dir}", "wandb.enabled=false", "loss=dpo", "loss.beta=0.1",
                         dataset_override, "batch_size=4", "n_examples=8", "eval_every=4", "n_eval_examples=4",
                         "eval_batch_size=4", "do_first_eval=false", "sample_during_eval=false")
    final = train_script.train(config)
    assert (Path(run_dir) / "LATEST" / "policy.pt").is_file()
    assert math.isfinite(final["loss/eval"]) and math.isfinite(final["rewards_eval/margins"])
    return final


def test_trains_on_a_chat_dataset_saved_to_disk(tmp_path):
    path = save_splits(tmp_path / "chat", {"train": chat_rows(), "test": chat_rows(WORDS[:2])})
    train_tiny(tmp_path / "run", f"datasets=[{{path: {path}}}]")


def test_trains_on_mapped_column_names(tmp_path):
    path = save(tmp_path / "renamed", column_rows())
    train_tiny(tmp_path / "run", f"datasets=[{{path: {path}, columns: {{prompt: question, chosen: good, "
                                 "rejected: bad}}]")
