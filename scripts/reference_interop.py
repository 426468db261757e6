"""Checks that checkpoints move both ways between this project and transformers 4.29.2, the reference's version.

Run by scripts/check_reference_interop.sh, alternately in this project's environment ("here") and in
a virtual environment with transformers 4.29.2 ("there"), on one work directory:

    python scripts/reference_interop.py write-here WORK           # this project writes checkpoints
    OLD_PYTHON scripts/reference_interop.py check-there WORK      # 4.29.2 loads them, writes its own
    python scripts/reference_interop.py check-here WORK           # this project loads 4.29.2's

Each case is a tiny, seeded, randomly initialised model of one architecture, its weights perturbed so
that equal logits mean something, described by a config in the legacy key style both versions read.
Every check prints one line, `PASS` or `FAIL`, with the largest |difference| of the logits from those
the writing side computed; the exit status is 1 if any check failed. The "there" side uses only torch
and transformers, and loads as the reference implementation does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import traceback
from typing import Callable, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5
CONTROL_MINIMUM = 1e-4  # a corrupted buffer must move the logits at least this much
SAMPLE_TEXT = "\n\nHuman: reverse dgaf, please!\n\nAssistant: fagd"

# Dropout off everywhere (4.29.2's GPT-NeoX and Llama have none). max_position_embeddings is 32;
# Llama's inputs are longer, so 4.29.2 rebuilds its RoPE tables from the inv_freq it loaded.
CASES = {
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 64, "max_position_embeddings": 32, "rotary_pct": 0.5,
                 "rotary_emb_base": 5000, "use_parallel_residual": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "gptj": {"model_type": "gptj", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32, "rotary_dim": 4,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 32, "rms_norm_eps": 1e-6},
}
SEQUENCE_LENGTH = {"llama": 48}  # others: 24
# Buffers 4.29.2 actually uses, and a wrong value for each: the control checks that a test would notice.
CONTROLS = {"gpt_neox": ("attention.bias", lambda mask: torch.ones_like(mask)),
            "gpt2": ("attn.bias", lambda mask: torch.ones_like(mask)),
            "llama": ("rotary_emb.inv_freq", lambda inv_freq: inv_freq * 1.01)}


# ---- reporting -----------------------------------------------------------------------------------


class Report:
    def __init__(self):
        self.failed = 0

    def line(self, ok: bool, case: str, what: str, detail: str) -> None:
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {case:<9} {what:<62} {detail}", flush=True)

    def logits(self, case: str, what: str, compute: Callable[[], torch.Tensor], expected: torch.Tensor) -> None:
        """One check: `compute()` must give `expected` within TOLERANCE."""
        self.run(case, what, lambda: _compare(compute(), expected))

    def control(self, case: str, what: str, compute: Callable[[], torch.Tensor], expected: torch.Tensor) -> None:
        """One control: `compute()` (from a deliberately wrong state) must differ from `expected`."""
        def differs():
            difference = _max_difference(compute(), expected)
            return difference > CONTROL_MINIMUM, f"max|Δlogits| = {difference:.2e} (must be > {CONTROL_MINIMUM:.0e})"
        self.run(case, what, differs)

    def run(self, case: str, what: str, check: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = check()
        except Exception as error:  # a check that crashes is a failed check, and the others still run
            traceback.print_exc(file=sys.stderr)
            ok, detail = False, f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
        self.line(ok, case, what, detail)


def _max_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        raise ValueError(f"logits of shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    return (actual.float() - expected.float()).abs().max().item()


def _compare(actual: torch.Tensor, expected: torch.Tensor) -> tuple[bool, str]:
    difference = _max_difference(actual, expected)
    return difference <= TOLERANCE, f"max|Δlogits| = {difference:.2e}"


# ---- shared by both sides ------------------------------------------------------------------------


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight off its initial value, so that norms and biases matter too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def input_ids(case: str, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab_size, (2, SEQUENCE_LENGTH.get(case, 24)), generator=generator)


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def case_dir(work: str, case: str, *parts: str) -> str:
    return os.path.join(work, case, *parts)


def read_json(path: str) -> dict:
    with open(path) as file:
        return json.load(file)


def torch_load(path: str):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- here: this project's environment ------------------------------------------------------------


def here_cases(gpt2_tokenizer: Optional[str]) -> dict:
    """Each case's legacy config and tokenizer; the real GPT-2 tokenizer adds a case when given."""
    cases = {name: (config, "char") for name, config in CASES.items()}
    if gpt2_tokenizer:
        cases["gpt2-bpe"] = (CASES["gpt2"], gpt2_tokenizer)
    return cases


