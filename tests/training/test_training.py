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

from tests.training._toy import _nv_raw, _randp_raw, _write_dataset
from vicl_fast.training import ConfigError, config_from_dict, main
from vicl_fast.training.checkpointing import CheckpointError, latest_checkpoint, load_training_checkpoint

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("data") / "toy")


def _trainer(raw: dict):
    from vicl_fast.training.trainer import Trainer

    return Trainer(config_from_dict(raw))


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("family,model", [("neuroverse3d", "neuroverse3d_tiny"), ("randp", "randp_vit_tiny"),
                                          ("randp", "randp_uxnet_tiny")])
def test_ten_steps_reduce_loss(family, model, dataset, tmp_path):
    """The loss on the first ten training batches (fixed, no grad) is lower after training on them
    (RandP with the ViT and with a U-Net backbone); RandP's LR follows warm-up + cosine."""
    import math

    from vicl_fast.training.datasets import collate

    raw = (_nv_raw if family == "neuroverse3d" else _randp_raw)(dataset, tmp_path / "run")
    raw["model"]["name"] = model
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
    if family == "randp":  # warm-up 2 steps then cosine to 0 at step 10 (0-based step s: LR of its update)
        lrs = [float(r.split(",")[2]) for r in rows[1:]]
        want = [1e-3 * (s + 1) / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8))
                for s in range(10)]
        np.testing.assert_allclose(lrs, want, rtol=1e-5, atol=1e-12)


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


def test_deadline_stops_with_a_checkpoint_and_resumes_exactly(dataset, tmp_path):
    """fit(deadline=...) (a time-boxed GPU run): stops at the first step past the deadline, checkpoints
    there although ckpt_every is far, and a resumed run ends equal to an uninterrupted one."""
    import time

    extra = dict(steps=5, ckpt_every=100, val_every=100)
    full = _trainer(_nv_raw(dataset, tmp_path / "full", **extra))
    full.fit()
    boxed = _trainer(_nv_raw(dataset, tmp_path / "boxed", **extra))
    res = boxed.fit(max_steps=2)
    assert res["stopped_at_deadline"] is False and boxed.step == 2
    res = boxed.fit(deadline=time.monotonic())  # already due: one step, then stop
    assert res["stopped_at_deadline"] is True and boxed.step == 3
    assert (tmp_path / "boxed" / "checkpoints" / "step_00000003").is_dir()
    del boxed
    resumed = _trainer(_nv_raw(dataset, tmp_path / "boxed", **extra))
    assert resumed.step == 3
    assert resumed.fit(deadline=time.monotonic() + 3600)["stopped_at_deadline"] is False
    ref, got = _params(full.model), _params(resumed.model)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


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


@pytest.mark.parametrize("family", ["neuroverse3d", "randp"])
def test_episodes_do_not_depend_on_workers(family, dataset, tmp_path):
    """Episode (step, slot) is the same with 0 or 2 DataLoader workers."""
    from vicl_fast.training.datasets import StepBatchSampler, make_loader

    tr = _trainer((_nv_raw if family == "neuroverse3d" else _randp_raw)(dataset, tmp_path / "r"))
    a = list(make_loader(tr.train_ds, StepBatchSampler(0, 3, 2), 0, 0))
    b = list(make_loader(tr.train_ds, StepBatchSampler(0, 3, 2), 2, 0))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


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


@pytest.mark.parametrize("family", ["neuroverse3d", "randp"])
def test_two_process_gloo_stays_in_sync(family, dataset, tmp_path):
    make = _nv_raw if family == "neuroverse3d" else _randp_raw
    raw = make(dataset, tmp_path / "run", steps=2, val_every=2, ckpt_every=2)
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


# ------------------------------------------------------ RandP episodes (tasks2d)
def _find_slice(vol: np.ndarray, img: np.ndarray) -> tuple[int, int] | None:
    """(axis, index) of the slice of ``vol`` equal to ``img`` (grid = slice size: no resampling)."""
    for ax in range(3):
        for i in range(vol.shape[ax]):
            if np.allclose(np.take(vol, i, axis=ax), img, atol=1e-6):
                return ax, i
    return None


