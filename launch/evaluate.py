"""Evaluate a checkpoint or an exported model on a task; writes {out_dir}/{task}-{tag}.json.

deepspeed --num_gpus N launch/evaluate.py --config configs/eval/msrvtt_qa.yaml init=runs/msrvtt_qa
python launch/evaluate.py --config configs/eval/demo_pretrain.yaml init=runs/demo      # one process
"""

from multi_dist.cli import main

if __name__ == "__main__":
    main("evaluate", __doc__)
