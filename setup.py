from setuptools import find_packages, setup

setup(
    name="dpo",
    version="0.1.0",
    description="Direct Preference Optimization and its relatives, from scratch in PyTorch",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dpo", "dpo.*"]),
    py_modules=["preference_datasets"],
    package_data={"dpo": ["demo_static/*"]},  # the demo's page, which is not a package
    install_requires=[
        # Install torch first (see README): an unpinned torch requirement with no torch present pulls CUDA builds.
        "torch>=2.1",
        "transformers>=4.56",
        "tokenizers>=0.20",
        "datasets>=2.14",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "wandb>=0.16",
        "tqdm",
        "numpy",
        "pyarrow",
        "safetensors",
    ],
    extras_require={
        "test": ["pytest>=7"],
        # matplotlib for `python -m dpo.plot` and the plots written at the end of a run: the standard for
        # static figures, and its Agg canvas needs no display.
        "plot": ["matplotlib>=3.5"],
        # Flask for `python -m dpo.demo`: small and stable, no frontend build, no network calls
        # (Gradio is far heavier and phones home by default).
        "demo": ["flask>=2.2"],
        # TRL only for benchmarks/dpo_step.py's side-by-side rows; pinned because the benchmark feeds it
        # pre-tokenized pairs through two of its internal methods.
        "bench": ["trl==1.16.0"],
        # peft for lora.rank=<r>: Hugging Face's own adapter library, whose saved adapters every tool that
        # serves or merges LoRA reads; hand-written adapters would need their own loaders everywhere.
        "lora": ["peft>=0.13"],
    },
)