def test_randp_episodes_are_tasks2d_slices(dataset, tmp_path):
    """Validation episodes (no augmentation): the query is a slice of a held-out subject, the prompt one
    of a training subject, each task's label is what tasks2d defines, task ids index the task head."""
    from vicl_fast.data.task_registry import default_tasks
    from vicl_fast.data.tasks3d import downsample_upsample

    raw = _randp_raw(dataset, tmp_path / "r")
    raw["data"]["val_episodes"] = 24
    tr = _trainer(raw)
    assert [t.name for t in tr.tasks] == [n for n, _, _ in default_tasks(2)] == [
        "segmentation", "gaussian_noise", "super_resolution", "modality_transform"]
    assert tr.model.task_head.fc.out_features == 4
    src = tr.sources[0]
    held = [src.subject(i) for i in tr.val_ds.val_idx[0]]
    train = [src.subject(i) for i in tr.train_ds.train_idx[0]]
    seen = set()
    for e in range(24):
        it = tr.val_ds[(0, e)]
        name = tr.tasks[it["task"]].name
        seen.add(name)
        pi, pl, qi, ql = (it[k].numpy() for k in ("prompt_image", "prompt_label", "query_image", "query_label"))
        for x in (pi, pl, qi, ql):
            assert x.shape == (3, 32, 32) and x.dtype == np.float32
            assert np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2])  # grey / binary colours x 3
        clean_q = ql[0] if name in ("gaussian_noise", "super_resolution") else qi[0]
        clean_p = pl[0] if name in ("gaussian_noise", "super_resolution") else pi[0]
        hits = [(s, _find_slice(s.image, clean_q)) for s in held]
        hits = [(s, h) for s, h in hits if h is not None]
        assert hits, f"episode {e} ({name}): the query is not a slice of a held-out subject"
        assert any(_find_slice(s.image, clean_p) is not None for s in train), f"episode {e}: prompt"
        if name == "segmentation":
            s, (ax, i) = hits[0]
            lab = np.take(s.label_maps["label"], i, axis=ax)
            assert set(np.unique(ql)) <= {0.0, 1.0}
            assert any(np.array_equal(ql[0], (lab == c).astype(np.float32)) for c in (1, 2)), e
        elif name == "gaussian_noise":
            noise = qi[0] - ql[0]
            assert 0.03 < noise.std() < 0.2 and abs(noise.mean()) < 0.05
        elif name == "super_resolution":
            np.testing.assert_allclose(qi[0], downsample_upsample(ql[0], 2)[0], atol=1e-6)
        else:  # modality_transform: a GIN contrast of the slice (no targets/ in this dataset)
            assert not np.allclose(qi, ql) and ql.min() >= 0 and ql.max() <= 1
    assert seen == {"segmentation", "gaussian_noise", "super_resolution", "modality_transform"}


@pytest.mark.parametrize("model", ["randp_vit_tiny", "randp_uxnet_tiny", "randp_swinunetr_tiny",
                                   "randp_restormer_tiny"])
