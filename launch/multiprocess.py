#!/usr/bin/env python3
"""Run N smooth-jax processes on this machine as one multi-host job (jax.distributed over localhost).

Each process gets its own slice of the CPU's devices (or, with --gpus-per-process, of the GPUs) and
the coordinator address; together they behave as N hosts of a pod. Used by the tests, and to try
a multi-host config before renting one.

    python launch/multiprocess.py --processes 2 --devices-per-process 4 -- \\
        train --config configs/tiny.py --workdir runs/mp --config.data.host_slicing=true

Everything after ``--`` is the smooth-jax command line. Output lines are prefixed with [pN].
Exits with the first non-zero exit code; if one process fails the others are stopped.
SIGTERM to the launcher (a scheduler's stop or preemption) is passed on to every process, and
the launcher waits for them; if the launcher dies outright, its processes are killed with it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading

from smooth_jax.runtime import describe_exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


# Looked up before any fork: the child, forked while the output threads run, only makes the call.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Runs in each child before exec: on Linux, be killed when the launcher dies (even by SIGKILL),
    so that a killed launcher never leaves a host process waiting in a collective forever."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=1, help="CPU devices per process (XLA host platform)")
    p.add_argument("--gpus-per-process", type=int, default=0, help="give each process this many GPUs instead")
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- smooth-jax arguments")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the smooth-jax command after --")
    port = args.port or _free_port()
    procs: list[subprocess.Popen] = []

    def forward(signum, frame):  # each process decides how to stop (train saves a checkpoint first)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    for pid in range(args.processes):
        env = dict(os.environ)
        env.update(SMOOTH_JAX_COORDINATOR=f"127.0.0.1:{port}", SMOOTH_JAX_NUM_PROCESSES=str(args.processes),
                   SMOOTH_JAX_PROCESS_ID=str(pid), PYTHONUNBUFFERED="1")
        # All processes are on this machine: CPU collectives go over loopback, so the run does not
        # depend on what the hostname resolves to.
        env.setdefault("SMOOTH_JAX_GLOO_HOSTNAME", "127.0.0.1")
        if args.gpus_per_process:
            first = pid * args.gpus_per_process
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(args.gpus_per_process))
        else:
            flags = env.get("XLA_FLAGS", "")
            flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices_per_process}".strip()
            env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
        proc = subprocess.Popen([sys.executable, "-m", "smooth_jax.cli", *command], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=_die_with_parent)
        threading.Thread(target=_pump, args=(proc, f"[p{pid}]"), daemon=True).start()
        procs.append(proc)
    code = 0
    remaining = list(procs)
    while remaining:
        for proc in list(remaining):
            try:
                rc = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            remaining.remove(proc)
            if rc:  # say which host went down and how
                print(f"[launcher] process {procs.index(proc)} ended with {describe_exit(rc)}", file=sys.stderr,
                      flush=True)
            if rc and not code:
                code = rc if rc > 0 else 128 - rc  # killed by signal N: exit 128+N, as a shell reports it
                for other in remaining:  # one host down: the collective would hang forever
                    other.terminate()
    return code


if __name__ == "__main__":
    sys.exit(main())
