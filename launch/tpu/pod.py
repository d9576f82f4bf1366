"""Run a sweep on a Cloud TPU VM or pod slice: create, copy the repo, install, run on every
worker, fetch the results, delete.

    python -m launch.tpu.pod all --name=introspect-70b --zone=us-east5-b --accelerator_type=v6e-16 \
        --checkpoint=gs://my-bucket/llama-3.1-70b --sweep_config=configs/sweeps/lindsey2025.py \
        --out=results/lindsey-70b [--project=P] [--spot] [--keep] [--dry_run]

Subcommands: create | copy | install | run | fetch | delete | all (the six in order; the VM is
deleted at the end, even after a failure, unless --keep) | size (the HBM arithmetic of
docs/tpu.md for --model on --accelerator_type).

Every command is an argv list run without a shell. The one place a shell is unavoidable is
the remote command of `gcloud ... ssh --command=...`; every value that comes from a flag is
quoted there with shlex.quote. `--dry_run` prints the commands (shell-quoted) instead of
running them.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from typing import Optional, Sequence

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUBCOMMANDS = ("create", "copy", "install", "run", "fetch", "delete", "all", "size")

# Generation -> (accelerator-type prefix, runtime version, HBM GB per chip, TensorCores per chip
# in the type's number, chips per host of multi-host slices, chips of the largest single host).
GENERATIONS = {
    "v4": ("v4-", "tpu-ubuntu2204-base", 32, 2, 4, 4),
    "v5e": ("v5litepod-", "v2-alpha-tpuv5-lite", 16, 1, 4, 8),
    "v5p": ("v5p-", "v2-alpha-tpuv5", 95, 2, 4, 4),
    "v6e": ("v6e-", "v2-alpha-tpuv6e", 32, 1, 4, 8),
}

def define_flags() -> None:
    """The command line (defined by `__main__` only, so importing this module for `Pod` or
    `size_table` adds no absl flags to the importer's)."""
    flags.DEFINE_string("name", None, "TPU VM name.")
    flags.DEFINE_string("zone", None, "GCP zone, e.g. us-east5-b.")
    flags.DEFINE_string("project", None, "GCP project (default: gcloud's configured project).")
    flags.DEFINE_string("accelerator_type", None, "e.g. v4-8, v5litepod-16, v5p-32, v6e-64.")
    flags.DEFINE_string("runtime_version", None, "TPU software version (default: Google's for the generation).")
    flags.DEFINE_bool("spot", False, "Create a Spot TPU VM.")
    flags.DEFINE_string("remote_dir", "jax_introspect", "Repository folder on every worker (relative to ~).")
    flags.DEFINE_string("jax_requirement", "jax[tpu]==0.10.2", "pip requirement for JAX on the workers.")
    flags.DEFINE_string("checkpoint", None, "Checkpoint folder on every worker, or gs://bucket/path.")
    flags.DEFINE_string("sweep_config", "configs/sweeps/lindsey2025.py", "Sweep config (path inside the repo).")
    flags.DEFINE_string("out", "results/pod", "Results folder on the workers (relative to --remote_dir).")
    flags.DEFINE_string("mesh", "1x-1", "data x tensor mesh for the sweep ('1x-1': all chips tensor-parallel).")
    flags.DEFINE_multi_string("sweep_arg", [], "Extra argument for launch.sweep (repeatable), "
                              "e.g. --sweep_arg=--config.layers=40,60.")
    flags.DEFINE_string("fetch_to", None, "Local folder for fetched results (default: ./results/<name>).")
    flags.DEFINE_bool("keep", False, "`all`: keep the VM at the end.")
    flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
    flags.DEFINE_string("model", "llama-3.1-405b", "`size`: model preset.")
    flags.DEFINE_integer("batch", 32, "`size`: sweep batch size.")
    flags.DEFINE_integer("prompt_len", 192, "`size`: prompt tokens after bucketing (Lindsey's prompt: 172 -> 192).")
    flags.DEFINE_integer("max_new_tokens", 100, "`size`: generated tokens.")


FLAGS = flags.FLAGS

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class LaunchError(ValueError):
    pass


def generation(accelerator_type: str) -> str:
    for gen, (prefix, *_rest) in GENERATIONS.items():
        if accelerator_type.startswith(prefix) and accelerator_type[len(prefix):].isdigit():
            return gen
    raise LaunchError(f"accelerator type {accelerator_type!r}: expected one of "
                      f"{', '.join(p + 'N' for p, *_ in GENERATIONS.values())} (e.g. v5p-32, v6e-16)")


def chips(accelerator_type: str) -> int:
    prefix, _, _, cores_per_chip, _, _ = GENERATIONS[generation(accelerator_type)]
    return max(1, int(accelerator_type[len(prefix):]) // cores_per_chip)


def hosts(accelerator_type: str) -> int:
    _, _, _, _, per_host, single_host_max = GENERATIONS[generation(accelerator_type)]
    n = chips(accelerator_type)
    return 1 if n <= single_host_max else n // per_host


class Pod:
    """Builds the gcloud argv lists for one TPU VM / pod slice."""

    def __init__(self, name: str, zone: str, accelerator_type: str, project: Optional[str] = None,
                 runtime_version: Optional[str] = None, spot: bool = False, remote_dir: str = "jax_introspect"):
        if not name or not _NAME.match(name):
            raise LaunchError(f"--name={name!r}: a TPU name is lowercase letters, digits and '-', "
                              "starting with a letter (at most 63)")
        if not zone:
            raise LaunchError("--zone is required (e.g. us-east5-b)")
        self.name, self.zone, self.project = name, zone, project
        self.accelerator_type = accelerator_type
        self.runtime_version = runtime_version or GENERATIONS[generation(accelerator_type)][1]
        self.spot = spot
        self.remote_dir = remote_dir.rstrip("/") or "."

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def _tpu(self, verb: str, *args: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args]

    def create(self) -> list[str]:
        return self._tpu("create", self.name, *self._where(), f"--accelerator-type={self.accelerator_type}",
                         f"--version={self.runtime_version}", *(["--spot"] if self.spot else []))

    def delete(self) -> list[str]:
        return self._tpu("delete", self.name, *self._where(), "--quiet")

    def ssh(self, remote_command: str, worker: str = "all") -> list[str]:
        return self._tpu("ssh", self.name, *self._where(), f"--worker={worker}", f"--command={remote_command}")

    def scp_to(self, local: str, remote: str, worker: str = "all") -> list[str]:
        return self._tpu("scp", local, f"{self.name}:{remote}", *self._where(), f"--worker={worker}")

    def scp_from(self, remote: str, local: str, worker: str = "0") -> list[str]:
        return self._tpu("scp", "--recurse", f"{self.name}:{remote}", local, *self._where(), f"--worker={worker}")

    # --- the remote side: shell text built from quoted tokens only
    @staticmethod
    def shell(*commands: Sequence[str]) -> str:
        """`a && b && ...` with every token shell-quoted."""
        return " && ".join(" ".join(shlex.quote(token) for token in command) for command in commands)

    def in_repo(self, *commands: Sequence[str], venv: bool = True) -> str:
        steps = [["cd", self.remote_dir]] + ([[".", ".venv/bin/activate"]] if venv else []) + list(commands)
        return self.shell(*steps)

    TARBALL = "jax_introspect_src.tar.gz"

    def copy(self, tarball: str) -> list[list[str]]:
        unpack = self.shell(["mkdir", "-p", self.remote_dir], ["tar", "-xzf", self.TARBALL, "-C", self.remote_dir])
        return [self.scp_to(tarball, self.TARBALL), self.ssh(unpack)]

    # Fixed text (no flag values): some TPU images lack python3-venv.
    MAKE_VENV = ("(python3 -m venv .venv || (sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv"
                 " && python3 -m venv .venv))")

    def install(self, jax_requirement: str) -> list[list[str]]:
        script = " && ".join([self.shell(["cd", self.remote_dir]), self.MAKE_VENV,
                              self.shell([".", ".venv/bin/activate"], ["pip", "install", "--upgrade", "pip"],
                                         ["pip", "install", jax_requirement, "gcsfs", "-e", "."])])
        return [self.ssh(script)]

    def run(self, sweep_config: str, checkpoint: str, out: str, mesh: str, sweep_args: Sequence[str]) -> list[list[str]]:
        logs = out.rstrip("/") + "/logs"
        sweep = ["python", "-m", "launch.sweep", f"--config={sweep_config}", f"--checkpoint={checkpoint}",
                 f"--out={out}", f"--mesh={mesh}", "--distributed=tpu", f"--host_log_dir={logs}", *sweep_args]
        # stdout of each worker to its own file (named by the worker's hostname: fixed text, not a flag).
        script = ("set -o pipefail; " + self.in_repo(["mkdir", "-p", logs], sweep)
                  + " 2>&1 | tee " + shlex.quote(logs + "/stdout.") + "$(hostname).log")
        return [self.ssh(script)]

    def fetch(self, out: str, local: str) -> list[list[str]]:
        remote = out if out.startswith("/") else f"{self.remote_dir}/{out}"
        logs = remote.rstrip("/") + "/logs"
        # Results from process 0's worker; every worker's logs (file names differ per host).
        return [self.scp_from(remote, local, worker="0"),
                self.scp_from(logs, os.path.join(local, "all_logs"), worker="all")]


def source_tarball(repo: str = REPO, dest: Optional[str] = None) -> str:
    """The repository's tracked and untracked-but-not-ignored files, as a .tar.gz."""
    files = subprocess.run(["git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True).stdout.decode().split("\0")
    dest = dest or os.path.join(tempfile.mkdtemp(prefix="pod_"), Pod.TARBALL)
    with tarfile.open(dest, "w:gz") as tar:
        for path in files:
            if path and os.path.isfile(os.path.join(repo, path)):
                tar.add(os.path.join(repo, path), arcname=path)
    return dest


def plan(command: str, pod: Pod, tarball: str = "<tarball>") -> list[list[str]]:
    """The argv lists of one subcommand (for `all`: every step)."""
    steps = {
        "create": lambda: [pod.create()],
        "copy": lambda: pod.copy(tarball),
        "install": lambda: pod.install(FLAGS.jax_requirement),
        "run": lambda: pod.run(FLAGS.sweep_config, _required("checkpoint"), FLAGS.out, FLAGS.mesh, FLAGS.sweep_arg),
        "fetch": lambda: pod.fetch(FLAGS.out, FLAGS.fetch_to or os.path.join("results", pod.name)),
        "delete": lambda: [pod.delete()],
    }
    if command == "all":
        return [argv for name in ("create", "copy", "install", "run", "fetch", "delete") for argv in steps[name]()]
    return steps[command]()


def _required(flag: str) -> str:
    value = getattr(FLAGS, flag)
    if not value:
        raise LaunchError(f"--{flag} is required for this subcommand")
    return value


def execute(argv: list[str], dry_run: bool) -> None:
    print("+ " + shlex.join(argv), flush=True)
    if not dry_run:
        subprocess.run(argv, check=True)


def size_table(model: str, accelerator_type: str, batch: int, prompt_len: int, new_tokens: int) -> str:
    from jax_introspect import config, sharding
    cfg = config.preset(model)
    n = chips(accelerator_type)
    hbm = GENERATIONS[generation(accelerator_type)][2]
    need = sharding.per_device_bytes(cfg, 1, n, batch, prompt_len, new_tokens)
    gb = {k: v / 1e9 for k, v in need.items() if k != "kv_heads"}
    fits = "fits" if gb["total"] <= 0.85 * hbm else "does NOT fit (keep 15% for XLA scratch)"
    return (f"{model} bf16 on {accelerator_type} ({n} chips x {hbm} GB, mesh 1x{n}, {need['kv_heads']} KV heads held):\n"
            f"  weights {gb['weights']:.2f} GB + KV cache {gb['kv_cache']:.2f} GB (batch {batch} x "
            f"{prompt_len + new_tokens} slots) + logits {gb['logits']:.2f} GB = {gb['total']:.2f} GB per chip: {fits}")


def main(argv):
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        sys.exit(f"usage: python -m launch.tpu.pod {{{'|'.join(SUBCOMMANDS)}}} --name=... --zone=... "
                 "--accelerator_type=... [flags]")
    command = argv[1]
    try:
        if command == "size":
            print(size_table(FLAGS.model, _required("accelerator_type"), FLAGS.batch, FLAGS.prompt_len,
                             FLAGS.max_new_tokens))
            return
        pod = Pod(FLAGS.name, FLAGS.zone, _required("accelerator_type"), FLAGS.project, FLAGS.runtime_version,
                  FLAGS.spot, FLAGS.remote_dir)
        if command in ("all", "run"):
            _required("checkpoint")
        tarball = "<tarball>"
        if command in ("copy", "all"):
            tarball = os.path.join(tempfile.gettempdir(), Pod.TARBALL) if FLAGS.dry_run else source_tarball()
        commands = plan(command, pod, tarball)
    except LaunchError as e:
        sys.exit(f"error: {e}")
    if command != "all":
        for argv_ in commands:
            execute(argv_, FLAGS.dry_run)
        return
    delete = commands[-1]
    try:
        for argv_ in commands[:-1]:
            execute(argv_, FLAGS.dry_run)
    finally:
        if FLAGS.keep:
            print(f"# --keep: {pod.name} left running; delete it with: {shlex.join(delete)}")
        else:
            execute(delete, FLAGS.dry_run)


if __name__ == "__main__":
    define_flags()
    app.run(main)