def write_here(work: str, gpt2_tokenizer: Optional[str], report: Report) -> None:
    """Write each case's checkpoint exactly as the trainer saves LATEST/, with its logits and token ids."""
    for case, (config, tokenizer_name) in here_cases(gpt2_tokenizer).items():
        report.run(case, "written here (policy.pt + Hugging Face files)",
                   lambda: _write_here_case(work, case, config, tokenizer_name))


def _write_here_case(work: str, case: str, config: dict, tokenizer_name: str) -> tuple[bool, str]:
    from dpo.checkpoints import to_reference_names, write_checkpoint
    from dpo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer({"tokenizer_name_or_path": tokenizer_name})
    torch.manual_seed(0)
    model = load_model({"from_config": config}, tokenizer, torch.float32)
    perturb(model, seed=1)
    os.makedirs(case_dir(work, case), exist_ok=True)
    legacy_config = {**config, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.eos_token_id}
    with open(case_dir(work, case, "config.json"), "w") as file:
        json.dump({"config": legacy_config, "tokenizer": tokenizer_name}, file, indent=2)
    # as BasicTrainer.save writes LATEST/
    state = model.state_dict()
    write_checkpoint(case_dir(work, case, "here"), 64, {"loss": 1.0},
                     {"policy.pt": to_reference_names(state, model)}, hf_model=model, tokenizer=tokenizer,
                     hf_state=state)
    ids = input_ids(case, len(tokenizer))
    torch.save({"ids": ids, "logits": logits_of(model, ids), "token_ids": tokenizer(SAMPLE_TEXT)["input_ids"]},
               case_dir(work, case, "here_expected.pt"))
    return True, f"{len(state)} tensors; {sorted(os.listdir(case_dir(work, case, 'here')))}"


def check_here(work: str, report: Report) -> None:
    """Load what 4.29.2 wrote: its policy.pt, through model.archive too, and its save_pretrained directory."""
    for case in _cases_in(work):
        if not os.path.isfile(case_dir(work, case, "there_expected.pt")):
            report.line(False, case, "4.29.2 wrote nothing to load", case_dir(work, case, "there_expected.pt"))
            continue
        described = read_json(case_dir(work, case, "config.json"))
        expected = torch_load(case_dir(work, case, "there_expected.pt"))
        _check_here_case(case, described["config"], described["tokenizer"], case_dir(work, case, "there"),
                         expected, report)


def _check_here_case(case: str, config: dict, tokenizer_name: str, there: str, expected: dict,
                     report: Report) -> None:
    from dpo.checkpoints import load_policy_state, read_archive
    from dpo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer({"tokenizer_name_or_path": tokenizer_name})
    policy_path = os.path.join(there, "policy.pt")

    def with_load_policy_state():
        model = load_model({"from_config": config}, tokenizer, torch.float32)
        load_policy_state(model, read_archive(policy_path)["state"], policy_path)
        return logits_of(model, expected["ids"])

    def policy_and_reference_via_model_archive():
        policy, reference = _load_models_like_train(config, tokenizer_name, tokenizer, policy_path)
        torch.testing.assert_close(logits_of(reference, expected["ids"]), logits_of(policy, expected["ids"]),
                                   rtol=0, atol=0)
        return logits_of(policy, expected["ids"])

    def from_save_pretrained():
        model = load_model({"name_or_path": os.path.join(there, "hf")}, tokenizer, torch.float32)
        return logits_of(model, expected["ids"])

    report.logits(case, "4.29.2 policy.pt -> here: load_policy_state", with_load_policy_state, expected["logits"])
    report.logits(case, "4.29.2 policy.pt -> here: model.archive (policy and reference)",
                  policy_and_reference_via_model_archive, expected["logits"])
    report.logits(case, "4.29.2 save_pretrained -> here: dpo.models.load_model", from_save_pretrained,
                  expected["logits"])
    report.run(case, "4.29.2 tokenizer save_pretrained -> here: same token ids",
               lambda: _same_ids(load_tokenizer({"name_or_path": os.path.join(there, "hf")}), expected["token_ids"]))


def _load_models_like_train(config: dict, tokenizer_name: str, tokenizer, policy_path: str):
    """train.py's own loading of `model.archive=policy_path` into a policy and a reference model."""
    from omegaconf import OmegaConf

    from dpo.checkpoints import read_archive
    from dpo.models import load_models

    run_config = OmegaConf.create({"seed": 0, "model": {
        "name_or_path": None, "tokenizer_name_or_path": tokenizer_name, "from_config": config,
        "archive": policy_path, "policy_dtype": "float32", "reference_dtype": "float32"}})
    with contextlib.redirect_stdout(io.StringIO()):  # its "loaded model.archive=..." line
        return load_models(run_config, tokenizer, True, None, read_archive(policy_path))


