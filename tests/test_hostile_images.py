"""Hostile images through the decoder and the CLI: a correct analysis or one clear message,
bounded in time; an EXIF-rotated photo analyses like the same photo rotated on disk."""

import time

import hostile_images as H
import numpy as np
import pytest

from model import VisionTransformer, ViTConfig, load_image
from model.preprocess import ImageError
from viz_app.cli import main as cli_main

CASES = H.cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_decoder(name):
    data, expect = CASES[name]
    start = time.monotonic()
    if expect == "error":
        with pytest.raises(ImageError) as err:
            load_image(data, name=name)
        assert name in str(err.value) and "\n" not in str(err.value)
    else:
        img = load_image(data, name=name)
        assert img.mode == "RGB" and min(img.size) >= 1
    assert time.monotonic() - start < 20


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from safetensors.torch import save_file

    m = VisionTransformer(
        ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=4)
    )
    m.init_weights(seed=0)
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_cli_over_every_hostile_file(tmp_path, tiny_model, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, (data, _) in CASES.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "out"
    main_args = ["analyze", "--model", str(tiny_model), "--out", str(out), str(folder)]
    rc = cli_main(main_args)
    assert rc == 1  # some were skipped
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name, (_, expect) in CASES.items():
        stem = name.rsplit(".", 1)[0]
        if name.endswith(".svg"):
            continue  # not an image suffix: the folder scan does not pick it up
        if expect == "ok":
            assert (out / f"{stem}.npz").exists(), name
        else:
            assert not (out / f"{stem}.npz").exists(), name
            assert name in err


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotation_gives_the_same_analysis(tmp_path, tiny_model, orientation):
    (tmp_path / "tagged.jpg").write_bytes(H.exif_jpeg(orientation))
    (tmp_path / "rotated.jpg").write_bytes(H.rotated_jpeg(orientation))
    assert cli_main(["analyze", "--model", str(tiny_model), "--out", str(tmp_path / "o"), str(tmp_path)]) == 0
    a, b = np.load(tmp_path / "o" / "tagged.npz"), np.load(tmp_path / "o" / "rotated.npz")
    # both JPEGs are lossy encodings of the same pixels: close, not bit-equal
    np.testing.assert_allclose(a["logits"], b["logits"], atol=0.05)
    np.testing.assert_allclose(a["rollout"], b["rollout"], atol=0.01)
