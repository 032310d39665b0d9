"""dre_slcl.data: tiles read lazily at the target mpp and size, DataLoader workers, per-slide batch sampler."""

import pickle

import numpy as np
import pytest
import torch

openslide = pytest.importorskip("openslide")
pytest.importorskip("h5py")

from dre_slcl.data import IMAGENET_MEAN, IMAGENET_STD, SlideBatchSampler, TileDataset, collate_tiles  # noqa: E402


from slcl_helpers import data_root, tile_dir  # noqa: E402,F401  (session fixtures)


@pytest.fixture(scope="session")
def ds(tile_dir):
    return TileDataset.from_tile_dir(tile_dir, normalize=False)


def test_index_layout(ds, tile_dir):
    import h5py

    assert "blank" not in ds.slide_ids  # no tiles: left out by default
    assert ds.slide_ids == sorted(ds.slide_ids)
    counts = []
    for sid in ds.slide_ids:
        with h5py.File(tile_dir / "patches" / f"{sid}.h5") as f:
            counts.append(f["coords"].shape[0])
    assert ds.offsets.tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
    assert len(ds) == sum(counts) and ds.offsets.dtype == torch.int64
    with_empty = TileDataset.from_tile_dir(tile_dir, include_empty=True)
    assert "blank" in with_empty.slide_ids and with_empty.num_slides == ds.num_slides + 1
    sub = TileDataset.from_tile_dir(tile_dir, slide_ids=["wide", "carc20x"])
    assert sub.slide_ids == ["wide", "carc20x"]
    with pytest.raises(KeyError, match="slide_ids"):
        TileDataset.from_tile_dir(tile_dir, slide_ids=["nope"])


def test_items_shape_dtype_and_normalisation(ds, tile_dir):
    img, i, s = ds[3]
    assert img.shape == (3, 256, 256) and img.dtype == torch.uint8 and i == 3 and s == 0
    norm = TileDataset.from_tile_dir(tile_dir)
    x, _, _ = norm[3]
    assert x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (img.float() / 255 - mean) / std)
    small = TileDataset.from_tile_dir(tile_dir, image_size=224)
    assert small[3][0].shape == (3, 224, 224)  # resized to the encoder's input size
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="image_size"):
        TileDataset.from_tile_dir(tile_dir, image_size=0)


@pytest.mark.parametrize("name", ["carc20x", "carc40x"])
def test_tiles_are_read_at_target_mpp(ds, data_root, name):
    """A tile equals the level-0 region of patch_size_level0 brought to 0.5 um/px (a 2x2 mean at 40x)."""
    s = ds.slide_ids.index(name)
    i = int(ds.offsets[s]) + 2
    x, y = ds.coords[i].tolist()
    tile = ds[i][0].permute(1, 2, 0).numpy().astype(np.float64)
    osr = openslide.OpenSlide(str(data_root / "slides" / f"{name}.svs"))
    p0 = ds.attrs[s]["patch_size_level0"]
    ref = np.asarray(osr.read_region((x, y), 0, (p0, p0)).convert("RGB"), dtype=np.float64)
    f = p0 // 256
    ref = ref.reshape(256, f, 256, f, 3).mean(axis=(1, 3))
    osr.close()
    assert p0 == {"carc20x": 256, "carc40x": 512}[name]
    assert np.abs(tile - ref).mean() < 1.0 and np.abs(tile - ref).max() <= 2  # pyramid rounding only


def test_two_kinds_separable_by_mean_colour(ds):
    def means(name):
        s = ds.slide_ids.index(name)
        idx = range(int(ds.offsets[s]), int(ds.offsets[s + 1]))
        out = []
        for i in idx:
            px = ds[i][0].permute(1, 2, 0).reshape(-1, 3).float()
            tissue = (px.max(1).values - px.min(1).values) > 15  # edge tiles are part glass: leave it out
            out.append(px[tissue].mean(0).numpy())
        return np.stack(out)

    carc, lymph = means("carc20x"), means("lymph20x")
    assert len(carc) >= 10 and len(lymph) >= 10
    # nearest class mean on per-tile mean RGB classifies every tile
    mc, ml = carc.mean(0), lymph.mean(0)
    d = lambda a, m: np.linalg.norm(a - m, axis=1)  # noqa: E731
    assert (d(carc, mc) < d(carc, ml)).all() and (d(lymph, ml) < d(lymph, mc)).all()
    assert np.linalg.norm(mc - ml) > 30  # carcinoma is pinker, lymphoid bluer and darker
    assert mc[0] - mc[2] > ml[0] - ml[2]


