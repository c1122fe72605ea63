"""Several processes (torch.distributed, gloo on the CPU) and resuming an interrupted run.

The fast tests check the mechanism's pieces; the slow ones run the command on two processes of this
machine: the same quality as one process for every step that distributes, every module solved by exactly one
owner, a rank killed with SIGKILL ending the run in one line with nothing left behind, the resumed run's shards
byte-identical to an uninterrupted run's (a layer pass from its committed blocks, E2E-QP's training from its
committed step), and two torchrun launches as two "machines" equal to one launch of two processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.distributed import LOST_CONTACT, Distributed, RowSample, balance_owners
from compressor.recipe import Recipe
from compressor.resume import Commits, ResumeError, fingerprint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def write_recipe(folder: Path, calibration: str, steps: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(
        f"calibration: {{dataset: {calibration}, samples: 8, seq_len: 64, seed: 0}}\n"
        f"steps:\n{steps}export: {{format: auto}}\n"
    )
    return path


GPTQ = "  - gptq: {bits: 4, group_size: 32, ignore: [lm_head]}\n"


def run(*arguments, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *arguments], cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line holds ``text`` (a run's output path): none may outlive their run."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


# ----------------------------------------------------------------------------------------------
# The mechanism's pieces


def test_every_module_has_exactly_one_owner_and_the_solves_are_balanced():
    costs = {f"layer{i}": float(c) for i, c in enumerate([9, 7, 5, 5, 4, 3, 3, 1, 1, 1])}
    for world_size in (1, 2, 3, 4):
        owners = balance_owners(costs, world_size)
        assert list(owners) == list(costs)  # one owner each, in the modules' order
        assert set(owners.values()) <= set(range(world_size))
        loads = [sum(c for name, c in costs.items() if owners[name] == rank) for rank in range(world_size)]
        assert max(loads) - min(loads) <= max(costs.values())  # greedy longest-first: within one solve
        assert balance_owners(dict(reversed(list(costs.items()))), world_size).keys() == set(costs)
    assert set(balance_owners(costs, 2).values()) == {0, 1}


def test_the_samples_are_split_into_disjoint_shares_that_cover_them_all():
    rows = torch.arange(7 * 3).reshape(7, 3)
    shares = [Distributed(rank=rank, world_size=3).shard(rows) for rank in range(3)]
    assert torch.equal(torch.cat(shares), rows)
    assert [len(s) for s in shares] == [3, 2, 2]
    assert Distributed().shard(rows) is rows


def test_the_ranks_row_samples_add_up_to_the_single_process_sample():
    """Every ``every``-th row of all ranks' rows, at most ``size``: each rank fills its own rows' positions, fed in
    uneven pieces (calibration batches), and the sum over ranks is the single process's sample exactly."""
    rows = torch.randn(23, 5)
    for every, size in ((1, 23), (3, 8), (3, 5), (4, 2)):
        single = RowSample(0, every, size)
        single.add(rows)
        assert torch.equal(single.rows, rows[::every][:size])
        total = torch.zeros(size, 5)
        first = 0
        for share in rows.tensor_split(3):
            sample = RowSample(first, every, size)
            for piece in share.tensor_split(2):
                sample.add(piece)
            total += sample.rows
            first += len(share)
        assert torch.equal(total, single.rows)


def test_resume_refuses_a_changed_fingerprint_in_one_line_naming_it(tmp_path, tiny_llama, calibration_file):
    recipe = Recipe.from_yaml(write_recipe(tmp_path, calibration_file, GPTQ))
    first = Commits(tmp_path, fingerprint(recipe, tiny_llama, 2), Distributed())
    assert first.open(tmp_path / "out", resuming=False) == -1
    (tmp_path / "resume" / "committed.json").write_text(json.dumps({"block": 0}))
    same = Commits(tmp_path, fingerprint(recipe, tiny_llama, 2), Distributed())
    assert same.open(tmp_path / "out", resuming=True) == 0
    recipe.calibration.samples = 16
    changed = Commits(tmp_path, fingerprint(recipe, tiny_llama, 1), Distributed())
    with pytest.raises(ResumeError) as error:
        changed.open(tmp_path / "out", resuming=True)
    message = str(error.value)
    assert (
        "\n" not in message and "calibration settings (samples: 8 -> 16)" in message and "processes (2 -> 1)" in message
    )


