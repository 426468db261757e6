"""Train a language model on preferences: SFT, DPO, conservative DPO, IPO, ...

    python train.py                                              # tiny model, toy task, SFT
    python train.py loss=sft model=pythia28 datasets=[hh] exp_name=my_sft
    python train.py loss=dpo loss.beta=0.1 model=pythia28 datasets=[hh] model.archive=.../LATEST/policy.pt
    python train.py trainer=FSDPTrainer ...                      # one process per visible GPU, started here
    torchrun --nproc_per_node 8 train.py trainer=FSDPTrainer ... # or started by torchrun, on one or more nodes
    python train.py resume=.../my_run_2026-...                   # continue a run from its newest checkpoint

The run itself is `dpo.run`; this file turns the command line into a config and starts the processes.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dpo.config import register_resolvers
from dpo.distributed import LaunchError, launch, launched_by_torchrun, visible_devices
from dpo.errors import ConfigError, RunDirError, UserError
from dpo.overrides import composition_problem
from dpo.resume import resumed_config
from dpo.run import run as train  # noqa: F401 (train.train(config), as tests and notebooks call it)
from dpo.run import run_from_command_line

register_resolvers()


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(config: DictConfig) -> None:
    try:
        config = command_line_config(config, list(HydraConfig.get().overrides.task))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if config.trainer == "BasicTrainer" or launched_by_torchrun():
        run_from_command_line(config)
        return
    try:  # like the reference implementation: one process per visible GPU, without torchrun
        launch(run_from_command_line, config, config.nproc_per_node or visible_devices(), port=config.fsdp_port)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def command_line_config(config: DictConfig, overrides: list[str]) -> DictConfig:
    """The composed config; with `resume=<run dir>`, that run's saved config plus the allowed overrides."""
    if config.resume is None:
        OmegaConf.resolve(config)  # once, so that every process started here gets the same run directory
        return config
    if not isinstance(config.resume, str) or not config.resume:
        shown = str(config.resume).lower() if isinstance(config.resume, bool) else config.resume
        raise ConfigError(f"resume={shown} is not a run directory; resume= takes the directory of the run to "
                          "continue (the 'run directory:' it printed when it started), e.g. resume=runs/my_run")
    saved_path = os.path.join(config.resume, "config.yaml")
    if not os.path.isfile(saved_path):
        raise RunDirError(f"resume={config.resume} holds no config.yaml, so it is not a run directory; give the "
                          "directory a run was started in")
    resumed = resumed_config(OmegaConf.load(saved_path), config, overrides)
    resumed.resume = os.path.abspath(config.resume)
    resumed.local_run_dir = resumed.resume  # the run may have been moved since it started
    return resumed


if __name__ == "__main__":
    problem = composition_problem(sys.argv[1:])  # before Hydra, whose own report of it is many lines
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    main()
