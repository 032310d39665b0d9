"""DRE-SLCL end to end: memory bank, model step on `reference` vs the default backend, exact resume, DDP on gloo,
loss going down, embed/eval, and clear errors for bad configs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dre_slcl.config import TrainConfig, load_config_file
from dre_slcl.memory_bank import MemoryBank

TINY_MODEL = dict(encoder="vit_tiny_patch16_224", image_size=32, num_codewords=4, layers=1, heads=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 small synthetic slides of two kinds, tiled at 0.5 um/px."""
    from dre_slcl.synth import synth_dataset
    from dre_slcl.tiling import tile_slides

    root = tmp_path_factory.mktemp("slcl_train")
    synth_dataset(root / "data", n_slides=6, width=1280, height=1024, mpp=0.5, kinds=("carcinoma", "lymphoid"),
                  seed=3, embedding_dim=32, progress=False)
    tile_slides([root / "data" / "slides"], root / "tiles", workers=0, progress=False)
    return root


def make_cfg(root: Path, out: str, **over) -> TrainConfig:
    cfg = dict(tile_dir=str(root / "tiles"), reports=str(root / "data" / "report_embeddings.safetensors"),
               out_dir=str(root / out), steps=4, slides_per_batch=4, fresh_per_slide=3, lr=1e-3, warmup_steps=1,
               ckpt_every=2, kmeans_iters=3, progress=False, bank_init_batch_size=16, **TINY_MODEL)
    cfg.update(over)
    return TrainConfig(**cfg).validate()


# ---------------------------------------------------------------------------------------------- memory bank
def test_bank_sampling_excludes_fresh_rows_and_caps():
    bank = MemoryBank([0, 5, 5, 12], 3)
    fresh = torch.tensor([1, 3, 7])
    idx, off = bank.sample_bank_rows([0, 2], fresh, [0, 2, 3])
    assert off.tolist() == [0, 3, 9]
    assert idx[:3].tolist() == [0, 2, 4] and idx[3:].tolist() == [5, 6, 8, 9, 10, 11]
    g = torch.Generator().manual_seed(0)
    idx, off = bank.sample_bank_rows([0, 2], fresh, [0, 2, 3], max_rows=2, generator=g)
    assert off.tolist() == [0, 2, 4]
    assert set(idx[:2].tolist()) <= {0, 2, 4} and set(idx[2:].tolist()) <= {5, 6, 8, 9, 10, 11}
    with pytest.raises(ValueError, match="fresh_index"):
        bank.sample_bank_rows([1], torch.tensor([0]), [0, 1])


def test_bank_update_save_load_roundtrip(tmp_path):
    bank = MemoryBank([0, 2, 6], 4, dtype="bfloat16", slide_ids=["a", "b"])
    vals = torch.randn(3, 4)
    bank.update_(torch.tensor([5, 1, 5]), vals)  # a duplicate keeps its first occurrence
    want = torch.nn.functional.normalize(vals[[0, 1]], dim=1)
    torch.testing.assert_close(bank.features[[5, 1]].float(), want, atol=1e-2, rtol=1e-2)
    assert bank.filled.tolist() == [False, True, False, False, False, True]
    bank.save(tmp_path / "bank.safetensors")
    back = MemoryBank.load(tmp_path / "bank.safetensors")
    assert back.dtype == torch.bfloat16 and back.slide_ids == ["a", "b"]
    assert torch.equal(back.features, bank.features) and torch.equal(back.filled, bank.filled)
    with pytest.raises(ValueError, match="dtype"):
        MemoryBank([0, 1], 2, dtype="int8")


def test_bank_init_is_resumable(dataset, tmp_path):
    from dre_slcl.data import TileDataset

    ds = TileDataset.from_tile_dir(dataset / "tiles", image_size=16)
    bank = MemoryBank(ds.offsets, 6)
    calls = []

    def encode(images):
        calls.append(images.shape[0])
        return torch.nn.functional.normalize(images.flatten(1)[:, :6].float() + 3.0, dim=1)

    bank.filled[: len(ds) // 2] = True  # as if a killed init had done the first half
    bank.init_(encode, ds, batch_size=4, progress=False, checkpoint_path=tmp_path / "b.safetensors")
    assert sum(calls) == len(ds) - len(ds) // 2
    assert bank.filled.all()
    assert MemoryBank.load(tmp_path / "b.safetensors").filled.all()


# ---------------------------------------------------------------------------------------------- model step
def test_training_step_reference_matches_default_backend(dataset):
    from dre_kernels import available_backends, contrastive_loss
    from dre_slcl.train import build_model, load_data

    cfg = make_cfg(dataset, "unused")
    ds, reports = load_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, reports.shape[1])
    bank = torch.nn.functional.normalize(torch.randn(len(ds), model.dim), dim=1).to(torch.bfloat16)
    model.residual.init_from_features_(bank.float(), iters=3)
    images = torch.stack([ds[i][0] for i in range(6)])
    fresh_offsets = torch.tensor([0, 2, 3, 6])
    bank_index = torch.tensor([7, 8, 9, 10, 11, 0, 1, 2])
    bank_offsets = torch.tensor([0, 3, 5, 8])
    targets = reports[:3]
    results = {}
    for backend in ["reference", "auto"]:
        model.backend = model.residual.backend = backend
        model.zero_grad()
        z, _ = model(images, fresh_offsets, bank, bank_index, bank_offsets)
        loss = contrastive_loss(z, targets, model.logit_scale(), normalize=True, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None})
    (l_ref, g_ref), (l_auto, g_auto) = results["reference"], results["auto"]
    assert "native" in available_backends("cpu") or "torch" in available_backends("cpu")
    torch.testing.assert_close(l_auto, l_ref, atol=1e-5, rtol=1e-5)
    assert set(g_ref) == set(g_auto) and "residual.codewords" in g_ref and "encoder.patch_embed.proj.weight" in g_ref
    for name in g_ref:
        torch.testing.assert_close(g_auto[name], g_ref[name], atol=1e-4, rtol=1e-3, msg=name)


