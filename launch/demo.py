"""The main job on the embedded demo corpus: ``python launch/demo.py [--config FILE] [a.b=c ...]``."""

import argparse

from multi_dist.config import load_config, to_dict
from multi_dist.demo import DemoConfig, run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", help="YAML config (configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. data.num_workers=1")
    args = p.parse_args(argv)
    cfg = load_config(DemoConfig, args.config, args.overrides)
    print(f"config: {to_dict(cfg)}")
    run(cfg)


if __name__ == "__main__":
    main()
