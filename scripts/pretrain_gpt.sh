#!/usr/bin/env bash
# Run a patched Megatron-LM pretrain_gpt.py under torchrun with MoEtion.
#
#   scripts/pretrain_gpt.sh [--dry-run] [--help] [-- EXTRA_MEGATRON_FLAGS...]
#
# The defaults run on one node of 8 GPUs (TP1 x PP2 x EP4, data-parallel 4). The command line
# is assembled from flag blocks. Each block can be replaced whole through an environment
# variable of the same name, and the defaults inside a block through the smaller variables
# listed below:
#
#   MODEL_ARGS     NUM_LAYERS=16 HIDDEN_SIZE=2048 FFN_HIDDEN_SIZE=1408 NUM_HEADS=16
#                  SEQ_LENGTH=4096 MICRO_BATCH_SIZE=1 GLOBAL_BATCH_SIZE=256 TRAIN_ITERS=10000
#                  LR=3e-4 PRECISION=--bf16
#   MOE_ARGS       NUM_EXPERTS=64 TOPK=6 DISPATCHER=alltoall GROUPED_GEMM=--moe-grouped-gemm
#   PARALLEL_ARGS  TP=1 PP=2 EP=4 DIST_OPT=--use-distributed-optimizer
#                  SP=0 (1: --sequence-parallel, needs TP > 1)
#                  VPP=0 (N > 1: N virtual pipeline stages per rank, interleaved 1F1B)
#   DATA_ARGS      DATA_PATH (unset: --mock-data) TOKENIZER_MODEL TOKENIZER_TYPE
#   CKPT_ARGS      CHECKPOINT_DIR (unset: no persistent checkpoints) SAVE_INTERVAL=1000
#                  CKPT_FORMAT=torch_dist
#   MOETION_ARGS   MOETION=1 (0: MoEtion off) MOETION_WINDOW=0 (automatic)
#                  MOETION_REPLICATION_FACTOR=2 MOETION_METRICS_FILE MOETION_PERSIST_DIR
#                  MOETION_FAULT_PLAN (also read by the workers themselves)
#                  MOETION_DETECT_TIMEOUT_S (seconds of silence before a rank is declared dead)
#   RESILIENCY_ARGS  INPROCESS_RESERVES=0 (N > 0: Megatron's --inprocess-restart with N reserve
#                  ranks in the job: a dead rank is replaced in place and the survivors keep
#                  their state; the processes are started one per GPU without torchrun, whose
#                  agent would stop them all) INPROCESS_GRANULARITY=rank
#                  EXTERNAL_STORES=0 (1: the restart's stores in their own process on node 0,
#                  python -m megatron_moetion.store_host, so rank 0 can be replaced too)
#   LAUNCH         MEGATRON_DIR (the patched Megatron-LM checkout) GPUS_PER_NODE=8 NNODES=1
#                  NODE_RANK=0 MASTER_ADDR=localhost MASTER_PORT=6000 TORCHRUN=torchrun
#                  PYTHON=python (with INPROCESS_RESERVES)
#
# Reserve ranks, e.g. one node with 4 active ranks (PP=2 x EP=2) and 4 reserves:
# `INPROCESS_RESERVES=4 EP=2 CHECKPOINT_DIR=/ckpt scripts/pretrain_gpt.sh`. The active world
# (NNODES x GPUS_PER_NODE - INPROCESS_RESERVES) must fit the parallel sizes.
#
# Several nodes: run it on every node with NNODES, NODE_RANK and MASTER_ADDR set, e.g. on two
# nodes of 8 GPUs with PP=4 EP=4: `NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0> PP=4
# scripts/pretrain_gpt.sh` (MoEtion places each rank's buddies on the other node).
#
# --dry-run prints the command instead of running it. Flags after `--` are appended last, so
# they override the blocks (argparse keeps the last value).
set -euo pipefail

