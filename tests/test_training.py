"""Trainer tests (CPU, tiny models and volumes): loss goes down, bitwise resume, DDP sync, start-up checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from scipy import ndimage

from vicl_fast.training import ConfigError, config_from_dict, main
from vicl_fast.training.checkpointing import CheckpointError, latest_checkpoint, load_training_checkpoint

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures
def _write_dataset(root: Path, n: int = 5, shape=(20, 22, 18), seed: int = 0) -> Path:
    """Synthetic 'heads': smooth blobs (image) and two nested label classes, 1.2 mm voxels."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    aff = np.diag([1.2, 1.2, 1.2, 1.0])
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    for i in range(n):
        r = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2) * rng.uniform(0.9, 1.1)
        img = np.clip(1.2 - r, 0, 1) + 0.1 * ndimage.gaussian_filter(rng.standard_normal(shape), 2)
        lab = (r < 0.7).astype(np.int16) + (r < 0.35).astype(np.int16)
        nib.save(nib.Nifti1Image((img * 1000).astype(np.float32), aff), str(root / "images" / f"s{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(root / "labels" / f"s{i}.nii.gz"))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("data") / "toy")


def _nv_raw(data: Path, out: Path, **train) -> dict:
    return {
        "model": {"name": "neuroverse3d_tiny"},
        "data": {"datasets": [{"name": "toy", "path": str(data)}], "grid": [16, 16, 16],
                 "tasks": [{"name": "segmentation", "rate": 2, "weight": 50},
                           {"name": "gaussian_noise", "rate": 1, "weight": 1}],
                 "context_phases": [{"from_step": 0, "min": 1, "max": 3, "mini_context": 2}],
                 "val_fraction": 0.2, "val_episodes": 2, "val_context_size": 2},
        "optim": {"lr": 1e-3, "plateau_patience": 0},
        "train": {"steps": 10, "device": "cpu", "out_dir": str(out), "progress": False, "tensorboard": False,
                  "val_every": 100, "ckpt_every": 100, "log_every": 1, **train},
    }


def _randp_raw(data: Path, out: Path, **train) -> dict:
    return {
        "model": {"name": "randp_vit_tiny"},
        "data": {"datasets": [{"name": "toy", "path": str(data)}], "grid": [32, 32],
                 "val_fraction": 0.2, "val_episodes": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 10, "batch_size": 2, "device": "cpu", "out_dir": str(out), "progress": False,
                  "tensorboard": False, "val_every": 100, "ckpt_every": 100, "log_every": 1, **train},
    }


def _trainer(raw: dict):
    from vicl_fast.training.trainer import Trainer

    return Trainer(config_from_dict(raw))


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("family", ["neuroverse3d", "randp"])
def test_ten_steps_reduce_loss(family, dataset, tmp_path):
    """The loss on the first ten training batches (fixed, no grad) is lower after training on them."""
    from vicl_fast.training.datasets import collate

    raw = (_nv_raw if family == "neuroverse3d" else _randp_raw)(dataset, tmp_path / "run")
    if family == "neuroverse3d":
        raw["data"]["tasks"] = [{"name": "segmentation", "rate": 1, "weight": 50}]
    tr = _trainer(raw)
    B = tr.cfg.train.batch_size
    batches = [collate([tr.train_ds[(s, b)] for b in range(B)]) for s in range(10)]

    def mean_loss() -> float:
        tr.model.eval()
        with torch.no_grad():
            return float(np.mean([float(tr._forward_loss(b, s, train=False)[0]) for s, b in enumerate(batches)]))

    before = mean_loss()
    res = tr.fit()
    after = mean_loss()
    assert res["step"] == 10
    assert np.isfinite(before) and after < 0.8 * before, (before, after)
    # the CSV log has one row per step and the final checkpoint is loadable by vicl_fast.checkpoint
    rows = (tmp_path / "run" / "train.csv").read_text().strip().splitlines()
    assert len(rows) == 11
    from vicl_fast.checkpoint import load_checkpoint

    m = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints") / "model.safetensors")
    for k, v in m.state_dict().items():
        assert torch.equal(v, tr.model.state_dict()[k])


def test_loss_matches_paper_formulas(dataset, tmp_path):
    """Trainer losses = independent float64 re-computations of Eq. 6/7 (x Table 3 weight) and RandP's."""
    from vicl_fast.models.randp import randp_loss
    from vicl_fast.training.datasets import collate

    tr = _trainer(_nv_raw(dataset, tmp_path / "a"))
    pred = torch.rand(3, 1, 16, 16, 16, dtype=torch.float64) * 1.6 - 0.3
    y = (torch.rand(3, 1, 16, 16, 16, dtype=torch.float64) > 0.5).double()
    task = torch.tensor([0, 1, 0])  # segmentation, gaussian_noise, segmentation
    per = tr._nv_per_sample(pred, y, task)
    d = (pred - y).abs()
    seg = torch.where(d < 1, d ** 3 / 3, d - 2 / 3).flatten(1).mean(1)

    def sl1(a):
        return torch.where(a.abs() < 1, 0.5 * a ** 2, a.abs() - 0.5)

    diffs = [sl1(torch.diff(pred, dim=k) - torch.diff(y, dim=k)).flatten(1).mean(1) for k in (2, 3, 4)]
    gen = sl1(pred - y).flatten(1).mean(1) / 2 + torch.stack(diffs).mean(0) / 2
    ref = torch.stack([seg[0], gen[1], seg[2]])
    torch.testing.assert_close(per.double(), ref, rtol=1e-6, atol=1e-9)

    tr2 = _trainer(_randp_raw(dataset, tmp_path / "b"))
    batch = collate([tr2.train_ds[(0, b)] for b in range(2)])
    loss, _, pred2 = tr2._forward_loss(batch, 0, train=False)
    ref2 = randp_loss(pred2, batch["query_label"], tr2.model.last_task_logits, batch["task"], ce_weight=0.1)
    torch.testing.assert_close(loss, ref2)


@pytest.mark.parametrize("family", ["neuroverse3d", "randp"])
def test_resume_after_kill_is_bitwise_identical(family, dataset, tmp_path):
    """Stop after 5 of 6 steps (last checkpoint at 4: a new best validation), resume: step 5 is redone
    and the parameters equal an uninterrupted run's."""
    make = _nv_raw if family == "neuroverse3d" else _randp_raw
    extra = dict(steps=6, ckpt_every=3, val_every=2)
    full = _trainer(make(dataset, tmp_path / "full", **extra))
    full.fit()
    ref = _params(full.model)

    killed = _trainer(make(dataset, tmp_path / "killed", **extra))
    killed.fit(max_steps=5)  # "killed" after step 5, whose state was never saved
    del killed
    resumed = _trainer(make(dataset, tmp_path / "killed", **extra))
    assert resumed.step == 4
    resumed.fit()
    got = _params(resumed.model)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # optimizer moments too, and the logs equal the uninterrupted run's
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k])
    assert (tmp_path / "full" / "val.csv").read_text() == (tmp_path / "killed" / "val.csv").read_text()
    a = [r.split(",")[:3] for r in (tmp_path / "full" / "train.csv").read_text().splitlines()]
    b = [r.split(",")[:3] for r in (tmp_path / "killed" / "train.csv").read_text().splitlines()]
    assert a == b


