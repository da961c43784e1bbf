"""The Python inference API (:mod:`vicl_fast.inference`) and the error hierarchy (:mod:`vicl_fast.errors`).

The model is ``neuroverse3d_tiny`` with random weights saved by :mod:`vicl_fast.checkpoint` (the
real model code). The API must give exactly what ``vicl-fast predict`` writes (the CLI is a layer
over it), accept paths, nibabel images and arrays alike, predict by default at the grid, spacing
and cropping in the checkpoint's metadata, and raise one-line errors carrying their exit codes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import nibabel as nib

from vicl_fast import errors, inference
from vicl_fast.checkpoint import PREPROCESSING_KEY, read_preprocessing, save_checkpoint
from vicl_fast.data.preprocess import labels_to_original, preprocess_image
from vicl_fast.cli import main
from vicl_fast.inference import Predictor, predict_volume
from vicl_fast.models import create_model
from vicl_fast.models.neuroverse3d import Neuroverse3D

OPTS = {"grid": 32, "spacing": 2.5, "device": "cpu"}


def _case(shape, zooms, seed):
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float64)
    c = (np.asarray(shape) - 1)[:, None, None, None] / 2
    r = np.sqrt(((idx - c) ** 2).sum(0))
    img = (100 * np.exp(-r / 8) + rng.normal(0, 2, shape)).astype(np.float32)
    lab = (r < 5).astype(np.uint8)
    A = np.diag([*zooms, 1.0])
    A[:3, 3] = (-20.0, -25.0, -15.0)
    return nib.Nifti1Image(img, A), nib.Nifti1Image(lab, A)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("inference")
    torch.manual_seed(0)
    model = create_model("neuroverse3d_tiny")
    save_checkpoint(model, d / "plain.safetensors")
    meta = {"grid": [16, 16, 16], "spacing": [3.0, 3.0, 3.0], "crop": True, "training_data": "test data",
            "description": "tiny test model"}
    save_checkpoint(model, d / "with_meta.safetensors", extra_metadata={PREPROCESSING_KEY: json.dumps(meta)})
    pairs = []
    for i, (shape, zooms) in enumerate((((22, 24, 20), (2.0, 2.0, 2.5)), ((20, 26, 18), (2.2, 1.8, 3.0)))):
        im, lb = _case(shape, zooms, seed=i)
        nib.save(im, str(d / f"c{i}_image.nii.gz"))
        nib.save(lb, str(d / f"c{i}_label.nii.gz"))
        pairs.append((d / f"c{i}_image.nii.gz", d / f"c{i}_label.nii.gz"))
    tim, _ = _case((18, 22, 16), (2.4, 2.0, 3.2), seed=10)
    nib.save(tim, str(d / "target.nii.gz"))
    return d, pairs


def test_paths_images_and_cli_give_the_same_prediction(env, tmp_path):
    d, pairs = env
    model = d / "plain.safetensors"
    # A random model's probabilities sit near one value: threshold at their median so that the
    # segmentation holds both classes (an all-zero output would compare equal for any bug).
    probs = Predictor(pairs, "seg", model, **OPTS).predict(d / "target.nii.gz").grid_output
    thr = float(np.median(probs[probs > probs.min()]))
    by_path = predict_volume(d / "target.nii.gz", pairs, model, "seg", threshold=thr, **OPTS)
    imgs = [(nib.load(str(a)), nib.load(str(b))) for a, b in pairs]
    by_image = predict_volume(nib.load(str(d / "target.nii.gz")), imgs, model, "seg", threshold=thr, **OPTS)
    out = tmp_path / "cli.nii.gz"
    ctx = [x for a, b in pairs for x in ("--context", str(a), str(b))]
    rc = main(["predict", "--target", str(d / "target.nii.gz"), *ctx, "--model", str(model), "--out", str(out),
               "--grid", "32", "--spacing", "2.5", "--device", "cpu", "-q", "--threshold", repr(thr)])
    assert rc == 0
    by_cli = nib.load(str(out))
    tgt = nib.load(str(d / "target.nii.gz"))
    for img in (by_path, by_image):
        assert img.shape == tgt.shape
        np.testing.assert_allclose(img.affine, tgt.affine)
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(by_cli.dataobj))
    assert set(np.unique(np.asarray(by_path.dataobj)).tolist()) == {0, 1}


def test_arrays_with_an_affine_equal_images(env):
    d, pairs = env
    model = d / "plain.safetensors"
    imgs = [(nib.load(str(a)), nib.load(str(b))) for a, b in pairs]
    tgt = nib.load(str(d / "target.nii.gz"))
    # Arrays take one affine for all inputs: use images that share it.
    same = [(nib.Nifti1Image(np.asarray(a.dataobj), tgt.affine), nib.Nifti1Image(np.asarray(b.dataobj), tgt.affine))
            for a, b in imgs]
    ref = predict_volume(tgt, same, model, "gen", **OPTS)
    arr = predict_volume(np.asarray(tgt.dataobj), [(np.asarray(a.dataobj), np.asarray(b.dataobj)) for a, b in same],
                         model, "gen", affine=tgt.affine, **OPTS)
    np.testing.assert_array_equal(np.asarray(ref.dataobj), np.asarray(arr.dataobj))
    assert np.asarray(arr.dataobj).dtype == np.float32 and np.isfinite(np.asarray(arr.dataobj)).all()


def test_predictor_reuses_model_and_contexts(env):
    d, pairs = env
    p = Predictor(pairs, "seg", d / "plain.safetensors", **OPTS)
    thr = float(np.median(p.predict(d / "target.nii.gz").grid_output))  # both classes in the output
    a = p.predict(d / "target.nii.gz", threshold=thr)
    b = p.predict(d / "target.nii.gz", threshold=thr)
    one_call = predict_volume(d / "target.nii.gz", pairs, d / "plain.safetensors", threshold=thr, **OPTS)
    assert set(np.unique(np.asarray(one_call.dataobj)).tolist()) == {0, 1}
    np.testing.assert_array_equal(np.asarray(a.image.dataobj), np.asarray(one_call.dataobj))
    np.testing.assert_array_equal(a.grid_output, b.grid_output)
    assert a.grid_output.shape == (1, 32, 32, 32)
    assert 0.0 <= a.foreground_fraction <= 1.0
    assert set(a.seconds) == {"preprocess", "model", "postprocess"}


def test_default_grid_comes_from_the_checkpoint_metadata(env, monkeypatch):
    d, pairs = env
    assert read_preprocessing(d / "with_meta.safetensors")["grid"] == [16, 16, 16]
    assert read_preprocessing(d / "plain.safetensors") is None
    shapes = []
    orig = Neuroverse3D.predict

    def spy(self, target, *a, **k):
        shapes.append(tuple(target.shape[2:]))
        return orig(self, target, *a, **k)

    monkeypatch.setattr(Neuroverse3D, "predict", spy)
    p = Predictor(pairs, "seg", d / "with_meta.safetensors", device="cpu")
    assert p.grid == (16, 16, 16) and p.spacing == (3.0, 3.0, 3.0) and p.crop is True
    p.predict(d / "target.nii.gz")
    assert shapes[-1] == (16, 16, 16)
    assert "tiny test model" in p.describe_model() and "test data" in p.describe_model()
    # Without metadata: the package defaults.
    q = Predictor(pairs, "seg", d / "plain.safetensors", device="cpu", mini_context=1)
    assert q.grid == (inference.DEFAULT_GRID,) * 3 and q.spacing == inference.DEFAULT_SPACING


def test_multiscale_segmentation_is_the_mean_of_single_grid_predictions(env, tmp_path):
    """scales=(1, 1.5) must equal two single-grid predictions (32^3 at 2.5 mm, 48^3 at 5/3 mm: one field of
    view) whose probabilities are averaged on the target's grid; the CLI's --scales gives the same."""
    d, pairs = env
    model, target = d / "plain.safetensors", d / "target.nii.gz"
    multi = Predictor(pairs, "seg", model, scales=(1, 1.5), **OPTS)
    assert [lv.grid for lv in multi._levels] == [(32, 32, 32), (48, 48, 48)]
    assert multi.stages_per_target == 2 * (len(pairs) + 2)
    single = []
    for grid, spacing in ((32, 2.5), (48, 2.5 * 32 / 48)):
        p = Predictor(pairs, "seg", model, grid=grid, spacing=spacing, device="cpu", log=lambda m: None)
        probs = p.predict(target).grid_output
        _, mapping = preprocess_image(nib.load(str(target)), spacing=spacing, grid=grid, crop=True)
        single.append((probs, mapping))
    grid_mean = (single[0][0].mean() + single[1][0].mean()) / 2  # a random model's outputs sit near one value
    expected = labels_to_original(single, [1], threshold=float(grid_mean))
    assert set(np.unique(expected).tolist()) == {0, 1}
    got = multi.predict(target, threshold=float(grid_mean))
    np.testing.assert_array_equal(np.asarray(got.image.dataobj), expected)
    np.testing.assert_array_equal(got.grid_output, single[0][0])  # the first grid's output
    out = tmp_path / "multi.nii.gz"
    ctx = [x for a, b in pairs for x in ("--context", str(a), str(b))]
    rc = main(["predict", "--target", str(target), *ctx, "--model", str(model), "--out", str(out), "--grid", "32",
               "--spacing", "2.5", "--scales", "1", "1.5", "--device", "cpu", "-q", "--threshold", repr(float(grid_mean))])
    assert rc == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), expected)
    for bad in (["--scales", "9"], ["--mirror", "maybe"]):
        assert main(["predict", "--target", str(target), *ctx, "--model", str(model), "--out",
                     str(tmp_path / "x.nii.gz"), *bad, "--device", "cpu", "-q"]) == 2, bad


@pytest.mark.parametrize("task", ["seg", "gen"])
def test_mirror_averages_the_prediction_of_the_left_right_mirrored_inputs(env, task):
    """mirror=True must equal the mean of the plain prediction and the (mirrored back) prediction of inputs
    mirrored along their first voxel axis, R-L for these RAS-stored volumes (whole field of view, so the
    model grid is symmetric about its centre)."""
    d, pairs = env
    model = inference.load_model(d / "plain.safetensors")
    opts = {**OPTS, "crop": False}
    # Even sizes at the model's spacing: the grid's placement is then exactly symmetric under the mirror.
    cases = [_case(shape, (2.5, 2.5, 2.5), seed) for shape, seed in (((20, 24, 18), 1), ((22, 20, 16), 2),
                                                                      ((18, 22, 20), 3))]

    def flipped(img, flip):
        data = np.asarray(img.dataobj)
        return nib.Nifti1Image(np.ascontiguousarray(data[::-1]) if flip else data, img.affine)

    def run(flip, mirror):
        ctx = [(flipped(a, flip), flipped(a if task == "gen" else b, flip)) for a, b in cases[:2]]
        p = Predictor(ctx, task, model, mirror=mirror, **opts)
        return p, p.predict(flipped(cases[2][0], flip)).grid_output

    both, got = run(False, True)
    _, plain = run(False, False)
    _, mirrored = run(True, False)
    assert both.stages_per_target == 2 * (2 + 2)
    assert np.abs(plain - mirrored[:, ::-1]).max() > 1e-4  # a random model is not symmetric: a real test
    np.testing.assert_allclose(got, (plain + mirrored[:, ::-1]) / 2, atol=1e-5)


def test_scales_and_mirror_come_from_the_checkpoint_metadata(env, tmp_path):
    d, pairs = env
    torch.manual_seed(0)
    meta = {"grid": [16, 16, 16], "spacing": [3.0, 3.0, 3.0], "crop": True, "segmentation_scales": [1.0, 1.5],
            "mirror_tta": True}
    ckpt = tmp_path / "scales.safetensors"
    save_checkpoint(create_model("neuroverse3d_tiny"), ckpt, extra_metadata={PREPROCESSING_KEY: json.dumps(meta)})
    seg = Predictor(pairs, "seg", ckpt, device="cpu")
    assert seg.scales == (1.0, 1.5) and [lv.grid for lv in seg._levels] == [(16, 16, 16), (32, 32, 32)]
    assert [lv.spacing for lv in seg._levels] == [(3.0, 3.0, 3.0), 1.5]
    assert "segmenting at grids 16x16x16 and 32x32x32" in seg.describe_model()
    assert seg.mirror and "mirror image" in seg.describe_model()
    assert seg.stages_per_target == 2 * 2 * (len(pairs) + 2)  # two grids, each also mirrored
    assert not Predictor(pairs, "seg", ckpt, device="cpu", mirror=False).mirror
    assert not Predictor(pairs, "seg", d / "with_meta.safetensors", device="cpu").mirror  # no such metadata
    gen = Predictor(pairs, "gen", ckpt, device="cpu")  # a mean over grids would blur a generated image
    assert gen.scales == (1.0,) and len(gen._levels) == 1
    assert Predictor(pairs, "seg", ckpt, device="cpu", scales=[1]).scales == (1.0,)  # the caller's choice wins


def test_overriding_the_trained_resolution_warns(env):
    d, pairs = env
    notes = []
    Predictor(pairs, "seg", d / "with_meta.safetensors", grid=32, spacing=2.5, device="cpu", log=notes.append)
    assert len(notes) == 1 and "trained at grid 16x16x16" in notes[0]
    notes.clear()
    Predictor(pairs, "seg", d / "with_meta.safetensors", grid=16, spacing=3.0, device="cpu", log=notes.append)
    assert notes == []  # same resolution: nothing to say


def test_model_none_uses_the_shipped_checkpoint_or_says_there_is_none(env, monkeypatch):
    d, pairs = env
    monkeypatch.setattr(inference, "default_model_path", lambda: None)
    with pytest.raises(errors.BadModelError, match="no checkpoint ships") as ei:
        predict_volume(d / "target.nii.gz", pairs, **OPTS)
    assert ei.value.exit_code == 7
    monkeypatch.setattr(inference, "default_model_path", lambda: d / "with_meta.safetensors")
    p = Predictor(pairs, "seg", None, device="cpu")
    assert p.model_path == d / "with_meta.safetensors" and p.grid == (16, 16, 16)


def test_loaded_model_object_is_accepted(env):
    d, pairs = env
    model = inference.load_model(d / "plain.safetensors")
    a = predict_volume(d / "target.nii.gz", pairs, model, "gen", **OPTS)  # continuous outputs: a real comparison
    b = predict_volume(d / "target.nii.gz", pairs, d / "plain.safetensors", "gen", **OPTS)
    assert np.ptp(np.asarray(a.dataobj)) > 0
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


@pytest.mark.parametrize("kwargs, cls, text", [
    ({"task": "segment"}, errors.UsageError, "task must be 'seg' or 'gen'"),
    ({"mini_context": "x"}, errors.UsageError, "--mini-context"),
    ({"grid": 30}, errors.UsageError, "multiples of 16"),
    ({"spacing": -1}, errors.UsageError, "--spacing"),
    ({"labels": "0"}, errors.UsageError, "positive integers"),
    ({"device": "tpu"}, errors.UsageError, "not a device name"),
    ({"skull_strip": "yes"}, errors.UsageError, "--skull-strip"),
    ({"scales": [1, 0]}, errors.UsageError, "--scales takes grid scales"),
    ({"task": "gen", "scales": [1, 1.5]}, errors.UsageError, "--scales applies to --task seg only"),
])
def test_bad_arguments_are_usage_errors(env, kwargs, cls, text):
    d, pairs = env
    kw = {**OPTS, **kwargs}
    task = kw.pop("task", "seg")
    with pytest.raises(cls, match=text) as ei:
        predict_volume(d / "target.nii.gz", pairs, d / "plain.safetensors", task, **kw)
    assert ei.value.exit_code == 2 and isinstance(ei.value, ValueError)


def test_input_errors_carry_their_exit_codes(env, tmp_path):
    d, pairs = env
    m = d / "plain.safetensors"
    cases = [
        (lambda: predict_volume(d / "target.nii.gz", [], m, **OPTS), errors.NoContextError, 6),
        (lambda: predict_volume(tmp_path / "missing.nii.gz", pairs, m, **OPTS), errors.UnreadableFileError, 3),
        (lambda: predict_volume(np.zeros((8, 8, 8)), pairs, m, **OPTS), errors.BadImageError, 4),
        (lambda: predict_volume(d / "target.nii.gz", [(pairs[0][0], pairs[0][0])], m, **OPTS),
         errors.BadLabelError, 5),
        (lambda: predict_volume(d / "target.nii.gz", pairs, tmp_path / "none.safetensors", **OPTS),
         errors.BadModelError, 7),
        (lambda: predict_volume(d / "target.nii.gz", pairs, m, object(), **OPTS), errors.UsageError, 2),
        (lambda: predict_volume(42, pairs, m, **OPTS), errors.UsageError, 2),
    ]
    for call, cls, code in cases:
        with pytest.raises(cls) as ei:
            call()
        assert ei.value.exit_code == code and isinstance(ei.value, errors.ViclFastError)
        assert "\n" not in str(ei.value)


def test_empty_segmentation_is_a_warning_not_an_error(env, monkeypatch):
    d, pairs = env
    monkeypatch.setattr(Neuroverse3D, "predict", lambda self, t, *a, **k: torch.zeros_like(t))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        img = predict_volume(d / "target.nii.gz", pairs, d / "plain.safetensors", **OPTS)
    assert not np.any(np.asarray(img.dataobj))
    assert any("is empty" in str(x.message) for x in w)


def test_exit_code_table_is_complete_and_unique():
    table = errors.exit_code_table()
    codes = [c for c, _, _ in table]
    assert codes == sorted(set(codes)) == list(range(1, 11))
    # The CLI's documented codes are the classes' codes.
    assert errors.InsufficientMemoryError.exit_code == errors.EXIT_OOM == 10
    assert issubclass(errors.BadLabelError, errors.InputError)
    assert errors.ViclFastError("x", exit_code=8).exit_code == 8


def test_main_job_errors_are_vicl_fast_errors():
    from vicl_fast.main_job import MainJobError

    e = MainJobError("bad", 8)
    assert isinstance(e, errors.ViclFastError) and e.exit_code == 8


def test_readme_example_names_exist():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "from vicl_fast.inference import Predictor, predict_volume" in readme
    assert {"Predictor", "predict_volume"} <= set(inference.__all__)


def test_readme_runnable_example_runs(env, monkeypatch, capsys):
    """The README's runnable snippet, verbatim, with the shipped model replaced by the tiny test model
    (the same code path: model=None reads the default checkpoint and its preprocessing metadata)."""
    d, _ = env
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("Runnable as is")
    code = readme[readme.index("```python", start) + len("```python"):]
    code = code[:code.index("```")]
    monkeypatch.setattr(inference, "default_model_path", lambda: d / "with_meta.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model's segmentation may be empty
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("white matter Dice ")
    assert 0.0 <= float(out.split()[-1]) <= 1.0


def test_cli_without_model_uses_the_default_and_says_which(env, monkeypatch, tmp_path, capsys):
    d, pairs = env
    monkeypatch.setattr(inference, "default_model_path", lambda: d / "with_meta.safetensors")
    out = tmp_path / "seg.nii.gz"
    ctx = [x for a, b in pairs for x in ("--context", str(a), str(b))]
    rc = main(["predict", "--target", str(d / "target.nii.gz"), *ctx, "--out", str(out), "--device", "cpu", "-q"])
    assert rc == 0 and out.exists()
    err = capsys.readouterr().err
    assert f"vicl-fast: model {d / 'with_meta.safetensors'}: tiny test model, trained on test data, grid 16x16x16" in err
    monkeypatch.setattr(inference, "default_model_path", lambda: None)
    rc = main(["predict", "--target", str(d / "target.nii.gz"), *ctx, "--out", str(tmp_path / "b.nii.gz"),
               "--device", "cpu", "-q"])
    assert rc == 7 and "no checkpoint ships" in capsys.readouterr().err
