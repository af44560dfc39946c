#!/usr/bin/env bash
# Two CPU processes on one machine, DDP over gloo (what tests/test_distributed.py checks).
# accelerate 1.15 starts only one process with `--cpu` unless MPI is set up; `--multi_gpu` starts the
# processes with torchrun and hcx-extend's Trainer joins them in a gloo group when there is no CUDA.
# The global batch (--batch-size) is split over the processes: results match a single process.
set -euo pipefail
OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision no --dynamo_backend no \
  -m hcx_extend.cli train --strategy new-encoder --data basic-motions --output runs/ddp-cpu "$@"
