"""`python -m trainer [overrides]`: check the config, then run train(cfg) under Hydra."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from trainer.config import ConfigError, register
from trainer.precheck import check


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float:
    import logging

    from trainer.train import train  # TensorFlow starts here, after the config checks
    from trainer.data import DataError
    from trainer.models.weights import CheckpointError

    try:
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, DataError, CheckpointError) as e:  # user mistakes: no traceback
        logging.getLogger("trainer").error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics["val_accuracy"]  # the objective of sweeps


def main() -> None:
    try:
        check(sys.argv[1:])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    register()
    app()


if __name__ == "__main__":
    main()
