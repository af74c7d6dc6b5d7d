#!/usr/bin/env bash
# A3PO on verl across nodes (Ray + FSDP + vLLM). Start Ray first:
#   head:    ray start --head --port=6379
#   workers: ray start --address=<head-ip>:6379
# then run this on the head node. Every Ray worker imports engine.integrations.verl (which registers
# the losses) through VERL_USE_EXTERNAL_MODULES; the A3PO coefficients travel as environment variables.
set -euo pipefail
NNODES=${NNODES:-2}
GPUS=${GPUS_PER_NODE:-8}
MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}
DATA=${DATA:-/data/dapo-math-17k}
STEPS=${STEPS:-500}
MICRO_PER_STEP=${MICRO_PER_STEP:-16}   # ppo_epochs x mini-batches x micro-batches per worker and step
export VERL_USE_EXTERNAL_MODULES=engine.integrations.verl
export A3PO_ALPHA_POS=${A3PO_ALPHA_POS:-2} A3PO_ALPHA_NEG=${A3PO_ALPHA_NEG:-2} A3PO_RATIO=0.2 A3PO_DECAY=linear
export A3PO_TOTAL_STEPS=$STEPS A3PO_CALLS_PER_STEP=$MICRO_PER_STEP
python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
  data.train_batch_size=512 data.max_prompt_length=2048 data.max_response_length=8192 \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.actor.policy_loss.loss_mode=a3po \
  actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28 \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.actor.ppo_mini_batch_size=32 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1 \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=16 \
  trainer.nnodes="$NNODES" trainer.n_gpus_per_node="$GPUS" trainer.total_training_steps="$STEPS" \
  +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=engine.integrations.verl \
  +ray_kwargs.ray_init.runtime_env.env_vars.A3PO_ALPHA_POS="$A3PO_ALPHA_POS" \
  +ray_kwargs.ray_init.runtime_env.env_vars.A3PO_ALPHA_NEG="$A3PO_ALPHA_NEG" \
  +ray_kwargs.ray_init.runtime_env.env_vars.A3PO_TOTAL_STEPS="$STEPS" \
  +ray_kwargs.ray_init.runtime_env.env_vars.A3PO_CALLS_PER_STEP="$MICRO_PER_STEP" "$@"
