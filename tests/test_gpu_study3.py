"""The GPU run of Study III (benchmarks/gpu_study3*.py): the prepared folder's codecs are lossless, the packs respect
their size limit, and `prepare_data` picks by seed from the labels and the file's length alone (what lets the device
rebuild full-length files around only the images the study needs). Cheap: a few hundred images; the dry run
(`python benchmarks/gpu_study3_prepare.py --dry-run`) checks every prepared image against ../shared."""
import json, sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/"benchmarks"))
import gpu_study3 as g   # noqa: E402


def test_images_round_trip_exactly_and_compress(shared, tmp_path):
    x = np.load(shared/"data/cifar100/test.npz")["x"][:203]   # not a whole number of mosaic rows: padding is dropped
    files = g.encode_images(x, tmp_path)
    assert (g.decode_images(tmp_path, files, len(x)) == x).all()
    size = sum((tmp_path/f).stat().st_size for f in files)
    assert size < 0.7 * x.nbytes   # lossless WebP mosaics: about 0.55x of the raw bytes here (npz: about 0.9x)


def test_model_codec_round_trip(tmp_path):
    import torch
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    sd = {"layer.dense.weight": rng.normal(size=(8, 4)).astype(np.float32), "layer.dense.bias": rng.normal(size=8).astype(np.float32),
          "norm.weight": rng.normal(size=4).astype(np.float32), "embeddings.position_embeddings": rng.normal(size=(1, 3, 4)).astype(np.float32)}
    src, enc, dec = (tmp_path/n for n in ("src", "enc", "dec"))
    for f in (src, enc): f.mkdir()
    save_file(sd, str(src/"model.safetensors"), metadata={"format": "pt"})
    (src/"config.json").write_text("{}")
    meta = g.encode_model(src, enc)
    (enc/"meta.json").write_text(json.dumps(meta))
    assert {t["name"] for t in meta["tensors"] if t["dtype"] == "bf16"} == {"layer.dense.weight", "layer.dense.bias"}
    from safetensors.numpy import load_file
    out = load_file(str(g.decode_model(enc, dec)/"model.safetensors"))
    for k, v in sd.items():
        want = torch.from_numpy(v).to(torch.bfloat16).float().numpy() if k.startswith("layer.dense") else v
        assert out[k].dtype == np.float32 and (out[k] == want).all(), k


def test_packs_respect_the_budget(tmp_path):
    from gpu_study3_prepare import pack
    items = []
    for name, size in [("model", 600), ("a-test", 300), ("a-seed0", 200), ("a-seed1", 90)]:
        (tmp_path/"items"/name).mkdir(parents=True)
        (tmp_path/"items"/name/"f.bin").write_bytes(b"\0" * size)
        items.append((name, tmp_path/"items"/name, dict(file_names=["f.bin"], n=1)))
    packs = pack(items, budget=1000 + 4096, gpu=tmp_path)
    assert [list(p["items"]) for p in packs] == [["model", "a-test", "a-seed1"], ["a-seed0"]]   # first fit, in order
    for p in packs:
        assert sum(f.stat().st_size for f in (tmp_path/p["pack"]).rglob("*.bin")) <= 1000 + 4096
        assert json.loads((tmp_path/p["pack"]/"manifest.json").read_text())["items"].keys() == p["items"].keys()
    with pytest.raises(SystemExit): pack(items, budget=500, gpu=tmp_path)


def test_zero_filled_files_pick_the_same_images(shared, tmp_path):
    "`prepare_data` picks by seed from the labels and the length alone: zeros or any other pixels, the same images."
    from fclora.core import make_config
    from fclora.experiment import prepare_data
    d = json.loads((ROOT/"results/study3-vits-cifar10/design.json").read_text())["settings"]
    picks = []
    for fill in (0, 1):   # zeros (what the device rebuilds around the images it got) and other pixels in their place
        folder = tmp_path/str(fill)/"cifar10"
        folder.mkdir(parents=True)
        for s in ("train", "test"):
            y = np.load(shared/"data/cifar10"/f"{s}.npz")["y"]   # the real labels and length (np.load reads only y)
            x = np.zeros((len(y), 32, 32, 3), np.uint8) if fill == 0 else np.broadcast_to((np.arange(len(y)) % 251).astype(np.uint8)[:, None, None, None], (len(y), 32, 32, 3))
            np.savez(folder/f"{s}.npz", x=x, y=y)
        picks.append(prepare_data(make_config("paper", "cifar10", **dict(d, dataset=str(folder), seed=3))))
    for a, b in zip(*picks): assert len(a) and (a.index == b.index).all() and (a.y == b.y).all()
    assert [len(p) for p in picks[0]] == [1600, 400, 5000]
