"""Sweep pretraining (or finetuning) hyperparameters with Ray Tune and ASHA early stopping.

python launch/sweep.py --config configs/sweep/tiny.yaml [--address ADDR] [--resume] [a.b=c ...]

Every trial is a run of the sweep's base config with sampled values, in sweep_dir/tune/trial_<id>/run;
results.csv and best.yaml (the best trial's run config) land in sweep_dir. --address joins an
existing Ray cluster (default: a local one); --resume continues an interrupted sweep.
"""

from multi_dist.sweep import main

if __name__ == "__main__":
    main(__doc__)
