"""Multi-host runs: `jax.distributed.initialize` from flags or the environment, with a timeout
that ends in a clear message instead of a hang, process-0 helpers and per-host log files.

Every host runs the same program. Modes (`--distributed`):

  auto      multi-process when a coordinator address is given (--coordinator_address or
            $JAX_COORDINATOR_ADDRESS, with --num_processes/$JAX_NUM_PROCESSES and
            --process_id/$JAX_PROCESS_ID), single-process otherwise (the default)
  tpu       Cloud TPU pod slice: JAX reads the topology from the TPU metadata (what
            `launch/tpu/pod.py run` passes on every worker)
  off       single process

Only process 0 writes results and reports (`is_primary()`); every process computes.

A coordinator that cannot be reached is reported within `--distributed_timeout` seconds:
processes other than 0 probe its TCP port first and raise `DistributedError` naming the
address; a process stuck inside `jax.distributed.initialize` (e.g. process 0 waiting for peers
that never come) is ended by a watchdog that prints the same kind of message and exits with
status 75, before JAX's own fatal abort.
"""
from __future__ import annotations

import logging as std_logging
import os
import socket
import sys
import threading
import time
from typing import Optional

import jax
from absl import flags, logging



def define_flags() -> None:
    """The multi-host flags, for an entry point's `__main__` (importing this module defines none):
    --distributed, --coordinator_address, --num_processes, --process_id, --distributed_timeout,
    --host_log_dir."""
    flags.DEFINE_enum("distributed", "auto", ["auto", "tpu", "off"],
                      "Multi-process mode: auto (multi-process iff a coordinator address is given), tpu (Cloud "
                      "TPU pod: topology from the TPU metadata), off.")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0's coordinator (default: $JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "This process's index (default: $JAX_PROCESS_ID).")
    flags.DEFINE_float("distributed_timeout", 300.0,
                       "Seconds to wait for the coordinator and all processes before failing.")
    flags.DEFINE_string("host_log_dir", None, "If set, every process also logs to HOST_LOG_DIR/host_NNN.log.")


FLAGS = flags.FLAGS

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
WATCHDOG_EXIT_CODE = 75  # EX_TEMPFAIL


class DistributedError(RuntimeError):
    """The process group could not be formed; the message says what to check."""


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"${name}={value!r} is not an integer") from None


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistributedError(f"coordinator address {address!r}: expected HOST:PORT, e.g. 10.0.0.2:1234")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float, interval_s: float = 0.25) -> None:
    """Block until a TCP connection to `address` succeeds, or raise DistributedError."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, timeout_s))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise DistributedError(
                f"coordinator {address} unreachable after {timeout_s:g} s ({last}): start process 0 first, "
                f"check --coordinator_address / ${ENV_ADDRESS} and that the port is open between the hosts")
        time.sleep(interval_s)


def _watchdog(timeout_s: float, describe: str) -> threading.Event:
    """Exit the process with a clear message if `done` is not set within timeout_s."""
    done = threading.Event()

    def watch():
        if not done.wait(timeout_s):
            message = (f"error: jax.distributed.initialize did not complete within {timeout_s:g} s ({describe}); "
                       "check that every process was started with the same --coordinator_address and "
                       "--num_processes, and a distinct --process_id")
            print(message, file=sys.stderr, flush=True)
            logging.error(message)
            logging.flush()
            os._exit(WATCHDOG_EXIT_CODE)
    threading.Thread(target=watch, name="distributed-watchdog", daemon=True).start()
    return done


def initialize(mode: str = "auto", coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, timeout_s: float = 300.0) -> bool:
    """Join the process group; returns True when running multi-process. Arguments left None
    come from $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID."""
    if mode == "off":
        return False
    if mode not in ("auto", "tpu"):
        raise DistributedError(f"unknown distributed mode {mode!r}: auto, tpu or off")
    if jax.distributed.is_initialized():  # idempotent: a second call (e.g. library + entry point) is a no-op
        return jax.process_count() > 1
    if mode == "tpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        done = _watchdog(timeout_s, "TPU pod cluster auto-detection")
        try:
            jax.distributed.initialize(initialization_timeout=int(timeout_s) + 30)
        finally:
            done.set()
        _log_topology()
        return jax.process_count() > 1

    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if address is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise DistributedError(f"num_processes={num_processes} / process_id={process_id} given without a "
                                   f"coordinator address (--coordinator_address or ${ENV_ADDRESS})")
        return False
    _split_address(address)
    if num_processes is None or process_id is None:
        raise DistributedError(f"coordinator {address} given, but num_processes={num_processes} and "
                               f"process_id={process_id}: set both (flags or ${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id={process_id} must lie in [0, num_processes={num_processes})")
    # CPU collectives across processes (simulated pods, tests); the TPU runtime ignores it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    started = time.monotonic()
    if process_id != 0:
        wait_for_coordinator(address, timeout_s)
    remaining = max(1.0, timeout_s - (time.monotonic() - started))
    done = _watchdog(remaining, f"process {process_id} of {num_processes}, coordinator {address}")
    try:
        # JAX's own deadline comes later than ours: it aborts the process without a Python error.
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(remaining) + 30)
    finally:
        done.set()
    _log_topology()
    return num_processes > 1


def initialize_from_flags() -> bool:
    """`initialize` with the flags of `define_flags` (call after absl has parsed them)."""
    multi = initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                       FLAGS.distributed_timeout)
    if FLAGS.host_log_dir:
        setup_logging(FLAGS.host_log_dir)
    return multi


def topology() -> str:
    return (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local / "
            f"{jax.device_count()} global devices ({jax.devices()[0].platform})")


def _log_topology() -> None:
    logging.info("%s", topology())


def is_primary() -> bool:
    """True on process 0, the only one that writes results and reports."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across all processes (no-op single-process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def broadcast_from_primary(value):
    """Process 0's value of a JSON-able object, on every process (identity single-process).

    Every decision that changes which collectives run (which trials are already done, whether
    cached vectors exist) must be taken by process 0 and shared this way: on a pod only process
    0's disk has the results folder, and processes that plan different batches deadlock."""
    if jax.process_count() == 1:
        return value
    import json

    import numpy as np
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_primary() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buffer = np.zeros(size, np.uint8)
    buffer[:data.size] = data
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode())


def log_path(log_dir: str, process_index: Optional[int] = None) -> str:
    index = jax.process_index() if process_index is None else process_index
    return os.path.join(log_dir, f"host_{index:03d}.log")


def setup_logging(log_dir: str) -> str:
    """Send this process's absl/Python logs also to LOG_DIR/host_NNN.log (one file per host,
    each line tagged with the process index; the level is absl's verbosity); non-primary
    processes keep stderr to warnings."""
    os.makedirs(log_dir, exist_ok=True)
    path = log_path(log_dir)
    with open(path, "a") as f:  # a header whatever the log level: who this host is, what it runs
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [p{jax.process_index()}] {topology()} on "
                f"{socket.gethostname()}; argv: {' '.join(sys.argv)}\n")
    handler = std_logging.FileHandler(path)
    handler.setFormatter(std_logging.Formatter(
        f"%(asctime)s [p{jax.process_index()}] %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(std_logging.INFO)
    std_logging.getLogger().addHandler(handler)  # absl's logger propagates to the root logger
    if not is_primary():
        logging.get_absl_handler().setLevel(std_logging.WARNING)
    return path