# ---------------------------------------------------------------------------------------------- resume, loss
def test_killed_run_resumes_with_the_same_losses(dataset):
    from dre_slcl.train import train

    full = train(make_cfg(dataset, "full", steps=6))
    first = train(make_cfg(dataset, "resumed", steps=6, max_steps_this_run=3))  # stops as if killed after step 3
    assert first["step"] == 3 and (dataset / "resumed" / "checkpoint.pt").is_file()
    # a killed run may have logged a step past its checkpoint: it must be dropped and redone
    with open(dataset / "resumed" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    second = train(make_cfg(dataset, "resumed", steps=6))
    assert second["step"] == 6 and len(second["losses"]) == 3
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]), torch.tensor(full["losses"]),
                               atol=1e-6, rtol=1e-6)
    logged = [json.loads(x) for x in (dataset / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6] and all(r["loss"] != 123.0 for r in logged)
    assert len(list((dataset / "resumed").glob("bank-*.safetensors"))) == 1


def test_loss_falls_on_the_synthetic_set(dataset):
    from dre_slcl.train import train

    out = train(make_cfg(dataset, "falls", steps=24, lr=2e-3, warmup_steps=2, ckpt_every=24))
    losses = out["losses"]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses


def test_embed_and_eval(dataset):
    from dre_slcl.evaluate import embed_slides, evaluate
    from dre_slcl.reports import load_report_embeddings, load_report_labels
    from dre_slcl.train import train

    train(make_cfg(dataset, "embed", steps=2))
    ids, emb = embed_slides(dataset / "embed", progress=False)
    assert len(ids) == emb.shape[0] == 6 and emb.shape[1] == 32 and torch.isfinite(emb).all()
    metrics = evaluate(ids, emb, labels=load_report_labels(dataset / "data" / "reports.csv"),
                       reports=load_report_embeddings(dataset / "data" / "report_embeddings.safetensors"))
    for key in ("probe_accuracy", "probe_auc", "retrieval_top1", "retrieval_top5", "label_retrieval_top1"):
        assert 0.0 <= metrics[key] <= 1.0, key


def test_metrics_on_known_inputs():
    from dre_slcl.evaluate import auc_binary, linear_probe, retrieval

    assert auc_binary(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([True, True, False, False])) == 1.0
    assert auc_binary(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5
    assert auc_binary(torch.tensor([0.1, 0.9, 0.4]), torch.tensor([True, False, False])) == 0.0
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 6)
    emb = torch.randn(12, 5, generator=g) * 0.1 + torch.stack([torch.eye(5)[int(y)] for y in labels]) * 3
    m = linear_probe(emb, labels, folds=3)
    assert m["probe_accuracy"] == 1.0 and m["probe_auc"] == 1.0 and m["chance_accuracy"] == 0.5
    r = retrieval(torch.eye(4), torch.eye(4) + 0.01, labels=torch.tensor([0, 0, 1, 1]))
    assert r["retrieval_top1"] == 1.0 and r["label_retrieval_top1"] == 1.0


# ---------------------------------------------------------------------------------------------- DDP
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = r"""
import json, sys
from dre_slcl.config import TrainConfig
from dre_slcl.train import train
cfg = TrainConfig(**json.loads(sys.argv[1]))
out = train(cfg)
if out["rank"] == 0:
    open(sys.argv[2], "w").write(json.dumps(out["losses"]))
"""


def test_ddp_two_processes_on_gloo_match_one_process(dataset, tmp_path):
    """2 ranks x 2 slides give the same losses as 1 process x 4 slides (every tile of a slide fresh, all others
    from the bank, so no random draw differs)."""
    from dre_slcl.train import train

    common = dict(steps=3, slides_per_batch=4, fresh_per_slide=1000, ckpt_every=3)
    single = train(make_cfg(dataset, "ddp_single", **common))["losses"]
    cfg = make_cfg(dataset, "ddp_two", **common).to_dict()
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    port = _free_port()
    procs = []
    root = Path(__file__).resolve().parents[1]
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(root / "python"), str(root), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(cfg), str(tmp_path / "losses.json")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    ddp = json.loads((tmp_path / "losses.json").read_text())
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- bad input
def test_config_files_on_a_python_without_tomllib(tmp_path):
    """Python 3.10 (setup.py allows it) has no tomllib: the config module imports there, reads TOML through the
    tomli package (the slcl extra's dependency there) and, without it, JSON, with a clear error for TOML. Run in a
    subprocess whose tomllib is hidden; tomli is played by the real tomllib (on Python 3.10, by tomli)."""
    (tmp_path / "run.toml").write_text("steps = 7\n[train]\nsteps = 9\n")
    (tmp_path / "run.json").write_text('{"steps": 9}')
    code = (
        "import sys\n"
        "try:\n"
        "    import tomllib as parser\n"
        "except ModuleNotFoundError:\n"  # Python 3.10: the real tomli
        "    import tomli as parser\n"
        "sys.modules['tomli'] = parser if sys.argv[2] == 'tomli' else None\n"
        "sys.modules['tomllib'] = None\n"
        "from dre_slcl import config\n"
        "print(config.tomllib is not None)\n"
        "print(config.load_config_file(sys.argv[1] + '/run.json')['steps'])\n"
        "try:\n"
        "    print(config.load_config_file(sys.argv[1] + '/run.toml')['steps'])\n"
        "except ValueError as e:\n"
        "    print('ValueError', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"),
                                                         os.environ.get("PYTHONPATH", "")])}
    outs = {}
    for tomli in ("tomli", "none"):
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path), tomli], capture_output=True, text=True,
                           env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        outs[tomli] = r.stdout.strip().splitlines()
    assert outs["tomli"] == ["True", "9", "9"]
    assert outs["none"][:2] == ["False", "9"]
    assert outs["none"][2].startswith("ValueError CONFIG:") and "pip install tomli" in outs["none"][2]


