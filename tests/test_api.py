"""The Python API (`from dpo import DPOTrainer`): the tutorial snippet as written, every kind of in-memory data,
settings by config key, LoRA, and the same training as `train.py` on the same data."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train as train_script  # noqa: E402
from dpo import DPOTrainer  # noqa: E402
from dpo.data import get_dataset  # noqa: E402
from dpo.errors import ConfigError, DataError  # noqa: E402
from dpo.models import build_char_tokenizer, load_model  # noqa: E402
from tests.test_train import make_config, quick, read_metrics  # noqa: E402

STORIES = REPO.parent / "shared" / "models" / "stories260K"
PAIRS = [("Once upon a time, there was a", " little girl named Lily.", " big scary monster."),
         ("The cat sat on the", " mat and purred.", " car and exploded."),
         ("Tom liked to play with his", " ball in the park.", " knife in the dark."),
         ("One day, the sun was", " shining bright.", " gone forever."),
         ("Lily and her mom went to the", " park to play.", " war to fight."),
         ("The dog was very", " happy and friendly.", " angry and mean."),
         ("She gave him a big", " hug.", " punch."),
         ("They had a lot of", " fun together.", " fights together.")]


@pytest.fixture(autouse=True)
def run_dirs_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default local_dirs end in .cache, under the working directory


def tiny_model(seed: int = 0):
    """The `tiny` model of config/model/tiny.yaml, built as train.py builds it."""
    config = make_config()
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    return load_model(config.model, tokenizer, torch.float32), tokenizer


def toy_pairs(split: str, n: int) -> list[tuple[str, str, str]]:
    data = get_dataset("toy", split)
    return [(prompt, example["responses"][i], example["responses"][j])
            for prompt, example in list(data.items())[:n] for i, j in example["pairs"]]


@pytest.mark.skipif(not STORIES.is_dir(), reason="needs ../shared/models/stories260K")
def test_the_tutorial_snippet_runs_as_written_and_the_margins_on_its_pairs_rise(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES)
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    original = copy.deepcopy(model)

    dataset = PAIRS
    trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=dataset, beta=0.1)
    before = trainer.evaluate(dataset)
    trainer.train()
    model.save_pretrained("fine-tuned-model"); tokenizer.save_pretrained("fine-tuned-model")  # noqa: E702

    after = trainer.evaluate(dataset)
    assert before["rewards_eval/margins"] == 0  # the reference is a copy of the model as it was
    assert after["rewards_eval/margins"] > 0 and after["rewards_eval/accuracies"] > 0.5
    ids = tokenizer("The cat sat on the mat", return_tensors="pt").input_ids
    reloaded = AutoModelForCausalLM.from_pretrained("fine-tuned-model")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
        assert not torch.allclose(model(ids).logits, original(ids).logits)  # it trained in place
        torch.testing.assert_close(trainer.ref_model(ids).logits, original(ids).logits, atol=0, rtol=0)
    assert trainer.run_dir and (Path(trainer.run_dir) / "LATEST" / "policy.pt").is_file()


def test_the_api_trains_exactly_as_train_py_on_the_same_data_and_settings(tmp_path):
    settings = dict(n_examples=64, eval_every=64, n_eval_examples=64, eval_batch_size=32, do_first_eval=False)
    config = quick(tmp_path / "cli", "loss=dpo", "loss.beta=0.1", "sample_during_eval=false",
                   *(f"{key}={value}" for key, value in settings.items()))
    expected = train_script.train(config)

    model, tokenizer = tiny_model(seed=config.seed)
    tiny = make_config().model
    trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=toy_pairs("train", 10**6),
                         eval_dataset=toy_pairs("test", 10**6), beta=0.1, lr=config.lr, batch_size=config.batch_size,
                         warmup_steps=config.warmup_steps, max_length=config.max_length, optimizer=config.optimizer,
                         max_prompt_length=config.max_prompt_length, lm_head_chunk_size=None, **settings)
    assert trainer.config.model.name_or_path and tiny.from_config  # the same model, handed over
    metrics = trainer.train()
    for key in ("loss/eval", "rewards_eval/accuracies", "rewards_eval/margins", "logps_eval/chosen"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert [row["loss/train"] for row in read_metrics(trainer.run_dir) if row["event"] == "train"] == \
        pytest.approx([row["loss/train"] for row in read_metrics(tmp_path / "cli") if row["event"] == "train"])


def test_settings_are_the_config_keys_with_the_configs_defaults():
    model, tokenizer = tiny_model()
    trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS, beta=0.25, lr=1e-5, n_epochs=3,
                         label_smoothing=0.1, reference_dtype="float32", lora={"alpha": 4})
    config = trainer.config
    assert (config.loss.name, config.loss.beta, config.loss.label_smoothing) == ("dpo", 0.25, 0.1)
    assert (config.lr, config.n_epochs, config.model.reference_dtype) == (1e-5, 3, "float32")
    assert (config.lora.alpha, config.lora.rank) == (4, None)  # a section is merged, not replaced
    defaults = make_config("model=pythia28", "loss=dpo", "loss.beta=0.1")
    for key in ("batch_size", "optimizer", "warmup_steps", "max_length", "max_prompt_length", "max_grad_norm",
                "gradient_accumulation_steps", "eval_every", "seed"):
        assert config[key] == defaults[key], key
    assert not config.wandb.enabled and config.n_eval_examples == 0 and not config.sample_during_eval


def test_unknown_and_missing_settings_are_named():
    model, tokenizer = tiny_model()
    with pytest.raises(TypeError, match=r"unknown setting betta=.*beta, label_smoothing"):
        DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS, betta=0.1)
    with pytest.raises(ConfigError, match=r"loss.beta is required for loss=dpo.*beta=0.1"):
        DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS)
    with pytest.raises(TypeError, match="dataset="):
        DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS, beta=0.1, datasets=["hh"])
    trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS, beta=0.1)
    with pytest.raises(ConfigError, match="eval_dataset="):
        trainer.evaluate()
    with pytest.raises(ConfigError, match="batch_size=8"):
        DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS[:3], beta=0.1, batch_size=8).train()
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS, beta=0.1, lr=-1).train()


@pytest.mark.parametrize("rows, message", [
    ("prompt,chosen,rejected", "list of"),
    ([], "holds no rows"),
    ([("p", "c")], "row 0 is"),
    ([("p", "c", "r"), {"prompt": "p", "chosen": "c"}], "row 1 has no 'rejected'"),
    ([("p", "c", 3)], "row 0: rejected is a int"),
])
def test_bad_rows_are_named_when_the_trainer_is_built(rows, message):
    model, tokenizer = tiny_model()
    with pytest.raises(DataError, match=message):
        DPOTrainer(model=model, tokenizer=tokenizer, dataset=rows, beta=0.1)


def test_dicts_and_a_datasets_dataset_are_the_same_pairs_as_tuples():
    import datasets

    model, tokenizer = tiny_model()
    dicts = [dict(zip(("prompt", "chosen", "rejected"), row)) for row in PAIRS]
    results = []
    for rows in (PAIRS, dicts, datasets.Dataset.from_list(dicts)):
        trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS, beta=0.1)
        results.append(trainer.evaluate(rows))
    assert results[0] == results[1] == results[2]
    assert results[0]["logps_eval/chosen"] < 0 and math.isfinite(results[0]["loss/eval"])


def test_a_loss_without_a_reference_makes_no_copy_and_lora_trains_adapters_only():
    pytest.importorskip("peft")
    model, tokenizer = tiny_model()
    trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS, loss="orpo", batch_size=4)
    assert trainer.ref_model is None
    assert math.isfinite(trainer.train()["counters/examples"])

    model, tokenizer = tiny_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS, eval_dataset=PAIRS[:4], beta=0.1,
                         lr=1e-2, lora={"rank": 4})
    assert trainer.ref_model is None and hasattr(trainer.model, "disable_adapter")
    start = trainer.evaluate()
    metrics = trainer.train()
    assert start["rewards_eval/margins"] == 0 and metrics["rewards_eval/margins"] != 0
    base = {name.replace(".base_layer.", "."): value
            for name, value in trainer.model.get_base_model().state_dict().items() if ".lora_" not in name}
    assert all(torch.equal(base[name], value) for name, value in before.items())


def test_a_peft_model_handed_over_uses_its_adapter_free_self_as_the_reference():
    peft = pytest.importorskip("peft")
    model, tokenizer = tiny_model()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query_key_value"]))
    trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS, beta=0.1, lr=1e-2)
    assert trainer.ref_model is None and trainer.model is model
    trainer.train()
    saved = OmegaConf.load(Path(trainer.run_dir) / "config.yaml")
    assert saved.lora.rank is None  # the caller's adapters, not ones made from lora.*
    assert (Path(trainer.run_dir) / "LATEST" / "adapter" / "adapter_config.json").is_file()


def test_chat_rows_in_memory_are_rendered_with_the_chat_template():
    model, tokenizer = tiny_model()  # the char tokenizer's template writes HH transcripts
    chat = [{"chosen": [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": chosen.strip()}],
             "rejected": [{"role": "user", "content": prompt.strip()},
                          {"role": "assistant", "content": rejected.strip()}]} for prompt, chosen, rejected in PAIRS]
    as_text = [(f"\n\nHuman: {prompt.strip()}\n\nAssistant:", " " + chosen.strip(), " " + rejected.strip())
               for prompt, chosen, rejected in PAIRS]
    trainer = DPOTrainer(model=model, tokenizer=tokenizer, dataset=PAIRS, beta=0.1)
    assert trainer.evaluate(chat) == trainer.evaluate(as_text)
    with pytest.raises(DataError, match=r"eval_dataset row 0.*assistant"):
        trainer.evaluate([{"chosen": [{"role": "user", "content": "hi"}],
                           "rejected": [{"role": "user", "content": "x"}]}])


def test_run_evaluate_works_from_the_config_alone(tmp_path):
    from dpo.run import evaluate

    metrics = evaluate(quick(tmp_path / "run", "loss=dpo", "loss.beta=0.1", "sample_during_eval=false"))
    assert metrics["rewards_eval/margins"] == 0 and math.isfinite(metrics["loss/eval"])
    assert not (tmp_path / "run").exists()  # evaluation writes nothing
