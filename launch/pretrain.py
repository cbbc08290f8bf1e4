"""Pretrain MuLTI.

deepspeed --num_gpus N launch/pretrain.py --config configs/pretrain/base.yaml [a.b=c ...]
torchrun --nproc_per_node N launch/pretrain.py --config ...      # or srun, or plain python
"""

import argparse

from multi_dist.config import load_config
from multi_dist.train import TrainConfig, setup_logging, train


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/pretrain/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher; read from env")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. steps=100 data.batch_size=8")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    cfg = load_config(TrainConfig, args.config, args.overrides)  # a typo fails here, before any process group
    setup_logging()
    train(cfg)


if __name__ == "__main__":
    main()