def test_every_randp_backbone_trains_by_config(model, dataset, tmp_path):
    """model.name picks the backbone; one step updates the weights and reaches the task head (CE term)."""
    from vicl_fast.training.datasets import collate

    raw = _randp_raw(dataset, tmp_path / "r")
    raw["model"]["name"] = model
    if "swinunetr" in model:  # its 5th stage is 1x1 at 32x32 (instance norm needs > 1 element)
        raw["data"]["grid"] = [64, 64]
    tr = _trainer(raw)
    before = _params(tr.model)
    batch = collate([tr.train_ds[(0, b)] for b in range(2)])
    out = tr.train_step(batch, 0)
    assert np.isfinite(out["loss"]) and out["grad_norm"] > 0
    assert tr.model.task_head.fc.weight.grad is not None and tr.model.task_head.fc.weight.grad.abs().sum() > 0
    changed = [k for k, v in tr.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2


def test_randp_task_names_and_grid_errors(dataset, tmp_path):
    """One name per task for 2D and 3D: a 3D-only task is refused for RandP naming why; RandP's former
    names load as the shared ones with one deprecation warning per config."""
    from vicl_fast.data.task_registry import DeprecatedTaskNameWarning

    raw = _randp_raw(dataset, tmp_path / "o")
    raw["data"]["tasks"] = [{"name": "bias_field"}]
    with pytest.raises(ConfigError, match=r"data\.tasks\[0\].*'bias_field'.*3D-only"):
        config_from_dict(raw)
    raw["data"]["tasks"] = [{"name": "denoising"}, {"name": "gaussian_noise"}]  # the same task twice
    with pytest.warns(DeprecatedTaskNameWarning), pytest.raises(ConfigError, match="listed twice"):
        config_from_dict(raw)
    raw["data"]["tasks"] = [{"name": "denoising"}, {"name": "synthesis"}]
    raw["data"]["datasets"][0]["tasks"] = ["denoising", "synthesis"]
    with pytest.warns(DeprecatedTaskNameWarning) as rec:
        cfg = config_from_dict(raw)
    ours = [w for w in rec if issubclass(w.category, DeprecatedTaskNameWarning)]
    assert len(ours) == 1 and "'denoising' -> 'gaussian_noise'" in str(ours[0].message)  # one for the config
    assert cfg.task_names() == cfg.data.datasets[0].tasks == ["gaussian_noise", "modality_transform"]
    raw = _randp_raw(dataset, tmp_path / "o")
    raw["data"]["grid"] = [32, 48]
    with pytest.raises(ConfigError, match=r"data\.grid.*square"):
        config_from_dict(raw)
    raw = _nv_raw(dataset, tmp_path / "o")
    raw["data"]["tasks"] = [{"name": "denoising"}]  # the old 2D name of a task 3D models have too
    with pytest.warns(DeprecatedTaskNameWarning):
        assert config_from_dict(raw).task_names() == ["gaussian_noise"]
    raw["data"]["tasks"] = [{"name": "denoise"}]
    with pytest.raises(ConfigError, match="unknown task 'denoise'"):
        config_from_dict(raw)


# ------------------------------------------------------- the papers' recipes
def test_paper_defaults(dataset, tmp_path):
    """Neuroverse3D: Table 3 rates/weights, Adam 1e-4, clip 0.25, ReduceLROnPlateau x0.5 / 20 evaluations,
    L = l = 3 for 100K of 120K steps then L ~ U{1..8}; RandP: Adam, max LR 1e-3, warm-up + cosine, 0.1 CE."""
    from vicl_fast.data.task_registry import default_tasks
    from vicl_fast.training.trainer import WarmupCosine

    raw = _nv_raw(dataset, tmp_path / "a")
    del raw["data"]["tasks"], raw["data"]["context_phases"], raw["optim"]
    raw["train"]["steps"] = 120000
    cfg = config_from_dict(raw)
    assert (cfg.optim.lr, cfg.optim.grad_clip, cfg.optim.schedule) == (1e-4, 0.25, "plateau")
    assert (cfg.optim.plateau_factor, cfg.optim.plateau_patience) == (0.5, 20)
    ph = [(p.from_step, p.min, p.max, p.mini_context) for p in cfg.data.context_phases]
    assert ph == [(0, 3, 3, 3), (100000, 1, 8, 3)]
    from vicl_fast.training.trainer import Trainer

    tr = Trainer(cfg)
    assert type(tr.optimizer) is torch.optim.Adam and tr.optimizer.param_groups[0]["lr"] == 1e-4
    assert isinstance(tr.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    # the toy folder has labels but no brain masks: every Table 3 task but skull stripping
    table = {n: (r, w) for n, r, w in default_tasks(3)}
    assert [t.name for t in tr.tasks] == [n for n in table if n != "skull_stripping"]
    assert all((t.rate, t.weight) == table[t.name] for t in tr.tasks)

    raw = _randp_raw(dataset, tmp_path / "b")
    raw["optim"] = {}
    raw["train"]["steps"] = 2000
    tr = _trainer(raw)
    o = tr.cfg.optim
    assert (o.lr, o.schedule, o.warmup_steps, o.ce_weight) == (1e-3, "cosine", 100, 0.1)
    assert type(tr.optimizer) is torch.optim.Adam and isinstance(tr.scheduler, WarmupCosine)


def test_task_sampling_follows_rates(dataset, tmp_path):
    """Tasks are drawn with the configured rates (Table 3: segmentation twice as often) and each
    episode carries its task's weight."""
    from scipy.stats import chisquare

    raw = _nv_raw(dataset, tmp_path / "a")
    raw["data"]["tasks"] = [{"name": "segmentation", "rate": 2, "weight": 50},
                            {"name": "gaussian_noise", "rate": 1, "weight": 1},
                            {"name": "slices_to_volume", "rate": 1, "weight": 0.5}]
    tr = _trainer(raw)
    n = 8000
    counts = np.bincount([tr.train_ds._pick(np.random.default_rng([0, i]))[0] for i in range(n)], minlength=3)
    assert chisquare(counts, n * np.array([0.5, 0.25, 0.25])).pvalue > 1e-3, counts
    for s in range(6):
        it = tr.train_ds[(s, 0)]
        assert it["weight"] == [50.0, 1.0, 0.5][it["task"]]


def test_gradient_clipping(dataset, tmp_path):
    from vicl_fast.training.datasets import collate

    tr = _trainer(_nv_raw(dataset, tmp_path / "a"))
    tr.cfg.optim.grad_clip = 1e-3
    out = tr.train_step(collate([tr.train_ds[(0, 0)]]), 0)
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in tr.model.parameters() if p.grad is not None))
    assert out["grad_norm"] > 1e-2  # the norm before clipping is reported
    assert float(total) <= 1e-3 * (1 + 1e-4)


