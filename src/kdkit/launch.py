"""``kdkit --nproc N COMMAND ...``: the command in N processes on this machine (torchrun).

Equivalent to ``torchrun --standalone --nproc-per-node N -m kdkit COMMAND ...``, with
kdkit's conventions: each process gets a fair share of the CPU threads unless told
otherwise, torchrun's own chatter is kept quiet, and a failure ends as one line naming the
rank that failed (that rank's own ``kdkit: error`` line comes first). Across machines,
run torchrun yourself on each node with a rendezvous (see docs/DEVICES.md).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``kdkit argv`` in ``nproc`` local processes; return the exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "OMP_NUM_THREADS" not in os.environ and "KDKIT_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"kdkit-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_configs={"is_host": True},
        max_restarts=0, monitor_interval=0.2, start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "kdkit", *argv)
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())
        code = failure.exitcode
        how = (f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
        print(f"kdkit: error: --nproc {nproc}: rank {rank} {how}; the other processes were "
              "stopped", file=sys.stderr)
        return 130 if code in (130, -2) else (code if code > 0 else 1)
    except (KeyboardInterrupt, SignalException):  # Ctrl-C: the processes checkpointed
        print("kdkit: interrupted", file=sys.stderr)
        return 130
    return 0
