"""saev.shards: Metadata, ShardWriter, Shards, ImageIndex, iter_images, reference saev 0.1 dirs."""

import json
import time

import factories
import numpy as np
import pytest
import torch

from saev.errors import UserError
from saev.shards import (
    LEGACY,
    PROTOCOL,
    ImageIndex,
    Metadata,
    Shards,
    ShardWriter,
    iter_images,
    read_status,
)


def make_md(**kw) -> Metadata:
    return factories.metadata(**{"data": {"kind": "demo", "root": "/imgs"}, **kw})


def acts_for(md: Metadata, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((md.n_imgs, *md.img_shape)).astype(np.float32)


def write(root, md, acts, batch=3, rows=True):
    with ShardWriter(root, md) as w:
        for i in range(0, md.n_imgs, batch):
            j = min(i + batch, md.n_imgs)
            r = (
                [{"path": f"img/{k}.png", "label": str(k % 3)} for k in range(i, j)]
                if rows
                else None
            )
            w.write(acts[i:j], rows=r)


def test_metadata_roundtrip_and_derived_sizes():
    md = make_md()
    assert Metadata.from_json(json.loads(json.dumps(md.to_json()))) == md
    assert md.protocol == PROTOCOL
    assert md.n_tokens_per_img == 5 and md.n_shards == 3 and md.patch_grid == (2, 2)
    assert [md.n_imgs_in(i) for i in range(3)] == [4, 4, 2]
    assert md.bytes_per_img == 2 * 5 * 8 * 4
    assert md.resolve_layer(-1) == 3


def test_metadata_rejects_bad_values():
    with pytest.raises(UserError, match="patch_grid"):
        make_md(patch_grid=(3, 3))
    with pytest.raises(UserError, match="dtype"):
        make_md(dtype="int8")
    bad = make_md().to_json() | {"colour": 1}
    with pytest.raises(UserError, match="unknown keys \\['colour'\\]"):
        Metadata.from_json(bad)


def test_write_then_read_every_value(tmp_path):
    md = make_md()
    acts = acts_for(md)
    write(tmp_path, md, acts)
    status = json.loads((tmp_path / "shards.json").read_text())
    assert [(s["n_imgs"], s["complete"]) for s in status["shards"]] == [
        (4, True),
        (4, True),
        (2, True),
    ]
    # The last shard holds only the remainder, no padding.
    assert (tmp_path / "acts000002.bin").stat().st_size == 2 * md.bytes_per_img
    shards = Shards(tmp_path)
    assert shards.n_imgs == 10 and shards.md == md
    for i in range(10):
        np.testing.assert_array_equal(shards.img_acts(i), acts[i])
    assert shards.acts(1).shape == (4, 2, 5, 8)
    assert shards.layer_pos(3) == 1 and shards.layer_pos(-2) == 0
    with pytest.raises(UserError, match=r"layer 1 was not recorded.*\[2, 3\]"):
        shards.layer_pos(1)
    assert shards.token_slice("cls") == slice(0, 1)
    assert shards.token_slice("patches") == slice(1, 5)
    idx, xs = zip(
        *iter_images(shards, -1, batch_size=3, tokens="patches", start=2, stop=9), strict=True
    )
    # Batches stop at shard boundaries: [2,3] [4,5,6] [7] [8].
    assert [len(i) for i in idx] == [2, 3, 1, 1]
    got = torch.cat(xs)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), acts[2:9, 1, 1:])
    assert torch.cat(idx).tolist() == list(range(2, 9))


def test_image_index(tmp_path):
    md = make_md()
    write(tmp_path, md, acts_for(md))
    index = Shards(tmp_path).images
    assert isinstance(index, ImageIndex)
    assert len(index) == 10 and index.columns == ["index", "path", "label"]
    assert index.label_names == ["label"]
    assert index.path(7) == "img/7.png"
    assert index.labels("label")[:4] == ["0", "1", "2", "0"]
    with pytest.raises(UserError, match="no label column 'age'"):
        index.labels("age")


def test_float16_and_torch_input(tmp_path):
    md = make_md(dtype="float16")
    acts = acts_for(md)
    with ShardWriter(tmp_path, md) as w:
        w.write(torch.from_numpy(acts))
    shards = Shards(tmp_path)
    assert shards.acts(0).dtype == np.float16
    np.testing.assert_array_equal(shards.img_acts(5), acts[5].astype(np.float16))
    assert not (tmp_path / "images.csv").exists()  # no rows given


