"""Pretrain MuLTI.

deepspeed --num_gpus N launch/pretrain.py --config configs/pretrain/base.yaml [a.b=c ...]
torchrun --nproc_per_node N launch/pretrain.py --config ...      # or srun, or plain python
"""

from multi_dist.cli import main

if __name__ == "__main__":
    main("pretrain", __doc__)
