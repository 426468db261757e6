"""`python -m dpo.generate`: the right two models, the same randomness for both, the files and the judge."""

import json

import pytest
import torch

from test_train import quick, train_script
from dpo.checkpoints import read_archive, to_current_names
from dpo.errors import ConfigError, DataError
from dpo.generate import GenerationOptions, generate, load_side_by_side, main, read_prompts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An SFT run of the tiny model from scratch, then a DPO run from its checkpoint."""
    root = tmp_path_factory.mktemp("generate")
    short = ("n_examples=128", "eval_every=64", "sample_during_eval=false", "n_eval_examples=32")
    train_script.train(quick(root / "sft", "loss=sft", *short))
    train_script.train(quick(root / "dpo", "loss=dpo", "loss.beta=0.1", "lr=1e-3",
                             f"model.archive={root / 'sft' / 'LATEST' / 'policy.pt'}", *short))
    return root


def same_weights(model, state) -> bool:
    expected = to_current_names(state, model)
    return all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())


def test_a_run_is_rebuilt_as_its_checkpoint_and_the_model_it_started_from(runs):
    pair = load_side_by_side(str(runs / "dpo"), device="cpu")
    assert same_weights(pair.policy, read_archive(str(runs / "dpo" / "LATEST" / "policy.pt"))["state"])
    assert same_weights(pair.reference, read_archive(str(runs / "sft" / "LATEST" / "policy.pt"))["state"])
    assert not same_weights(pair.policy, read_archive(str(runs / "sft" / "LATEST" / "policy.pt"))["state"])
    assert pair.datasets == ("toy",) and not pair.policy.training


def test_a_checkpoint_directory_gives_that_checkpoint(runs):
    pair = load_side_by_side(str(runs / "dpo" / "step-64"), device="cpu")
    assert same_weights(pair.policy, read_archive(str(runs / "dpo" / "step-64" / "policy.pt"))["state"])
    assert pair.run_dir == str(runs / "dpo")


def test_a_run_from_scratch_compares_with_its_fresh_initialisation(runs):
    pair = load_side_by_side(str(runs / "sft"), device="cpu")
    trained = read_archive(str(runs / "sft" / "LATEST" / "policy.pt"))["state"]
    assert same_weights(pair.policy, trained) and not same_weights(pair.reference, trained)
    again = load_side_by_side(str(runs / "sft"), device="cpu")  # the same seed: the same initial weights
    assert same_weights(again.reference, pair.reference.state_dict())


def test_both_models_sample_with_the_same_randomness(runs):
    pair = load_side_by_side(str(runs / "dpo" / "LATEST"), reference=str(runs / "dpo" / "LATEST"), device="cpu")
    prompts, _ = read_prompts("toy", 6)
    rows = pair.complete(prompts, GenerationOptions(max_new_tokens=12, seed=3))
    assert all(row["policy"] == row["reference"] for row in rows)  # one model twice: identical samples
    again = generate(pair.policy, pair.tokenizer, prompts, GenerationOptions(max_new_tokens=12, seed=3))
    assert again == [row["policy"] for row in rows]
    other_seed = generate(pair.policy, pair.tokenizer, prompts, GenerationOptions(max_new_tokens=12, seed=4))
    assert other_seed != again


def test_the_command_writes_both_files_and_the_judges_verdict(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(runs / "dpo"), "--prompts", "toy", "--n", "5", "--max_new_tokens", "8", "--greedy",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all({"prompt", "policy", "reference", "judge_policy", "judge_reference"} <= set(row)
                                  for row in rows)
    table = (out / "generations.md").read_text()
    assert table.startswith("| prompt | policy | reference | judge policy | judge reference |")
    assert table.count("\n|") == 6 and "policy win rate" in table
    printed = capsys.readouterr().out
    assert "policy win rate" in printed and "generations.md" in printed


def test_the_default_output_is_the_run_directory(runs):
    assert main([str(runs / "dpo"), "--prompts", "toy", "--n", "2", "--max_new_tokens", "4"]) == 0
    assert (runs / "dpo" / "generations" / "generations.jsonl").is_file()


def test_prompts_from_text_and_jsonl_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first\n\nsecond line\\nwith a break\n")
    assert read_prompts(str(text), 10) == (["first", "second line\nwith a break"], None)
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert read_prompts(str(rows), 1) == (["a"], None)


@pytest.mark.parametrize("content, message", [
    ("", "holds no prompts"),
    ('{"text": "no prompt field"}\n', 'line 1 of .* has no "prompt" text field'),
])
def test_bad_prompt_files_are_explained(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_prompts(str(path), 4)


def test_bad_paths_are_explained(runs, tmp_path, capsys):
    with pytest.raises(DataError, match="neither a .txt or .jsonl file nor a dataset"):
        read_prompts("no_such_dataset", 4)
    with pytest.raises(ConfigError, match="pass --reference"):
        load_side_by_side(str(tmp_path), device="cpu")  # neither a run nor a checkpoint of one
    assert main([str(tmp_path / "missing"), "--prompts", "toy"]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main([str(runs / "dpo"), "--prompts", "toy", "--top_p", "2"]) == 1
    assert "--top_p in (0, 1]" in capsys.readouterr().err


def test_a_reference_option_replaces_the_runs_starting_model(runs):
    pair = load_side_by_side(str(runs / "dpo"), reference=str(runs / "sft" / "LATEST"), device="cpu")
    assert same_weights(pair.reference, read_archive(str(runs / "sft" / "LATEST" / "policy.pt"))["state"])
    with pytest.raises(ConfigError, match="could not load --reference="):
        load_side_by_side(str(runs / "dpo"), reference=str(runs / "no_such_model"), device="cpu")
