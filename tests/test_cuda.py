"""On a CUDA device, saev computes what it computes on the CPU (skipped where torch sees no GPU).

CI has no GPU. On a machine with one, `pytest tests -k cuda` runs these and the `[cuda]` cases
of the kernel tests (tests/test_nn_stack.py, tests/test_nn_families.py): every family's training
step, the sparse top-k and relu paths (cuSPARSE, CUDA embedding bags), `saev train` with the
pinned loader in float32 and bfloat16, and `saev evaluate`.
"""

import json

import pytest
import torch
from factories import tiny_shards
from test_nn_stack import FAMILY_MEMBERS, data, four_float32_steps, run

import saev.nn
from saev.evaluate import evaluate_ckpts
from saev.train.config import Config, DataConfig, SaeConfig
from saev.train.main import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LRS = [1e-2, 3e-3, 2e-2]


@pytest.mark.parametrize("family", sorted(f for f in FAMILY_MEMBERS if not f.startswith("vsae")))
def test_training_steps_on_cuda_equal_the_cpu_steps(family):
    """Four float64 steps of a three-member stack (init from data, forward, backward, Adam with
    clipping) give the CPU's parameters and optimiser-visible buffers on CUDA."""
    xs = [data(32, seed=i) for i in range(4)]
    cpu = run(family, FAMILY_MEMBERS[family], 4, LRS, xs, "cpu")
    gpu = run(family, FAMILY_MEMBERS[family], 4, LRS, xs, "cuda")
    for (name, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items(), strict=True):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, rtol=1e-7, atol=1e-9, msg=f"{family} {name}")


@pytest.mark.parametrize("family", ["vsae-topk", "vsae-mixture"])
def test_vsae_inference_on_cuda_equals_the_cpu(family):
    """The variational families sample with the device's own generator in training, so the
    steps differ by design; their inference (the mean code) must not."""
    xs = [data(32, seed=i) for i in range(4)]
    stack = run(family, FAMILY_MEMBERS[family], 2, LRS, xs, "cpu").eval()
    gpu = run(family, FAMILY_MEMBERS[family], 0, LRS, xs, "cuda")
    gpu.load_state_dict(stack.state_dict())
    gpu.eval()
    with torch.no_grad():
        want, got = stack(xs[3].double()), gpu(xs[3].double().cuda())
    torch.testing.assert_close(got.f.cpu(), want.f, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got.x_hat.cpu(), want.x_hat, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saev_train_and_evaluate_on_cuda(tmp_path, dtype):
    """`saev train --device cuda` (pinned host batches, non-blocking copies, the sparse kernels)
    trains a topk SAE whose FVU is the CPU run's to 5%; its checkpoint loads on the CPU, and
    `evaluate` on CUDA scores it as training did."""
    shards = tiny_shards(tmp_path / "shards")
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = Config(
            data=DataConfig(shard_root=shards, layer=-1, batch_size=128, eval_frac=0.25),
            sae=SaeConfig(family="topk", exp_factor=2, k=4),
            n_train=3072,
            lr=3e-3,
            n_init_sample=512,
            run_root=tmp_path / device,
            device=device,
            dtype=dtype,
        )
        runs[device] = train(cfg)
    summary = {
        device: json.loads((run_dir / "summary.json").read_text())["members"]
        for device, run_dir in runs.items()
    }
    (cpu,), (gpu,) = summary["cpu"], summary["cuda"]
    assert gpu["status"] == "ok"
    assert gpu["eval"]["fvu"] == pytest.approx(cpu["eval"]["fvu"], rel=0.05)
    ckpt = runs["cuda"] / "members" / gpu["name"]
    sae = saev.nn.load(ckpt)
    assert all(t.device.type == "cpu" for t in sae.stack.state_dict().values())
    (result,) = evaluate_ckpts([(gpu["name"], ckpt)], device="cuda")
    assert result["fvu"] == pytest.approx(gpu["eval"]["fvu"], rel=1e-3)


def test_relu_members_switch_to_the_sparse_path_at_a_lower_density_on_a_gpu():
    """On a GPU the dense products are cheap next to the sparse path's index work, so a relu
    member 5% active steps densely there and sparsely on the CPU (ReLUStack.sparse_below_gpu)."""
    d, f, b = 768, 1024, 256
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(3, b, f, generator=g) - torch.tensor([3.0, 1.645, 0.0])[:, None, None]
    density = (pre > 0).float().mean((1, 2))  # ~0.1%, 5%, 50% active
    assert 0.03 < density[1] < 0.07
    for device, want in [("cpu", [True, True, False]), ("cuda", [True, False, False])]:
        stack = saev.nn.make_stack("relu", d_vit=d, d_sae=f, members=[{}, {}, {}], device=device)
        assert stack._sparse_members(pre.to(device)) == want, device


@pytest.mark.parametrize("family", ["topk", "batchtopk", "relu-sparse", "relu-mixed"])
def test_a_cuda_training_run_repeats_bit_for_bit(family, monkeypatch):
    """Two runs of the same float32 steps on the GPU end with the same weights, bit for bit: no
    atomic adds in the sparse backward (the b_enc gradient is a column sum there)."""
    from saev.nn import families

    if family.startswith("relu-"):
        mixed = family == "relu-mixed"
        monkeypatch.setattr(
            families.ReLUStack,
            "_sparse_members",
            lambda self, pre: [not mixed or m["sparsity_coeff"] > 0.05 for m in self.members],
        )
        family, members = "relu", [{"sparsity_coeff": c} for c in (0.05, 0.1, 0.4)]
    else:
        members = [{"k": k, "dead_after_tokens": 1024, "k_aux": 64} for k in (4, 8, 16)]
    f, b = 1024, 1024
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4 * b, 64, generator=g) * 3 + 1).cuda()

    first, second = (
        four_float32_steps(family, members, x, d_sae=f, batch=b, device="cuda").state_dict()
        for _ in range(2)
    )
    for name in first:
        assert torch.equal(first[name], second[name]), name
