"""SFT, then DPO, from Python on the embedded toy task: `dpo.DPOTrainer` with a model you hold. Runs offline.

    python examples/python_api.py            # the README's numbers: a few minutes on a laptop CPU
    python examples/python_api.py --quick    # a smoke run of a few seconds

The fine-tuned model is saved to --output-dir (default runs/python_api/fine-tuned-model, which git ignores).

The model is the `tiny` GPT-NeoX of config/model/tiny.yaml, built here with transformers; the data is the
toy task (reverse a word) as (prompt, chosen, rejected) tuples. Any causal LM and tokenizer from
transformers work the same way, and so does a list of dicts or a `datasets.Dataset`.
"""

import argparse
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dpo import DPOTrainer
from dpo.data import get_dataset
from dpo.models import build_char_tokenizer


def toy_pairs(split: str) -> list[tuple[str, str, str]]:
    data = get_dataset("toy", split)
    return [(prompt, example["responses"][i], example["responses"][j])
            for prompt, example in data.items() for i, j in example["pairs"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage, to check the setup")
    parser.add_argument("--output-dir", default=os.path.join("runs", "python_api", "fine-tuned-model"),
                        help="where to save the fine-tuned model and tokenizer (save_pretrained)")
    args = parser.parse_args()
    length = {"n_examples": 64} if args.quick else {}

    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()  # one token per character, built offline
    config = AutoConfig.for_model("gpt_neox", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=512, max_position_embeddings=128, rotary_pct=1.0,
                                  vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    train, test = toy_pairs("train"), toy_pairs("test")
    shapes = dict(batch_size=32, eval_batch_size=64, max_length=64, max_prompt_length=48, warmup_steps=20,
                  optimizer="AdamW", lm_head_chunk_size=None, n_eval_examples=256, do_first_eval=False)

    # SFT on the chosen responses: trains from scratch, so a high learning rate and many epochs.
    sft = DPOTrainer(model=model, tokenizer=tokenizer, dataset=train, eval_dataset=test, loss="sft",
                     lr=2e-3, n_epochs=16, eval_every=16384, exp_name="api_sft", **shapes, **length)
    print("SFT:", {k: round(v, 3) for k, v in sft.train().items() if k.startswith("logps_eval")})

    # DPO from the SFT model; the reference is a frozen copy of the model as it is now.
    dpo = DPOTrainer(model=model, tokenizer=tokenizer, dataset=train, eval_dataset=test, beta=0.1,
                     lr=3e-5, n_epochs=1, eval_every=2048, exp_name="api_dpo", **shapes, **length)
    before = dpo.evaluate()
    after = dpo.train()
    for key in ("rewards_eval/accuracies", "rewards_eval/margins", "logps_eval/chosen"):
        print(f"{key}: {before[key]:.3f} before DPO, {after[key]:.3f} after")
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved {args.output_dir}/; the runs' logs and checkpoints: {sft.run_dir}, {dpo.run_dir}")


if __name__ == "__main__":
    main()
