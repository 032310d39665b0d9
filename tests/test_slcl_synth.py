"""dre_slcl.synth: synthetic slides are real pyramidal TIFFs that OpenSlide reads with mpp and objective power."""

import csv
import hashlib

import numpy as np
import pytest

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

from dre_slcl.synth import KIND_NAMES, make_slide, render_slide, KINDS  # noqa: E402


from slcl_helpers import data_root  # noqa: E402,F401  (session fixture)


def test_openslide_reads_levels_mpp_and_power(data_root):
    s = openslide.OpenSlide(str(data_root / "slides" / "carc40x.svs"))
    assert s.properties["openslide.vendor"] == "aperio"
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25)
    assert float(s.properties["openslide.objective-power"]) == 40
    assert s.dimensions == (3072, 2304)
    assert s.level_count >= 3  # every level is its own page, so OpenSlide sees all of them
    for k in range(1, s.level_count):
        assert s.level_downsamples[k] == pytest.approx(2.0 ** k, rel=1e-3)
    assert s.properties["openslide.level[0].tile-width"] == "256"
    with tifffile.TiffFile(str(data_root / "slides" / "carc40x.svs")) as t:
        assert len(t.pages) == s.level_count
        assert all(p.is_tiled and p.compression == 8 for p in t.pages)  # tiled, zlib (ADOBE_DEFLATE)
    s.close()


def test_slide_without_mpp_has_no_mpp_property(data_root):
    s = openslide.OpenSlide(str(data_root / "slides" / "nompp.svs"))
    assert "openslide.mpp-x" not in s.properties
    assert s.properties["openslide.objective-power"] == "20"
    s.close()
    s = openslide.OpenSlide(str(data_root / "slides" / "nothing.svs"))
    assert "openslide.mpp-x" not in s.properties and "openslide.objective-power" not in s.properties
    s.close()


def test_deterministic_given_seed(tmp_path):
    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    kw = dict(slide_id="d", kind="stroma", width=768, height=640, mpp=0.5)
    make_slide(tmp_path / "a.svs", seed=7, **kw)
    make_slide(tmp_path / "b.svs", seed=7, **kw)
    make_slide(tmp_path / "c.svs", seed=8, **kw)
    assert digest(tmp_path / "a.svs") == digest(tmp_path / "b.svs")
    assert digest(tmp_path / "a.svs") != digest(tmp_path / "c.svs")


def test_kinds_differ_in_colour_and_texture_and_margins_are_empty():
    means, stds = [], []
    for kind in KINDS:
        rgb, mask, info = render_slide(1024, 1024, kind, 0.5, seed=3)
        assert 0.05 < mask.mean() < 0.8 and info["fragments"] >= 1
        m = 32 if 0.06 * 1024 < 32 else int(0.06 * 1024)
        assert not mask[:m].any() and not mask[-m:].any() and not mask[:, :m].any() and not mask[:, -m:].any()
        assert (rgb[:m] == rgb[0, 0]).all()  # pen-free, debris-free margin: plain glass
        t = rgb[mask].astype(np.float64)
        means.append(t.mean(0))
        stds.append(t.std(0).mean())
    means = np.array(means)
    for i in range(len(KINDS)):
        for j in range(i + 1, len(KINDS)):
            assert np.abs(means[i] - means[j]).max() > 20, (KINDS[i].name, KINDS[j].name, means)
    assert min(stds) > 10  # textured, not flat colour


def test_blank_slide_has_no_tissue_but_debris():
    rgb, mask, info = render_slide(800, 600, None, 0.5, seed=1)
    assert not mask.any() and info["fragments"] == 0
    assert (rgb != rgb[0, 0]).any()  # a few specks of debris on the glass


def test_synth_cli_writes_slides_reports_and_embeddings(tmp_path):
    from dre_slcl.cli import main
    from dre_slcl.reports import load_report_embeddings, load_reports

    out = tmp_path / "ds"
    rc = main(["synth", str(out), "--slides", "4", "--blank", "1", "--width", "900", "--height", "700",
               "--seed", "3", "--no-progress", "--embedding-dim", "32"])
    assert rc == 0
    with open(out / "reports.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == ["synth_000", "synth_001", "synth_002", "synth_003", "synth_blank_000"]
    assert {"slide_id", "label", "kind", "report"} <= set(rows[0])
    words = {"carcinoma": "carcinoma", "lymphoid": "lympho", "stroma": "fibr"}
    for r in rows:
        assert (out / "slides" / f"{r['slide_id']}.svs").is_file()
        if r["kind"] == "blank":
            assert r["label"] == "-1" and "no tissue" in r["report"]
        else:
            assert KIND_NAMES[int(r["label"])] == r["kind"]  # labels index the kinds used
            assert words[r["kind"]] in r["report"].lower()  # the report text depends on the kind
    assert len({r["kind"] for r in rows if r["kind"] != "blank"}) == 3
    assert load_reports(out / "reports.csv")["synth_000"] == rows[0]["report"]
    ids, emb = load_report_embeddings(out / "report_embeddings.safetensors")
    assert ids == [r["slide_id"] for r in rows] and emb.shape == (5, 32)
    for r in csv.DictReader(open(out / "slides.csv")):
        assert int(r["file_bytes"]) > 10_000 and int(r["width"]) in range(810, 991)


def test_bad_arguments_are_named(tmp_path):
    from dre_slcl.cli import main

    with pytest.raises(ValueError, match="kind"):
        make_slide(tmp_path / "x.svs", slide_id="x", kind="sarcoma", width=512, height=512)
    with pytest.raises(ValueError, match="width"):
        make_slide(tmp_path / "x.svs", slide_id="x", kind="stroma", width=100, height=512)
    assert main(["synth", str(tmp_path / "o"), "--kinds", "carcinoma,nope", "--no-progress"]) == 2
    with pytest.raises(SystemExit):
        main(["synth", str(tmp_path / "o"), "--mpp", "-1"])
    assert not (tmp_path / "x.svs").exists()  # nothing half-written
