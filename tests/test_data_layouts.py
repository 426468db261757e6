"""Preference data as other projects write it, read with a plain `datasets=[path]`.

Each layout is written here as its project writes it: LLaMA-Factory's ShareGPT and alpaca preference
files, Intel/orca_dpo_pairs (a `system` column beside `question`), OpenAI's preference fine-tuning
JSONL (content as a list of parts), lvwerra/stack-exchange-paired, and a `save_to_disk` directory
with the Hub's split names (HuggingFaceH4/ultrafeedback_binarized's `train_prefs`/`test_prefs`, ...).
One row of each is rendered and compared exactly; `python train.py` trains on all of them in one run.
The built-in `char` tokenizer's template writes HH transcripts, so the expected prompts are those.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import fixtures as fx  # noqa: E402
from dpo.batching import flatten_examples  # noqa: E402
from dpo.data import dataset_source, get_dataset, load_source  # noqa: E402
from dpo.errors import ConfigError, DataError  # noqa: E402
from dpo.models import build_char_tokenizer, load_tokenizer  # noqa: E402

GPT2 = REPO.parent / "shared" / "tokenizers" / "gpt2"
WORDS = ("yes", "no", "maybe", "always", "never", "often", "seldom", "twice")
# A template unlike the char one, so that what it renders shows that it was used.
TAG_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def char():
    return build_char_tokenizer()


def hh(*turns: str) -> str:
    """An HH prompt: alternating human and assistant turns, ending with the assistant's tag."""
    roles = ("Human", "Assistant")
    return "".join(f"\n\n{roles[i % 2]}: {turn}" for i, turn in enumerate(turns)) + "\n\nAssistant:"


def both_splits(entry, tokenizer) -> dict:
    """Train and test prompts together: which split a prompt falls in is the hash's business, tested elsewhere."""
    return {**get_dataset(entry, "train", silent=True, tokenizer=tokenizer),
            **get_dataset(entry, "test", silent=True, tokenizer=tokenizer)}


def pairs_of(data: dict) -> dict:
    """prompt -> [(chosen, rejected), ...] as texts."""
    return {prompt: [(ex["responses"][c], ex["responses"][r]) for c, r in ex["pairs"]] for prompt, ex in data.items()}


# ---- the layouts, as their projects write them ---------------------------------------------------------

def sharegpt_rows(words=WORDS):
    """LLaMA-Factory's ShareGPT preference form: the history in `conversations`, single-message responses."""
    return [{"conversations": [{"from": "system", "value": "Answer in one word."},
                               {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                               {"from": "human", "value": f"say {w}"}],
             "chosen": {"from": "gpt", "value": w}, "rejected": {"from": "gpt", "value": f"not {w}"}} for w in words]


def orca_rows(words=WORDS):
    """Intel/orca_dpo_pairs: system, question, chosen, rejected strings."""
    return [{"system": "You are an AI assistant.", "question": f"Repeat {w}.", "chosen": w, "rejected": w + w}
            for w in words]


def alpaca_rows(words=WORDS):
    """LLaMA-Factory's alpaca preference form: instruction and input, system, [question, answer] history."""
    return [{"instruction": "Translate to English.", "input": f"le mot {w}", "chosen": w, "rejected": f"the {w}",
             "system": "Be exact.", "history": [["hi", "hello"]]} for w in words]


def openai_rows(words=WORDS):
    """OpenAI's preference fine-tuning JSONL, the content as a list of parts."""
    return [{"input": {"messages": [{"role": "user", "content": [{"type": "text", "text": "say "},
                                                                  {"type": "text", "text": w}]}],
                       "tools": [], "parallel_tool_calls": True},
             "preferred_output": [{"role": "assistant", "content": w}],
             "non_preferred_output": [{"role": "assistant", "content": f"not {w}"}]} for w in words]


def ultrafeedback_splits():
    """HuggingFaceH4/ultrafeedback_binarized's layout: a prompt string, whole conversations as responses, and
    the splits train_prefs/test_prefs/train_sft/test_sft (message content as LLaMA-Factory v1's parts)."""
    def row(w):
        def say(text):
            return [{"type": "text", "value": text}]
        return {"prompt": f"say {w}",
                "chosen": [{"role": "user", "content": say(f"say {w}")}, {"role": "assistant", "content": say(w)}],
                "rejected": [{"role": "user", "content": say(f"say {w}")},
                             {"role": "assistant", "content": say(f"not {w}")}]}

    return {"train_prefs": [row(w) for w in WORDS[:6]], "test_prefs": [row(w) for w in WORDS[6:]],
            "train_sft": [row(w) for w in WORDS[:3]], "test_sft": [row(w) for w in WORDS[3:5]]}


def save_splits(path: Path, splits: dict) -> str:
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(path))
    return str(path)


