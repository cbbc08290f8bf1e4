"""Submit pretraining, finetuning or evaluation to Slurm (submitit): one task per GPU, requeued
after the time-limit warning and resumed from the checkpoint; evaluations of several checkpoints
or configs go out as one job array.

python launch/slurm.py pretrain --config configs/pretrain/base.yaml --nodes 8 --gpus-per-node 8 \\
    --partition gpu --time 1440 [a.b=c ...] [--max-requeues 10] [--dry-run]
python launch/slurm.py finetune --config configs/finetune/msrvtt_qa.yaml --gpus-per-node 8 --time 720
python launch/slurm.py pretrain --config configs/pretrain/tiny.yaml --tasks-per-node 2 --cpus-per-task 1 \\
    --time 30  # CPU ranks
python launch/slurm.py evaluate --config configs/eval/demo_pretrain.yaml --gpus-per-node 1 --time 30 \\
    --checkpoints runs/demo/checkpoints/step_00000100 runs/demo/checkpoints/step_00000150
"""

from multi_dist.slurm import main

if __name__ == "__main__":
    main(doc=__doc__)
