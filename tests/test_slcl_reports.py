"""dre_slcl.reports: report tables (CSV/JSONL), report embeddings (safetensors/.npy), optional text encoder."""

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

from dre_slcl.reports import (encode_reports, hashed_text_embeddings, load_report_embeddings,  # noqa: E402
                              load_report_labels, load_reports, save_report_embeddings, text_encoder_available)


def test_csv_and_jsonl(tmp_path):
    (tmp_path / "r.csv").write_text('slide_id,label,report\na,0,"Carcinoma, large nuclei."\nb,1,Lymphoid.\n')
    assert load_reports(tmp_path / "r.csv") == {"a": "Carcinoma, large nuclei.", "b": "Lymphoid."}
    assert load_report_labels(tmp_path / "r.csv") == {"a": 0, "b": 1}
    lines = [json.dumps({"slide_id": "a", "text": "one"}), "", json.dumps({"slide_id": 7, "report": "two"})]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    assert load_reports(tmp_path / "r.jsonl") == {"a": "one", "7": "two"}


def test_bad_tables_are_named(tmp_path):
    (tmp_path / "dup.csv").write_text("slide_id,report\na,x\na,y\n")
    with pytest.raises(ValueError, match="twice"):
        load_reports(tmp_path / "dup.csv")
    (tmp_path / "nocol.csv").write_text("slide_id,notes\na,x\n")
    with pytest.raises(ValueError, match="'report' or 'text'"):
        load_reports(tmp_path / "nocol.csv")
    (tmp_path / "bad.jsonl").write_text('{"slide_id": "a", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        load_reports(tmp_path / "bad.jsonl")
    (tmp_path / "r.xlsx").write_text("")
    with pytest.raises(ValueError, match="path"):
        load_reports(tmp_path / "r.xlsx")
    with pytest.raises(FileNotFoundError, match="path"):
        load_reports(tmp_path / "missing.csv")


@pytest.mark.parametrize("width", [1, 7, 768])
def test_safetensors_roundtrip_any_width(tmp_path, width):
    emb = torch.randn(3, width)
    save_report_embeddings(tmp_path / "e.safetensors", ["a", "b", "c"], emb)
    ids, got = load_report_embeddings(tmp_path / "e.safetensors")
    assert ids == ["a", "b", "c"] and torch.equal(got, emb)
    ids, got = load_report_embeddings(tmp_path / "e.safetensors", slide_ids=["c", "a"])
    assert ids == ["c", "a"] and torch.equal(got, emb[[2, 0]])
    with pytest.raises(KeyError, match="slide_ids"):
        load_report_embeddings(tmp_path / "e.safetensors", slide_ids=["zz"])


def test_safetensors_one_tensor_per_slide_and_half_precision(tmp_path):
    from safetensors.torch import save_file

    save_file({"s1": torch.ones(5, dtype=torch.float16), "s2": torch.zeros(5, dtype=torch.float16)},
              str(tmp_path / "p.safetensors"))
    ids, got = load_report_embeddings(tmp_path / "p.safetensors")
    assert sorted(ids) == ["s1", "s2"] and got.dtype == torch.float32 and got.shape == (2, 5)
    assert torch.equal(got[ids.index("s1")], torch.ones(5))


def test_npy_with_sidecar_or_ids(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "e.npy", arr)
    with pytest.raises(ValueError, match="slide ids"):
        load_report_embeddings(tmp_path / "e.npy")
    ids, got = load_report_embeddings(tmp_path / "e.npy", slide_ids=["x", "y", "z"])
    assert ids == ["x", "y", "z"] and np.array_equal(got.numpy(), arr)
    (tmp_path / "e.ids.txt").write_text("x\ny\nz\n")
    ids, got = load_report_embeddings(tmp_path / "e.npy", slide_ids=["z"])
    assert ids == ["z"] and np.array_equal(got.numpy(), arr[[2]])
    np.save(tmp_path / "bad.npy", np.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        load_report_embeddings(tmp_path / "bad.npy", slide_ids=["a", "b", "c"])
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):  # never unpickled
        load_report_embeddings(tmp_path / "obj.npy", slide_ids=["a"])


def test_hashed_embeddings_follow_the_wording():
    from dre_slcl.synth import KINDS, SPECIMEN

    texts = [k.reports[0] + " " + SPECIMEN[0].format(n=1, size="1.0") for k in KINDS]
    texts += [k.reports[1] + " " + SPECIMEN[1].format(n=2, size="2.5") for k in KINDS]
    e = hashed_text_embeddings(texts, dim=256)
    assert e.shape == (6, 256) and torch.allclose(e.norm(dim=1), torch.ones(6))
    assert torch.equal(e, hashed_text_embeddings(texts, dim=256))  # deterministic across calls
    sim = e @ e.T
    for k in range(3):
        same = sim[k, k + 3]
        other = max(sim[k, j + 3] for j in range(3) if j != k)
        assert same > other + 0.1  # reports about the same kind are closer


def test_text_encoder_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    with pytest.raises(RuntimeError, match="sentence-transformers is not installed"):
        encode_reports(["text"])
    assert isinstance(text_encoder_available(), bool)
