"""The Python API on a tiny linear model whose errors and corrections are known."""

import numpy as np
import torch

import flipback


class Linear2(torch.nn.Module):
    def forward(self, x):
        s = 255 * x.flatten(1).sum(1) - 255 * 16 * 0.5
        return torch.stack([torch.zeros_like(s), s], 1)


def test_explain_returns_one_verified_correction_per_error(tmp_path):
    images = np.full((4, 4, 4, 1), 127, dtype=np.uint8)  # sum just below the boundary: class 0
    images[1] = 140  # class 1
    labels = np.array([1, 1, 0, 1])  # images 0 and 3 are errors (predicted 0, label 1)
    fixes = flipback.explain(Linear2(), images, labels, class_names=["dark", "bright"])
    assert [f.index for f in fixes] == [0, 3]
    model = Linear2()
    for f in fixes:
        assert f.success and f.predicted == 0 and f.predicted_after == 1 and f.queries >= 1
        assert np.allclose(np.round(f.corrected * 255), f.corrected * 255, atol=1e-4)  # 8-bit
        with torch.no_grad():
            assert model(torch.from_numpy(f.corrected).permute(2, 0, 1)[None]).argmax() == 1
        assert f.l2 > 0 and f.regions
    png = fixes[0]._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert fixes[0].figure(tmp_path / "f.png").is_file()