def write_json(path: Path, rows: list) -> str:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


# ---- one row of each, rendered exactly ------------------------------------------------------------------

def test_sharegpt_conversations_give_the_prompt_with_its_system_turn_and_history(tmp_path, char):
    data = both_splits(write_json(tmp_path / "sharegpt.json", sharegpt_rows()), char)
    prompt = "Answer in one word." + hh("hi", "hello", "say maybe")
    assert pairs_of(data)[prompt] == [(" maybe", " not maybe")] and len(data) == 8


def test_a_system_column_beside_a_question_is_kept(tmp_path, char):
    path = str(fx.write_jsonl(tmp_path / "orca.jsonl", orca_rows()))
    # Without a chat template the strings are used as written, the system text first, as HH writes it.
    assert pairs_of(both_splits(path, char))["You are an AI assistant.\n\nRepeat no."] == [("no", "nono")]
    hh_system = [{**row, "question": hh(row["question"])} for row in orca_rows()]
    path_hh = str(fx.write_jsonl(tmp_path / "orca_hh.jsonl", hh_system))
    assert pairs_of(both_splits(path_hh, char))["You are an AI assistant." + hh("Repeat no.")] == [("no", "nono")]
    # With string_prompts_as_chat, the system text is the template's system turn and the question a user turn.
    as_chat = load_tokenizer({"tokenizer_name_or_path": "char", "string_prompts_as_chat": True})
    assert pairs_of(both_splits(path, as_chat))["You are an AI assistant." + hh("Repeat no.")] == [(" no", " nono")]
    tagged = load_tokenizer({"tokenizer_name_or_path": "char", "chat_template": TAG_TEMPLATE,
                             "string_prompts_as_chat": True})
    data = both_splits(path, tagged)
    assert pairs_of(data)["<system>You are an AI assistant.<user>Repeat no.<assistant>"] == [("no", "nono")]
    source = dataset_source(path, tagged)
    assert load_source(source, "train", silent=True, tokenizer=tagged).truncation_mode == "keep_end"


def test_system_prompts_in_memory_and_in_a_columns_mapping(tmp_path, char):
    from dpo.data.memory import InMemoryPairs

    rows = [{"system": "Be brief.", "prompt": hh("hi"), "chosen": " hello", "rejected": " go away"}]
    assert pairs_of(InMemoryPairs(rows, tokenizer=char).load("train")) == {"Be brief." + hh("hi"): [(" hello",
                                                                                                    " go away")]}
    as_chat = load_tokenizer({"tokenizer_name_or_path": "char", "string_prompts_as_chat": True})
    assert pairs_of(InMemoryPairs([("hi", "hello", "go away")], tokenizer=as_chat).load("train")) == \
        {hh("hi"): [(" hello", " go away")]}
    renamed = [{"sys": "Be brief.", "q": f"say {w}", "a": w, "b": "no"} for w in WORDS]
    path = str(fx.write_jsonl(tmp_path / "renamed.jsonl", renamed))
    entry = {"path": path, "columns": {"system": "sys", "prompt": "q", "chosen": "a", "rejected": "b"}}
    assert pairs_of(both_splits(entry, char))["Be brief.\n\nsay yes"] == [("yes", "no")]


def test_alpaca_instruction_and_input_are_joined_after_the_history(tmp_path, char):
    data = both_splits(write_json(tmp_path / "alpaca.json", alpaca_rows()), char)
    prompt = "Be exact." + hh("hi", "hello", "Translate to English.\nle mot often")
    assert pairs_of(data)[prompt] == [(" often", " the often")]


def test_openai_preference_rows_with_content_parts(tmp_path, char):
    data = both_splits(str(fx.write_jsonl(tmp_path / "openai.jsonl", openai_rows())), char)
    assert pairs_of(data)[hh("say never")] == [(" never", " not never")]
    fixture = get_dataset(str(fx.write_jsonl(tmp_path / "openai_fixture.jsonl", [fx.OPENAI_PREFERENCE_ROW])),
                          "train", silent=True, tokenizer=char)  # a single prompt: all of it trains
    assert pairs_of(fixture) == {hh("Hello, can you tell me how cold San Francisco is today?"): [
        (" Today in San Francisco, it is not quite cold as expected.",
         " It is not particularly cold in San Francisco today.")]}


