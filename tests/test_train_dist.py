"""`saev train` on several ranks (gloo, CPU): the members split across ranks train bit for bit as
in one process, a killed rank resumes exactly, data-parallel training, and `--slurm`."""

import contextlib
import itertools
import json
import os
import pathlib
import pickle
import random
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing
from factories import tiny_shards
from safetensors.torch import load_file
from test_train import RESUME, SWEEP, sweep_cfg

import saev.nn
from saev.__main__ import run
from saev.train import partition, sweep
from saev.train.config import Config
from saev.train.main import train

# Two members of each group, and one rank trains a stack of one: the relu group is cut.
GRID = SWEEP.replace("ckpt_every = 1024", "ckpt_every = 768")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> pathlib.Path:
    return tiny_shards(tmp_path_factory.mktemp("shards") / "s")


@pytest.fixture(scope="module")
def single(tmp_path_factory, shards) -> pathlib.Path:
    """GRID trained in one process of one thread: what every multi-rank run must equal."""
    with one_thread():
        return train(sweep_cfg(tmp_path_factory.mktemp("one"), shards, GRID))


@pytest.fixture(scope="module")
def single_resume(tmp_path_factory, shards) -> pathlib.Path:
    """RESUME trained in one process of one thread."""
    with one_thread():
        return train(sweep_cfg(tmp_path_factory.mktemp("one"), shards, RESUME))


