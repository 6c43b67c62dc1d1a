"""Data-parallel training under torchrun on the CPU (gloo, 2 processes): the same model as one process, only rank
0 writes, a killed run resumes with 2 processes or with 1, gradient accumulation, the batch norm over processes.

How equal is "the same": with batch norm over all processes (`models.training.sync_norm`), one step of 2
processes x 1 image and of 1 process x 2 images have the same loss (to 1e-6) and gradients that differ by about
0.5 % (relative L2): the one-process run uses torch's batch-norm kernel, the two-process run the float64 layer,
and MaSSFormer's BatchNorms after global pooling normalise 2 values per channel, which amplifies rounding. The
same layer on 1 process gives the two-process gradients to 2e-6 (the first test checks both). AdamW moves every
weight by about lr x sign(gradient) on its first steps, so weights whose gradient is at rounding level can move
either way: where the number of processes changes within a run, the test bounds the share of weights that
differ instead of the largest difference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from addclass.tasks.training.train import train
from addclass.tasks.training.train_launch import Launch, launch_training, run_training, torchrun_command
from tests.tasks.test_train import make_train_store, read_log, tiny_config

REPO = Path(__file__).resolve().parents[2]
TWO = Launch(nproc=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_train_store(tmp_path_factory.mktemp("ddp") / "scenes.zarr")


def share_differing(a: Path, b: Path, *, atol: float = 1e-5) -> float:
    """Share of the weight (and buffer) elements of two model folders that differ by more than ``atol``."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    differ = sum(int(((wa[k].double() - wb[k].double()).abs() > atol).sum()) for k in wa)
    return differ / sum(v.numel() for v in wa.values())


def max_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


GRADIENTS = """
import os, sys
import torch
import addclass.models.training.sync_norm as sync_norm
from addclass.tasks.training.distributed import Distributed
from addclass.tasks.training.train import _build_run, _data_loader, _step, model_config, resolve_train_config
from tests.tasks.test_train import tiny_config

store, out, same_norm = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
config = resolve_train_config(tiny_config(store, out + ".run", grad_clip=0.0))
ctx = Distributed.from_env(torch.device("cpu"))
expected = model_config(config)
torch.manual_seed(config.seed)
run = _build_run(config, expected, checkpoint=None, ctx=ctx)
if same_norm and not ctx.active:  # one process with the layer the processes use: its own statistics code
    sync_norm._world_size = lambda: 2
    sync_norm.all_reduce = lambda t: t
    sync_norm.sync_batch_norm(run.model, device=ctx.device)
run.optimizer.step = lambda *a, **k: None  # keep the gradients, skip the update
batch = next(iter(_data_loader(config, start_step=0, ctx=ctx)))
losses, total = _step(config, run, [batch], pseudo=set(expected["pseudo_classes"]), step=1)
grads = {n: p.grad for n, p in run.model.named_parameters() if p.grad is not None}
torch.save({"total": float(total), "grads": grads}, f"{out}.{ctx.rank}.pt")
ctx.close()
"""


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    return (num / sum(float(a[k].double().norm() ** 2) for k in a)) ** 0.5