def test_stack_exchange_paired_reads_question_and_response_j_over_k(tmp_path, char):
    row = fx.STACK_EXCHANGE_PAIRED_ROW
    other = {**row, "question": "How do I sort a dict by value?", "response_j": "sorted(d.items(), key=...)"}
    data = both_splits(str(fx.write_parquet(tmp_path / "se.parquet", [row, other])), char)
    assert pairs_of(data)[row["question"]] == [(row["response_j"], row["response_k"])]


def test_a_save_to_disk_directory_as_a_plain_path_pairs_its_hub_split_names(tmp_path, char, capsys):
    path = save_splits(tmp_path / "ufb", ultrafeedback_splits())
    train, test = (get_dataset(path, split, tokenizer=char) for split in ("train", "test"))
    assert pairs_of(train)[hh("say yes")] == [(" yes", " not yes")] and len(train) == 6
    assert set(test) == {hh("say seldom"), hh("say twice")}  # test_prefs, not 5% of train_prefs
    assert f"dataset {path}: train <- train_prefs; test <- test_prefs" in capsys.readouterr().out
    assert dataset_source(path).name == path  # named as written, like every path
    only_train = save_splits(tmp_path / "only_train", {"train": [{"prompt": hh(f"say {w}{i}"), "chosen": f" {w}",
                                                                  "rejected": " x"} for i in range(5) for w in WORDS]})
    assert len(get_dataset(only_train, "test", silent=True, tokenizer=char)) == 2  # 5% of 40, as for a file


def test_a_hub_snapshot_folder_pairs_train_prefs_with_test_prefs(tmp_path, char, capsys):
    for split, rows in ultrafeedback_splits().items():
        fx.write_shards(tmp_path / "snapshot" / "data", split, rows, n_shards=1)
    path = str(tmp_path / "snapshot")
    assert set(get_dataset(path, "test", tokenizer=char)) == {hh("say seldom"), hh("say twice")}
    assert (f"dataset {path}: train <- data/train_prefs-00000-of-00001.parquet; "
            "test <- data/test_prefs-00000-of-00001.parquet") in capsys.readouterr().out


def test_roles_and_content_parts_of_every_common_form(tmp_path, char):
    rows = [{"messages": [{"role": "system", "content": [{"type": "input_text", "text": "Be kind."}]},
                          {"role": "user", "content": [{"type": "text", "value": f"say {w}"}]}],
             "chosen": [{"role": "model", "content": w}], "rejected": [{"role": "model", "content": "no"}]}
            for w in WORDS]
    data = both_splits(str(fx.write_jsonl(tmp_path / "gemini.jsonl", rows)), char)
    assert pairs_of(data)["Be kind." + hh("say yes")] == [(" yes", " no")]


def test_an_image_part_is_refused_in_one_sentence(tmp_path, char):
    rows = openai_rows()
    rows[1]["input"]["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "cat.png"}})
    path = fx.write_jsonl(tmp_path / "vision.jsonl", rows)
    with pytest.raises(DataError) as error:
        both_splits(str(path), char)
    assert str(error.value) == (
        f"{path} line 2 field 'prompt' message 1 has a content part of type 'image_url', but only text can be "
        "trained on here (the models are text-only); remove the row or its image_url parts")


# ---- pairs that truncation makes identical ---------------------------------------------------------------

def test_pairs_identical_after_truncation_are_skipped_and_counted(char, capsys):
    """The measured case: Chinese text with the char tokenizer, whose every CJK character is <|unk|>."""
    from dpo.data.memory import InMemoryPairs

    long_prompt = "请" * 60
    rows = [(long_prompt + str(i), "好" * 20 + " yes", "坏" * 20 + " no") for i in range(4)]  # cut to 16 <|unk|>
    rows += [(long_prompt + "x", "The answer is yes, definitely", "The answer is yes, maybe")]  # ASCII, same 16
    rows += [("short", "The answer is yes, definitely", "The answer is yes, maybe")]  # not cut: kept
    rows += [(long_prompt + "y", "yes", "no")]  # cut, still different: kept
    examples = flatten_examples([InMemoryPairs(rows, name="zh", tokenizer=char)], "train", char, max_length=64,
                                max_prompt_length=48)
    assert sorted(example.prompt for example in examples if example.pairs) == sorted([long_prompt + "y", "short"])
    assert "skipped pairs with chosen == rejected once truncated to max_length: 5" in capsys.readouterr().out
    untruncated = flatten_examples([InMemoryPairs(rows, name="zh", tokenizer=char)], "train", char, silent=True)
    assert sum(len(example.pairs) for example in untruncated) == 7  # no lengths given: nothing is cut or tied


# ---- tokenizers and chat templates -------------------------------------------------------------------------

def test_model_chat_template_takes_a_file_or_a_string_and_refuses_neither(tmp_path):
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TAG_TEMPLATE)
    for value in (str(template_file), TAG_TEMPLATE):
        tokenizer = load_tokenizer({"tokenizer_name_or_path": "char", "chat_template": value})
        assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True) == "<user>hi<assistant>"
    with pytest.raises(ConfigError) as error:
        load_tokenizer({"tokenizer_name_or_path": "char", "chat_template": str(tmp_path / "missing.jinja")})
    assert str(error.value) == (f"model.chat_template={tmp_path / 'missing.jinja'} is neither a file nor a Jinja "
                                "template (no {{ or {% in it); give the path of a template file, or the template "
                                "itself")
    with pytest.raises(ConfigError, match=r"^model.chat_template cannot render a user and an assistant turn"):
        load_tokenizer({"tokenizer_name_or_path": "char", "chat_template": "{% for m in messages %}{{ m"})


