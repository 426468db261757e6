"""The fast paths through whole training runs: packing, prefix sharing and cached reference log-probs
give the run the plain path gives, step by step; the cache is reused, and the reference model freed."""

import gzip
import itertools
import os
from pathlib import Path

import pytest
import torch

from test_train import make_config, quick, read_metrics, train_script
from dpo.batching import get_batch_iterator
from dpo.errors import ConfigError, TrainingError
from dpo.losses import build_loss
from dpo.metrics import MetricsSink
from dpo.models import build_char_tokenizer, load_models
from dpo.reference_cache import ReferenceLogpsCache, reference_fingerprint
from dpo.trainers import BasicTrainer

REAL_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT_NEOX_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt-neox-20b"
DPO = ("loss=dpo", "loss.beta=0.1")


def train_losses(run_dir):
    return [row["loss/train"] for row in read_metrics(run_dir) if "loss/train" in row]


def eval_rows(run_dir):
    return [row for row in read_metrics(run_dir) if "loss/eval" in row]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same short DPO run of the tiny model with each path; all share one cache folder."""
    root = tmp_path_factory.mktemp("fast_paths")
    chunked = "lm_head_chunk_size=64"  # tiny's default is the plain head; 64 makes several chunks per batch
    settings = {
        "plain": ["lm_head_chunk_size=null"],
        "chunked": [chunked],
        "packed": ["packing=true", chunked],
        "prefix_shared": ["prefix_sharing=true", chunked],
        "cached": ["cache_reference_logps=true", "prefix_sharing=true", chunked],
        "cached_again": ["cache_reference_logps=true"],
    }
    for name, overrides in settings.items():
        train_script.train(quick(root / name, *DPO, f"local_dirs=[{root / 'cache'}]", *overrides))
    return {name: root / name for name in settings}


@pytest.mark.parametrize("name", ["chunked", "packed", "prefix_shared", "cached", "cached_again"])
def test_every_path_trains_step_by_step_like_the_plain_one(runs, name):
    expected, losses = train_losses(runs["plain"]), train_losses(runs[name])
    assert len(losses) == len(expected) == 8
    assert len(set(round(loss, 6) for loss in expected)) > 4  # the losses move, so agreeing means something
    for got, want in zip(losses, expected):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    for got, want in zip(eval_rows(runs[name]), eval_rows(runs["plain"])):
        for key in ("loss/eval", "rewards_eval/margins", "logps_eval/chosen", "logps_eval/rejected"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_cached_runs_still_sample_and_judge_the_reference(runs):
    """The reference model is freed after the first evaluation's samples, which are kept (they never change)."""
    for name in ("cached", "cached_again"):
        rows = eval_rows(runs[name])
        assert len(rows) == 3
        assert [row["judge_eval/reference"] for row in rows] == [eval_rows(runs["plain"])[0]["judge_eval/reference"]] * 3


def test_a_second_run_reads_the_cache_file(runs):
    files = list((runs["cached"].parent / "cache").rglob("reference_logps/*.pt"))
    assert len(files) == 1
    cache = ReferenceLogpsCache(str(files[0]))
    assert len(cache) == 256 + 64  # every train pair of one epoch, and the eval pairs: each once


# ---- the trainer's cache, directly ----------------------------------------------------------------------


def toy_trainer(tmp_path, *overrides):
    config = quick(tmp_path / "run", *DPO, "cache_reference_logps=true", *overrides)
    tokenizer = build_char_tokenizer()
    loss = build_loss(dict(config.loss))
    policy, reference = load_models(config, tokenizer, needs_reference=True, cache_dir=None, verbose=False)
    trainer = BasicTrainer(config, policy, tokenizer, loss, [], [], str(tmp_path / "run"), reference_model=reference,
                           sink=MetricsSink(str(tmp_path / "run"), enabled=False))
    batches = list(get_batch_iterator(["toy"], tokenizer, batch_size=8, n_examples=32, max_length=config.max_length,
                                      max_prompt_length=config.max_prompt_length, silent=True))
    return trainer, batches


def test_precompute_frees_the_reference_model_and_then_serves_every_batch(tmp_path):
    trainer, batches = toy_trainer(tmp_path, "sample_during_eval=false")
    live = [trainer.reference_logps(batch) for batch in batches]
    path = tmp_path / "cache" / "reference.pt"
    assert trainer.precompute_reference_logps(batches, str(path)) == 32
    assert trainer.reference_model is None and path.is_file()
    for batch, expected in zip(batches, live):
        cached = trainer.reference_logps(batch)
        torch.testing.assert_close(cached.chosen, expected.chosen)
        torch.testing.assert_close(cached.rejected_tokens, expected.rejected_tokens)
    other = get_batch_iterator(["toy"], trainer.tokenizer, split="test", batch_size=8, n_examples=8, silent=True,
                               max_length=trainer.config.max_length, max_prompt_length=trainer.config.max_prompt_length)
    with pytest.raises(TrainingError, match="not in the cache.*cache_reference_logps=false"):
        trainer.reference_logps(next(iter(other)))


def test_precompute_skips_what_the_file_already_has(tmp_path):
    trainer, batches = toy_trainer(tmp_path, "sample_during_eval=false")
    path = str(tmp_path / "reference.pt")
    ReferenceLogpsCache(path).save()  # an empty file first
    first = ReferenceLogpsCache(path)
    for batch in batches[:2]:
        first.add(batch, trainer.reference_logps(batch))
    first.save()
    assert trainer.precompute_reference_logps(batches, path) == 16
    assert len(ReferenceLogpsCache(path)) == 32


