"""launch/tpu/pod.py: the exact gcloud command lines (--dry_run), no shell injection from flag
values, bad input, and the sizing arithmetic."""
import json
import os
import shlex
import subprocess
import sys
import tarfile

import pytest

from tests import hf_reference as ref

# A checkpoint path and a sweep argument full of shell metacharacters.
EVIL_CHECKPOINT = "gs://b/ck; touch PWNED $(touch PWNED2) `touch PWNED3` 'q' \"d\" | cat & >x"
EVIL_ARG = "--config.template=Tell me about {word}'s \"x\"; rm -rf ~"


def pod(*args, tmpdir, check=True):
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    proc = subprocess.run([sys.executable, "-m", "launch.tpu.pod", *args], cwd=ref.REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def test_dry_run_prints_the_exact_commands(tmp_path):
    proc = pod("all", "--dry_run", "--name=intro-405b", "--zone=us-east5-a", "--project=my-proj",
               "--accelerator_type=v5p-32", "--spot", f"--checkpoint={EVIL_CHECKPOINT}",
               "--sweep_config=configs/sweeps/lindsey2025.py", "--out=results/l405", "--mesh=1x16",
               f"--sweep_arg={EVIL_ARG}", "--fetch_to=fetched", tmpdir=tmp_path)
    lines = proc.stdout.splitlines()
    where = ["--zone=us-east5-a", "--project=my-proj"]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    # The remote commands, exactly as the workers' shell receives them.
    unpack = "mkdir -p jax_introspect && tar -xzf jax_introspect_src.tar.gz -C jax_introspect"
    install = ("cd jax_introspect && (python3 -m venv .venv || (sudo apt-get update -qq && sudo apt-get install -y "
               "-qq python3-venv && python3 -m venv .venv)) && . .venv/bin/activate && pip install --upgrade pip && "
               "pip install 'jax[tpu]==0.10.2' gcsfs -e .")
    run = ("set -o pipefail; cd jax_introspect && . .venv/bin/activate && mkdir -p results/l405/logs && "
           "python -m launch.sweep --config=configs/sweeps/lindsey2025.py "
           "'--checkpoint=gs://b/ck; touch PWNED $(touch PWNED2) `touch PWNED3` '\"'\"'q'\"'\"' \"d\" | cat & >x' "
           "--out=results/l405 --mesh=1x16 --distributed=tpu --host_log_dir=results/l405/logs "
           "'--config.template=Tell me about {word}'\"'\"'s \"x\"; rm -rf ~' "
           "2>&1 | tee results/l405/logs/stdout.$(hostname).log")
    expected = [
        tpu + ["create", "intro-405b", *where, "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5", "--spot"],
        tpu + ["scp", f"{tmp_path}/jax_introspect_src.tar.gz", "intro-405b:jax_introspect_src.tar.gz", *where,
               "--worker=all"],
        tpu + ["ssh", "intro-405b", *where, "--worker=all", f"--command={unpack}"],
        tpu + ["ssh", "intro-405b", *where, "--worker=all", f"--command={install}"],
        tpu + ["ssh", "intro-405b", *where, "--worker=all", f"--command={run}"],
        tpu + ["scp", "--recurse", "intro-405b:jax_introspect/results/l405", "fetched", *where, "--worker=0"],
        tpu + ["scp", "--recurse", "intro-405b:jax_introspect/results/l405/logs", "fetched/all_logs", *where,
               "--worker=all"],
        tpu + ["delete", "intro-405b", *where, "--quiet"],
    ]
    assert lines == ["+ " + shlex.join(argv) for argv in expected]
    assert lines[0] == ("+ gcloud compute tpus tpu-vm create intro-405b --zone=us-east5-a --project=my-proj "
                        "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5 --spot")
    assert [shlex.split(line[2:]) for line in lines] == expected


def test_remote_command_hands_flag_values_over_verbatim(tmp_path):
    """Run the generated remote command in bash against a stand-in repo whose `python` records its
    argv: the metacharacters arrive as data and nothing they spell out runs."""
    sys.path.insert(0, ref.REPO)
    from launch.tpu.pod import Pod
    home = tmp_path / "home"
    repo = home / "jax_introspect"
    (repo / ".venv" / "bin").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text("#!/bin/sh\n" f"exec {sys.executable} -c 'import json, sys; "
                    "open(\"argv.json\", \"w\").write(json.dumps(sys.argv[1:]))' \"$@\"\n")
    fake.chmod(0o755)
    (repo / ".venv" / "bin" / "activate").write_text(f"PATH={bin_dir}:$PATH\n")
    p = Pod("intro", "us-east5-a", "v6e-8")
    ssh = p.run("configs/sweeps/quickstart.py", EVIL_CHECKPOINT, "results/x", "2x4", [EVIL_ARG])[0]
    remote = ssh[-1][len("--command="):]
    proc = subprocess.run(["bash", "-c", remote], cwd=home, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads((repo / "argv.json").read_text())
    assert argv == ["-m", "launch.sweep", "--config=configs/sweeps/quickstart.py", f"--checkpoint={EVIL_CHECKPOINT}",
                    "--out=results/x", "--mesh=2x4", "--distributed=tpu", "--host_log_dir=results/x/logs", EVIL_ARG]
    for root in (home, repo, tmp_path):
        assert not any(name.startswith("PWNED") or name == "x" for name in os.listdir(root))
    assert os.listdir(repo / "results" / "x" / "logs")[0].startswith("stdout.")


@pytest.mark.parametrize("args,message", [
    (["create", "--name=intro", "--zone=z", "--accelerator_type=v7-8"], "accelerator type 'v7-8'"),
    (["create", "--name=Intro;rm", "--zone=z", "--accelerator_type=v4-8"], "a TPU name is lowercase"),
    (["create", "--name=intro", "--accelerator_type=v4-8"], "--zone is required"),
    (["run", "--name=intro", "--zone=z", "--accelerator_type=v4-8"], "--checkpoint is required"),
    (["launch", "--name=intro"], "usage: python -m launch.tpu.pod"),
])
def test_bad_input(tmp_path, args, message):
    proc = pod(*args, "--dry_run", tmpdir=tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert "gcloud" not in proc.stdout


def test_generations_and_hosts():
    sys.path.insert(0, ref.REPO)
    from launch.tpu import pod as pod_lib
    assert [pod_lib.chips(t) for t in ("v4-8", "v5litepod-16", "v5p-32", "v6e-64")] == [4, 16, 16, 64]
    assert [pod_lib.hosts(t) for t in ("v4-8", "v4-32", "v5litepod-8", "v5litepod-16", "v6e-8", "v6e-64")] == \
        [1, 4, 1, 4, 1, 16]
    assert pod_lib.Pod("a", "z", "v5litepod-4").runtime_version == "v2-alpha-tpuv5-lite"
    assert pod_lib.Pod("a", "z", "v6e-4").runtime_version == "v2-alpha-tpuv6e"
    assert pod_lib.Pod("a", "z", "v4-8").runtime_version == "tpu-ubuntu2204-base"


def test_size_subcommand(tmp_path):
    out = pod("size", "--model=llama-3.1-405b", "--accelerator_type=v5p-32", tmpdir=tmp_path).stdout
    assert "16 chips x 95 GB, mesh 1x16, 16 KV heads held" in out
    assert "weights 51.27 GB + KV cache 0.60 GB (batch 32 x 292 slots)" in out and ": fits" in out
    out = pod("size", "--model=llama-3.1-405b", "--accelerator_type=v5litepod-64", tmpdir=tmp_path).stdout
    assert "does NOT fit" in out


def test_source_tarball_has_the_repo_without_ignored_files(tmp_path):
    sys.path.insert(0, ref.REPO)
    from launch.tpu.pod import source_tarball
    path = source_tarball(dest=str(tmp_path / "src.tar.gz"))
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
    assert {"setup.py", "jax_introspect/sharding.py", "launch/tpu/pod.py"} <= names
    assert not any(n.startswith(".venv/") or "__pycache__" in n for n in names)
    assert [n for n in names if n.startswith("checkpoints/")] == ["checkpoints/.gitkeep"]
