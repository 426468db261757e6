"""Direct Preference Optimization and its relatives, from scratch in PyTorch.

`from dpo import DPOTrainer` is the Python API (dpo/api.py); `train.py` is the command line.
"""

__version__ = "0.1.0"

__all__ = ["DPOTrainer"]


def __getattr__(name: str):
    # Imported on first use: `import dpo.losses` in a notebook should not load Hydra and transformers.
    if name == "DPOTrainer":
        from dpo.api import DPOTrainer

        return DPOTrainer
    raise AttributeError(f"module 'dpo' has no attribute {name!r}")
