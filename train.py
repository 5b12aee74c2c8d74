"""Train an OLMo 2-style model: ``python train.py [group=option ...] [key=value ...]``.

Configs live in ``configs/`` (``train.yaml`` composes the groups); see docs/training.md.
"""

import hydra
from omegaconf import DictConfig

import olmo_mini.config  # noqa: F401  (registers the config schema with Hydra)
from olmo_mini.training import run


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
