"""tools/pack_resume.py: a checkpoint packed to commit (Adam moments in bf16) unpacks into a checkpoint the
trainer resumes from: same step, same weights, moments within bf16 rounding, and training goes on."""

from __future__ import annotations

import torch

from tests._scripts import load_script
from tests.training._toy import _nv_raw, _write_dataset
from vicl_fast.training import config_from_dict
from vicl_fast.training.trainer import Trainer



def _tool():
    return load_script("tools/pack_resume.py")


def test_pack_unpack_resume(tmp_path):
    data = _write_dataset(tmp_path / "toy")
    raw = _nv_raw(data, tmp_path / "run", steps=4, ckpt_every=2, val_every=100)
    t = Trainer(config_from_dict(raw))
    t.fit(max_steps=2)
    src = tmp_path / "run" / "checkpoints" / "step_00000002"
    tool = _tool()
    tool.pack(src, tmp_path / "packed")
    assert (tmp_path / "packed" / tool.PACKED).stat().st_size < (src / "state.safetensors").stat().st_size
    raw2 = _nv_raw(data, tmp_path / "run2", steps=4, ckpt_every=2, val_every=100)
    tool.unpack(tmp_path / "packed", tmp_path / "run2" / "checkpoints" / "step_00000002")
    r = Trainer(config_from_dict(raw2))
    assert r.step == 2
    for (k, a), (_, b) in zip(t.model.state_dict().items(), r.model.state_dict().items()):
        assert torch.equal(a, b), k
    sa, sb = t.optimizer.state_dict()["state"], r.optimizer.state_dict()["state"]
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[i][k], sa[i][k], rtol=1 / 128, atol=0)
    r.fit()
    assert r.step == 4