def test_checkpoints_best_and_last_k(dataset, tmp_path):
    tr = _trainer(_nv_raw(dataset, tmp_path / "r", steps=6, ckpt_every=1, keep_last=2, val_every=2))
    tr.fit()
    ck = tmp_path / "r" / "checkpoints"
    steps = sorted(p.name for p in ck.iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000005", "step_00000006"]
    assert not [p for p in ck.iterdir() if p.name.startswith(".tmp")]
    doc, _, _ = load_training_checkpoint(ck / "best")
    assert doc["meta"]["best"] == pytest.approx(tr.best)
    assert doc["meta"]["val"]["loss"] == pytest.approx(tr.best)


@pytest.mark.parametrize("damage", ["flip_model", "truncate_state", "truncate_json", "drop_json"])
def test_corrupt_checkpoint_refused(damage, dataset, tmp_path):
    tr = _trainer(_nv_raw(dataset, tmp_path / "r", steps=2, ckpt_every=2))
    tr.fit()
    ck = latest_checkpoint(tmp_path / "r" / "checkpoints")
    if damage == "flip_model":
        p = ck / "model.safetensors"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
        want = "model.safetensors is corrupt or truncated"
    elif damage == "truncate_state":
        p = ck / "state.safetensors"
        p.write_bytes(p.read_bytes()[:100])
        want = "state.safetensors is corrupt or truncated"
    elif damage == "truncate_json":
        p = ck / "state.json"
        p.write_text(p.read_text()[:200])
        want = "state.json is corrupt or truncated"
    else:
        (ck / "state.json").unlink()
        want = "no state.json"
    with pytest.raises(CheckpointError, match=want):
        load_training_checkpoint(ck)
    with pytest.raises(CheckpointError, match=str(ck.name)):
        _trainer(_nv_raw(dataset, tmp_path / "r", steps=4, ckpt_every=2))  # resume=auto refuses it


# ------------------------------------------------------------- start-up checks
def _run_check(tmp_path: Path, raw: dict, capsys) -> tuple[int, str]:
    f = tmp_path / "cfg.yaml"
    f.write_text(yaml.safe_dump(raw))
    rc = main(["--config", str(f), "--check"])
    return rc, capsys.readouterr().err


def test_unknown_key_is_named(dataset, tmp_path, capsys):
    raw = _nv_raw(dataset, tmp_path / "o")
    raw["train"]["stepz"] = 5
    rc, err = _run_check(tmp_path, raw, capsys)
    assert rc == 2 and "train.stepz" in err and "steps" in err
    raw = _nv_raw(dataset, tmp_path / "o")
    raw["data"]["datasets"][0]["pth"] = "x"
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.pth"):
        config_from_dict(raw)
    raw = _nv_raw(dataset, tmp_path / "o")
    raw["optim"]["schedule"] = "linear"
    with pytest.raises(ConfigError, match="optim.schedule"):
        config_from_dict(raw)


def test_missing_folder_is_named(tmp_path, capsys):
    raw = _nv_raw(tmp_path / "does_not_exist", tmp_path / "o")
    rc, err = _run_check(tmp_path, raw, capsys)
    assert rc == 2 and "'toy'" in err and "does_not_exist" in err and "does not exist" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "images").mkdir()
    raw = _nv_raw(tmp_path / "half", tmp_path / "o")
    rc, err = _run_check(tmp_path, raw, capsys)
    assert rc == 2 and "no labels/ sub-folder" in err


