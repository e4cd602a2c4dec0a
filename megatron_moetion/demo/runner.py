"""Build Megatron command lines for the tiny CPU MoE run and launch them under torchrun.

``RunConfig`` describes one run (model size, parallel layout, MoEtion settings, faults);
``megatron_flags`` turns it into Megatron's flags; ``run_pretrain`` launches
``pretrain_moe_cpu`` on the patched Megatron tree and returns where its outputs are. Used by the
demo, the tests and the benchmark, so all of them train the same model the same way.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_moetion.testing.launch import (
    FT_LAUNCHER,
    RunResult,
    run_torchrun,
    run_with_reserves,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PATCHED_MEGATRON = Path(os.environ.get("MOETION_PATCHED_MEGATRON",
                                       REPO_ROOT / "build" / "megatron-patched"))
DRIVER = Path(__file__).resolve().parent / "pretrain_moe_cpu.py"
CPU_ENTRY = REPO_ROOT / "megatron_moetion" / "testing" / "cpu_entry.py"


@dataclass(frozen=True)
class RunConfig:
    """One tiny MoE GPT run on CPU (defaults: the demo's PP=2 x EP=2 x DP=2 layout)."""

    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    seq_length: int = 32
    micro_batch_size: int = 2
    global_batch_size: int = 8
    num_experts: int = 8
    topk: int = 2
    pp: int = 2
    ep: int = 2
    dp: int = 2
    tp: int = 1  # with MoE, TP > 1 turns sequence parallel on (MoELayer requires it)
    etp: int = 1  # expert tensor parallel (--expert-tensor-parallel-size; Megatron's default: tp)
    vpp: int = 0  # model chunks per pipeline rank (interleaved schedule); 0: not interleaved
    train_iters: int = 12
    distributed_optimizer: bool = True
    # "adam" (torch AdamW, step per parameter), "group-step-adam" (step per parameter group,
    # as Transformer Engine's and Apex's FusedAdam keep it), "sgd" (momentum)
    optimizer: str = "adam"
    bf16: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    lr: float = 1e-3
    seed: int = 1234
    moetion: bool = False
    window: int = 0
    replication_factor: int = 2
    fault_plan: str = ""
    save_interval: int = 0
    # reserve ranks: Megatron's --inprocess-restart (nvidia-resiliency-ext's Wrapper) replaces a
    # dead rank by one in place, the survivors keep their state (adapter.nvrx_restart)
    spares: int = 0
    external_stores: bool = False  # the restart's stores in the launcher, not in rank 0
    # under ft_launcher with --enable-ft-package: its --ft-* arguments (None: torchrun)
    ft_launcher: tuple[str, ...] | None = None
    # a patched Megatron-LM checkout's pretrain_gpt.py to run instead of the CPU driver
    # (testing.cpu_entry); its checkout goes first on the path
    entry: str = ""
    # "cpu": gloo, CPU initialization; "cuda": NCCL, parameters initialized on the GPU
    device: str = "cpu"
    vocab_size: int = 128
    deterministic: bool = True  # --deterministic-mode
    oracle: bool = True  # dump losses and state for the bitwise oracle (out_dir/oracle)
    extra_flags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def with_flags(self, *flags) -> RunConfig:
        """This run with more command-line flags (``--moetion-negative-control x``, ...)."""
        return self.replace(extra_flags=(*self.extra_flags, *(str(f) for f in flags)))


def megatron_flags(cfg: RunConfig, out_dir: Path) -> list[str]:
    """Megatron command-line flags for ``cfg``; outputs go under ``out_dir``."""
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"RunConfig.device must be cpu or cuda; got {cfg.device!r}")
    flags = [
        "--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size,
        "--ffn-hidden-size", cfg.ffn_hidden_size, "--num-attention-heads",
        cfg.num_attention_heads, "--seq-length", cfg.seq_length,
        "--max-position-embeddings", cfg.seq_length,
        "--micro-batch-size", cfg.micro_batch_size, "--global-batch-size",
        cfg.global_batch_size, "--train-iters", cfg.train_iters,
        "--lr", cfg.lr, "--min-lr", cfg.lr / 10, "--lr-decay-style", "cosine",
        "--lr-warmup-iters", 2, "--weight-decay", 0.01, "--clip-grad", 1.0,
        "--pipeline-model-parallel-size", cfg.pp,
        "--expert-model-parallel-size", cfg.ep,
        "--num-experts", cfg.num_experts, "--moe-router-topk", cfg.topk,
        "--moe-token-dispatcher-type", "alltoall",
        "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", 1e-2,
        "--distributed-backend", "gloo" if cfg.device == "cpu" else "nccl",
        "--untie-embeddings-and-output-weights",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", cfg.vocab_size,
        # data in the main process: a data-loader worker forked from a rank that already runs
        # gloo threads can deadlock in fork (seen once in ~50 runs, stuck in os.fork)
        "--num-workers", 0,
        "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
        "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
        "--no-rope-fusion", "--no-persist-layer-norm",
        "--disable-bias-linear", "--position-embedding-type", "rope",
        "--normalization", "LayerNorm", "--hidden-dropout", cfg.hidden_dropout,
        "--attention-dropout", cfg.attention_dropout, "--log-interval", 1, "--eval-iters", 0,
        "--eval-interval", 100000, "--seed", cfg.seed,
    ]
    if cfg.oracle:
        flags += ["--moetion-oracle-dir", out_dir / "oracle"]
    if cfg.device == "cpu":
        flags.append("--use-cpu-initialization")
    if cfg.deterministic:
        flags.append("--deterministic-mode")
    if cfg.tp > 1:
        flags += ["--tensor-model-parallel-size", cfg.tp, "--sequence-parallel",
                  "--expert-tensor-parallel-size", cfg.etp]
    if cfg.vpp:
        flags += ["--num-virtual-stages-per-pipeline-rank", cfg.vpp]
    if cfg.distributed_optimizer:
        flags.append("--use-distributed-optimizer")
    if cfg.bf16:
        flags.append("--bf16")
    if cfg.optimizer == "sgd":
        flags += ["--optimizer", "sgd"]
    elif cfg.optimizer == "group-step-adam":
        flags += ["--test-optimizer", "group-step-adam"]  # the driver's, not Megatron's
    elif cfg.optimizer != "adam":
        raise ValueError(f"RunConfig.optimizer must be adam, group-step-adam or sgd; got "
                         f"{cfg.optimizer!r}")
    if cfg.save_interval:
        flags += ["--save", out_dir / "ckpt", "--load", out_dir / "ckpt",
                  "--save-interval", cfg.save_interval, "--ckpt-format", "torch_dist"]
    if cfg.ft_launcher is not None:
        flags.append("--enable-ft-package")
    if cfg.spares:
        flags += ["--inprocess-restart", "--inprocess-active-world-size", cfg.world_size,
                  "--inprocess-granularity", "rank"]
    if cfg.moetion:
        flags += ["--moetion", "--moetion-window", cfg.window,
                  "--moetion-replication-factor", cfg.replication_factor,
                  "--moetion-metrics-file", out_dir / "metrics" / "rank{rank}.jsonl"]
        if cfg.fault_plan:
            flags += ["--moetion-fault-plan", cfg.fault_plan]
    return [str(f) for f in flags] + list(cfg.extra_flags)