@contextlib.contextmanager
def one_thread():
    """Each rank runs one intra-op thread (as under torchrun); CPU sums are only bit-identical
    between processes that use the same number of threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg: Config, fault: tuple[str, int] | None) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    if fault is not None and rank == world - 1:
        # The last rank is killed (SIGKILL) or gets a Ctrl-C (SIGINT) in its n-th optimiser step.
        what, n = fault
        orig, calls = saev.nn.StackAdam.step, {"n": 0}

        def step(self, loss=None):
            calls["n"] += 1
            if calls["n"] == n:
                if what == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                signal.raise_signal(signal.SIGINT)
            return orig(self, loss)

        saev.nn.StackAdam.step = step
        if what == "sigint":  # as in a terminal (the test runner may ignore SIGINT)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    train(cfg)


def run_ranks(cfg: Config, world: int = 2, fault: tuple[str, int] | None = None) -> None:
    """`train(cfg)` on `world` forked ranks; raises if a rank fails, and never leaves one running."""
    ctx = torch.multiprocessing.start_processes(
        _rank,
        args=(world, free_port(), cfg, fault),
        nprocs=world,
        join=False,
        start_method="fork",
    )
    try:
        while not ctx.join(timeout=120):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def weights(run_dir: pathlib.Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        d.name: load_file(d / "sae.safetensors") for d in sorted((run_dir / "members").iterdir())
    }


def assert_bit_identical(a: pathlib.Path, b: pathlib.Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and len(wa) >= 2
    for name in wa:
        assert wa[name].keys() == wb[name].keys()
        for key in wa[name]:
            assert torch.equal(wa[name][key], wb[name][key]), (name, key)
    for name in wa:  # same metrics, line for line (but timing)
        ma, mb = (
            [
                {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
                for x in (run / "members" / name / "metrics.jsonl").read_text().splitlines()
            ]
            for run in (a, b)
        )
        assert ma == mb, name
    sa, sb = (json.loads((r / "summary.json").read_text())["members"] for r in (a, b))
    assert [(m["name"], m["status"], m["eval"]["fvu"]) for m in sa] == [
        (m["name"], m["status"], m["eval"]["fvu"]) for m in sb
    ]


@pytest.mark.parametrize("read", ["each", "broadcast"])
def test_two_ranks_equal_one_process_bit_for_bit(tmp_path, shards, single, capfd, read):
    capfd.readouterr()
    cfg = sweep_cfg(tmp_path / "two", shards, GRID, dist_read=read)
    run_ranks(cfg)
    out = capfd.readouterr().out
    two = tmp_path / "two" / "runs" / single.name
    assert_bit_identical(single, two)
    # Rank 0 prints the plan once, with one line per rank; relu's stack is cut between ranks.
    assert out.count("plan: 4 member(s)") == 1
    assert "rank 0: pass 0: 000-topk-k2, 001-topk-k4, 002-relu-sparsity_coeff0.1 (cost 58%)" in out
    assert "rank 1: pass 0: 003-relu-sparsity_coeff1 (cost 42%)" in out
    how = "rank 0 reads each batch and broadcasts it" if read == "broadcast" else "each rank reads"
    assert f"ranks: 2 (gloo); {how}" in out
    # One resume state per member, committed once for the step both ranks reached.
    doc = json.loads((two / "state" / "pass0" / "committed.json").read_text())
    assert doc["step"] == 24 and sorted(doc["status"]) == sorted(weights(two))
    (step_dir,) = (two / "state" / "pass0").glob("step*")
    assert sorted(p.stem for p in step_dir.iterdir()) == sorted(weights(two))


def test_killed_rank_resumes_to_the_same_result(tmp_path, shards, single_resume):
    single = single_resume
    run_dir = tmp_path / "two" / "runs" / single.name
    commit = run_dir / "state" / "pass0" / "committed.json"
    # RESUME has one batchtopk and one jumprelu member, one per rank; it logs every 2 steps
    # and checkpoints every 6. The last rank is killed in step 15: step 12 is the last state
    # both ranks committed.
    with pytest.raises(torch.multiprocessing.ProcessExitedException):
        run_ranks(sweep_cfg(tmp_path / "two", shards, RESUME), fault=("kill", 15))
    assert json.loads(commit.read_text())["step"] == 12
    assert not (run_dir / "summary.json").exists()
    run_ranks(Config(resume=run_dir, device="cpu"))
    assert_bit_identical(single, run_dir)


def test_ctrl_c_stops_every_rank_at_one_step_and_one_process_resumes(
    tmp_path, shards, single_resume
):
    single = single_resume
    run_dir = tmp_path / "two" / "runs" / single.name
    # A Ctrl-C reaches the last rank in step 7; the ranks agree at the next logged step and
    # both save step 8 (torch.multiprocessing exits 0 on KeyboardInterrupt).
    run_ranks(sweep_cfg(tmp_path / "two", shards, RESUME), fault=("sigint", 7))
    doc = json.loads((run_dir / "state" / "pass0" / "committed.json").read_text())
    assert doc["step"] == 8 and not (run_dir / "summary.json").exists()
    # The state is per member, so any number of ranks resumes it: here one process.
    with one_thread():
        train(Config(resume=run_dir, device="cpu"))
    assert_bit_identical(single, run_dir)


def test_launch_flags_are_not_sweep_keys(tmp_path, shards, capsys):
    (tmp_path / "grid.toml").write_text(
        GRID.replace("log_every = 4", "log_every = 4\ndata_parallel = true")
    )
    code = run(["train", "--sweep", str(tmp_path / "grid.toml"), "--data.shard-root", str(shards)])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'grid.toml'}: key 'data_parallel' says how this command runs, not "
        "what it trains; give it on the command line (--data-parallel).\n"
    )


def test_partition_balances_cost_and_keeps_stacks_whole():
    def member(i: int, family: str, k: int | None = None) -> sweep.Member:
        c = sweep.replace(Config(), {"sae.family": family, "sae.exp_factor": 2, "sae.k": k})
        return sweep.Member(i, f"{i:03d}", c, {})

    topk = [member(i, "topk", k) for i, k in enumerate([8, 8, 16, 32])]
    relu = [member(4 + i, "relu") for i in range(3)]
    p = sweep.Pass(0, [sweep.Group(topk), sweep.Group(relu)])
    # top-k members cost d_sae*k, dense ones d_sae*d_vit (d_vit 16, d_sae 32).
    costs = [partition.member_cost(m, 16) for m in p.members]
    assert costs == [256, 256, 512, 1024, 512, 512, 512]
    shares = partition.split(p, 16, 3)
    assert [[[m.name for m in g.members] for g in s.groups] for s in shares] == [
        [["000", "001", "002"]],
        [["003"], ["004"]],
        [["005", "006"]],
    ]
    assert all(s.index == 0 for s in shares)
    # More ranks than members: the last ranks get nothing.
    assert partition.split(p, 16, 9)[7:] == [None, None]


def test_contiguous_cuts_minimise_the_largest_share():
    rng = random.Random(0)
    for _ in range(300):
        costs = [rng.choice([1, 2, 3, 5, 8, 64]) for _ in range(rng.randint(1, 8))]
        world = rng.randint(1, 4)
        cuts = partition.contiguous_cuts(costs, world)
        assert len(cuts) == world + 1 and cuts[0] == 0 and cuts[-1] == len(costs)
        assert cuts == sorted(cuts)
        largest = max(sum(costs[a:b]) for a, b in itertools.pairwise(cuts))
        best = min(
            max(sum(costs[a:b]) for a, b in itertools.pairwise([0, *inner, len(costs)]))
            for inner in itertools.combinations_with_replacement(range(len(costs) + 1), world - 1)
        )
        assert largest == best, (costs, world, cuts)


@pytest.mark.slow  # ~12 s: DDP over gloo, five stacks
def test_data_parallel_splits_each_batch_and_matches_one_process(tmp_path, shards, capfd):
    grid = GRID.replace(
        'family = ["topk", "relu"]', 'family = ["topk", "relu", "batchtopk", "jumprelu", "gated"]'
    )
    with one_thread():
        single = train(sweep_cfg(tmp_path / "one", shards, grid))
    capfd.readouterr()
    run_ranks(sweep_cfg(tmp_path / "two", shards, grid, data_parallel=True))
    assert "rank 1: every member, on slice 2/2 of each batch" in capfd.readouterr().out
    two = tmp_path / "two" / "runs" / single.name
    wa, wb = weights(single), weights(two)
    sa, sb = (
        {m["name"]: m for m in json.loads((r / "summary.json").read_text())["members"]}
        for r in (single, two)
    )
    for name in wa:
        # Dead-latent counters count the whole batch, not one rank's slice.
        assert torch.equal(wa[name]["tokens_since_fired"], wb[name]["tokens_since_fired"])
        if "batchtopk" in name:
            # BatchTopK keeps the k*B largest of each rank's slice: close, not equal.
            assert sb[name]["eval"]["fvu"] == pytest.approx(sa[name]["eval"]["fvu"], rel=0.05)
            continue
        # Averaged half-batch gradients are the full-batch gradient up to rounding.
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(wb[name][key], wa[name][key], rtol=1e-5, atol=1e-6)
        assert sb[name]["eval"]["fvu"] == pytest.approx(sa[name]["eval"]["fvu"], rel=1e-5)
    # Only rank 0 wrote: one metrics line per logged step.
    lines = (two / "members" / "000-topk-k2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(4, 25, 4))


def test_data_parallel_refuses_what_it_cannot_split(tmp_path, shards, capfd):
    grid = GRID.replace("batch_size = 128", "batch_size = 125")
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="multiple of 2"):
        run_ranks(sweep_cfg(tmp_path, shards, grid, data_parallel=True))
    assert not (tmp_path / "runs").exists()


def fake_slurm(tmp_path: pathlib.Path, monkeypatch) -> pathlib.Path:
    """`srun` and `sbatch` on PATH; sbatch keeps the job script it was given."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "sbatch-script.sh"
    (bindir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" {record}\necho "Submitted batch job 4242"\n'
    )
    (bindir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return record


def test_slurm_submits_one_job_with_a_rank_per_gpu(tmp_path, shards, monkeypatch, capsys):
    record = fake_slurm(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.toml").write_text(GRID)
    argv = ["train", "--sweep", "grid.toml", "--data.shard-root", str(shards)]
    argv += ["--slurm", "--slurm-nodes", "2", "--slurm-gpus", "8", "--slurm-cpus", "6"]
    argv += ["--slurm-account", "acct", "--slurm-partition", "gpu", "--slurm-time-min", "90"]
    argv += ["--log-to", "logs", "--run-root", "runs", "--data-parallel"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "submitted job 4242: 2 node(s) x 8 rank(s); logs: logs" in out
    assert "ranks: 16 (nccl); rank 0 reads each batch and broadcasts it" in out
    assert "rank 15: every member, on slice 16/16 of each batch" in out
    script = record.read_text()
    for line in [
        "#SBATCH --job-name=saev-train",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --time=90",
        "#SBATCH --account=acct",
        "#SBATCH --partition=gpu",
        f"#SBATCH --output={tmp_path}/logs/%j_0_log.out",
    ]:
        assert line in script, line
    # One log per rank, as `activations --slurm` writes one per job.
    assert f"srun --unbuffered --output {tmp_path}/logs/%j_%t_log.out" in script
    assert "-m submitit.core._submit" in script
    # The run directory is made (and checked) here; the job resumes it with the same flags.
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "run.json").is_file() and not (run_dir / "members").exists()
    job = pickle.loads((tmp_path / "logs" / "4242_submitted.pkl").read_bytes()).function
    assert job.train is train
    assert job.cfg.resume == run_dir and job.cfg.data.shard_root == shards.resolve()
    assert (job.cfg.slurm, job.cfg.data_parallel, job.cfg.device) == (False, True, "auto")
    assert job.cfg.sweep is None and job.cfg.log_to == tmp_path / "logs"
    # A submitted job is requeued as itself on timeout or preemption (it resumes the run).
    assert job.checkpoint().function is job

    # The same command again is refused: the run exists; nothing is submitted.
    record.unlink()
    assert run(argv) == 2
    assert "already holds an unfinished run" in capsys.readouterr().err
    assert not record.exists()


def test_slurm_without_a_cluster_is_one_line_and_writes_nothing(tmp_path, shards, capsys):
    monkeypatch_path = os.environ["PATH"]
    os.environ["PATH"] = str(tmp_path)  # no srun
    try:
        code = run(
            [
                "train",
                "--data.shard-root",
                str(shards),
                "--slurm",
                "--run-root",
                str(tmp_path / "r"),
            ]
        )
    finally:
        os.environ["PATH"] = monkeypatch_path
    assert code == 2
    assert capsys.readouterr().err == (
        "error: --slurm: no Slurm cluster found (srun is not on PATH); drop --slurm to run here.\n"
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # ~20 s: two fresh interpreters import torch
def test_submitted_job_trains_on_the_ranks_submitit_gives_it(tmp_path, shards, single, monkeypatch):
    """The job of `--slurm`, run by submitit's local executor as two tasks: torch.distributed is
    set up from submitit's job environment, and the result is the one-process result."""
    import submitit

    from saev.train import main, slurm

    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(tasks_per_node=2, timeout_min=5)
    monkeypatch.setattr(slurm, "make_executor", lambda cfg: executor)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    root = pathlib.Path(saev.__file__).parent.parent  # the tasks import this checkout's saev
    monkeypatch.setenv("PYTHONPATH", f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cfg = sweep_cfg(tmp_path / "two", shards, GRID, slurm=True, slurm_gpus=2)  # on CPU
    job = main.submit(cfg)
    try:
        results = job.results()
    finally:
        job.cancel(check=False)
    two = tmp_path / "two" / "runs" / single.name
    assert results == [two.resolve()] * 2
    assert_bit_identical(single, two)
    # Rank 0's log shows the plan with its rank lines, and the summary.
    log = (tmp_path / "logs" / f"{job.job_id}_0_log.out").read_text()
    assert "rank 1: pass 0: 003-relu-sparsity_coeff1 (cost 42%)" in log
    assert "| 003-relu-sparsity_coeff1 | ok |" in log
    assert "| 003-relu" not in (tmp_path / "logs" / f"{job.job_id}_1_log.out").read_text()


@pytest.mark.slow  # ~20 s: torchrun and two fresh interpreters import torch
def test_torchrun_command_line(tmp_path, shards, single):
    """`torchrun --nproc-per-node 2 -m saev train --sweep ...`, as a user types it."""
    (tmp_path / "grid.toml").write_text(GRID)
    root = pathlib.Path(saev.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd += ["-m", "saev", "train", "--sweep", str(tmp_path / "grid.toml"), "--device", "cpu"]
    cmd += ["--data.shard-root", str(shards), "--run-root", str(tmp_path / "two")]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert out.count("rank 0: pass 0:") == 1 and out.count("| 003-relu-sparsity_coeff1 | ok |") == 1
    assert_bit_identical(single, tmp_path / "two" / single.name)
