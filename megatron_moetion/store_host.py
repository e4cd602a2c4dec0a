"""The in-process restart's two stores, hosted outside every rank.

Under Megatron's ``--inprocess-restart`` two TCP stores coordinate the job: the application
store on ``MASTER_PORT + 1`` (the process groups of every restart rendezvous in it, and MoEtion's
kept-state handover) and nvidia-resiliency-ext's Wrapper store on ``MASTER_PORT + 2`` (its
barriers, heartbeats and rank assignment). By default initial rank 0 hosts both, so its death
ends the job (the Wrapper marks it critical, and every survivor's next store call fails).

Run ``python -m megatron_moetion.store_host`` (reading ``MASTER_ADDR`` / ``MASTER_PORT``) on
the first node before the ranks start, and start the ranks with ``MOETION_EXTERNAL_STORES=1``:
every rank then connects to both stores as a client, and any rank, rank 0 included, can be
replaced in place. The process holds no training state and does no I/O but the stores'.
"""

from __future__ import annotations

import argparse
import os
import signal
from datetime import timedelta

ENV_EXTERNAL_STORES = "MOETION_EXTERNAL_STORES"
APP_STORE_PORT_OFFSET, WRAPPER_STORE_PORT_OFFSET = 1, 2  # as Megatron's inprocess_restart.py


def external_stores() -> bool:
    """Whether the ranks were started with the stores hosted outside them."""
    value = os.environ.get(ENV_EXTERNAL_STORES, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV_EXTERNAL_STORES} must be 0 or 1; got {value!r}")
    return value == "1"


def host_stores(host: str, master_port: int) -> list:
    """Start both stores' servers in this process; they live as long as the returned list."""
    import torch.distributed as dist

    return [dist.TCPStore(host, master_port + offset, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=300), use_libuv=True)
            for offset in (APP_STORE_PORT_OFFSET, WRAPPER_STORE_PORT_OFFSET)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_moetion.store_host",
        description="Host the --inprocess-restart stores outside every rank (start the ranks "
                    f"with {ENV_EXTERNAL_STORES}=1).")
    parser.add_argument("--host", default=os.environ.get("MASTER_ADDR", "0.0.0.0"),
                        help="address to listen on (default: MASTER_ADDR)")
    parser.add_argument("--master-port", type=int, default=os.environ.get("MASTER_PORT"),
                        help="the job's MASTER_PORT; the stores take the two ports after it")
    args = parser.parse_args(argv)
    if args.master_port is None:
        parser.error("--master-port (or MASTER_PORT in the environment) is required")
    stores = host_stores(args.host, int(args.master_port))
    print(f"[moetion] stores on {args.host}:{int(args.master_port) + APP_STORE_PORT_OFFSET} "
          f"and :{int(args.master_port) + WRAPPER_STORE_PORT_OFFSET}; SIGTERM ends them",
          flush=True)
    ends = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, ends)
    signal.sigwait(ends)
    del stores


if __name__ == "__main__":
    main()