def _same_ids(tokenizer, expected_ids: list) -> tuple[bool, str]:
    ids = tokenizer(SAMPLE_TEXT)["input_ids"]
    return ids == expected_ids, f"{len(ids)} ids" + ("" if ids == expected_ids else f": {ids} vs {expected_ids}")


def _cases_in(work: str) -> list[str]:
    return sorted(name for name in os.listdir(work) if os.path.isfile(case_dir(work, name, "config.json")))


# ---- there: transformers 4.29.2, loading and saving as the reference implementation does ----------


def check_there(work: str, report: Report) -> None:
    for case in _cases_in(work):
        described = read_json(case_dir(work, case, "config.json"))
        if not os.path.isfile(case_dir(work, case, "here_expected.pt")):
            report.line(False, case, "this project wrote nothing to load", case_dir(work, case, "here_expected.pt"))
            continue
        expected = torch_load(case_dir(work, case, "here_expected.pt"))
        _check_there_case(case, described["config"], case_dir(work, case, "here"), expected, report)
        report.run(case, "written by 4.29.2 (policy.pt + save_pretrained)",
                   lambda: _write_there_case(work, case, described["config"]))
        report.run(case, "tokenizer written by 4.29.2 (save_pretrained)", lambda: _write_there_tokenizer(work, case))


def _old_model(config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def _check_there_case(case: str, config: dict, here: str, expected: dict, report: Report) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def strict_load(state):
        model = _old_model(config)
        model.load_state_dict(state)  # strict, as the reference's train.py loads model.archive
        return logits_of(model, expected["ids"])

    def reference_load():
        state_dict = torch.load(os.path.join(here, "policy.pt"), map_location="cpu")
        return strict_load(state_dict["state"])

    report.logits(case, "policy.pt -> 4.29.2: strict load_state_dict", reference_load, expected["logits"])
    if case in CONTROLS:
        suffix, corrupt = CONTROLS[case]
        state = torch.load(os.path.join(here, "policy.pt"), map_location="cpu")["state"]
        corrupted = {key: corrupt(value) if key.endswith(suffix) else value for key, value in state.items()}
        report.control(case, f"control: a wrong {suffix} changes 4.29.2's logits", lambda: strict_load(corrupted),
                       expected["logits"])
    report.logits(case, "Hugging Face files -> 4.29.2: from_pretrained",
                  lambda: logits_of(AutoModelForCausalLM.from_pretrained(here), expected["ids"]), expected["logits"])
    report.run(case, "tokenizer -> 4.29.2: AutoTokenizer, same token ids",
               lambda: _same_ids(AutoTokenizer.from_pretrained(here), expected["token_ids"]))


def _write_there_case(work: str, case: str, config: dict) -> tuple[bool, str]:
    """A 4.29.2 model saved as the reference saves policy.pt, and with save_pretrained."""
    torch.manual_seed(5)
    model = _old_model(config)
    perturb(model, seed=6)
    there = case_dir(work, case, "there")
    os.makedirs(there, exist_ok=True)
    # BasicTrainer.write_state_dict of the reference implementation
    torch.save({"step_idx": 32, "state": model.state_dict(), "metrics": {"loss": 2.0}},
               os.path.join(there, "policy.pt"))
    model.save_pretrained(os.path.join(there, "hf"))
    ids = input_ids(case, config["vocab_size"])
    token_ids = torch_load(case_dir(work, case, "here_expected.pt"))["token_ids"]
    torch.save({"ids": ids, "logits": logits_of(model, ids), "token_ids": token_ids},
               case_dir(work, case, "there_expected.pt"))
    return True, f"{len(model.state_dict())} tensors; {sorted(os.listdir(os.path.join(there, 'hf')))}"


def _write_there_tokenizer(work: str, case: str) -> tuple[bool, str]:
    """The tokenizer this project exported, as 4.29.2 loads and saves it again."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(case_dir(work, case, "here"))
    tokenizer.save_pretrained(case_dir(work, case, "there", "hf"))
    return True, type(tokenizer).__name__


# ---- command line --------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("write-here", "check-there", "check-here"))
    parser.add_argument("work", help="the work directory the three steps share")
    parser.add_argument("--gpt2-tokenizer", help="a GPT-2 tokenizer directory (or hub name) for one more case")
    args = parser.parse_args(argv)
    if args.step != "check-there":
        sys.path.insert(0, REPO_ROOT)  # dpo/ and train.py
    report = Report()
    if args.step == "write-here":
        write_here(args.work, args.gpt2_tokenizer, report)
    elif args.step == "check-there":
        check_there(args.work, report)
    else:
        check_here(args.work, report)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
