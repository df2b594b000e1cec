"""Launcher discovery from torchrun, srun and mpirun environments."""

import pytest

from megatron_r1.parallel.launch_env import discover, first_slurm_host


@pytest.mark.parametrize(("nodelist", "host"), [
    ("node001", "node001"),
    ("gpu[003-005,009]", "gpu003"),
    ("gpu[12,14],cpu1", "gpu12"),
    ("a-b-c[0007-0010]", "a-b-c0007"),
    ("host1,host2", "host1"),
])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


@pytest.mark.parametrize("bad", ["", "gpu[x-3]"])
def test_bad_nodelist_names_the_variable(bad):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        first_slurm_host(bad)


def test_torchrun_env_wins_even_inside_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}
    got = discover(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank) == ("torchrun", 3, 8, 1)
    assert (got.master_addr, got.master_port) == ("h0", 1234)


def test_srun_task():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_STEP_ID": "0",
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[010-011]"}
    got = discover(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank) == ("slurm", 5, 16, 5)
    assert got.master_addr == "gpu010"
    assert got.master_port == 20000 + 4242
    assert discover({**env, "SLURM_PROCID": "9"}).master_port == got.master_port


def test_sbatch_script_itself_is_not_a_rank():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu1"}
    assert discover(env).launcher == "single"


def test_plain_process_is_a_world_of_one():
    got = discover({})
    assert (got.launcher, got.rank, got.world_size) == ("single", 0, 1)
    assert got.master_port > 0


def test_non_integer_rank_names_the_variable():
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})