def test_string_rows_as_chat_need_a_template(tmp_path):
    if not GPT2.is_dir():
        pytest.skip("../shared/tokenizers/gpt2 is absent")
    tokenizer = load_tokenizer({"tokenizer_name_or_path": str(GPT2), "string_prompts_as_chat": True})
    path = fx.write_jsonl(tmp_path / "orca.jsonl", orca_rows())
    with pytest.raises(DataError) as error:
        get_dataset(str(path), "train", silent=True, tokenizer=tokenizer)
    assert str(error.value) == (
        f"dataset {path} holds string rows to render as chat (model.string_prompts_as_chat=true, e.g. {path} line 1), "
        f"but tokenizer {GPT2} has no chat template to render them; choose a tokenizer that has one (e.g. an -Instruct "
        "or -chat model's, or the built-in char), or set model.chat_template to a template file or string")
    tokenizer = load_tokenizer({"tokenizer_name_or_path": str(GPT2), "string_prompts_as_chat": True,
                                "chat_template": TAG_TEMPLATE})
    data = both_splits(str(path), tokenizer)
    assert pairs_of(data)["<system>You are an AI assistant.<user>Repeat no.<assistant>"] == [("no", "nono")]


# ---- through the entry points ------------------------------------------------------------------------------

def train_py(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", "model=tiny", "loss=dpo", "loss.beta=0.1", "batch_size=4", "n_examples=8",
               "n_epochs=null", "eval_every=8", "n_eval_examples=4", "eval_batch_size=4", "do_first_eval=false",
               "sample_during_eval=false", "wandb.enabled=false", f"local_run_dir={run_dir}", *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_trained(result: subprocess.CompletedProcess, run_dir: Path) -> list[dict]:
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "LATEST" / "policy.pt").is_file() and (run_dir / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["counters/examples"] == 8 and "loss/eval" in metrics[-1]
    return metrics


def test_train_py_trains_on_every_layout_as_a_plain_path(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    zh = [{"conversations": [{"from": "human", "value": "请" * 60 + str(i)}],
           "chosen": {"from": "gpt", "value": "好" * 20}, "rejected": {"from": "gpt", "value": "坏" * 20}}
          for i in range(4)]
    paths = [write_json(data / "sharegpt.json", sharegpt_rows() + zh),
             str(fx.write_jsonl(data / "orca.jsonl", orca_rows())),
             write_json(data / "alpaca.json", alpaca_rows()),
             str(fx.write_jsonl(data / "openai.jsonl", openai_rows())),
             str(fx.write_parquet(data / "se.parquet", [{**fx.STACK_EXCHANGE_PAIRED_ROW, "question": f"Q{i}?"}
                                                        for i in range(4)])),
             save_splits(data / "ufb", ultrafeedback_splits())]
    run_dir = tmp_path / "run"
    result = train_py(run_dir, f"datasets=[{','.join(paths)}]")
    assert_trained(result, run_dir)
    assert f"dataset {paths[-1]}: train <- train_prefs; test <- test_prefs" in result.stdout
    # The four Chinese pairs differ only in characters the char tokenizer cannot read: skipped, and counted.
    skips = [line for line in result.stdout.splitlines() if line.startswith(f"dataset {paths[0]} (")]
    assert any("pairs with chosen == rejected once tokenized: " in line for line in skips), skips
    assert sum(int(line.rsplit(": ", 1)[1]) for line in skips) == 4


def test_train_py_renders_string_pairs_with_model_chat_template(tmp_path):
    path = str(fx.write_jsonl(tmp_path / "orca.jsonl", orca_rows()))
    run_dir = tmp_path / "run"
    result = train_py(run_dir, f"datasets=[{path}]", "model.string_prompts_as_chat=true",
                      f'model.chat_template="{TAG_TEMPLATE}"')
    assert_trained(result, run_dir)
    assert (run_dir / "LATEST" / "chat_template.jinja").read_text() == TAG_TEMPLATE  # exported with the model


def test_train_py_names_the_columns_mapping_for_an_unknown_layout(tmp_path):
    rows = [{"query": f"say {w}", "good_answer": w, "bad_answer": "no"} for w in WORDS]
    path = fx.write_jsonl(tmp_path / "ratings.jsonl", rows)
    run_dir = tmp_path / "run"
    result = train_py(run_dir, f"datasets=[{path}]")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith(f"error: {path} fits no layout read here (its columns: query, good_answer, bad_answer)")
    assert message.endswith(f"'datasets=[{{path: {path}, columns: {{prompt: query, chosen: good_answer, rejected: "
                            "bad_answer}}]' with the preferred response's column as chosen")
    assert "\n" not in message and not run_dir.exists()
    # The entry the message proposes, read as Hydra reads the command line, loads the rows.
    from omegaconf import OmegaConf

    entry = message.split("'datasets=[", 1)[1].split("]'", 1)[0]
    entry = OmegaConf.to_container(OmegaConf.from_dotlist([f"entry={entry}"]).entry)
    data = get_dataset(entry, "train", silent=True, tokenizer=build_char_tokenizer())
    assert pairs_of(data)["say yes"] == [("yes", "no")]


def api_error(tokenizer_line: str, run_dir: Path, **settings) -> str:
    """The UserError a fresh process's `DPOTrainer(...).train()` raises with the tokenizer `tokenizer_line` builds."""
    options = "".join(f", {key}={value!r}" for key, value in settings.items())
    script = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, GPTNeoXConfig
from dpo import DPOTrainer
from dpo.errors import UserError
tokenizer = {tokenizer_line}
model = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=max(len(tokenizer), 1), hidden_size=16,
    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
try:
    DPOTrainer(model=model, tokenizer=tokenizer, dataset=[("Say yes.", " yes", " no")] * 8, beta=0.1, batch_size=4,
               local_run_dir={str(run_dir)!r}{options}).train()
except UserError as error:
    print(error)
    sys.exit(3)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 3, result.stderr[-2000:]
    assert not run_dir.exists()
    return result.stdout.strip().splitlines()[-1]


def test_api_refuses_a_tokenizer_with_no_vocabulary_before_training(tmp_path):
    if not GPT2.is_dir():
        pytest.skip("../shared/tokenizers/gpt2 is absent")
    empty = f"GPT2TokenizerFast(vocab_file={str(GPT2 / 'vocab.json')!r}, merges_file={str(GPT2 / 'merges.txt')!r})"
    assert api_error(empty, tmp_path / "run") == (
        "the tokenizer in use has no vocabulary (1 tokens, all special, and it encodes 'Hello, world' to no tokens), "
        "so nothing could be trained; load it with AutoTokenizer.from_pretrained(<its directory or hub name>) "
        "(transformers 5 builds an empty one from GPT2TokenizerFast(vocab_file=..., merges_file=...)), or set "
        "model.tokenizer_name_or_path to it")


def test_api_renders_string_prompts_as_chat_when_asked(tmp_path):
    # The setting reaches a tokenizer the caller hands over: a template-less GPT-2 tokenizer is then refused.
    if not GPT2.is_dir():
        pytest.skip("../shared/tokenizers/gpt2 is absent")
    message = api_error(f"AutoTokenizer.from_pretrained({str(GPT2)!r})", tmp_path / "run", string_prompts_as_chat=True)
    assert "string rows to render as chat (model.string_prompts_as_chat=true" in message


def test_eos_text_in_a_chosen_response_is_named_as_the_chosen_response(tmp_path):
    rows = [{"prompt": f"\n\nHuman: say {word}\n\nAssistant:", "chosen": f" {word}", "rejected": f" not {word}"}
            for word in ("yes", "no", "maybe", "always", "never", "often", "seldom", "twice")]
    rows[0]["chosen"] = " yes<|endoftext|>"
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = train_py(tmp_path / "run", f"datasets=[{path}]")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: dataset {path} (train): the chosen response of prompt '\\n\\nHuman: say yes\\n\\nAssistant:' "
        "contains the tokenizer's EOS text '<|endoftext|>'; remove it from the data (EOS is appended automatically)"]
    assert not (tmp_path / "run").exists()