def test_plateau_halves_lr_after_patience(dataset, tmp_path, monkeypatch):
    """ReduceLROnPlateau on the validation loss: x0.5 once `patience` evaluations bring no improvement."""
    raw = _nv_raw(dataset, tmp_path / "a", steps=4, val_every=1)
    raw["optim"]["plateau_patience"] = 1
    tr = _trainer(raw)
    vals = iter([1.0, 1.0, 1.0, 0.5])  # best at step 1; steps 2, 3 without improvement; step 4 improves
    monkeypatch.setattr(tr, "validate", lambda: {"loss": next(vals), "dice": float("nan"), "psnr": float("nan")})
    lrs = []
    orig = tr.train_step
    monkeypatch.setattr(tr, "train_step", lambda b, s: (lrs.append(tr.optimizer.param_groups[0]["lr"]), orig(b, s))[1])
    tr.fit()
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])  # reduced after the evaluation of step 3
    assert tr.best == 0.5


def test_bf16_autocast(dataset, tmp_path):
    """amp 'auto' is off on CPU; 'bf16' runs the model under bfloat16 autocast, the loss in float32."""
    from vicl_fast.training.datasets import collate

    assert _trainer(_randp_raw(dataset, tmp_path / "a")).amp_dtype is None
    tr = _trainer(_randp_raw(dataset, tmp_path / "b", amp="bf16"))
    assert tr.amp_dtype == torch.bfloat16
    dtypes = []
    lin = next(m for m in tr.model.modules() if isinstance(m, torch.nn.Linear))
    lin.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    loss, per, pred = tr._forward_loss(collate([tr.train_ds[(0, b)] for b in range(2)]), 0, train=True)
    assert dtypes and dtypes[0] == torch.bfloat16
    assert loss.dtype == torch.float32 and pred.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.gpu
def test_bf16_autocast_default_on_cuda(dataset, tmp_path):
    tr = _trainer(_randp_raw(dataset, tmp_path / "a", device="cuda"))
    assert tr.amp_dtype == torch.bfloat16 and tr.device.type == "cuda"
    from vicl_fast.training.datasets import collate

    out = tr.train_step(collate([tr.train_ds[(0, b)] for b in range(2)]), 0)
    assert np.isfinite(out["loss"])


