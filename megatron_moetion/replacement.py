"""What a restart in place decides and needs that is not Megatron's nor the Wrapper's.

After a failure, every surviving rank publishes where its training state stands; they resume in
place only from one common point, the start of an iteration no rank has begun to step
(``survivor_conflict`` says why not otherwise, and the failure policy's fallback applies).
``shut_down_peer_connections`` is gloo's missing abort: it releases every operation of the
failed generation still pending here or on a peer blocked on this rank. No Megatron, no store.
"""

from __future__ import annotations

import json
import os
import socket


def survivor_conflict(kept: dict[int, dict]) -> str:
    """Why the survivors cannot all resume in place from where they stand (``kept``: rank ->
    what it published), or "" when they can: one interrupted inside or after an optimizer step,
    or they stopped at different points."""
    inside = sorted(r for r, k in kept.items() if k.get("in_step"))
    if inside:
        return (f"ranks {inside} were inside an optimizer step the failure interrupted "
                f"(their state may be partly stepped)")
    after = sorted(r for r, k in kept.items() if k.get("after_step"))
    if after:
        return (f"ranks {after} stopped after an optimizer step the failure interrupted; "
                f"in place, training resumes only from the start of an iteration")
    if len({json.dumps(k, sort_keys=True) for k in kept.values()}) != 1:
        where = {r: k.get("iteration") for r, k in sorted(kept.items())}
        return (f"the survivors stopped at different points of training (resume iteration "
                f"by rank: {where})")
    return ""


def shut_down_peer_connections(*store_ports: int) -> int:
    """Shut down this process's connections to its peers (every connected TCP socket but
    those of the stores on ``store_ports``, client or server side). A gloo operation still
    pending on a failed generation's group keeps that group, and so its sockets, alive, and a survivor blocked on this rank would wait for its
    timeout; gloo has no abort (NCCL has ``ncclCommAbort``). Shutting the connections down
    makes every such operation fail at once, here and on the peers. Returns how many."""
    count = 0
    fd_dir = "/proc/self/fd"
    for name in os.listdir(fd_dir) if os.path.isdir(fd_dir) else ():
        try:
            if not os.readlink(os.path.join(fd_dir, name)).startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                      socket.AF_INET6):
                continue
            # a client of a store, or (on the rank that hosts one) a store's own connection
            if sock.getpeername()[1] in store_ports or sock.getsockname()[1] in store_ports:
                continue
            sock.shutdown(socket.SHUT_RDWR)
            count += 1
        except OSError:
            pass  # listening or already closed
        finally:
            sock.close()  # the duplicate only
    return count
