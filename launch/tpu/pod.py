"""Run a sweep on a Cloud TPU VM or pod slice: create, copy the repo, install, run on every
worker, fetch the results, delete.

    python -m launch.tpu.pod all --name=introspect-70b --zone=us-east5-b --accelerator_type=v6e-16 \
        --checkpoint=gs://my-bucket/llama-3.1-70b --sweep_config=configs/sweeps/lindsey2025.py \
        --out=results/lindsey-70b [--project=P] [--spot] [--keep] [--dry_run]

Subcommands: create | copy | install | run | fetch | delete | all (the six in order; the VM is
deleted at the end, even after a failure, unless --keep) | size (the HBM arithmetic of
docs/tpu.md for --model on --accelerator_type).

Before `create`, `all` and `run` (with --dry_run too) the run is planned for the slice
(`jax_introspect.experiment.plan`: the sweep's programs compiled on this host for the slice's
compile-only TPU topology, e.g. v5p-64 -> 'v5p:2x4x4', `--topology` overrides) and a run whose
programs do not fit the chips' HBM is refused unless `--force`. The model planned is the local
`--checkpoint` folder, else `--model` when given (a gs:// checkpoint cannot be read here);
`--noplan` skips the plan.

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
    flags.DEFINE_bool("plan", True, "Plan the run for the slice (compile its programs here) before create / all / "
                      "run, and refuse one that does not fit.")
    flags.DEFINE_string("topology", None, "Compile-only TPU topology of the plan (default: from --accelerator_type, "
                        "e.g. v5p-64 -> v5p:2x4x4, v6e-64 -> v6e:8x8, v5litepod-256 -> v5e:16x16).")
    flags.DEFINE_bool("force", False, "Go ahead even when the plan says the run does not fit.")


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


# --- the plan: the sweep's programs compiled for the slice -----------------------------------------

# The name jax.experimental.topologies / libtpu gives each generation's compile-only topologies.
TOPOLOGY_PREFIX = {"v5e": "v5e", "v5p": "v5p", "v6e": "v6e"}


def compile_topology(accelerator_type: str) -> tuple[str, Optional[int]]:
    """(compile-only topology name, chips to use of it: None = all) for an accelerator type:
    v5p-N (N TensorCores, N/2 chips) -> 'v5p:AxBxC'; v6e-N / v5litepod-N (N chips) -> 'v6e:AxB' /
    'v5e:AxB', chips per axis as Cloud TPU lays them out (v5p-64 -> v5p:2x4x4, v6e-64 -> v6e:8x8,
    v5litepod-256 -> v5e:16x16). libtpu's smallest topology is one host's 2x2 chips: a 1- or
    2-chip slice is the first chips of it. v4 has none: libtpu's compile-only v4 devices are
    TensorCores of 16 GB, not the megacore chips a v4 VM runs."""
    gen = generation(accelerator_type)
    n = chips(accelerator_type)
    if gen not in TOPOLOGY_PREFIX:
        raise LaunchError(f"no compile-only plan for {accelerator_type}: libtpu's v4 topologies expose TensorCores "
                          "(16 GB each), not the 32 GB megacore chips a v4 VM runs; --noplan to go without one")
    if n & (n - 1):
        raise LaunchError(f"{accelerator_type}: {n} chips is not a power of two; give --topology=NAME")
    k = n.bit_length() - 1
    prefix = TOPOLOGY_PREFIX[gen]
    if n <= 4:
        return (f"{prefix}:2x2x1" if gen == "v5p" else f"{prefix}:2x2"), (None if n == 4 else n)
    if gen == "v5p":
        dims = [1 << (k // 3)] * 3
        for i in range(k % 3):
            dims[2 - i] *= 2
    else:
        dims = [1 << (k // 2), 1 << (k - k // 2)]
    return f"{prefix}:{'x'.join(map(str, dims))}", None


def _sweep_arg_value(name: str) -> Optional[str]:
    """The value of `--NAME=VALUE` among the --sweep_arg flags (the last one)."""
    value = None
    for arg in FLAGS.sweep_arg:
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def plan_model() -> tuple[Optional[str], str]:
    """(the model to plan: a local checkpoint folder or a preset, or None; why)."""
    checkpoint = FLAGS.checkpoint
    if checkpoint and "://" not in checkpoint and os.path.isdir(checkpoint):
        return checkpoint, f"the checkpoint {checkpoint}"
    if FLAGS["model"].present:
        return FLAGS.model, f"--model={FLAGS.model}"
    where = f"--checkpoint={checkpoint} is not a folder on this host" if checkpoint else "no --checkpoint"
    return None, f"{where} and no --model=PRESET names the model"


def plan_run(accelerator_type: str, progress=None):
    """The plan of the sweep `run` would start on this slice, or None (with a note on stderr) when
    the model cannot be known here. Raises LaunchError on bad input."""
    from jax_introspect.experiment import plan as plan_lib
    from jax_introspect.experiment import sweep_config
    from launch.common import split_config_args
    model, why = plan_model()
    if model is None:
        print(f"note: no plan for the slice: {why} (pass --model=PRESET to plan, --noplan to skip)", file=sys.stderr)
        return None
    if not FLAGS.topology and generation(accelerator_type) not in TOPOLOGY_PREFIX:
        print(f"note: no plan for {accelerator_type}: libtpu's compile-only v4 topologies expose TensorCores (16 GB "
              "each), not the 32 GB megacore chips a v4 VM runs (--topology=NAME to plan on one anyway)",
              file=sys.stderr)
        return None
    topology, n_chips = (FLAGS.topology, None) if FLAGS.topology else compile_topology(accelerator_type)
    config_path = FLAGS.sweep_config if os.path.isabs(FLAGS.sweep_config) else os.path.join(REPO, FLAGS.sweep_config)
    try:
        _, overrides = split_config_args(["pod"] + list(FLAGS.sweep_arg), sweep_config.FIELDS, sweep_config.SweepError)
        arms = sweep_config.with_overrides(sweep_config.load_config_file(config_path), overrides)
        dtype = _sweep_arg_value("dtype")
        if dtype is None and os.path.isdir(model):
            from jax_introspect import checkpoint as checkpoint_lib
            dtype = checkpoint_lib.read_manifest(model).get("dtype")
        print(f"planning the run for {accelerator_type} ({topology}{f', first {n_chips} chips' if n_chips else ''}, "
              f"mesh {FLAGS.mesh}) with {why}: compiling its programs here ...", file=sys.stderr, flush=True)
        return plan_lib.make_plan(model, topology, FLAGS.mesh, dtype=dtype if dtype in ("bfloat16", "float32")
                                  else "bfloat16", numerics=_sweep_arg_value("numerics") or "dequantized",
                                  sweep=arms, chips=n_chips, progress=progress or plan_lib.stderr_progress,
                                  sweep_label=" ".join([FLAGS.sweep_config, *FLAGS.sweep_arg]))
    except (plan_lib.PlanError, ValueError) as e:
        raise LaunchError(f"plan: {e} (--noplan skips the plan)") from e


def check_plan(plan, force: bool) -> None:
    """Print the plan; refuse (LaunchError) a run that does not fit, unless `force`."""
    print(plan.format_text(), flush=True)
    if plan.fits:
        return
    failing = ", ".join(f"{p.name} ({'needs ' + format(p.total / 1e9, '.2f') + ' GB' if p.total else p.error})"
                        for p in plan.programs if not p.fits)
    if force:
        print(f"warning: --force: going ahead although {failing} does not fit {plan.topology}", file=sys.stderr)
        return
    raise LaunchError(f"the plan says this run does not fit {plan.topology} ({plan.hbm / 1e9:.2f} GB usable per chip): "
                      f"{failing}; take a larger slice or a smaller batch (--sweep_arg=--config.batch_size=N), "
                      "or --force")


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
        if command in ("create", "all", "run") and FLAGS.plan:
            slice_plan = plan_run(pod.accelerator_type)
            if slice_plan is not None:
                check_plan(slice_plan, FLAGS.force)
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
