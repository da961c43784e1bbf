"""The main job's quick path (``python -m vicl_fast.main_job --quick``): outputs, metrics, cache reuse.

One quick run trains a tiny Neuroverse3D for a few dozen steps at 32^3 (seconds), runs the three
demo tasks through ``vicl-fast predict`` and writes NIfTI/PNG/summary files; a second run must
reuse the cached model (the trainer is replaced by one that fails if it is built).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from vicl_fast import main_job  # noqa: E402
from vicl_fast.training import demo_recipe  # noqa: E402
from vicl_fast.data.demo_data import load_demo_subjects  # noqa: E402
from vicl_fast.data.metrics import dice, psnr  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("main_job")
    out, cache = root / "out", root / "cache"
    rc = main_job.main(["--quick", "--out", str(out), "--cache-dir", str(cache), "--device", "cpu"])
    assert rc == 0
    return out, cache


def test_quick_outputs_exist_on_target_grid(quick_run):
    out, _ = quick_run
    g = main_job.QUICK.grid
    target = load_demo_subjects(names=["colin27"], size=g)[0]
    for task in main_job.DEMO_TASKS:
        d = out / task.name
        names = ["target_image", "target_reference", "prediction", "copy_prompt"]
        names += [f"context{i}_{'label' if task.kind == 'seg' else 'output'}" for i in (1, 2, 3, 4)]
        names += [f"context{i}_image" for i in (1, 2, 3, 4)]
        for n in names:
            img = nib.load(str(d / f"{n}.nii.gz"))
            assert img.shape == (g, g, g), n
            if not n.startswith("context"):  # every output lies on the target's grid and affine
                np.testing.assert_allclose(img.affine, target.affine, atol=1e-4)
        for png in ("prediction.png", "reference.png", "context1.png"):
            assert (d / png).stat().st_size > 100
        if task.kind == "seg":
            pred = np.asarray(nib.load(str(d / "prediction.nii.gz")).dataobj)
            assert set(np.unique(pred).tolist()) <= {0, 1}


def test_quick_summary_metrics_are_finite_and_recomputable(quick_run):
    out, _ = quick_run
    s = json.loads((out / "summary.json").read_text())
    assert (out / "summary.md").read_text().count("|") > 10
    assert s["model"]["source"] == "trained"
    assert [r["task"] for r in s["tasks"]] == [t.name for t in main_job.DEMO_TASKS]
    for r in s["tasks"]:
        assert r["model"] and r["model"].keys() == r["copy_prompt"].keys()
        for v in (*r["model"].values(), *r["copy_prompt"].values(), r["wall_s"], r["peak_mem_mb"]):
            assert math.isfinite(v)
        d = out / r["task"]
        ref = np.asarray(nib.load(str(d / "target_reference.nii.gz")).dataobj, dtype=np.float32)
        pred = np.asarray(nib.load(str(d / "prediction.nii.gz")).dataobj, dtype=np.float32)
        copy = np.asarray(nib.load(str(d / "copy_prompt.nii.gz")).dataobj, dtype=np.float32)
        ctx1 = np.asarray(nib.load(str(d / ("context1_label.nii.gz" if r["kind"] == "seg" else
                                             "context1_output.nii.gz"))).dataobj, dtype=np.float32)
        if r["kind"] == "seg":
            # Independent recomputation from the written files.
            assert r["model"]["dice"] == pytest.approx(dice(pred > 0.5, ref > 0.5), abs=1e-9)
            assert r["copy_prompt"]["dice"] == pytest.approx(dice(ctx1 > 0.5, ref > 0.5), abs=1e-9)
            assert 0.0 < r["copy_prompt"]["dice"] < 1.0  # warped contexts: not a copy of the target's labels
        else:
            lo, hi = np.quantile(ref.astype(np.float64), [0.02, 0.98])
            refn = np.clip((ref - lo) / (hi - lo), 0, 1)
            assert r["model"]["psnr"] == pytest.approx(psnr(np.clip(pred, 0, 1), refn, 1.0), abs=1e-3)
            # the written copy baseline is the normalised first context output
            lo, hi = np.quantile(ctx1.astype(np.float64), [0.02, 0.98])
            np.testing.assert_allclose(copy, np.clip((ctx1 - lo) / (hi - lo), 0, 1), atol=1e-5)
            if r["task"] == "denoising":
                assert r["extra_baselines"]["noisy_input"]["psnr"] < 25  # sigma 0.2 noise really is there
            else:  # the corrupted input differs from the reference
                assert r["extra_baselines"]["input"]["psnr"] < 40


def test_protocol_draw_zero_is_the_showcase_prediction_made_again(quick_run):
    """The protocol reuses the showcase's prediction as draw 0 at L = 4: predicting it afresh gives the
    same metrics (the same contexts, inputs and model)."""
    from vicl_fast import evaluation as ev
    from vicl_fast.inference import load_model

    out, cache = quick_run
    s = json.loads((out / "summary.json").read_text())
    g = main_job.QUICK.grid
    model = load_model(next(cache.glob("*.safetensors")), "cpu")
    target, pool = ev.demo_target(g), ev.context_pool(g)
    for i, task in enumerate(main_job.DEMO_TASKS):
        if task.name not in ("white_matter", "denoising"):
            continue
        row = next(r for r in s["tasks"] if r["task"] == task.name)
        fresh = ev.evaluate_protocol(task, model, target, pool, g, "cpu", (ev.N_CONTEXTS,), 1, seed=100 + i)
        for k, v in fresh[str(ev.N_CONTEXTS)]["model"].items():
            assert row["protocol"][str(ev.N_CONTEXTS)]["model"][k]["values"][0] == pytest.approx(v["mean"], abs=1e-4)
            assert row["model"][k] == pytest.approx(v["mean"], abs=1e-9)


def test_target_is_colin27_and_contexts_icbm152_copies(quick_run):
    out, _ = quick_run
    s = json.loads((out / "summary.json").read_text())
    assert s["contexts"] and all(c.startswith("icbm152_aug") for c in s["contexts"])
    g = main_job.QUICK.grid
    colin = load_demo_subjects(names=["colin27"], size=g)[0]
    ref = np.asarray(nib.load(str(out / "white_matter" / "target_reference.nii.gz")).dataobj) > 0
    np.testing.assert_array_equal(ref, colin.masks["wm"])
    tin = np.asarray(nib.load(str(out / "white_matter" / "target_image.nii.gz")).dataobj)
    assert not np.any(tin[~colin.masks["brain"]])  # skull-stripped


def test_second_run_reuses_cache(quick_run, tmp_path, monkeypatch, capsys):
    _, cache = quick_run
    import vicl_fast.training.trainer as trainer_mod

    class _NoTraining:
        def __init__(self, *a, **k):
            raise AssertionError("the second run must not train")

    monkeypatch.setattr(trainer_mod, "Trainer", _NoTraining)
    capsys.readouterr()
    out2 = tmp_path / "out2"
    rc = main_job.main(["--quick", "--out", str(out2), "--cache-dir", str(cache), "--device", "cpu"])
    assert rc == 0
    assert "reusing the cached model" in capsys.readouterr().out
    s = json.loads((out2 / "summary.json").read_text())
    assert s["model"]["source"] == "cache"
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_cache_key_depends_on_recipe():
    import dataclasses

    k = main_job.recipe_key(main_job.QUICK)
    assert k == main_job.recipe_key(main_job.QUICK) and len(k) == 16
    assert k != main_job.recipe_key(dataclasses.replace(main_job.QUICK, steps=main_job.QUICK.steps + 1))


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    rc = main_job.main(["--quick", "--out", str(f), "--cache-dir", str(tmp_path / "c")])
    assert rc == main_job.EXIT_OUTPUT
    err = capsys.readouterr().err
    assert "--out" in err and "not a folder" in err
    rc = main_job.main(["--quick", "--out", str(f / "sub"), "--cache-dir", str(tmp_path / "c")])
    assert rc == main_job.EXIT_OUTPUT
    assert "not writable" in capsys.readouterr().err


def test_bad_flag_is_a_usage_error(capsys):
    assert main_job.main(["--device", "tpu"]) == main_job.EXIT_USAGE


def test_gpu_recipe_parses_and_is_small_enough_to_ship():
    root = Path(__file__).resolve().parents[2]
    r = main_job.load_recipe(root / "train" / "configs" / "demo_gpu.yaml")
    assert r.grid == 64 and r.channels == (16, 24, 32, 64, 128) and r.crop is None
    assert ("segmentation", 3.0, 50.0) in r.tasks
    from vicl_fast.models import create_model

    n = sum(p.numel() for p in create_model(r.model, channels=r.channels).parameters())
    assert n * 2 < 9.8e6  # bf16 bytes, with room for the metadata: the shipped model's limit is 10 MB
    assert main_job.recipe_key(r) != main_job.recipe_key(main_job.FULL)


def test_cpu_recipes_parse_and_phase2_starts_from_the_committed_phase1_weights():
    """train/configs/demo_cpu.yaml (phase 1) and demo_cpu_phase2.yaml (the shipped model's phase 2, from
    phase 1's committed step-1,000 weights) parse; phase 2's starting weights fit its model."""
    from safetensors.torch import load_file

    from vicl_fast.models import create_model

    root = Path(__file__).resolve().parents[2]
    p1 = main_job.load_recipe(root / "train" / "configs" / "demo_cpu.yaml")
    p2 = main_job.load_recipe(root / "train" / "configs" / "demo_cpu_phase2.yaml")
    assert p2.init_from == str(root / "train" / "resume" / "demo_cpu_v2_step1000" / "model.safetensors")
    assert p2.ema > 0 and p2.seg_dice_weight > 0 and p1.init_from is None and p1.seg_dice_weight == 0
    assert (p2.grid, p2.channels, p2.model) == (p1.grid, p1.channels, p1.model)
    model = create_model(p2.model, channels=p2.channels)
    model.load_state_dict(load_file(p2.init_from), strict=True)
    assert demo_recipe.recipe_doc(p2)["init_from"].startswith("model.safetensors sha256:506ebe9adfdcbde9")
    # Phases 3 and 4 start from the bf16 weights of the phase before, committed in train/resume/.
    for name, init in (("demo_cpu_phase3.yaml", "demo_cpu_phase2_step3150.safetensors"),
                       ("demo_cpu_phase4.yaml", "demo_cpu_phase3_step3000.safetensors")):
        r = main_job.load_recipe(root / "train" / "configs" / name)
        assert r.init_from == str(root / "train" / "resume" / init)
        assert (r.grid, r.channels, r.model, r.seg_masks) == (p2.grid, p2.channels, p2.model, p2.seg_masks)
        create_model(r.model, channels=r.channels).load_state_dict(load_file(r.init_from), strict=True)
    # Phase 5 widens phase 3's weights (train.init_widen); the flags enter its key, and only where they are on.
    from vicl_fast.models.neuroverse3d.widen import widen_state_dict

    r5 = main_job.load_recipe(root / "train" / "configs" / "demo_cpu_phase5.yaml")
    assert r5.init_widen and r5.init_freeze and r5.init_from == str(root / "train" / "resume" / init)
    wide = create_model(r5.model, channels=r5.channels)
    sd, _ = widen_state_dict({k: v.float() for k, v in load_file(r5.init_from).items()}, p2.channels, r5.channels,
                             wide.state_dict())
    wide.load_state_dict(sd, strict=True)
    assert demo_recipe.recipe_doc(r5)["init_widen"] is True and "init_widen" not in demo_recipe.recipe_doc(p2)


def test_recipe_with_unknown_key_is_refused(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("grid: 32\nstepz: 10\n")
    from vicl_fast.errors import UsageError

    with pytest.raises(UsageError, match="stepz") as ei:  # exit code 2 from the main job
        main_job.load_recipe(f)
    assert ei.value.exit_code == 2


def test_recipe_init_from_is_relative_to_the_file_and_keyed_by_content(tmp_path):
    """A second-phase recipe names its starting weights relative to the recipe file; the cache key and
    the metadata carry the file's name and SHA-256, so a copy elsewhere gives the same key."""
    import shutil

    from vicl_fast.errors import UsageError

    (tmp_path / "a" / "w").mkdir(parents=True)
    (tmp_path / "a" / "w" / "init.safetensors").write_bytes(b"weights v1")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for d in ("a", "b"):
        (tmp_path / d / "r.yaml").write_text("grid: 32\nema: 0.998\ninit_from: w/init.safetensors\n")
    ra, rb = (main_job.load_recipe(tmp_path / d / "r.yaml") for d in ("a", "b"))
    assert Path(ra.init_from) == (tmp_path / "a" / "w" / "init.safetensors").resolve() and ra.ema == 0.998
    assert main_job.recipe_key(ra) == main_job.recipe_key(rb)
    doc = demo_recipe.recipe_doc(ra)
    assert doc["init_from"].startswith("init.safetensors sha256:") and str(tmp_path) not in json.dumps(doc)
    (tmp_path / "b" / "w" / "init.safetensors").write_bytes(b"weights v2")
    assert main_job.recipe_key(ra) != main_job.recipe_key(rb)
    (tmp_path / "b" / "w" / "init.safetensors").unlink()
    with pytest.raises(UsageError, match="init_from"):
        main_job.recipe_key(rb)


def test_bf16_export_loads_through_the_cli_loader(quick_run, tmp_path):
    import torch

    from vicl_fast.cli import load_model

    _, cache = quick_run
    src = next(cache.glob("*.safetensors"))
    dst = main_job.export_bf16(src, tmp_path / "demo.safetensors", {"grid": 32, "source": "cache"})
    assert dst.stat().st_size < 0.6 * src.stat().st_size
    a, b = load_model(src), load_model(dst)
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    ci, co = torch.rand(1, 2, 1, 32, 32, 32), torch.rand(1, 2, 1, 32, 32, 32)
    ya, yb = a.predict(x, ci, co), b.predict(x, ci, co)
    assert torch.allclose(ya, yb, atol=0.05 * float(ya.abs().max()) + 1e-3)  # bf16 weights, fp32 maths
    from vicl_fast.training.demo_recipe import _read_demo_meta

    assert _read_demo_meta(dst)["dtype"] == "bfloat16"
