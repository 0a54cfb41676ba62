"""The gloo group of a test's spawned worker: joined through a rendezvous file, left in step.

torch's gloo teardown can abort a process that is already done ("terminate called without an
active exception", SIGABRT): a rank that closes its connections while its peer still uses them,
or a C++ thread still alive when the interpreter finalizes. A worker that has written its results
therefore waits for its peers, destroys the group and leaves at once with status 0; a worker that
failed raises as usual, and the group's timeout turns a dead peer into an error, never a hang."""
import datetime
import faulthandler
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

import mos

TIMEOUT = datetime.timedelta(seconds=120)


@contextmanager
def spawned_group(rank, rendezvous, world):
    """Joins the group (one thread each for torch and mos's BLAS, no TCP port to pick, so
    concurrent runs cannot collide) and runs the body; see the module's docstring for the exit."""
    faulthandler.enable()  # an abort prints every thread's Python stack
    torch.set_num_threads(1)
    mos.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
