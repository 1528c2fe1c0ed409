"""lora_course.distributed and lora_course.communication against PyTorch, PEFT and transformers.

Every test that trains starts a real process group (gloo, 2 processes × 1 thread); no mocks. One
launch serves most checks (starting processes costs seconds: torch is imported in each). The data
is random token ids sized to the shipped base model: the mechanics of data parallelism do not
depend on what the tokens mean, and the test does not wait for the task's data to be generated.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from lora_course import communication, data, distributed, training
from lora_course.architectures import get_architecture, total_parameters
from lora_course.communication import LLAMA_2_70B, GQALlama
from lora_course.distributed import RunSpec
from lora_course.gpt import load_pretrained_gpt

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


@pytest.fixture(scope="module")
def base():
    return load_pretrained_gpt()


@pytest.fixture(scope="module")
def num_classes():
    return data.num_classes(data.MAIN_TASK)


@pytest.fixture(scope="module")
def train(base, num_classes):
    """256 random examples that fit the base model: ids (256, T), lengths 3..T, labels 0..C-1."""
    g = torch.Generator().manual_seed(0)
    n, t = 256, min(20, base.cfg.context_length)
    return training.EncodedSplit(torch.randint(3, base.cfg.vocab_size, (n, t), generator=g),
                                 torch.randint(3, t + 1, (n,), generator=g),
                                 torch.randint(0, num_classes, (n,), generator=g))


RUNS = [
    RunSpec("full", method="full", steps=3, batch_size=8, save_parameters=True),
    RunSpec("lora", rank=4, steps=3, batch_size=8, save_parameters=True),
    # DDP's built-in all-reduce (no hook), counted at the dispatcher instead
    RunSpec("lora builtin", rank=4, steps=3, batch_size=8, comm_hook=False, count_collectives=True),
    RunSpec("lora hook counted", rank=4, steps=2, batch_size=8, count_collectives=True),
    RunSpec("freeze after wrap", rank=4, steps=3, batch_size=8, mistake="freeze_after_wrap"),
    RunSpec("unused adapter", rank=4, steps=3, batch_size=8, mistake="unused_adapter"),
    RunSpec("unused adapter, find_unused", rank=4, steps=2, batch_size=8, mistake="unused_adapter",
            find_unused_parameters=True),
    RunSpec("freeze after wrap, find_unused", rank=4, steps=2, batch_size=8, mistake="freeze_after_wrap",
            find_unused_parameters=True),
    RunSpec("lora static graph", rank=4, steps=2, batch_size=8, static_graph=True),
    RunSpec("fsdp lora", rank=4, steps=2, batch_size=8, wrapper="fsdp", count_collectives=True),
    RunSpec("fsdp full", method="full", steps=1, batch_size=8, wrapper="fsdp", count_collectives=True),
    RunSpec("lora again", rank=4, steps=3, batch_size=8),  # after the failures: the group still works
]


HANG_TIMEOUT = 30


def _launch_a_hang(train):
    start = time.monotonic()
    try:
        distributed.launch([RunSpec("hang", mistake="hang", batch_size=8)], world_size=WORLD, train=train,
                           timeout_s=HANG_TIMEOUT)
    except Exception as err:  # the test below checks which
        return err, time.monotonic() - start
    return None, time.monotonic() - start


@pytest.fixture(scope="module")
def hang(train):
    """A run whose rank 1 hangs, started in a thread: its processes mostly wait, so it runs
    beside the main launch instead of adding its timeout to the test time."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(_launch_a_hang, train)


@pytest.fixture(scope="module")
def results(train, hang):
    return distributed.launch(RUNS, world_size=WORLD, train=train, timeout_s=240)


def _spec(name):
    return next(r for r in RUNS if r.name == name)


def _model(base, num_classes, name):
    return distributed.build_classifier(base, _spec(name), num_classes)


