"""Multi-host on one machine: processes on 127.0.0.1 joined by jax.distributed with CPU (gloo)
collectives, 4 simulated devices each, one global mesh over all of them."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests import hf_reference as ref

WORKER = os.path.join(ref.REPO, "tests", "sharded_worker.py")
CONFIG = "configs/sweeps/quickstart.py"
SMALL = ["--config.words=('Dust','Snow')", "--config.layers=0,1", "--config.strengths=1.0,4.0",
         "--config.trials_per_cell=2", "--config.control_trials=3", "--config.max_new_tokens=6",
         "--config.batch_size=4", "--config.baseline_words=('Desks','Jackets','Sand')"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS",
                                                            "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    return {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": ref.REPO}


def run_group(commands, env, timeout=600):
    """Start every command at once; wait for all (killing the ones we started on timeout)."""
    procs = [subprocess.Popen(c, cwd=ref.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for (rc, _, err), c in zip(outs, commands):
        if rc != 0:
            raise AssertionError(f"{c} failed ({rc}):\n{err[-4000:]}")
    return outs


def worker(mode, *args, process_id=None, num_processes=None, port=None):
    cmd = [sys.executable, WORKER, mode, *args]
    if port is not None:
        cmd += [f"--process_id={process_id}", f"--num_processes={num_processes}", f"--coordinator=127.0.0.1:{port}",
                "--devices=4"]
    return cmd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    ref.build_hf_model("gqa_untied", str(root / "hf"), train_steps=100, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=8)
    ref.run_convert(str(root / "hf"), str(root / "ckpt"))
    return str(root / "ckpt")


@pytest.mark.parametrize("mesh", ["2x4", "1x8"])
def test_two_processes_generate_what_one_process_does(tiny, tmp_path, mesh):
    """data across the processes (2x4) or tensor parallelism across them (1x8)."""
    port = free_port()
    two = tmp_path / "two.json"
    run_group([worker("generate", f"--checkpoint={tiny}", f"--mesh={mesh}", f"--out={two}", process_id=i,
                      num_processes=2, port=port) for i in range(2)], cpu_env(4))
    one = tmp_path / "one.json"
    run_group([worker("generate", f"--checkpoint={tiny}", f"--mesh={mesh}", f"--out={one}")], cpu_env(8))
    single = tmp_path / "single.json"
    run_group([worker("generate", f"--checkpoint={tiny}", "--mesh=1x1", f"--out={single}", "--devices=1")],
              cpu_env(1))
    a, b, c = (json.loads(p.read_text()) for p in (two, one, single))
    assert (a["process_count"], a["device_count"], a["mesh"]) == (2, 8, mesh)
    assert (b["process_count"], b["device_count"]) == (1, 8)
    for ra, rb, rc in zip(a["records"], b["records"], c["records"]):
        assert ra["token_ids"] == rb["token_ids"] == rc["token_ids"]
        assert ra["finished"] == rb["finished"]
        for x, y in ((ra, rb), (ra, rc)):
            assert max(abs(u - v) for su, sv in zip(x["logits"], y["logits"]) for u, v in zip(su, sv)) <= 1e-5
    # Only process 0 wrote the results file; both computed and received process 0's broadcast.
    shared = [json.loads((tmp_path / f"two.json.p{i}").read_text()) for i in range(2)]
    assert [s["process"] for s in shared] == [0, 1]
    assert all(s["broadcast"]["from"] == 0 for s in shared)
    assert shared[1]["broadcast"]["ids"] == [r["token_ids"] for r in a["records"]]


@pytest.fixture(scope="module")
def sweep_checkpoint(tmp_path_factory):
    return ref.build_llama3_checkpoint(tmp_path_factory.mktemp("mh_sweep"))


def _records(path):
    with open(path) as f:
        records = [json.loads(line) for line in f]
    for r in records:
        r.pop("timing")
    return records


def test_two_process_sweep_writes_the_same_results_as_one_process(sweep_checkpoint, tmp_path):
    port = free_port()
    logs = tmp_path / "logs"
    # Each process gets its own --out, as each TPU worker has its own disk: only process 0's is written.
    outs = [tmp_path / f"host{i}" for i in range(2)]
    base = [sys.executable, "-m", "launch.sweep", f"--config={CONFIG}", f"--checkpoint={sweep_checkpoint}",
            "--mesh=2x4", "--noreport", *SMALL]
    run_group([base + [f"--out={outs[i]}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                       f"--process_id={i}", f"--host_log_dir={logs}", "--distributed_timeout=120"]
               for i in range(2)], cpu_env(4))
    one = tmp_path / "one"
    run_group([base + [f"--out={one}"]], cpu_env(8))
    two_records, one_records = _records(outs[0] / "trials.jsonl"), _records(one / "trials.jsonl")
    assert len(two_records) == 11
    # The readout's probabilities are floats summed across devices in another order on two processes
    # (measured <= 1e-7 relative): equal within 1e-5 relative, their top tokens exactly.
    two_readouts, one_readouts = ([r.pop("readout") for r in rs] for rs in (two_records, one_records))
    assert two_records == one_records
    for a, b in zip(two_readouts, one_readouts):
        assert a["p_yes"] == pytest.approx(b["p_yes"], rel=1e-5) and a["p_no"] == pytest.approx(b["p_no"], rel=1e-5)
        for x, y in zip(a["lens"], b["lens"]):
            assert x["top_ids"] == y["top_ids"] and x["top_probs"] == pytest.approx(y["top_probs"], rel=1e-5)
    assert not (outs[1] / "trials.jsonl").exists() and not (outs[1] / "vectors.npz").exists()
    assert sorted(os.listdir(logs)) == ["host_000.log", "host_001.log"]
    assert "process 1 of 2: 4 local / 8 global devices" in (logs / "host_001.log").read_text()


# --- restore memory ---------------------------------------------------------------------------

def test_sharded_restore_reads_and_holds_only_each_hosts_shards(tmp_path):
    ckpt, info = tmp_path / "synthetic", tmp_path / "synthetic.json"
    run_group([worker("synthetic", f"--checkpoint={ckpt}", f"--out={info}", "--devices=1")], cpu_env(1))
    size = json.loads(info.read_text())
    assert 300e6 < size["bytes"] < 450e6
    run_group([worker("restore", f"--checkpoint={ckpt}", "--mesh=1x8", f"--out={tmp_path / 'one'}")], cpu_env(8))
    port = free_port()
    run_group([worker("restore", f"--checkpoint={ckpt}", "--mesh=1x8", f"--out={tmp_path / 'two'}", process_id=i,
                      num_processes=2, port=port) for i in range(2)], cpu_env(4))
    one = json.loads((tmp_path / "one.p0").read_text())
    two = [json.loads((tmp_path / f"two.p{i}").read_text()) for i in range(2)]
    print(json.dumps({"checkpoint": size, "one_process": one, "two_processes": two}, indent=1))
    for r in two:
        # Each process holds half the (tensor-split) weights and reads about half of the files.
        assert r["local_param_bytes"] * 2 == one["local_param_bytes"]
        assert r["read_bytes"] < 0.6 * size["stored_bytes"], r
        # CPU "devices" live in host memory, so a host's RSS carries its half of the weights; the
        # other half never arrives: each process grows by far less than the single process.
        assert r["growth"] < one["growth"] - 0.4 * size["bytes"], (r, one)
        assert r["growth"] < size["bytes"], r
    assert one["read_bytes"] < 1.1 * size["stored_bytes"]


# --- the process group cannot form ------------------------------------------------------------

def _python(code, env, timeout=120):
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ref.REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - began


def test_unreachable_coordinator_fails_fast_and_names_it():
    port = free_port()  # nothing listens there
    env = {**cpu_env(4), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1"}
    proc, seconds = _python("from jax_introspect import distributed as d; d.initialize(timeout_s=3)", env)
    assert proc.returncode != 0
    assert f"DistributedError: coordinator 127.0.0.1:{port} unreachable after 3 s" in proc.stderr
    assert "start process 0 first" in proc.stderr
    assert seconds < 30


def test_coordinator_without_peers_times_out_with_a_message():
    port = free_port()
    proc, seconds = _python(f"from jax_introspect import distributed as d; "
                            f"d.initialize('auto', '127.0.0.1:{port}', 2, 0, timeout_s=3)", cpu_env(4))
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert (f"error: jax.distributed.initialize did not complete within 3 s (process 0 of 2, coordinator "
            f"127.0.0.1:{port})") in proc.stderr
    assert seconds < 30


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_processes=2, process_id=1), "without a coordinator address"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "expected HOST:PORT"),
    (dict(coordinator_address="127.0.0.1:1234", process_id=0), "set both"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), r"must lie in \[0, "),
    (dict(mode="mpi"), "unknown distributed mode"),
])
def test_bad_distributed_settings(kwargs, message, monkeypatch):
    from jax_introspect import distributed
    for name in (distributed.ENV_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.initialize(**kwargs)


def test_single_process_by_default(monkeypatch):
    from jax_introspect import distributed
    for name in (distributed.ENV_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False and distributed.initialize("off") is False
    assert distributed.is_primary()
    assert distributed.broadcast_from_primary({"a": [1, 2]}) == {"a": [1, 2]}
