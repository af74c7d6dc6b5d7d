#!/usr/bin/env bash
# A3PO on verl 0.9.1 across nodes (Ray + FSDP + vLLM). Install this project on every node
# (pip install --no-deps -e .) beside verl, then start Ray:
#   head:    ray start --head --port=6379
#   workers: ray start --address=<head-ip>:6379
# and run this on the head node. Every Ray worker imports engine.integrations.verl (which registers
# the losses) through VERL_USE_EXTERNAL_MODULES. Ray does not copy this shell's environment to other
# nodes, so VERL_USE_EXTERNAL_MODULES and every A3PO_* variable travel in ray.init's
# runtime_env.env_vars. Ray accepts only strings there and Hydra reads 2 as an int, hence the
# Hydra quotes '...' around each value. The decay follows verl's own global step (also after a
# resume); A3PO_CALLS_PER_STEP only matters if that step is not available (see the module).
set -euo pipefail
NNODES=${NNODES:-2}
GPUS=${GPUS_PER_NODE:-8}
MODEL=${MODEL:-Qwen/Qwen2.5-Math-7B}
DATA=${DATA:-/data/dapo-math-17k}
STEPS=${STEPS:-500}
# Qwen2.5-Math-7B has a 4096-token context (max_position_embeddings): prompt + response must fit.
MAX_PROMPT=${MAX_PROMPT:-1024}
MAX_RESPONSE=${MAX_RESPONSE:-3072}
TRAIN_BATCH=512        # prompts per step
ROLLOUT_N=16           # responses per prompt
MINI_BATCH=32          # prompts per optimizer step
MICRO_PER_GPU=1        # responses per forward/backward per GPU
PPO_EPOCHS=1
export VERL_USE_EXTERNAL_MODULES=engine.integrations.verl
export A3PO_ALPHA_POS=${A3PO_ALPHA_POS:-2} A3PO_ALPHA_NEG=${A3PO_ALPHA_NEG:-2} A3PO_RATIO=${A3PO_RATIO:-0.2}
export A3PO_DECAY=${A3PO_DECAY:-linear} A3PO_DECAY_RATE=${A3PO_DECAY_RATE:-5} A3PO_TOTAL_STEPS=${A3PO_TOTAL_STEPS:-$STEPS}
# Fallback only: loss calls per worker and step = epochs x responses per step / (GPUs x micro-batch).
export A3PO_CALLS_PER_STEP=$(( PPO_EPOCHS * TRAIN_BATCH * ROLLOUT_N / (NNODES * GPUS * MICRO_PER_GPU) ))

# A wrong A3PO_* value stops here with one error line instead of inside a Ray worker.
python3 -m engine.integrations.verl

# Forward VERL_USE_EXTERNAL_MODULES and every A3PO_* variable that is set, each as a quoted string.
FORWARD=()
for name in VERL_USE_EXTERNAL_MODULES ${!A3PO_@}; do
  FORWARD+=("+ray_kwargs.ray_init.runtime_env.env_vars.${name}='${!name}'")
done

python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
  data.train_batch_size=$TRAIN_BATCH data.max_prompt_length="$MAX_PROMPT" data.max_response_length="$MAX_RESPONSE" \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.actor.policy_loss.loss_mode=a3po \
  actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28 \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.actor.ppo_epochs=$PPO_EPOCHS \
  actor_rollout_ref.actor.ppo_mini_batch_size=$MINI_BATCH \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=$MICRO_PER_GPU \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=$ROLLOUT_N \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=$MICRO_PER_GPU \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=$MICRO_PER_GPU \
  trainer.nnodes="$NNODES" trainer.n_gpus_per_node="$GPUS" trainer.total_training_steps="$STEPS" \
  "${FORWARD[@]}" "$@"