# ----- DDP: bytes, replicas, the one-process reference ------------------------------------------
def test_allreduce_bytes_are_four_times_the_trainable_parameters(results, base, num_classes):
    for name in ("full", "lora", "lora static graph"):
        trainable = sum(p.numel() for p in _model(base, num_classes, name).parameters() if p.requires_grad)
        r = results[name]
        assert r.trainable_parameters == trainable
        assert r.allreduce_bytes == [4 * trainable] * _spec(name).steps, name
    full, lora = results["full"], results["lora"]
    assert full.trainable_parameters == sum(p.numel() for p in base.parameters()) - base.out_head.weight.numel() \
        + (base.out_head.in_features + 1) * num_classes  # the new head has a bias, the LM head none
    assert full.bytes_per_step > 10 * lora.bytes_per_step


def test_hook_count_equals_the_dispatcher_count_and_changes_nothing(results):
    hooked, builtin = results["lora hook counted"], results["lora builtin"]
    assert hooked.collectives["backward"]["all_reduce"] == hooked.allreduce_bytes
    # DDP's own C++ all-reduce, seen at the dispatcher: the same bytes
    assert builtin.collectives["backward"]["all_reduce"] == [results["lora"].bytes_per_step] * 3
    # the hook averages as DDP's default does: bit-identical training
    assert builtin.state_sha256 == results["lora"].state_sha256


def test_replicas_are_bit_identical(results):
    for name in ("full", "lora", "lora builtin", "lora static graph", "lora again",
                 "unused adapter, find_unused", "freeze after wrap, find_unused", "fsdp lora"):
        assert results[name].replicas_identical, name
    assert results["lora again"].state_sha256 == results["lora"].state_sha256


def test_ddp_equals_one_process_on_the_same_global_batch(results, train):
    for name, tolerance in (("lora", 1e-5), ("full", 1e-5)):
        single = distributed.train_single_process(_spec(name), train=train)
        ddp = results[name]
        assert single.parameters.keys() == ddp.parameters.keys()
        assert distributed.max_parameter_difference(single, ddp) < tolerance, name
        assert single.losses == pytest.approx(ddp.losses, abs=1e-5)


# ----- the two classic failures ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["freeze after wrap", "unused adapter"])
def test_classic_failures_raise_the_reduction_error(results, name):
    r = results[name]
    assert r.failed_at_step == 2 and r.error is not None
    assert "Expected to have finished reduction in the prior iteration" in r.error
    assert "find_unused_parameters=True" in r.error
    assert r.allreduce_bytes == [0]  # step 1 all-reduced nothing: a bucket waited for a frozen / unused gradient
    assert not r.replicas_identical  # ... so each rank applied its own gradient and the replicas diverged


def test_find_unused_parameters_silences_the_errors_and_what_it_costs(results, base, num_classes):
    unused = results["unused adapter, find_unused"]
    assert unused.error is None
    assert unused.allreduce_bytes[-1] == 4 * unused.trainable_parameters  # the unused A, B too (zeros)
    late = results["freeze after wrap, find_unused"]
    assert late.error is None
    everything = sum(p.numel() for p in _model(base, num_classes, "freeze after wrap").parameters())
    assert late.allreduce_bytes[-1] == 4 * everything  # every frozen weight still all-reduced
    assert late.trainable_parameters == results["lora"].trainable_parameters


# ----- FSDP2 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fsdp lora", "fsdp full"])
def test_fsdp_gather_and_reduce_scatter_bytes(results, base, num_classes, name):
    model = _model(base, num_classes, name)
    expected = communication.fsdp_step_payloads(model, model.trf_blocks, WORLD)
    measured = results[name].collectives
    steps = _spec(name).steps
    assert measured["forward"]["all_gather"] == [expected["forward all_gather"]] * steps
    assert measured["backward"]["all_gather"] == [expected["backward all_gather"]] * steps
    assert measured["backward"]["reduce_scatter"] == [expected["backward reduce_scatter"]] * steps
    total = sum(p.numel() for p in model.parameters())
    assert 4 * total <= expected["forward all_gather"] < 4 * total * 1.01  # padding to a multiple of N rows


