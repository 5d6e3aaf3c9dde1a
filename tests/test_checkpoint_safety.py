"""Hostile checkpoints are refused with one clear error, and nothing in them runs."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model import CheckpointError, load_checkpoint

import hf_models


class _CreatesFile:
    """Unpickling this would create a file (builtins.open(path, 'w'))."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["evil.pth", "pytorch_model.bin", "weights.pt"])
def test_code_running_pickle_is_refused(tmp_path, name):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / name
    torch.save({"patch_embed.proj.weight": torch.zeros(4, 3, 2, 2), "x": _CreatesFile(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(path)
    assert not marker.exists()


def test_legacy_raw_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "old.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": _CreatesFile(marker)}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_npz_with_object_arrays_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)


def _good_safetensors(path):
    save_file({"patch_embed.proj.weight": torch.randn(16, 3, 4, 4), "pos_embed": torch.randn(1, 5, 16)}, str(path))


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "cut.safetensors"
    _good_safetensors(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_safetensors_header_claiming_more_than_the_file(tmp_path):
    path = tmp_path / "liar.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    huge = tmp_path / "huge_header.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header length is larger than the file"):
        load_checkpoint(huge)


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (_png_bytes(), "a PNG image"),
        (b"Secret notes: hello world, these are not tensors\n" * 3, "text"),
        (b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09" * 5, None),
    ],
    ids=["png", "text", "binary"],
)
def test_a_file_that_is_not_safetensors_says_so(tmp_path, content, kind):
    """Renamed to .safetensors (alone, or as a folder's weights): the message names the file and
    says plainly what it is not, without a meaningless header length or the file's contents."""
    (tmp_path / "photo.safetensors").write_bytes(content)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model.safetensors").write_bytes(content)
    for path, name in ((tmp_path / "photo.safetensors", "photo"), (tmp_path / "folder", "model")):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        msg = str(err.value)
        assert msg.startswith(f"{name}.safetensors is not a safetensors file")
        if kind:
            assert f"looks like {kind}" in msg
        bogus_length = int.from_bytes(content[:8], "little")
        assert str(bogus_length) not in msg and "claims" not in msg
        assert "Secret" not in msg and "hello" not in msg and "IHDR" not in msg


def test_empty_and_garbage_files(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not tensors")
    (tmp_path / "junk.pth").write_bytes(b"<html>404</html>")
    for name in ("empty.pth", "junk.safetensors", "junk.pth"):
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / name)


def test_transformers_config_that_lies_about_sizes(tmp_path):
    """Sizes a config file states that the tensors contradict are refused before any model is built,
    the message naming the file and key."""
    hf_models.save(hf_models.build("vit", patch_size=16, image_size=64), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json \(intermediate_size\) says mlp_dim = 4096"):
        load_checkpoint(tmp_path)
    cfg["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json \(num_hidden_layers\) says depth = 2"):
        load_checkpoint(tmp_path)
    cfg["hidden_size"] = -5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: hidden_size must be a whole number"):
        load_checkpoint(tmp_path)


def test_unknown_source():
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint("/nonexistent/dir/model.pth")


def test_loaded_weights_do_not_follow_the_file(tmp_path):
    """A checkpoint rewritten in place while its model is loaded leaves the model as it was."""
    from model import VisionTransformer, ViTConfig

    c = ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_dim=64, num_classes=2)
    m = VisionTransformer(c)
    m.init_weights(seed=0)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    lm = load_checkpoint(path)
    before = lm.model.pos_embed.clone()
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = bytes(len(data) - header)  # every weight byte zeroed, in place
    with open(path, "r+b") as f:
        f.write(data)
    assert torch.equal(lm.model.pos_embed, before)