def run_env(extra: dict[str, str] | None = None, tree: Path = PATCHED_MEGATRON) -> dict[str, str]:
    """Environment for a worker: the patched Megatron tree and this repo first on the path."""
    if not (tree / "megatron" / "training" / "training.py").exists():
        raise FileNotFoundError(
            f"no patched Megatron tree at {tree}; run `make patched-megatron` "
            f"(scripts/check_patches.sh build/megatron-patched) first")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree), str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("MOETION_FAULT_PLAN", None)  # faults come from RunConfig only
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron asks it with TP > 1
    env.update(extra or {})
    return env


def run_pretrain(cfg: RunConfig, out_dir: str | os.PathLike, *, timeout_s: float = 600,
                 env: dict[str, str] | None = None, max_restarts: int = 0) -> RunResult:
    """Launch one run; its log is ``out_dir/log.txt`` and its oracle dump ``out_dir/oracle``.

    ``max_restarts`` plays the cluster scheduler that requeues a failed job: when the job
    failed after MoEtion fell back to the last persistent checkpoint (it records that in
    ``<save>/moetion_fallback.json``), or after a planned fault fired (a ``kill`` ends the job
    through torchrun before anyone can record anything; fired faults are in
    ``<save>/moetion_faults_fired.jsonl``), and a checkpoint exists, the job is launched again
    with the same flags and Megatron's ``--load`` resumes it. (torchrun's own
    ``--max-restarts`` cannot do this with gloo on torch 2.13: the restarted workers try to
    connect to the first attempt's addresses.)
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "ckpt"
    watched = (ckpt / "moetion_fallback.json", ckpt / "moetion_faults_fired.jsonl")

    def stamp():
        return tuple(p.stat().st_mtime_ns if p.exists() else None for p in watched)

    seconds = 0.0
    if cfg.entry:  # a Megatron-LM checkout's own script, through the CPU support
        script, first = CPU_ENTRY, [str(Path(cfg.entry).resolve())]
        env = run_env(env, tree=Path(cfg.entry).resolve().parent)
    else:
        script, first, env = DRIVER, [], run_env(env)
    for _attempt in range(max_restarts + 1):
        before = stamp()
        if cfg.spares:
            result = run_with_reserves(script, cfg.world_size, cfg.spares,
                                       first + megatron_flags(cfg, out_dir),
                                       log_path=out_dir / "log.txt",
                                       timeout_s=timeout_s - seconds, env=env,
                                       external_stores=cfg.external_stores)
        else:
            ft = {} if cfg.ft_launcher is None else {"launcher": FT_LAUNCHER,
                                                       "launcher_args": cfg.ft_launcher}
            result = run_torchrun(script, cfg.world_size, first + megatron_flags(cfg, out_dir),
                                  log_path=out_dir / "log.txt", timeout_s=timeout_s - seconds,
                                  env=env, python=sys.executable, **ft)
        seconds += result.seconds
        if (result.returncode == 0 or result.timed_out or stamp() == before
                or not (ckpt / "latest_checkpointed_iteration.txt").exists()):
            break
    result.seconds = seconds
    return result
