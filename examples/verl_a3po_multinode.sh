#!/usr/bin/env bash
# A3PO on verl 0.9.1 across nodes (Ray + FSDP + vLLM), writing every step into the engine's store.
# Install this project on every node (pip install --no-deps -e .) beside verl, then start Ray:
#   head:    ray start --head --port=6379
#   workers: ray start --address=<head-ip>:6379
# and run this on the head node. engine.integrations.verl_main composes verl's config with these
# overrides, checks the a3po.* keys with the engine's own config checks (a bad value stops here with
# one error line), and runs verl's default trainer with the a3po loss. The resolved coefficients reach
# every Ray worker as one JSON string (A3PO_RESOLVED in ray_init.runtime_env.env_vars, set by the
# entry point). The decay follows verl's own global step, also after a resume. The store run
# (STORE, default ./runs) is written by verl's TaskRunner: on a multi-node cluster put STORE on a
# filesystem that node can write (a shared one, or the head node when Ray places the TaskRunner there).
# Extra arguments are passed on: verl overrides (trainer.resume_mode=auto) or a3po keys
# (a3po.algorithm.alpha_pos=3, a3po.run_name=qwen-a3po).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
NNODES=${NNODES:-2}
GPUS=${GPUS_PER_NODE:-8}
MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}
DATA=${DATA:-/data/dapo-math-17k}
STEPS=${STEPS:-500}
STORE=${STORE:-runs}
A3PO_CONFIG=${A3PO_CONFIG:-$HERE/verl_a3po.yaml}
# Qwen2.5-Math-7B has a 4096-token context (max_position_embeddings): prompt + response must fit.
MAX_PROMPT=${MAX_PROMPT:-1024}
MAX_RESPONSE=${MAX_RESPONSE:-3072}
TRAIN_BATCH=512        # prompts per step
ROLLOUT_N=16           # responses per prompt
MINI_BATCH=32          # prompts per optimizer step
MICRO_PER_GPU=1        # responses per forward/backward per GPU
PPO_EPOCHS=1

python3 -m engine.integrations.verl_main \
  algorithm.adv_estimator=grpo \
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
  data.train_batch_size=$TRAIN_BATCH data.max_prompt_length="$MAX_PROMPT" data.max_response_length="$MAX_RESPONSE" \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28 \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.actor.ppo_epochs=$PPO_EPOCHS \
  actor_rollout_ref.actor.ppo_mini_batch_size=$MINI_BATCH \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=$MICRO_PER_GPU \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=$ROLLOUT_N \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=$MICRO_PER_GPU \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=$MICRO_PER_GPU \
  trainer.nnodes="$NNODES" trainer.n_gpus_per_node="$GPUS" trainer.total_training_steps="$STEPS" \
  a3po.config="$A3PO_CONFIG" a3po.store="$STORE" "$@"
