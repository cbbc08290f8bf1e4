"""Finetune MuLTI on a downstream task (qa, choice, retrieval, labels) from pretrained weights.

deepspeed --num_gpus N launch/finetune.py --config configs/finetune/msrvtt_qa.yaml init=runs/pretrain_base/model
torchrun --nproc_per_node N launch/finetune.py --config ...      # or srun, or plain python
"""

from multi_dist.cli import main

if __name__ == "__main__":
    main("finetune", __doc__)