def test_fsdp_lora_gathers_everything_but_reduces_and_stores_only_the_trainable(results):
    lora, full = results["fsdp lora"], results["fsdp full"]
    assert lora.collectives["forward"]["all_gather"][0] > full.collectives["forward"]["all_gather"][0]  # + A, B
    assert lora.collectives["backward"]["reduce_scatter"][0] < full.collectives["backward"]["reduce_scatter"][0] / 10
    # AdamW's m and v: sharded under FSDP (half of DDP's on 2 ranks)
    assert lora.optimizer_state_bytes == results["lora"].optimizer_state_bytes // WORLD


# ----- timeouts and bad input --------------------------------------------------------------------
def test_timeout_kills_a_hanging_worker(hang):
    err, seconds = hang.result()
    assert isinstance(err, distributed.DistributedTimeoutError), err
    assert f"did not finish within {HANG_TIMEOUT} s" in str(err)
    assert seconds < HANG_TIMEOUT + 15
    assert "simulated hang" in str(err)  # rank 1 reached the hang; rank 0 waited for it in a collective
    for pid in err.pids:  # every process is gone (killed and reaped)
        assert not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"world_size": 32}, "larger than the global batch"),
    ({"world_size": 3}, "cannot be split evenly"),
    ({"world_size": 0}, "world_size must be an integer >= 1"),
    ({"backend": "mpi"}, "backend must be one of"),
])
def test_bad_input_is_refused_before_any_process_starts(monkeypatch, train, kwargs, match):
    def no_processes(*args, **kw):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_processes)
    with pytest.raises(ValueError, match=match):
        distributed.launch([RunSpec("r", batch_size=16)], train=train, **{"world_size": 2, **kwargs})


def test_nccl_without_a_gpu_per_process_is_refused(monkeypatch, train):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    world = (torch.cuda.device_count() if torch.cuda.is_available() else 0) + 1
    with pytest.raises(ValueError, match="needs one CUDA GPU per process"):
        distributed.launch([RunSpec("r", batch_size=8 * world)], world_size=world, backend="nccl", train=train)