def test_two_processes_x_one_image_give_the_gradients_of_one_process_x_two(store: Path, tmp_path: Path) -> None:
    script = tmp_path / "grads.py"
    script.write_text(GRADIENTS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(prefix: list[str], out: str, same_norm: bool) -> None:
        proc = subprocess.run([*prefix, str(script), str(store), str(tmp_path / out), "1" if same_norm else "0"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"], "two", False)
    run([sys.executable], "one", False)
    run([sys.executable], "same", True)
    two, two_rank1 = torch.load(tmp_path / "two.0.pt", weights_only=True), torch.load(
        tmp_path / "two.1.pt", weights_only=True)
    one, same = torch.load(tmp_path / "one.0.pt", weights_only=True), torch.load(
        tmp_path / "same.0.pt", weights_only=True)
    assert relative_difference(two["grads"], two_rank1["grads"]) == 0.0  # DDP gave both the same gradients
    assert two["total"] == pytest.approx(one["total"], rel=1e-6)
    against_same, against_torch = relative_difference(same["grads"], two["grads"]), relative_difference(
        one["grads"], two["grads"])
    print(f"gradients, relative L2 difference: {against_same:.2e} (same batch-norm layer), {against_torch:.2e} "
          f"(torch's BatchNorm2d kernel)")
    # float32 sums taken in another order (a batch of 2 against 1 + 1 all-reduced): 2.4e-6 on one CPU, 1.2e-4 on
    # another, 1.04e-3 on a loaded machine; a wrong normaliser or a missing all-reduce is off by 0.5 or more, so
    # the bound keeps a factor 50 from either side
    assert against_same < 1e-2
    assert against_torch < 2e-2


DIE_AT_CHECKPOINT = """
import os, signal, sys
import addclass.tasks.training.train as tt
from addclass.tasks.training.train_launch import main

save = tt.save_checkpoint

def save_then_die(*args, **kwargs):
    folder = save(*args, **kwargs)
    if kwargs["step"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # rank 0, right after the checkpoint and latest.json
    return folder

tt.save_checkpoint = save_then_die
sys.exit(main())
"""


def test_a_killed_run_resumes_with_two_processes_or_one(store: Path, tmp_path: Path) -> None:
    config = tiny_config(store, tmp_path / "straight")  # 3 steps, checkpoints at 2 and 3
    steps: list[int] = []
    straight = run_training(config, launch=TWO, on_step=lambda info: steps.append(info.step))
    assert steps == [1, 2, 3]  # the launcher followed the run's log
    killed = tmp_path / "killed"
    script = tmp_path / "die.py"
    script.write_text(DIE_AT_CHECKPOINT)
    cmd = torchrun_command(tiny_config(store, killed), TWO)
    cmd[cmd.index("-m", 3):cmd.index("-m", 3) + 2] = [str(script)]  # the worker, with the kill
    with pytest.raises(RuntimeError, match="failed"):
        launch_training(tiny_config(store, killed), TWO, command=cmd)
    assert json.loads((killed / "latest.json").read_text())["step"] == 2
    assert not (killed / "final").exists()
    single = tmp_path / "single"
    shutil.copytree(killed, single)

    resumed = launch_training(tiny_config(store, killed), TWO, resume=True)
    diff = max_difference(straight, resumed)
    print(f"2-process resume: max |weight difference| {diff:.3g}")
    assert diff <= 1e-6
    assert [r["step"] for r in read_log(killed)] == [1, 2, 3]
    for mine, theirs in zip(read_log(killed), read_log(straight.parent), strict=True):
        assert mine["total"] == pytest.approx(theirs["total"], rel=1e-6)

    # the checkpoint does not depend on the number of processes: 1 process finishes the run
    alone = train(tiny_config(store, single), resume=True, progress=False)
    share = share_differing(straight, alone)
    print(f"1-process resume of a 2-process run: {100 * share:.3f} % of the weights differ by > 1e-5")
    assert share < 0.005
    assert read_log(single)[-1]["total"] == pytest.approx(read_log(straight.parent)[-1]["total"], rel=1e-4)
    # rank 0 alone wrote: the 2-process run's folder holds the files of the run finished by 1 process, and one log
    # line per step and validation
    assert files(straight.parent) == files(single)
    assert len((straight.parent / "train_log.jsonl").read_text().splitlines()) == 6


def test_gradient_accumulation_trains_in_passes_of_two_images_or_more(store: Path, tmp_path: Path) -> None:
    for batch, accumulate in ((2, 2), (6, 4)):  # passes of 1 image (batch norm cannot train), 6 / 4
        with pytest.raises(ValueError, match=f"Got accumulate {accumulate} instead"):
            tiny_config(store, tmp_path / "a", batch_size=batch, accumulate=accumulate)
    final = train(tiny_config(store, tmp_path / "c", batch_size=4, accumulate=2, iters=1), progress=False)
    assert read_log(final.parent)[0]["total"] > 0


def test_a_failed_process_is_an_error_naming_the_run(store: Path, tmp_path: Path) -> None:
    config = tiny_config(store, tmp_path / "bad", batch_size=3)  # 3 images do not split over 2 processes
    with pytest.raises(ValueError, match=r"batch_size 3 divisible by processes x accumulate = 2 x 1"):
        launch_training(config, TWO)  # before starting anything
    config = tiny_config(store, tmp_path / "bad", version="v9")
    with pytest.raises(RuntimeError, match=r"bad under torchrun failed \(exit code 1\); the processes raised: .*v9"):
        launch_training(config, TWO)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        Launch(nproc=2, nnodes=2)
    cmd = torchrun_command(config, Launch(nproc=8, nnodes=2, rdzv_endpoint="node0:29400"))
    assert cmd[1:8] == ["-m", "torch.distributed.run", "--nproc-per-node=8", "--nnodes=2", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=node0:29400", "-m"]


def test_batch_norm_over_processes_matches_one_batch_norm(tmp_path: Path) -> None:
    """`AllReduceBatchNorm2d` on 2 gloo processes x 1 image = BatchNorm2d on the 2 images: output, input and
    weight gradients, running statistics (float64 inputs, so the tolerance is rounding)."""
    script = tmp_path / "bn.py"
    script.write_text(BN_SCRIPT)
    out = tmp_path / "bn.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = json.loads(out.read_text())
    print(errors)
    assert max(errors.values()) < 1e-9


BN_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from addclass.models.training.sync_norm import AllReduceBatchNorm2d, sync_batch_norm
dist.init_process_group("gloo")
rank = dist.get_rank()
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 6, 5, 4, generator=g, dtype=torch.float64) * 3 + 10
w = torch.randn(2, 6, 5, 4, generator=g, dtype=torch.float64)
ref = torch.nn.BatchNorm2d(6).double()
torch.nn.init.uniform_(ref.weight, generator=g)
net = sync_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm2d(6)), device=torch.device("cpu")).double()
net[0].load_state_dict(ref.state_dict())
assert type(net[0]) is AllReduceBatchNorm2d
xr = x.clone().requires_grad_()
yr = ref(xr)
(yr * w).pow(2).sum().backward()
xs = x[rank:rank + 1].clone().requires_grad_()
ys = net(xs)
(ys * w[rank:rank + 1]).pow(2).sum().backward()
gw = net[0].weight.grad.clone()
dist.all_reduce(gw)
if rank == 0:
    err = lambda a, b: float((a - b).abs().max() / b.abs().max())
    json.dump({"output": err(ys[0], yr[0]), "input_grad": err(xs.grad[0], xr.grad[0]),
               "weight_grad": err(gw, ref.weight.grad), "running_mean": err(net[0].running_mean, ref.running_mean),
               "running_var": err(net[0].running_var, ref.running_var)}, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""