dry_run=0
extra=()
while (( $# )); do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "pretrain_gpt.sh: unknown option '$1' (allowed: --dry-run, --help, -- FLAGS...)" >&2; exit 2 ;;
  esac
done

int_re='^[0-9]+$'
for v in NUM_LAYERS HIDDEN_SIZE FFN_HIDDEN_SIZE NUM_HEADS SEQ_LENGTH MICRO_BATCH_SIZE \
         GLOBAL_BATCH_SIZE TRAIN_ITERS NUM_EXPERTS TOPK TP PP EP SP VPP GPUS_PER_NODE NNODES NODE_RANK \
         MASTER_PORT SAVE_INTERVAL MOETION_WINDOW MOETION_REPLICATION_FACTOR \
         INPROCESS_RESERVES EXTERNAL_STORES; do
  if [[ -n ${!v:-} && ! ${!v} =~ $int_re ]]; then
    echo "pretrain_gpt.sh: $v must be a non-negative integer; got '${!v}'" >&2; exit 2
  fi
done

MODEL_ARGS=${MODEL_ARGS:-"--num-layers ${NUM_LAYERS:-16} --hidden-size ${HIDDEN_SIZE:-2048} \
--ffn-hidden-size ${FFN_HIDDEN_SIZE:-1408} --num-attention-heads ${NUM_HEADS:-16} \
--seq-length ${SEQ_LENGTH:-4096} --max-position-embeddings ${SEQ_LENGTH:-4096} \
--micro-batch-size ${MICRO_BATCH_SIZE:-1} --global-batch-size ${GLOBAL_BATCH_SIZE:-256} \
--train-iters ${TRAIN_ITERS:-10000} --lr ${LR:-3e-4} --min-lr 3e-5 --lr-decay-style cosine \
--lr-warmup-iters 100 --weight-decay 0.1 --clip-grad 1.0 ${PRECISION---bf16} \
--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear \
--untie-embeddings-and-output-weights"}
MOE_ARGS=${MOE_ARGS:-"--num-experts ${NUM_EXPERTS:-64} --moe-router-topk ${TOPK:-6} \
--moe-token-dispatcher-type ${DISPATCHER:-alltoall} --moe-router-load-balancing-type aux_loss \
--moe-aux-loss-coeff 1e-2 ${GROUPED_GEMM---moe-grouped-gemm}"}
if [[ -z ${PARALLEL_ARGS:-} ]]; then
  PARALLEL_ARGS="--tensor-model-parallel-size ${TP:-1} \
--pipeline-model-parallel-size ${PP:-2} --expert-model-parallel-size ${EP:-4} \
${DIST_OPT---use-distributed-optimizer}"
  [[ ${SP:-0} != 0 ]] && PARALLEL_ARGS+=" --sequence-parallel"
  (( ${VPP:-0} > 1 )) && PARALLEL_ARGS+=" --num-virtual-stages-per-pipeline-rank ${VPP}"
fi
if [[ -z ${DATA_ARGS:-} ]]; then
  if [[ -n ${DATA_PATH:-} ]]; then
    DATA_ARGS="--data-path ${DATA_PATH} --tokenizer-type ${TOKENIZER_TYPE:-HuggingFaceTokenizer} \
--tokenizer-model ${TOKENIZER_MODEL:?set TOKENIZER_MODEL with DATA_PATH} --split 99,1,0"
  else
    DATA_ARGS="--mock-data --tokenizer-type NullTokenizer --vocab-size 32000"
  fi
fi
if [[ -z ${CKPT_ARGS:-} ]]; then
  CKPT_ARGS=""
  if [[ -n ${CHECKPOINT_DIR:-} ]]; then
    CKPT_ARGS="--save ${CHECKPOINT_DIR} --load ${CHECKPOINT_DIR} \
--save-interval ${SAVE_INTERVAL:-1000} --ckpt-format ${CKPT_FORMAT:-torch_dist}"
  fi
fi
if [[ -z ${MOETION_ARGS:-} ]]; then
  MOETION_ARGS=""
  if [[ ${MOETION:-1} != 0 ]]; then
    MOETION_ARGS="--moetion --moetion-window ${MOETION_WINDOW:-0} \
--moetion-replication-factor ${MOETION_REPLICATION_FACTOR:-2}"
    [[ -n ${MOETION_METRICS_FILE:-} ]] && MOETION_ARGS+=" --moetion-metrics-file ${MOETION_METRICS_FILE}"
    [[ -n ${MOETION_PERSIST_DIR:-} ]] && MOETION_ARGS+=" --moetion-persist-dir ${MOETION_PERSIST_DIR}"
    [[ -n ${MOETION_DETECT_TIMEOUT_S:-} ]] && MOETION_ARGS+=" --moetion-detect-timeout-s ${MOETION_DETECT_TIMEOUT_S}"
  fi
fi
LOG_ARGS=${LOG_ARGS:-"--log-interval 10 --eval-interval 1000 --eval-iters 10"}
gpus=${GPUS_PER_NODE:-8} nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0}
reserves=${INPROCESS_RESERVES:-0} world=$(( nnodes * gpus ))
if [[ -z ${RESILIENCY_ARGS:-} ]]; then
  RESILIENCY_ARGS=""
  if (( reserves > 0 )); then
    if (( reserves >= world )); then
      echo "pretrain_gpt.sh: INPROCESS_RESERVES must be below NNODES x GPUS_PER_NODE = $world; got $reserves" >&2; exit 2
    fi
    RESILIENCY_ARGS="--inprocess-restart --inprocess-active-world-size $(( world - reserves )) \
--inprocess-granularity ${INPROCESS_GRANULARITY:-rank}"
  fi
fi
if [[ ${EXTERNAL_STORES:-0} != 0 ]] && (( reserves == 0 )); then
  echo "pretrain_gpt.sh: EXTERNAL_STORES=1 needs INPROCESS_RESERVES > 0 (it hosts the --inprocess-restart stores)" >&2; exit 2
fi

MEGATRON_DIR=${MEGATRON_DIR:-}
entry=${MEGATRON_DIR:+$MEGATRON_DIR/}pretrain_gpt.py
# shellcheck disable=SC2206  # the blocks are whitespace-separated flag lists on purpose
flags=($MODEL_ARGS $MOE_ARGS $PARALLEL_ARGS $DATA_ARGS $CKPT_ARGS $MOETION_ARGS $RESILIENCY_ARGS
       $LOG_ARGS "${extra[@]}")
master=(MASTER_ADDR="${MASTER_ADDR:-localhost}" MASTER_PORT="${MASTER_PORT:-6000}")
if (( reserves > 0 )); then  # one process per GPU, as srun starts them
  store_host=("${PYTHON:-python}" -m megatron_moetion.store_host)
  procs=()
  for (( local = 0; local < gpus; local++ )); do
    procs+=("$(printf '%q ' env "${master[@]}" RANK=$(( node_rank * gpus + local )) \
      LOCAL_RANK="$local" WORLD_SIZE="$world" LOCAL_WORLD_SIZE="$gpus" \
      MOETION_EXTERNAL_STORES=$(( ${EXTERNAL_STORES:-0} != 0 )) "${PYTHON:-python}" "$entry" \
      "${flags[@]}")")
  done
else
  cmd=("${TORCHRUN:-torchrun}" --nproc-per-node "$gpus" --nnodes "$nnodes" --node-rank "$node_rank"
       --master-addr "${MASTER_ADDR:-localhost}" --master-port "${MASTER_PORT:-6000}" "$entry"
       "${flags[@]}")
fi

if (( dry_run )); then
  if (( reserves > 0 )); then
    if [[ ${EXTERNAL_STORES:-0} != 0 ]] && (( node_rank == 0 )); then
      printf '%q ' env "${master[@]}" "${store_host[@]}"; echo '&'
    fi
    printf '%s&\n' "${procs[@]}"
  else
    printf '%q ' "${cmd[@]}"; echo
  fi
  exit 0
fi
if [[ -z $MEGATRON_DIR || ! -f $MEGATRON_DIR/pretrain_gpt.py ]]; then
  echo "pretrain_gpt.sh: set MEGATRON_DIR to a Megatron-LM checkout with the MoEtion patches applied (scripts/apply_patches.sh MEGATRON_DIR); got '${MEGATRON_DIR}'" >&2
  exit 2
fi
if ! grep -q megatron_hooks "$MEGATRON_DIR/megatron/training/training.py"; then
  echo "pretrain_gpt.sh: $MEGATRON_DIR is not patched; run scripts/apply_patches.sh $MEGATRON_DIR first" >&2
  exit 2
fi
cd "$MEGATRON_DIR"
export PYTHONPATH="$MEGATRON_DIR${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
if (( reserves == 0 )); then
  exec "${cmd[@]}"
fi
# reserve ranks: nothing here stops the others when one process dies (the Wrapper replaces it)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
if [[ ${EXTERNAL_STORES:-0} != 0 ]] && (( node_rank == 0 )); then
  env "${master[@]}" "${store_host[@]}" & store_pid=$!
  sleep 2
fi
for proc in "${procs[@]}"; do
  eval "$proc" & pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid" || { code=$?; (( code == 137 || code == 143 )) || (( rc )) || rc=$code; }
done
[[ -n ${store_pid:-} ]] && kill "$store_pid" 2>/dev/null
exit "$rc"