def test_empty_dataset_is_named(dataset, tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "labels").mkdir()
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    nib.save(img, str(bad / "images" / "a.nii.gz"))
    nib.save(img, str(bad / "labels" / "a_seg.nii.gz"))  # name does not match
    raw = _nv_raw(dataset, tmp_path / "o")
    raw["data"]["datasets"].append({"name": "broken", "path": str(bad)})
    rc, err = _run_check(tmp_path, raw, capsys)
    assert rc == 2 and "'broken'" in err and "no usable image/label pairs" in err and "a_seg" in err
    # the same config without the broken dataset passes the check
    assert main(["--config", str(_write_yaml(tmp_path, _nv_raw(dataset, tmp_path / "o"))), "--check"]) == 0


def _write_yaml(tmp_path: Path, raw: dict) -> Path:
    raw = json.loads(json.dumps(raw))
    raw["train"]["steps"] = 1
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_episodes_do_not_depend_on_workers(dataset, tmp_path):
    """Episode (step, slot) is the same with 0 or 2 DataLoader workers."""
    from vicl_fast.training.datasets import StepBatchSampler, make_loader

    tr = _trainer(_nv_raw(dataset, tmp_path / "r"))
    a = list(make_loader(tr.train_ds, StepBatchSampler(0, 3, 1), 0, 0))
    b = list(make_loader(tr.train_ds, StepBatchSampler(0, 3, 1), 2, 0))
    for x, y in zip(a, b):
        for k in ("target_in", "target_out", "context_in", "context_out", "task"):
            assert torch.equal(x[k], y[k])


# ----------------------------------------------------------------- DDP (gloo)
_DDP_SCRIPT = """
import os, sys, yaml, torch
from safetensors.torch import save_file
from vicl_fast.training import config_from_dict
from vicl_fast.training.trainer import Trainer
from vicl_fast.training import distributed
raw = yaml.safe_load(open(sys.argv[1]))
tr = Trainer(config_from_dict(raw))
before = {k: v.clone() for k, v in tr.model.state_dict().items()}
res = tr.fit()
rank = tr.env.rank
save_file({k: v.contiguous() for k, v in tr.model.state_dict().items()}, os.path.join(sys.argv[2], f"rank{rank}.safetensors"))
save_file({k: v.contiguous() for k, v in before.items()}, os.path.join(sys.argv[2], f"init{rank}.safetensors"))
distributed.cleanup()
"""


def test_two_process_gloo_stays_in_sync(dataset, tmp_path):
    raw = _nv_raw(dataset, tmp_path / "run", steps=2, val_every=2, ckpt_every=2)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), str(cfg), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    p0, p1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    i0 = load_file(str(tmp_path / "init0.safetensors"))
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    assert any(not torch.equal(p0[k], i0[k]) for k in p0)  # it trained
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json").is_file()  # rank 0 saved