def test_a_refused_resume_keeps_the_interrupted_runs_commits(tmp_path, tiny_llama, calibration_file):
    """--resume with another recipe: one line naming what changed, and the committed progress is still there."""
    from compressor.api import apply

    recipe = Recipe.from_yaml(write_recipe(tmp_path, calibration_file, GPTQ))
    partial = tmp_path / ".out.partial-999999999"  # left by a killed run (no process has this pid)
    (partial / "resume").mkdir(parents=True)
    (partial / "resume" / "fingerprint.json").write_text(json.dumps(fingerprint(recipe, tiny_llama, 1)))
    (partial / "resume" / "committed.json").write_text(json.dumps({"block": 0}))
    recipe.calibration.seed = 1
    with pytest.raises(ResumeError, match=r"calibration settings \(seed: 0 -> 1\)"):
        apply(recipe, tiny_llama, tmp_path / "out", progress=False, resume=True)
    (kept,) = tmp_path.glob(".out.partial-*")
    assert json.loads((kept / "resume" / "committed.json").read_text()) == {"block": 0}
    assert not (tmp_path / "out").exists()


def test_a_step_that_cannot_distribute_refuses_before_any_process_starts(tmp_path, tiny_llama, calibration_file):
    """Every shipped data-dependent step distributes; the test helper's ``undistributed`` step declares nothing."""
    recipe = write_recipe(tmp_path, calibration_file, "  - undistributed: {}\n")
    arguments = ["-m", "tests.distributed_helper", "apply", str(recipe), str(tiny_llama), "-o", str(tmp_path / "out")]
    result = run(*arguments, "--nproc", "2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "steps[0].undistributed" in lines[0] and "several processes" in lines[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Two processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, calibration_file):
    """The same GPTQ recipe on one process and on two (``--nproc 2``)."""
    folder = tmp_path_factory.mktemp("distributed")
    recipe = write_recipe(folder, calibration_file, GPTQ)
    # one process launched as the others are (one thread, ENV), so its bytes are comparable with resumed runs
    result = run("-m", "compressor", "apply", str(recipe), str(tiny_llama), "-o", str(folder / "one"), "--quiet")
    assert result.returncode == 0, result.stderr
    result = run("-m", "compressor", "apply", str(recipe), str(tiny_llama), "-o", str(folder / "two"), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    return folder


def kl_from_base(model: Path, base: Path, text: str) -> float:
    from compressor.eval import evaluate_paths

    result = evaluate_paths(
        str(model), str(base), text, 64, 6, torch.device("cpu"), progress=False, trust_remote_code=True
    )  # SwiftKV and MoDeGPT's sliced layout ship their modeling code
    return result.kl_divergence


@pytest.mark.slow
def test_two_processes_give_the_quality_of_one_and_each_module_one_owner(runs, tiny_llama, calibration_file):
    one, two = (
        kl_from_base(runs / "one", tiny_llama, calibration_file),
        kl_from_base(runs / "two", tiny_llama, calibration_file),
    )
    assert one > 0 and abs(two - one) <= 0.02 * one
    rows = [row for row in json.loads((runs / "two" / "report.json").read_text())["modules"] if row["step"] == "gptq"]
    single = json.loads((runs / "one" / "report.json").read_text())["modules"]
    assert [row["module"] for row in rows] == [row["module"] for row in single]  # each once, in the same order
    assert {row["owner"] for row in rows} == {0, 1}  # both ranks solve
    assert json.loads((runs / "two" / "report.json").read_text())["summary"]["distributed"]["processes"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "step",
    [
        "  - squeezellm: {bits: 3, iterations: 10, ignore: [lm_head]}\n",
        "  - efficientqat_block_ap: {bits: 2, group_size: 32, epochs: 2, batch_size: 2, heldout: 0.25}\n",
        "  - bfp: {k_bits: 4, block_size: 32, ksort: act_rms, scope: token}\n",
        "  - rtn: {bits: 3, group_size: 32, symmetric: false}\n"
        "  - efficientqat_e2e_qp: {epochs: 4, batch_size: 2, micro_batch_size: 2, lr: 5.0e-5, heldout: 0.25}\n",
        "  - qllm: {bits: 4, epochs: 2, batch_size: 1, feature_samples: 2, search_candidates: 4}\n",
        "  - modegpt: {ratio: 0.3, modules: [qk, vo, mlp]}\n",
        "  - modegpt: {ratio: 0.3, modules: [mlp], export: masked}\n",
        "  - transmla: {kv_cache_ratio: 0.25}\n  - transmla_heal: {epochs: 2, lr: 1.0e-3, batch_size: 2}\n",
        "  - swiftkv: {epochs: 2, lr: 1.0e-3, batch_size: 2}\n",
        "  - awq: {bits: 3, group_size: 32, alphas: 10}\n  - rtn: {bits: 3, group_size: 32}\n",
        "  - fp8_kv: {}\n",
        "  - bfp: {k_bits: 4, block_size: 32, ksort: act_rms, refine: greedy, refine_trials: 200}\n",
        "  - gptq: {bits: 2, group_size: 32, symmetric: false, bits_per_weight: 3.0, schemes: [w4g32, w8g32]}\n",
    ],
    ids=[
        "squeezellm", "efficientqat_block_ap", "bfp_ksort", "e2e_qp", "qllm", "modegpt", "modegpt_experts", "transmla",
        "swiftkv",
        "awq", "fp8_kv", "bfp_greedy", "gptq_allocation",
    ],
)  # fmt: skip
def test_the_other_distributed_steps_give_the_quality_of_one_process(tmp_path, tiny_llama, calibration_file, step):
    """SqueezeLLM (Fisher sums to owners), Block-AP, E2E-QP, SwiftKV and TransMLA's healing (gradients over
    ranks), BFP's K-sort (all-reduced key statistics), QLLM (all-reduced channel ranges, gradients), MoDeGPT and
    TransMLA (correlations and Grams summed to owners), GPTQ's bit allocation (output Fisher all-reduced, Hessians
    summed to owners that score the candidates): two processes, the KL of one. E2E-QP at batch 2 (one
    sequence a rank a step) with a held-out part: the steps and the held-out part are the single process's."""
    from compressor.api import apply
    from compressor.testing import make_random_model

    model = tiny_llama
    if "swiftkv" in step:  # 2 layers make M = 1, where SwiftKV is the original model: 4 layers, M = 2
        model = make_random_model("llama", tmp_path / "deep", num_hidden_layers=4)
    experts = "export: masked" in step  # MoDeGPT per expert: each expert's C_sigma summed at its owner
    if experts:
        model = make_random_model("mixtral", tmp_path / "moe")
    recipe = write_recipe(tmp_path, calibration_file, step)
    apply(recipe, model, tmp_path / "one", progress=False)
    apply(recipe, model, tmp_path / "two", progress=False, nproc=2)
    one, two = (
        kl_from_base(tmp_path / "one", model, calibration_file),
        kl_from_base(tmp_path / "two", model, calibration_file),
    )
    print(f"KL one process {one:.6g}, two {two:.6g}")
    assert one > 0 and abs(two - one) <= 0.02 * one, (one, two)
    owners = json.loads((tmp_path / "two" / "report.json").read_text())["summary"]["distributed"]["owners"]
    blocks = ("model.layers.0", "model.layers.1")
    expected = {  # what is solved on one owner (a dict: exactly one each), and whether both ranks solve
        "modegpt": ({f"{b}.{m}" for b in blocks for m in ("self_attn.qk", "self_attn.vo", "mlp")}, {0, 1}),
        "transmla": ({f"{b}.self_attn" for b in blocks}, {0}),
        "qllm": ({f"{b}.{point}" for b in blocks for point in ("attn_in", "mlp_in", "down_in")}, {0, 1}),
    }
    if experts:
        every_expert = {f"{b}.mlp.experts.{e}" for b in blocks for e in range(4)}  # each solved once, both ranks solve
        assert set(owners) == every_expert and set(owners.values()) == {0, 1}, owners
    for name, (modules, ranks) in expected.items():
        if f"- {name}:" in step and not experts:
            assert set(owners) == modules and set(owners.values()) == ranks, owners
    single, double = (json.loads((tmp_path / run / "report.json").read_text())["modules"] for run in ("one", "two"))
    chosen = {  # every rank chooses as one process
        "awq": ("alpha", "mean_clip"),
        "fp8_kv": ("k_scale", "v_scale"),
        "gptq": ("scheme",),
    }
    for name, keys in chosen.items():
        if f"- {name}:" in step:
            choices = [
                [(row["module"], key, row[key]) for row in rows for key in keys if key in row]
                for rows in (single, double)
            ]
            assert choices[0] and choices[1] == choices[0], choices
    if "refine: greedy" in step:  # the greedy swaps are the single process's
        refined = [
            (row["logit_error_sorted"], row["logit_error_refined"]) for row in single if "logit_error_sorted" in row
        ]
        assert any(after < before for before, after in refined), refined  # it swapped
        perms = [buffers(tmp_path / run, "k_perm") for run in ("one", "two")]
        assert len(perms[0]) == 2 and all(torch.equal(perms[0][name], perms[1][name]) for name in perms[0])


def buffers(model: Path, suffix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        name: tensor
        for shard in model.glob("*.safetensors")
        for name, tensor in load_file(shard).items()
        if name.endswith(suffix)
    }


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_in_one_line_and_resume_gives_identical_shards(runs, tiny_llama, calibration_file):
    """Rank 1 is SIGKILLed in block 1 (``tests/distributed_helper.py``): one line names it, no process is left,
    the partial output keeps block 0; ``--resume`` continues at block 1 and writes the uninterrupted run's bytes."""
    folder = runs / "killed"
    folder.mkdir()
    recipe = write_recipe(folder, calibration_file, GPTQ + "  - die_at: {}\n")
    output = folder / "out"
    launcher = (
        "import sys; from pathlib import Path; from compressor.distributed import launch; "
        f"sys.exit(launch(sys.argv[1:], 2, Path({str(folder / 'status')!r}), module='tests.distributed_helper'))"
    )
    arguments = ["-c", launcher, "apply", str(recipe), str(tiny_llama), "-o", str(output), "--quiet"]
    killed = run(*arguments, env={"COMPRESSOR_TEST_DIE": "1:1"})
    assert killed.returncode == 128 + signal.SIGKILL
    lines = killed.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(
        "error: rank 1 was killed by SIGKILL while gptq+die_at on block 1"
    )
    assert not processes_mentioning(str(output))
    assert not output.exists()
    (partial,) = folder.glob(".out.partial-*")
    assert json.loads((partial / "resume" / "committed.json").read_text()) == {"block": 0}

    resumed = run(*arguments, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing at block 1 of 2" in resumed.stderr
    assert (output / "model.safetensors").read_bytes() == (runs / "two" / "model.safetensors").read_bytes()
    assert not list(folder.glob(".out.partial-*")) and not (output / "resume").exists()


@pytest.mark.slow
def test_one_process_killed_after_block_0_resumes_to_identical_shards(runs, tiny_llama, calibration_file):
    """Without --nproc: SIGKILL in block 1, then --resume writes what the uninterrupted single process wrote."""
    folder = runs / "single"
    folder.mkdir()
    recipe = write_recipe(folder, calibration_file, GPTQ + "  - die_at: {}\n")
    output = kill_in_block_1_and_resume(recipe, tiny_llama, folder / "out")
    assert (output / "model.safetensors").read_bytes() == (runs / "one" / "model.safetensors").read_bytes()


def kill_in_block_1_and_resume(recipe: Path, model: Path, output: Path) -> Path:
    """One process SIGKILLed in block 1 (``die_at``), then the same command with --resume; returns ``output``."""
    arguments = ["-m", "tests.distributed_helper", "apply", str(recipe), str(model), "-o", str(output), "--quiet"]
    killed = run(*arguments, env={"COMPRESSOR_TEST_DIE": "0:1"})
    assert killed.returncode == -signal.SIGKILL and not output.exists()
    resumed = run(*arguments, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "blocks 0..0 were committed; continuing at block 1 of 2" in resumed.stderr
    return output


@pytest.mark.slow
def test_a_hung_rank_ends_the_run_after_the_timeout_in_one_line(runs, tiny_llama, calibration_file):
    folder = runs / "hung"
    folder.mkdir()
    recipe = write_recipe(folder, calibration_file, GPTQ + "  - die_at: {}\n")
    output = folder / "out"
    launcher = (
        "import sys; from pathlib import Path; from compressor.distributed import launch; "
        f"sys.exit(launch(sys.argv[1:], 2, Path({str(folder / 'status')!r}), module='tests.distributed_helper'))"
    )
    arguments = ["-c", launcher, "apply", str(recipe), str(tiny_llama), "-o", str(output), "--quiet", "--timeout", "5"]
    hung = run(*arguments, env={"COMPRESSOR_TEST_HANG": "1:1"}, timeout=300)
    lines = hung.stderr.strip().splitlines()
    assert hung.returncode == LOST_CONTACT and len(lines) == 1, hung.stderr
    assert (
        lines[0].startswith("error: rank 0 lost contact with another rank")
        and "rank 1: gptq+die_at on block 1" in lines[0]
    )
    assert not processes_mentioning(str(output))
    (partial,) = folder.glob(".out.partial-*")  # resumable: block 0 is committed
    assert json.loads((partial / "resume" / "committed.json").read_text()) == {"block": 0}


@pytest.mark.slow
def test_two_torchrun_launches_as_two_machines_equal_one_launch_of_two_processes(runs, tiny_llama, calibration_file):
    recipe = write_recipe(runs, calibration_file, GPTQ, "nodes.yaml")
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    output = runs / "nodes"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "localhost",
                "--master-port",
                str(port),
                "-m",
                "compressor",
                "apply",
                str(recipe),
                str(tiny_llama),
                "-o",
                str(output),
                "--quiet",
            ],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr
    assert (output / "model.safetensors").read_bytes() == (runs / "two" / "model.safetensors").read_bytes()


E2E = (
    "  - rtn: {bits: 3, group_size: 32, symmetric: false}\n"
    "  - efficientqat_e2e_qp: {epochs: 2, batch_size: 2, micro_batch_size: 2, lr: 5.0e-5, heldout: 0.25}\n"
)


@pytest.mark.slow
def test_training_killed_mid_run_resumes_after_its_last_committed_step(tmp_path, tiny_llama, calibration_file):
    """E2E-QP on two processes, rank 1 SIGKILLed as it starts training step 5 of 6: ``--resume`` runs RTN again,
    puts back the trained scales, optimizer state and held-out record of step 4, says so in one line and writes
    the bytes of an uninterrupted run."""
    recipe = write_recipe(tmp_path, calibration_file, E2E)
    launcher = (
        "import sys; from pathlib import Path; from compressor.distributed import launch; "
        f"sys.exit(launch(sys.argv[1:], 2, Path({str(tmp_path / 'status')!r}), module='tests.distributed_helper'))"
    )
    whole = run("-c", launcher, "apply", str(recipe), str(tiny_llama), "-o", str(tmp_path / "whole"), "--quiet")
    assert whole.returncode == 0, whole.stderr
    arguments = ["-c", launcher, "apply", str(recipe), str(tiny_llama), "-o", str(tmp_path / "out"), "--quiet"]
    killed = run(*arguments, env={"COMPRESSOR_TEST_DIE_STEP": "1:5"})
    assert killed.returncode == 128 + signal.SIGKILL and "rank 1 was killed by SIGKILL" in killed.stderr
    (partial,) = tmp_path.glob(".out.partial-*")
    assert (partial / "resume" / "progress-0.pt").is_file()
    resumed = run(*arguments, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("resume:")]
    assert lines == [
        "resume: efficientqat_e2e_qp: training continuing after step 4 of 6 (the steps before it ran again)"
    ]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors"
    ).read_bytes()
    assert not list(tmp_path.glob(".out.partial-*")) and not (tmp_path / "out" / "resume").exists()


def test_a_model_step_that_commits_nothing_says_that_it_runs_again(tmp_path, tiny_llama, calibration_file, capsys):
    """--resume with SqueezeLLM alone: it starts from the beginning; before E2E-QP (which commits): it runs again,
    and without an interrupted run to continue, the run says that it starts from the beginning."""
    from compressor.api import apply

    squeezellm = "  - squeezellm: {bits: 3, iterations: 2, ignore: [lm_head]}\n"
    apply(
        write_recipe(tmp_path, calibration_file, squeezellm), tiny_llama, tmp_path / "out", progress=False, resume=True
    )
    said = capsys.readouterr().err
    assert "resume: model step squeezellm does not commit its progress; starting from the beginning" in said
    recipe = write_recipe(
        tmp_path, calibration_file, squeezellm + "  - efficientqat_e2e_qp: {epochs: 1, batch_size: 4}\n"
    )
    apply(recipe, tiny_llama, tmp_path / "both", progress=False, resume=True)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resume:")]
    assert said == [
        "resume: model step squeezellm does not commit its progress; it runs again",
        f"resume: no interrupted run of {tmp_path / 'both'} to continue; starting from the beginning",
    ]


@pytest.mark.slow
def test_a_resumed_bit_allocation_writes_identical_shards(tmp_path, tiny_llama, calibration_file):
    """GPTQ with ``bits_per_weight``: the allocation runs before the layer pass and again on --resume (nothing in
    it is random), so a run killed in block 1 and resumed writes the uninterrupted run's bytes."""
    allocated = "  - gptq: {bits: 2, group_size: 32, symmetric: false, bits_per_weight: 3.0, schemes: [w4g32, w8g32]}\n"
    whole = write_recipe(tmp_path, calibration_file, allocated, "whole.yaml")
    result = run("-m", "compressor", "apply", str(whole), str(tiny_llama), "-o", str(tmp_path / "whole"), "--quiet")
    assert result.returncode == 0, result.stderr
    recipe = write_recipe(tmp_path, calibration_file, allocated + "  - die_at: {}\n")
    output = kill_in_block_1_and_resume(recipe, tiny_llama, tmp_path / "out")
    assert (output / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    schemes = [
        [(row["module"], row["scheme"]) for row in json.loads((folder / "report.json").read_text())["modules"]
         if "scheme" in row]
        for folder in (tmp_path / "whole", output)
    ]  # fmt: skip
    assert schemes[0] and schemes[1] == schemes[0]
