"""Evaluate a checkpoint or an exported model on a task; writes {out_dir}/{task}-{tag}.json.

deepspeed --num_gpus N launch/evaluate.py --config configs/eval/msrvtt_qa.yaml init=runs/qa/checkpoints/step_00001000
python launch/evaluate.py --config configs/eval/demo_pretrain.yaml init=runs/demo      # one process
"""

from multi_dist.cli import main

if __name__ == "__main__":
    main("evaluate", __doc__)