def test_cache_keys_follow_the_tokens(tmp_path):
    tokenizer = build_char_tokenizer()
    long_batch, = get_batch_iterator(["toy"], tokenizer, batch_size=4, n_examples=4, max_length=64,
                                     max_prompt_length=48, silent=True, shuffle=False)
    short_batch, = get_batch_iterator(["toy"], tokenizer, batch_size=4, n_examples=4, max_length=20,
                                      max_prompt_length=8, silent=True, shuffle=False)
    keys = ReferenceLogpsCache.keys(long_batch)
    assert len(set(keys)) == 4 and keys == ReferenceLogpsCache.keys(long_batch)
    assert not set(keys) & set(ReferenceLogpsCache.keys(short_batch))  # other truncation, other tokens


def test_the_cache_file_is_named_after_the_reference_model(tmp_path):
    base = make_config("model=pythia28")
    archive = tmp_path / "policy.pt"
    archive.write_bytes(b"weights")
    with_archive = make_config("model=pythia28", f"model.archive={archive}")
    bf16 = make_config("model=pythia28", "model.reference_dtype=bfloat16")
    names = {reference_fingerprint(config) for config in (base, with_archive, bf16)}
    assert len(names) == 3
    assert reference_fingerprint(make_config("model=pythia28")) == reference_fingerprint(base)
    before = reference_fingerprint(with_archive)
    os.utime(archive, ns=(0, 10**18))  # a rewritten archive is another model
    assert reference_fingerprint(with_archive) != before
    tiny = [make_config(f"seed={seed}") for seed in (0, 1)]
    assert reference_fingerprint(tiny[0]) != reference_fingerprint(tiny[1])  # a fresh model follows the seed


@pytest.mark.parametrize("override, message", [
    ("lm_head_chunk_size=0", "lm_head_chunk_size must be a positive integer"),
    ("packing=yes", "packing must be true or false"),
    ("cache_reference_logps=1", "cache_reference_logps must be true or false"),
])
def test_bad_settings_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        train_script.train(quick(tmp_path / "run", *DPO, override))


# ---- real HH rows with the real GPT-NeoX tokenizer ---------------------------------------------------------


@pytest.mark.skipif(not (REAL_HH.is_file() and GPT_NEOX_TOKENIZER.is_dir()), reason="needs ../shared (HH-RLHF rows)")
def test_real_hh_rows_train_alike_with_packing_and_prefix_sharing(tmp_path):
    data = tmp_path / "hh"
    data.mkdir()
    with gzip.open(REAL_HH, "rt") as rows:
        lines = list(itertools.islice(rows, 48))
    (data / "train.jsonl").write_text("".join(lines[:32]))
    (data / "test.jsonl").write_text("".join(lines[32:]))
    model = ("model.from_config={model_type: gpt_neox, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
             "intermediate_size: 128, max_position_embeddings: 512, rotary_pct: 0.25}")
    losses = {}
    for name, overrides in {"plain": ["lm_head_chunk_size=null"], "fast": ["packing=true", "prefix_sharing=true"]}.items():
        config = make_config(f"local_run_dir={tmp_path / name}", "wandb.enabled=false", *DPO, model,
                             f"model.tokenizer_name_or_path={GPT_NEOX_TOKENIZER}", f"datasets=[{data}]",
                             "batch_size=8", "max_length=512", "max_prompt_length=256", "n_examples=32",
                             "n_eval_examples=8", "sample_during_eval=false", "eval_every=100000", "lr=1e-3",
                             "warmup_steps=0", *overrides)
        train_script.train(config)
        losses[name] = train_losses(tmp_path / name)
    assert len(losses["plain"]) == 4
    assert losses["fast"] == pytest.approx(losses["plain"], rel=1e-5)


# ---- precision, kernels, compilation ------------------------------------------------------------------------


def test_a_fused_optimizer_is_chosen_on_the_gpu_where_one_exists():
    from dpo.trainers import fused_if_available

    parameters = list(torch.nn.Linear(2, 2).parameters())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused_if_available(torch.optim.AdamW, parameters, cuda) == {"fused": True}
    assert fused_if_available(torch.optim.RMSprop, parameters, cuda) == {}  # RMSprop has no fused kernel
    assert fused_if_available(torch.optim.AdamW, parameters, cpu) == {}


def test_mixed_precision_on_one_device_computes_in_bfloat16(tmp_path):
    """model.fsdp_policy_mp=bfloat16 with BasicTrainer: float32 weights, bfloat16 matmuls (close, not equal)."""
    runs = {}
    for name, overrides in {"float32": [], "bfloat16": ["model.fsdp_policy_mp=bfloat16"]}.items():
        train_script.train(quick(tmp_path / name, "n_examples=64", "sample_during_eval=false", *overrides))
        runs[name] = train_losses(tmp_path / name)
    assert runs["bfloat16"] != runs["float32"]
    assert runs["bfloat16"] == pytest.approx(runs["float32"], rel=2e-2)
    state = torch.load(tmp_path / "bfloat16" / "LATEST" / "policy.pt", weights_only=True)["state"]
    assert all(value.dtype == torch.float32 for value in state.values() if value.is_floating_point())


def test_compiled_blocks_train_like_eager_ones(tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    runs = {}
    for name, overrides in {"eager": [], "compiled": ["compile=true"]}.items():
        train_script.train(quick(tmp_path / name, *DPO, "n_examples=64", "sample_during_eval=false", "packing=true",
                                 *overrides))
        runs[name] = train_losses(tmp_path / name)
    assert counters["stats"]["unique_graphs"] > 0  # something was compiled
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
    eager = torch.load(tmp_path / "eager" / "LATEST" / "policy.pt", weights_only=True)["state"]
    compiled = torch.load(tmp_path / "compiled" / "LATEST" / "policy.pt", weights_only=True)["state"]
    assert list(eager) == list(compiled)  # compiling renames nothing in the checkpoint