@pytest.mark.parametrize("mode", ["scaled", "exact"])
def test_apsp_mode_and_context_size_per_step(mode, dataset, tmp_path):
    """Each step draws L from its phase (shared by the step's slots); the model gets the phase's
    mini-context size and train.apsp_mode; 'exact' gives the full-context gradient."""
    from vicl_fast.training.datasets import collate, context_size_for_step

    raw = _nv_raw(dataset, tmp_path / "a", apsp_mode=mode, batch_size=2)
    raw["data"]["context_phases"] = [{"from_step": 0, "min": 3, "max": 3, "mini_context": 3},
                                     {"from_step": 5, "min": 1, "max": 4, "mini_context": 2}]
    tr = _trainer(raw)
    Ls = [context_size_for_step(tr.cfg, s) for s in range(40)]
    assert all(x == (3, 3) for x in Ls[:5])
    assert {L for L, _ in Ls[5:]} == {1, 2, 3, 4} and all(l == 2 for _, l in Ls[5:])
    for s in (0, 7, 8):
        b = collate([tr.train_ds[(s, k)] for k in range(2)])
        assert b["context_in"].shape[1] == Ls[s][0]
    calls = []
    model = tr.model

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *a, **kw):
            calls.append((a[1].shape[1], a[3], kw.get("apsp_mode")))
            return self.m(*a, **kw)

    tr.ddp = Spy()
    step = next(s for s in range(5, 40) if Ls[s][0] == 4)
    batch = collate([tr.train_ds[(step, k)] for k in range(2)])
    tr.model.zero_grad()
    loss, _, _ = tr._forward_loss(batch, step, train=True)
    loss.backward()
    assert calls == [(4, 2, mode)]
    if mode == "exact":  # two mini-contexts of 2, gradient of the full 4-context average
        g_exact = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        tr.cfg.train.apsp_mode = "full"
        loss_full, _, _ = tr._forward_loss(batch, step, train=True)
        loss_full.backward()
        torch.testing.assert_close(loss_full, loss, rtol=1e-5, atol=1e-7)
        for a, p in zip(g_exact, model.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------- validation and logs
def test_validation_metrics_match_independent_computation(dataset, tmp_path):
    """RandP validation: Dice (segmentation), PSNR and SSIM (generation) equal scikit-image / NumPy on
    the same episodes and predictions."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    raw = _randp_raw(dataset, tmp_path / "a")
    raw["data"]["val_episodes"] = 12
    tr = _trainer(raw)
    row = tr.validate()
    per: dict[str, list[float]] = {}
    ssims, losses = [], []
    tr.model.eval()
    with torch.no_grad():
        for i in range(12):
            it = tr.val_ds[(0, i)]
            pred = tr.model(it["prompt_image"][None], it["prompt_label"][None], it["query_image"][None])[0]
            p = pred.double().numpy()
            y = it["query_label"].double().numpy()
            losses.append(float(torch.nn.functional.smooth_l1_loss(pred, it["query_label"])))
            name = tr.tasks[it["task"]].name
            if name == "segmentation":
                a, b = p.mean(0) > 0.5, y.mean(0) > 0.5
                per.setdefault(name, []).append(1.0 if a.sum() + b.sum() == 0 else
                                                2 * (a & b).sum() / (a.sum() + b.sum()))
            else:
                pc = np.clip(p, 0, 1)
                per.setdefault(name, []).append(peak_signal_noise_ratio(y, pc, data_range=1.0))
                s = structural_similarity(y, pc, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=1.0)
                per.setdefault(name + "/ssim", []).append(s)
                ssims.append(s)
    assert row["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    for k, v in per.items():
        key = k if k.endswith("/ssim") else f"{k}/{'dice' if k == 'segmentation' else 'psnr'}"
        assert row[key] == pytest.approx(np.mean(v), rel=1e-5, abs=1e-9), key
    gen = [x for k, v in per.items() if k not in ("segmentation",) and not k.endswith("/ssim") for x in v]
    assert row["psnr"] == pytest.approx(np.mean(gen), rel=1e-6)
    assert row["ssim"] == pytest.approx(np.mean(ssims), rel=1e-5)
    assert row["dice"] == pytest.approx(np.mean(per["segmentation"]), rel=1e-9)


def test_logs_progress_and_tensorboard_notice(dataset, tmp_path, monkeypatch, capsys):
    """Validation every val_every steps in val.csv; a progress bar; without the tensorboard package a
    one-line notice and the CSV logs (with it: event files)."""
    import logging

    records: list[str] = []

    class H(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())

    lg = logging.getLogger("vicl_fast.training")
    h = H()
    lg.addHandler(h)
    monkeypatch.setenv("VICL_FAST_PROGRESS", "1")
    try:
        import torch.utils.tensorboard  # noqa: F401
        has_tb = True
    except Exception:
        has_tb = False
    try:
        tr = _trainer(_randp_raw(dataset, tmp_path / "r", steps=4, val_every=2, progress=True, tensorboard=True))
        tr.fit()
    finally:
        lg.removeHandler(h)
    err = capsys.readouterr().err
    assert "4/4" in err  # tqdm's bar
    val = (tmp_path / "r" / "val.csv").read_text().splitlines()
    assert val[0].startswith("step,loss,dice,psnr,ssim,") and [r.split(",")[0] for r in val[1:]] == ["2", "4"]
    if has_tb:
        assert list((tmp_path / "r" / "tensorboard").glob("events.*"))
    else:
        notes = [m for m in records if "TensorBoard" in m]
        assert len(notes) == 1 and "\n" not in notes[0] and "pip install tensorboard" in notes[0]


def test_shipped_configs_load():
    """Every trainer config of train/configs loads and validates (data folders are checked by --check)."""
    from vicl_fast.training import load_config

    files = sorted((REPO / "train" / "configs").glob("neuroverse3d*.yaml")) + \
        sorted((REPO / "train" / "configs").glob("randp*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = load_config(f)
        assert cfg.family == ("neuroverse3d" if f.name.startswith("neuroverse3d") else "randp"), f


def test_folder_masks_and_targets(tmp_path, capsys):
    """masks/ enables skull_stripping, targets/ gives real modality pairs: RandP modality_transform maps
    a slice of the image to the same slice of the registered target."""
    root = _write_dataset(tmp_path / "mm", n=4)
    (root / "masks").mkdir()
    (root / "targets").mkdir()
    for f in sorted((root / "images").iterdir()):
        im = nib.load(str(f))
        x = np.asarray(im.dataobj, np.float32)
        nib.save(nib.Nifti1Image((x > 300).astype(np.uint8), im.affine), str(root / "masks" / f.name))
        nib.save(nib.Nifti1Image((x.max() - x).astype(np.float32), im.affine), str(root / "targets" / f.name))
    raw = _nv_raw(root, tmp_path / "o")
    del raw["data"]["tasks"]
    rc = main(["--config", str(_write_yaml(tmp_path, raw)), "--check"])
    out = capsys.readouterr().out
    assert rc == 0 and "skull_stripping" in out.splitlines()[-1]
    raw = _randp_raw(root, tmp_path / "r")
    raw["data"]["tasks"] = [{"name": "modality_transform"}]
    tr = _trainer(raw)
    src = tr.sources[0]
    for e in range(3):
        it = tr.val_ds[(0, e)]
        qi, ql = it["query_image"][0].numpy(), it["query_label"][0].numpy()
        hit = [(s, _find_slice(s.image, qi)) for s in (src.subject(i) for i in range(len(src)))]
        s, (ax, i) = next((s, h) for s, h in hit if h is not None)
        np.testing.assert_allclose(ql, np.clip(np.take(s.modalities["target"], i, axis=ax), 0, 1), atol=1e-6)


def test_init_from_starts_from_weights_with_a_fresh_optimizer(dataset, tmp_path):
    """train.init_from (fine-tuning, a second training phase): the model starts from the given weights
    (a checkpoint folder or a vicl_fast .safetensors file), the optimizer and step start at zero, and a
    later restart resumes the run's own checkpoint instead of re-initialising."""
    from vicl_fast.checkpoint import save_checkpoint

    first = _trainer(_nv_raw(dataset, tmp_path / "a", steps=3, ckpt_every=3))
    first.fit()
    ref = _params(first.model)
    save_checkpoint(first.model, tmp_path / "a.safetensors", model_name="neuroverse3d")
    for src in (tmp_path / "a" / "checkpoints" / "step_00000003", tmp_path / "a.safetensors"):
        out = tmp_path / f"b_{src.name}"
        tr = _trainer(_nv_raw(dataset, out, steps=2, ckpt_every=2, init_from=str(src)))
        assert tr.step == 0 and not tr.optimizer.state_dict()["state"]
        got = _params(tr.model)
        for k in ref:
            assert torch.equal(ref[k], got[k]), k
        tr.fit()
        moved = _params(tr.model)
        assert any(not torch.equal(ref[k], moved[k]) for k in ref)
        again = _trainer(_nv_raw(dataset, out, steps=2, ckpt_every=2, init_from=str(src)))
        assert again.step == 2
        for k in moved:
            assert torch.equal(moved[k], _params(again.model)[k]), k


def test_init_from_errors_are_named(dataset, tmp_path):
    with pytest.raises(ConfigError, match="train.init_from: .*does not exist"):
        config_from_dict(_nv_raw(dataset, tmp_path / "x", init_from=str(tmp_path / "missing.safetensors")))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        _trainer(_nv_raw(dataset, tmp_path / "y", init_from=str(bad)))
    other = _trainer(_nv_raw(dataset, tmp_path / "z", steps=1))
    from vicl_fast.checkpoint import save_checkpoint

    save_checkpoint(other.model, tmp_path / "wide.safetensors", model_name="neuroverse3d")
    raw = _nv_raw(dataset, tmp_path / "w", init_from=str(tmp_path / "wide.safetensors"))
    raw["model"]["kwargs"] = {"channels": [8, 16, 32, 64, 128]}
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        _trainer(raw)


def test_init_widen_and_freeze(dataset, tmp_path):
    """train.init_widen: a narrower checkpoint starts the wider model with the same outputs;
    train.init_freeze: its weights stay exactly fixed through training and a resumed run, while the
    added entries learn."""
    from vicl_fast.checkpoint import save_checkpoint
    from vicl_fast.models.neuroverse3d.widen import widen_state_dict

    narrow = _trainer(_nv_raw(dataset, tmp_path / "n", steps=2))
    narrow.fit()
    src = tmp_path / "narrow.safetensors"
    save_checkpoint(narrow.model, src, model_name="neuroverse3d_tiny")
    old, new = [4, 8, 16, 32, 64], [8, 12, 16, 32, 64]
    raw = _nv_raw(dataset, tmp_path / "w", steps=3, ckpt_every=2, init_from=str(src), init_widen=True,
                  init_freeze=True)
    raw["model"]["kwargs"] = {"channels": new}
    wide = _trainer(raw)
    x = torch.rand(1, 1, 16, 16, 16)
    ci, co = torch.rand(1, 2, 1, 16, 16, 16), (torch.rand(1, 2, 1, 16, 16, 16) > 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(wide.model(x, ci, co, fast=False), narrow.model(x, ci, co, fast=False))
    _, was_old = widen_state_dict(narrow.model.state_dict(), old, new, wide.model.state_dict())
    start = _params(wide.model)
    wide.fit(max_steps=2)
    again = _trainer(raw)  # resumes step 2 (the hooks come from the channel lists, not from init)
    assert again.step == 2
    again.fit()
    end = _params(again.model)
    for k in start:
        assert torch.equal(start[k][was_old[k]], end[k][was_old[k]]), k
    assert any(not torch.equal(start[k][~was_old[k]], end[k][~was_old[k]]) for k in start)
    raw_bad = _nv_raw(dataset, tmp_path / "b", init_freeze=True, init_from=str(src))
    with pytest.raises(ConfigError, match="needs train.init_widen"):
        config_from_dict(raw_bad)
    raw_bad = _nv_raw(dataset, tmp_path / "c", init_widen=True)
    with pytest.raises(ConfigError, match="need train.init_from"):
        config_from_dict(raw_bad)


def test_ema_of_weights_is_validated_saved_and_resumed(dataset, tmp_path):
    """train.ema: the average follows w_avg <- d w_avg + (1 - d) w after each step (checked against the
    weights recorded step by step), validation evaluates it, and a resumed run ends with the same
    average as an uninterrupted one."""
    d = 0.9
    extra = dict(steps=4, ckpt_every=2, val_every=4, ema=d)
    tr = _trainer(_nv_raw(dataset, tmp_path / "full", **extra))
    seen = []
    orig = tr.optimizer.step

    def step(*a, **k):
        out = orig(*a, **k)
        seen.append(_params(tr.model))
        return out

    tr.optimizer.step = step
    tr.fit()
    ref = {k: v.double() for k, v in seen[0].items()}  # the first update copies the weights
    for w in seen[1:]:
        ref = {k: d * ref[k] + (1 - d) * w[k].double() for k in ref}
    got = _params(tr.eval_model)
    for k in ref:
        torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(got[k], seen[-1][k]) for k in got)
    # validation scores the average: swap it out and the loss changes
    val_avg = tr.validate()["loss"]
    tr.ema = None
    assert tr.validate()["loss"] != val_avg

    killed = _trainer(_nv_raw(dataset, tmp_path / "killed", **extra))
    killed.fit(max_steps=3)
    del killed
    resumed = _trainer(_nv_raw(dataset, tmp_path / "killed", **extra))
    assert resumed.step == 2
    resumed.fit()
    for k, v in _params(resumed.eval_model).items():
        assert torch.equal(v, got[k]), k


def test_ema_out_of_range_is_named(dataset, tmp_path):
    with pytest.raises(ConfigError, match="train.ema"):
        config_from_dict(_nv_raw(dataset, tmp_path / "x", ema=1.0))