def test_pickles_without_handles_and_works_in_workers(ds, tile_dir):
    ds[0]  # opens a handle in this process
    assert len(ds._handles) >= 1
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._handles) == 0
    torch.testing.assert_close(clone[5][0], ds[5][0])
    idx = list(range(0, len(ds), max(1, len(ds) // 24)))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=8, num_workers=2)
    got = torch.cat([b[0] for b in loader])
    torch.testing.assert_close(got, torch.stack([ds[i][0] for i in idx]))


def test_handle_cache_is_bounded(tile_dir):
    ds = TileDataset.from_tile_dir(tile_dir, max_open=2)
    for s in range(ds.num_slides):
        ds[int(ds.offsets[s])]
    assert len(ds._handles) == 2
    ds.close()
    assert len(ds._handles) == 0


def test_unreadable_slide_raises_clear_error(tile_dir, tmp_path):
    ds = TileDataset.from_tile_dir(tile_dir, slide_ids=["carc20x"], slide_dir=tmp_path)  # slides "moved" away
    with pytest.raises(RuntimeError, match="carc20x"):
        ds[0]


# ------------------------------------------------------------------------------------------------- sampler


def test_sampler_groups_slides_and_subsets_tiles():
    offsets = torch.tensor([0, 10, 10, 13, 40, 41])  # slide 1 is empty
    sp = SlideBatchSampler(offsets, slides_per_batch=2, tiles_per_slide=5, seed=1)
    batches = list(sp)
    assert len(sp) == len(batches) == 2  # 4 non-empty slides, 2 per batch
    seen = []
    for b in batches:
        slides = np.searchsorted(offsets.numpy(), b, side="right") - 1
        groups = [g for g in np.split(np.array(b), np.nonzero(np.diff(slides))[0] + 1)]
        assert len(groups) == 2
        for g in groups:
            s = int(np.searchsorted(offsets.numpy(), g[0], side="right") - 1)
            seen.append(s)
            n = int(offsets[s + 1] - offsets[s])
            assert len(g) == min(5, n) and len(set(g.tolist())) == len(g) and (np.diff(g) > 0).all()
            assert ((g >= offsets[s].item()) & (g < offsets[s + 1].item())).all()
    assert sorted(seen) == [0, 2, 3, 4]
    assert [b for b in SlideBatchSampler(offsets, 2, 5, seed=1)] == batches  # deterministic
    sp.set_epoch(1)
    assert list(sp) != batches  # reshuffled each epoch


def test_sampler_resume_replacement_and_ddp():
    offsets = np.concatenate([[0], np.cumsum(np.arange(3, 14))])  # 11 slides
    sp = SlideBatchSampler(offsets, 3, 4, seed=5)
    sp.set_epoch(2)
    full = list(sp)
    sp.set_epoch(2, skip_batches=2)
    assert list(sp) == full[2:]  # exact resume mid-epoch
    rep = SlideBatchSampler(offsets, 2, 20, replacement=True)
    assert [len(b) for b in rep] == [40] * 5 + [20]  # 11 slides, the last batch holds one
    assert len(SlideBatchSampler(offsets, 3, 4, drop_last=True)) == 3
    ranks = [SlideBatchSampler(offsets, 2, 100, num_replicas=3, rank=r, seed=0) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # same number of steps on every rank
    firsts = [set(np.searchsorted(offsets, np.concatenate(list(r)), side="right") - 1) for r in ranks]
    assert set().union(*firsts) == set(range(11))  # together the ranks cover every slide
    with pytest.raises(ValueError, match="offsets"):
        SlideBatchSampler([1, 2], 1, 1)
    with pytest.raises(ValueError, match="slides_per_batch"):
        SlideBatchSampler(offsets, 0, 1)


def test_dataloader_with_sampler_and_collate(ds):
    sp = SlideBatchSampler(ds.offsets, slides_per_batch=2, tiles_per_slide=3, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sp, collate_fn=collate_tiles, num_workers=0)
    batch = next(iter(loader))
    assert batch["images"].shape == (6, 3, 256, 256)
    assert batch["offsets"].tolist() == [0, 3, 6] and len(batch["slides"]) == 2
    for b in range(2):
        rows = batch["slide"][batch["offsets"][b]:batch["offsets"][b + 1]]
        assert (rows == batch["slides"][b]).all()
        lo, hi = ds.offsets[batch["slides"][b]], ds.offsets[batch["slides"][b] + 1]
        assert ((batch["index"][batch["offsets"][b]:batch["offsets"][b + 1]] >= lo) &
                (batch["index"][batch["offsets"][b]:batch["offsets"][b + 1]] < hi)).all()
