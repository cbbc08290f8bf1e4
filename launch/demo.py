"""The main job on the embedded demo corpus: ``python launch/demo.py [--config FILE] [a.b=c ...]``.

Builds data/demo if missing, pretrains the demo preset with 2 DeepSpeed processes on CPU,
evaluates on the held-out clips and prints what the model learned.
"""

import argparse

from multi_dist.config import exit_on_startup_error, load_config, start_up
from multi_dist.demo import DemoConfig, check_pretrain, run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. nproc=1 'pretrain=[steps=50]'")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    with exit_on_startup_error(), start_up():
        cfg = load_config(DemoConfig, args.config, args.overrides)
        check_pretrain(cfg)
    run(cfg)


if __name__ == "__main__":
    main()
