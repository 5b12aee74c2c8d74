"""Train an OLMo 2-style model: ``python train.py [group=option ...] [key=value ...]``.

Configs live in ``configs/`` (``train.yaml`` composes the groups); see docs/training.md.
The config is validated before torch and Lightning load, so a bad one fails in about a second.
"""

import hydra
from omegaconf import DictConfig

from olmo_mini import startup  # light: registers the config schema with Hydra


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with startup.no_run_dir_on_bad_input():
        startup.prepare(cfg)
        from olmo_mini.training.run import run  # the heavy stack: torch, Lightning, the model

        run(cfg)


if __name__ == "__main__":
    startup.report_bad_overrides(main)