def test_a_model_with_nothing_to_train_is_refused(monkeypatch, train):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(ValueError, match="trains nothing"):
        RunSpec("nothing", targets=(), train_head=False)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        distributed.launch([RunSpec("typo", targets=("W_qeury",))], train=train)
    too_long = training.EncodedSplit(torch.zeros(4, 500, dtype=torch.long), torch.ones(4, dtype=torch.long),
                                     torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit the base model"):
        distributed.launch([RunSpec("r")], train=too_long)


# ----- command line: torchrun -m lora_course.distributed, scripts/peft_ddp.py ---------------------
def _torchrun(args, tmp_path, timeout=240):
    if TORCHRUN is None:
        pytest.fail("torchrun is not installed next to this Python (it comes with torch)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", str(WORLD), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_torchrun_command_line(tmp_path, train, base, num_classes):
    distributed.save_split(train, tmp_path / "train.safetensors")
    out = _torchrun(["-m", "lora_course.distributed", "--method", "lora", "--rank", "2", "--steps", "2",
                     "--batch-size", "8", "--train-data", str(tmp_path / "train.safetensors"),
                     "--results", str(tmp_path / "results")], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / "results" / f"rank{r}.json").read_text())["runs"][0] for r in range(WORLD)]
    model = distributed.build_classifier(base, RunSpec("cli", rank=2), num_classes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for r in ranks:
        assert r["allreduce_bytes"] == [4 * trainable] * 2
        assert len(set(r["state_sha256"])) == 1
    assert "cli" in out.stdout and f"{4 * trainable:,}" in out.stdout  # rank 0's table


def test_peft_script_on_two_processes_equals_one_process_peft(tmp_path, train, base, num_classes):
    from peft import PeftModel, get_peft_model_state_dict

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import peft_ddp
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    distributed.save_split(train, tmp_path / "train.safetensors")
    steps, batch = 3, 8
    out = _torchrun(["scripts/peft_ddp.py", "--steps", str(steps), "--batch-size", str(batch), "--train-data",
                     str(tmp_path / "train.safetensors"), "--output", str(tmp_path / "adapter"),
                     "--summary", str(tmp_path / "summary.json")], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())

    # The same model and steps in one process, on the whole global batch, with PEFT itself
    torch.manual_seed(0)
    reference = peft_ddp.build_peft_classifier(base, num_classes)
    trainable, _ = reference.get_nb_trainable_parameters()
    assert summary["trainable_parameters"] == trainable
    assert summary["allreduce_bytes_per_step"] == [4 * trainable] * steps
    assert summary["replicas_identical"]
    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-3)
    reference.train()
    for idx in distributed.batch_indices(len(train), batch, steps, 0):
        logits = training.classification_logits(reference, train.ids[idx], train.lengths[idx])
        loss = torch.nn.functional.cross_entropy(logits, train.labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loaded = PeftModel.from_pretrained(training.make_classifier(base, num_classes=num_classes), tmp_path / "adapter")
    ours, theirs = get_peft_model_state_dict(reference), get_peft_model_state_dict(loaded)
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
    assert any(k.endswith("lora_B.weight") and theirs[k].abs().max() > 0 for k in theirs)  # it trained


# ----- projections to real models ----------------------------------------------------------------
def test_llama_shapes_match_transformers_and_the_published_counts():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                         intermediate_size=28672, vocab_size=32000)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    assert sum(p.numel() for p in hf.parameters()) == LLAMA_2_70B.total_parameters() == 68_976_648_192
    llama_7b = GQALlama("Llama-2-7B", 32000, 4096, 32, 32, 32, 11008)  # no GQA: n_kv_heads = n_heads
    assert llama_7b.total_parameters() == total_parameters(get_architecture("llama-2-7b")) == 6_738_415_616


def test_llama_70b_lora_count_equals_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # 2 layers of the 70B shape on the meta device: LoRA counts scale with the number of layers
    config = LlamaConfig(hidden_size=8192, num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8,
                         intermediate_size=28672, vocab_size=32000)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable * 40 == LLAMA_2_70B.lora_parameters(8)


def test_step_traffic_formulas():
    n, b = 8, 2
    ddp_full = communication.step_traffic(0, 1000, n, b)
    assert ddp_full["ddp"]["payload"] == 2000 and ddp_full["ddp"]["sent"] == pytest.approx(2 * 7 / 8 * 2000)
    # ZeRO-3 moves 1.5× DDP's volume for full fine-tuning (ZeRO paper §7.2.2)
    assert ddp_full["fsdp"]["sent"] == pytest.approx(1.5 * ddp_full["ddp"]["sent"])
    assert ddp_full["ddp"]["memory"] == 16 * 1000 and ddp_full["fsdp"]["memory"] == 16 * 1000 / n
    lora = communication.step_traffic(1000, 10, n, b)
    assert lora["ddp"]["payload"] == 20
    assert lora["fsdp"]["gather_payload"] == 2 * 2 * 1010  # every weight, twice, LoRA included
    rows = communication.projection_table(world_size=n)
    assert {r["model"] for r in rows} == {"GPT-2 124M", "Llama-2-7B", "Llama-2-70B"} and len(rows) == 12
    for row in rows:
        assert row["link_seconds"] == pytest.approx(row["sent_bytes"] / 100e9)
    with pytest.raises(ValueError, match="world_size"):
        communication.step_traffic(10, 10, 0)


def test_fsdp_padding():
    assert communication.fsdp_padded_numel((343, 64), 2) == 344 * 64
    assert communication.fsdp_padded_numel((64,), 8) == 64
    assert communication.fsdp_padded_numel((6,), 4) == 8
    assert math.prod((5, 3)) * 1 == communication.fsdp_padded_numel((5, 3), 1)
