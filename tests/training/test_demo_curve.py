"""train/demo_curve.py: the learning curve of a training in phases (phase 2 starts at a step of phase 1)."""
from __future__ import annotations

import json
from pathlib import Path

from tests._scripts import load_script


def _module():
    return load_script("train/demo_curve.py")


def _protocol(draws: int = 2, grid: int = 64) -> dict:
    from vicl_fast.training.demo_recipe import data_digest

    return {"data": data_digest(), "draws": draws, "grid": grid}


def _run(root: Path, steps: list[int], base: float, grid: int = 64) -> Path:
    (root / "snapshots").mkdir(parents=True)
    curve = {f"step_{s:06d}": {t: {"dice": [base + s / 1e4, 0.5]} for t in ("white_matter", "deep_grey",
                                                                          "hippocampus", "cerebellum")}
             | {t: {"psnr": [20 + s / 1e3, 15.4], "ssim": [0.6, 0.56]} for t in ("denoising", "bias_field")}
             for s in steps}
    # already evaluated (on this data, with 2 draws): nothing to run
    (root / "colin27_curve.json").write_text(json.dumps({"_protocol": _protocol(grid=grid), **curve}))
    (root / "val.csv").write_text("step,loss,dice,psnr\n" + "".join(f"{s},0.1,{base},{21}\n" for s in steps))
    return root


def test_phases_are_chained_at_their_start_step(tmp_path):
    mod = _module()
    p1 = _run(tmp_path / "demo_64_p1", [500, 1000, 1500, 2000], 0.1)
    p2 = _run(tmp_path / "demo_96_p2", [350, 700], 0.5, grid=96)  # measured on its own grid: reused
    seg, gen, val = mod.collect([(p1, 0), (p2, 1000)], draws=2)
    assert [x for x, _ in seg["white_matter"]] == [500, 1000, 1350, 1700]  # phase 1 after 1,000 is dropped
    assert seg["white_matter"][2][1] == 0.5 + 350 / 1e4
    assert [x for x, _ in gen["denoising"]] == [500, 1000, 1350, 1700]
    assert [x for x, _ in val["phase 1: segmentation Dice"]] == [500, 1000]
    assert [x for x, _ in val["phase 2: segmentation Dice"]] == [1350, 1700]
    assert mod._run_arg("some/dir@1000") == (Path("some/dir"), 1000) and mod._run_arg("d") == (Path("d"), 0)
    assert mod.run_folder_grid(Path("x/demo_96_demo_cpu_phase5")) == 96


def test_a_curve_measured_on_other_data_or_draws_is_not_reused(tmp_path):
    mod = _module()
    run = _run(tmp_path / "p1", [500], 0.1)
    assert list(mod.evaluate_snapshots(run, draws=2)) == ["step_000500"]
    assert mod.evaluate_snapshots(run, draws=5) == {}  # other draws: measured again (no snapshot files here)
    doc = json.loads((run / "colin27_curve.json").read_text())
    doc["_protocol"]["data"] = "0" * 64  # the embedded data or its task code changed since
    (run / "colin27_curve.json").write_text(json.dumps(doc))
    assert mod.evaluate_snapshots(run, draws=2) == {}