def test_bad_configs_get_clear_errors(dataset, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('tile_dir = "x"\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match="learning_rate"):
        load_config_file(bad)
    bad.write_text('steps = "ten"\n')
    with pytest.raises(ValueError, match="steps"):
        load_config_file(bad)
    bad.write_text("steps = [\n")
    with pytest.raises(ValueError, match="TOML"):
        load_config_file(bad)
    with pytest.raises(FileNotFoundError, match="CONFIG"):
        load_config_file(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="tile_dir"):
        TrainConfig(reports="r", out_dir="o").validate()
    with pytest.raises(FileNotFoundError, match="reports"):
        make_cfg(dataset, "x", reports=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="assignment"):
        make_cfg(dataset, "x", assignment="fuzzy")
    with pytest.raises(ValueError, match="steps"):
        make_cfg(dataset, "x", steps=0)
    with pytest.raises(ValueError, match="encoder"):
        from dre_slcl.train import train

        train(make_cfg(dataset, "bad_encoder", encoder="no_such_model_xyz"))


def test_train_cli_reports_bad_config_and_relative_paths(dataset, tmp_path, capsys):
    from dre_slcl.cli import main

    cfg = tmp_path / "run.toml"
    cfg.write_text(f'tile_dir = "{dataset / "tiles"}"\nreports = "missing.safetensors"\nout_dir = "out"\n')
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "reports" in err and str(tmp_path / "missing.safetensors") in err  # resolved against the config's folder
    assert main(["train", str(cfg), "--steps", "0",
                 "--reports", str(dataset / "data" / "report_embeddings.safetensors")]) == 2
    assert "steps" in capsys.readouterr().err


def test_amp_bf16_autocast_trains(dataset):
    """amp='bf16' runs the encoder under autocast (on the CPU here; bf16 is the GPU default) and stays close to
    the float32 run; the default bank_dtype (auto) follows it: a bfloat16 bank under bf16, float32 without AMP."""
    from dre_slcl.train import train

    fp32 = train(make_cfg(dataset, "amp_off", steps=2, amp="off"))["losses"]
    bf16 = train(make_cfg(dataset, "amp_bf16", steps=2, amp="bf16"))["losses"]
    assert all(torch.isfinite(torch.tensor(bf16)))
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), atol=0.1, rtol=0.05)
    for out, want in (("amp_off", torch.float32), ("amp_bf16", torch.bfloat16)):
        (bank_file,) = (dataset / out).glob("bank-*.safetensors")
        assert MemoryBank.load(bank_file).dtype == want


def test_bank_dtype_auto_follows_amp(tmp_path):
    from dre_slcl.train import bank_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")  # (resolution only: nothing runs on the device)
    cfg = TrainConfig()
    assert cfg.bank_dtype == "auto"
    assert bank_dtype(cfg, cpu) == "float32" and bank_dtype(cfg, gpu) == "bfloat16"
    assert bank_dtype(TrainConfig(amp="fp16"), cpu) == "float16"
    assert bank_dtype(TrainConfig(amp="off"), gpu) == "float32"
    assert bank_dtype(TrainConfig(amp="bf16", bank_dtype="float32"), gpu) == "float32"  # as given
    bad = TrainConfig(tile_dir=str(tmp_path), reports=__file__, out_dir=str(tmp_path), bank_dtype="int8")
    with pytest.raises(ValueError, match="bank_dtype: expected auto, float32"):
        bad.validate()