def test_resume_after_crash_is_byte_identical(tmp_path):
    md = make_md()
    acts = acts_for(md)
    write(tmp_path / "ref", md, acts)

    root = tmp_path / "run"
    with pytest.raises(RuntimeError), ShardWriter(root, md) as w:
        w.write(acts[:6])  # shard 0 complete, shard 1 half written
        raise RuntimeError("killed")
    assert not (root / "acts000001.bin").exists()
    assert [s["complete"] for s in json.loads((root / "shards.json").read_text())["shards"]] == [
        True,
        False,
        False,
    ]
    with pytest.raises(UserError, match="recording incomplete, 2 of 3 shards"):
        Shards(root)
    w = ShardWriter(root, md)
    assert (w.start_img, w.stop_img) == (4, 10)
    w.write(acts[4:])
    w.close()
    for i in range(3):
        name = md.shard_file(i)
        assert (root / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert ShardWriter(root, md).done


def test_job_ranges_cover_everything(tmp_path):
    md = make_md(n_imgs=11, n_imgs_per_shard=2)  # 6 shards
    acts = acts_for(md)
    for shards in (range(0, 2), range(2, 4), range(4, 6)):
        w = ShardWriter(tmp_path, md, shards=shards)
        assert w.start_img == shards.start * 2
        w.write(acts[w.start_img : w.stop_img])
        w.close()
    s = Shards(tmp_path)
    np.testing.assert_array_equal(np.stack([s.img_acts(i) for i in range(11)]), acts)


def test_truncated_and_foreign_dirs(tmp_path):
    md = make_md()
    write(tmp_path, md, acts_for(md))
    with pytest.raises(UserError, match="already holds shards of a different recording \\(d_vit"):
        ShardWriter(tmp_path, make_md(d_vit=16))
    f = tmp_path / "acts000001.bin"
    f.write_bytes(f.read_bytes()[:-10])
    # shards.json says complete, but the size is wrong: never trusted.
    with pytest.raises(UserError, match="acts000001.bin"):
        Shards(tmp_path)
    with pytest.raises(UserError, match="shard directory does not exist"):
        Shards(tmp_path / "acts000000.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="metadata.json: no such file"):
        Shards(tmp_path / "empty")


def test_reference_saev_0_1_directory(tmp_path):
    # Reference layout: no protocol, n_patches_per_shard, CLS always stored, float32, every
    # shard full size (the last one padded), no shards.json, no image index.
    n_imgs, n_layers, n_patches, d = 7, 2, 4, 8
    per_shard = 3
    meta = {
        "vit_family": "clip",
        "vit_ckpt": "ViT-B-32/openai",
        "layers": [-2, -1],
        "n_patches_per_img": n_patches,
        "cls_token": True,
        "d_vit": d,
        "seed": 42,
        "n_imgs": n_imgs,
        "n_patches_per_shard": per_shard * n_layers * (n_patches + 1),
        "data": "ImageFolder(root='x')",
    }
    (tmp_path / "metadata.json").write_text(json.dumps(meta, indent=4))
    acts = (
        np.random.default_rng(0).standard_normal((9, n_layers, n_patches + 1, d)).astype(np.float32)
    )
    for s in range(3):
        acts[s * per_shard : (s + 1) * per_shard].tofile(tmp_path / f"acts{s:06d}.bin")
    shards = Shards(tmp_path)
    assert shards.md.protocol == LEGACY and shards.md.n_imgs_per_shard == 3
    assert shards.n_imgs == 7 and shards.md.n_shards == 3
    np.testing.assert_array_equal(shards.img_acts(6), acts[6])
    assert shards.acts(2).shape == (1, 2, 5, 8)
    assert shards.layer_pos(-1) == 1
    (_, x), *_ = iter_images(shards, -2, batch_size=8, tokens="cls")
    np.testing.assert_array_equal(x.numpy(), acts[:3, 0, :1])
    with pytest.raises(UserError, match="no image index"):
        shards.images  # noqa: B018
    (tmp_path / "acts000001.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="truncated"):
        Shards(tmp_path)


@pytest.mark.parametrize("cls_token", [True, False])
def test_later_reference_layout_counts_cls_slot_only_when_present(tmp_path, cls_token):
    # Later reference versions write `max_patches_per_shard` and size shards with
    # n_patches + int(cls_token) tokens per image (saev 0.1 always reserved the CLS slot).
    n_patches, n_layers, d, per_shard = 4, 1, 8, 3
    n_tok = n_patches + int(cls_token)
    meta = {
        "vit_family": "clip",
        "vit_ckpt": "ViT-B-32/openai",
        "layers": [-1],
        "n_patches_per_img": n_patches,
        "cls_token": cls_token,
        "d_vit": d,
        "seed": 0,
        "n_imgs": 6,
        "max_patches_per_shard": per_shard * n_layers * n_tok,
        "data": "x",
    }
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    acts = np.arange(6 * n_layers * n_tok * d, dtype=np.float32).reshape(6, n_layers, n_tok, d)
    for s in range(2):
        acts[s * per_shard : (s + 1) * per_shard].tofile(tmp_path / f"acts{s:06d}.bin")
    shards = Shards(tmp_path)
    assert shards.md.n_imgs_per_shard == per_shard
    np.testing.assert_array_equal(shards.img_acts(4), acts[4])


def snapshot(root) -> dict:
    """Every file under `root` (hidden ones too) with its bytes and modification time."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_second_writer_of_a_shard_range_is_refused(tmp_path):
    import os
    import socket

    md = make_md()
    acts = acts_for(md)
    w1 = ShardWriter(tmp_path, md)
    w1.write(acts[:6])  # shard 0 complete, shard 1 half written
    with pytest.raises(UserError) as err:
        ShardWriter(tmp_path, md)
    assert str(err.value) == (
        f"{tmp_path}: shards 0..2 are being written by another `saev activations` "
        f"(pid {os.getpid()} on host {socket.gethostname()}); wait for it to end or stop it, "
        "then re-run."
    )
    with pytest.raises(UserError, match="shards 0..2 are being written"):
        ShardWriter(tmp_path, md, shards=range(2, 3))  # overlaps
    w1.write(acts[6:])
    w1.close()
    # Closed: the lock is gone and the directory is as one writer left it.
    assert not list(tmp_path.glob(".writer.*"))
    np.testing.assert_array_equal(Shards(tmp_path).img_acts(7), acts[7])
    assert ShardWriter(tmp_path, md).done


def test_refused_writer_changes_nothing(tmp_path):
    md = make_md()
    w1 = ShardWriter(tmp_path, md, shards=range(0, 2))
    w1.write(acts_for(md)[:4])
    deadline = time.monotonic() + 30
    while not read_status(tmp_path, md)[0]:  # until the writer is idle, its shard done
        assert time.monotonic() < deadline
        time.sleep(0.01)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"shards 0..1 are being written .*\(pid \d+ on host "):
        ShardWriter(tmp_path, md)
    assert snapshot(tmp_path) == before
    w1.abort()


def test_job_parts_lock_only_their_own_range(tmp_path):
    md = make_md(n_imgs=11, n_imgs_per_shard=2)  # 6 shards
    acts = acts_for(md)
    parts = [ShardWriter(tmp_path, md, shards=r) for r in (range(0, 3), range(3, 6))]
    assert sorted(p.name for p in tmp_path.glob(".writer.*")) == [
        ".writer.000000-000003.lock",
        ".writer.000003-000006.lock",
    ]
    for w in reversed(parts):  # side by side, in any order
        w.write(acts[w.start_img : w.stop_img])
    for w in parts:
        w.close()
    np.testing.assert_array_equal(np.stack([Shards(tmp_path).img_acts(i) for i in range(11)]), acts)


def test_lock_of_a_killed_writer_is_taken_over(tmp_path):
    md = make_md()
    write(tmp_path, md, acts_for(md))
    # A kill -9 leaves the lock file, but the OS has dropped its lock with the process.
    stale = tmp_path / ".writer.000001-000002.lock"
    stale.write_text("pid 999999 on host elsewhere\n")
    w = ShardWriter(tmp_path, md)
    assert not stale.exists() and w.done
    w.close()
    assert not list(tmp_path.glob(".writer.*"))


def test_skip_notes_are_kept_per_shard_across_a_crash(tmp_path):
    from saev.shards import read_skipped

    md = make_md()
    acts = acts_for(md)
    before = [("notes.txt", "not an image file")]
    root = tmp_path / "run"
    with pytest.raises(RuntimeError), ShardWriter(root, md, skipped=before) as w:
        w.write(acts[:4], skipped=[(2, "img/2.png", "could not decode")])  # shard 0 done
        w.write(acts[4:6], skipped=[(5, "img/5.png", "could not decode")])  # shard 1 half
        raise RuntimeError("killed")
    # What a kill leaves: shard 0 and its note; shard 1's note went with the unfinished shard.
    assert read_skipped(root, md) == [("img/2.png", "could not decode")]
    (root / "skipped.txt").unlink()  # a hard kill may come before any rewrite of it
    w = ShardWriter(root, md, skipped=before)
    assert (root / "skipped.txt").read_text() == (
        "notes.txt\tnot an image file\nimg/2.png\tcould not decode\n"
    )
    w.write(acts[4:], skipped=[(5, "img/5.png", "could not decode")])
    w.close()
    assert (root / "skipped.txt").read_text().splitlines() == [
        "notes.txt\tnot an image file",
        "img/2.png\tcould not decode",
        "img/5.png\tcould not decode",
    ]
    status = json.loads((root / "shards.json").read_text())["shards"]
    assert [s.get("skipped") for s in status] == [
        [["img/2.png", "could not decode"]],
        [["img/5.png", "could not decode"]],
        None,
    ]
    with pytest.raises(ValueError, match="not in this batch"):
        ShardWriter(tmp_path / "other", md).write(acts[:2], skipped=[(3, "x", "y")])


def set_metadata(root, **changes):
    path = root / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"dtype": "float16"},
            "acts000000.bin: 1,280 bytes, but {root}/metadata.json says 4 images x 2 layers x "
            "5 tokens x d_vit 8 x float16 = 640 bytes; that is the size of float32 values, or "
            "of d_vit 16; the file is truncated, or metadata.json does not describe it.",
        ),
        (
            {"d_vit": 16},
            "acts000000.bin: 1,280 bytes, but {root}/metadata.json says 4 images x 2 layers x "
            "5 tokens x d_vit 16 x float32 = 2,560 bytes; that is the size of float16 values, "
            "or of d_vit 8; the file is truncated, or metadata.json does not describe it.",
        ),
        ({"dtype": "float64"}, "metadata.json: metadata dtype 'float64' is not one of float32"),
    ],
)
def test_metadata_that_disagrees_with_the_files_is_named(tmp_path, changes, message):
    md = make_md()
    write(tmp_path, md, acts_for(md))
    set_metadata(tmp_path, **changes)
    with pytest.raises(UserError) as err:
        Shards(tmp_path)
    assert message.format(root=tmp_path) in str(err.value)
    assert "incomplete" not in str(err.value)


def test_missing_or_foreign_shards_json_is_named(tmp_path):
    md = make_md()
    write(tmp_path, md, acts_for(md))
    status = tmp_path / "shards.json"
    status.unlink()
    with pytest.raises(UserError) as err:
        Shards(tmp_path)
    assert str(err.value) == (
        f"{status}: missing, but all 3 shard files that metadata.json names are present with "
        "the right sizes (copied without it?); copy shards.json from the original recording."
    )
    (tmp_path / "acts000002.bin").unlink()
    with pytest.raises(UserError, match="missing, and 1 of the 3 shard files .* acts000002.bin"):
        Shards(tmp_path)
    for f in tmp_path.glob("acts*.bin"):
        f.unlink()
    with pytest.raises(UserError, match="the recording never started"):
        Shards(tmp_path)
    # shards.json of another layout (5 shards of 2 images) next to this metadata.json.
    write(tmp_path, md, acts_for(md))
    entries = [{"file": md.shard_file(i), "n_imgs": 2, "complete": True} for i in range(5)]
    status.write_text(json.dumps({"protocol": PROTOCOL, "n_shards": 5, "shards": entries}))
    with pytest.raises(UserError) as err:
        Shards(tmp_path)
    assert str(err.value) == (
        f"{status}: lists 5 shards (10 images), but {tmp_path}/metadata.json says 3 shards of "
        "4 images (10 in all); acts000000.bin: 2 images there, 4 in metadata.json; the two "
        "files are from different recordings."
    )


def test_fingerprint_is_optional_in_metadata(tmp_path):
    md = make_md()
    assert "fingerprint" not in md.to_json()  # files written before it existed stay the same
    fp = {"n_files": 10, "files": "a" * 64, "labels": "b" * 64}
    with_fp = make_md(fingerprint=fp)
    assert Metadata.from_json(json.loads(json.dumps(with_fp.to_json()))) == with_fp
    write(tmp_path, with_fp, acts_for(md))
    assert Shards(tmp_path).md.fingerprint == fp
