"""The minimal DRE-SLCL trainer: one process, or many through torchrun (DDP).

Each step, for B slides (split over ranks): encode `fresh_per_slide` tiles per slide with gradient, take the
slide's other tiles from the memory bank, residual-encode both, embed the slide, and train against the report
embeddings with the in-batch contrastive loss over the global batch (slide embeddings all-gathered with their
gradients); then write the fresh features back into the bank on every rank, so the banks stay identical.

Files in out_dir: checkpoint.pt (model, optimiser, scheduler, step, RNG, config), bank-<step>.safetensors (the
bank at that checkpoint), bank_init.safetensors (the resumable no-grad init pass), metrics.jsonl. All written
atomically; a killed run resumes from its last checkpoint and then takes exactly the steps an unbroken run takes:
the data order depends only on (seed, epoch, step) and every step reseeds its random draws from (seed, step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dre_kernels import contrastive_loss
from dre_slcl.atomic import atomic_path, write_text_atomic
from dre_slcl.config import TrainConfig
from dre_slcl.memory_bank import MemoryBank
from dre_slcl.model import DRESLCL

CHECKPOINT = "checkpoint.pt"
BANK_INIT = "bank_init.safetensors"
METRICS = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------- distributed
def init_distributed(device_type: str) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor whose first dimension differs across ranks (no gradient)."""
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All-gather equal-shaped tensors keeping the autograd graph (the contrastive loss over the global batch)."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t))


# ---------------------------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local)
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {name!r} asked for but no CUDA GPU is available")
    return dev


def amp_mode(cfg: TrainConfig, device: torch.device) -> str:
    """bf16, fp16 or off: `amp` with auto resolved (bf16 on GPU, off on CPU)."""
    if cfg.amp == "auto":
        return "bf16" if device.type == "cuda" else "off"
    return cfg.amp


# the dtype each AMP mode computes in (torch's name for it)
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "off": "float32"}


def autocast_context(cfg: TrainConfig, device: torch.device):
    mode = amp_mode(cfg, device)
    if mode == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, AMP_DTYPES[mode]))


def bank_dtype(cfg: TrainConfig, device: torch.device) -> str:
    """`bank_dtype` with auto resolved to the dtype the encoder computes in: bfloat16 (float16) under bf16 (fp16) AMP,
    float32 without. A bank of 16-bit rows is half the memory, and on GPU it takes the kernels' tensor-core paths,
    where float32 bank rows take the SIMT ones; under AMP the features it stores were 16-bit already."""
    if cfg.bank_dtype != "auto":
        return cfg.bank_dtype
    return AMP_DTYPES[amp_mode(cfg, device)]


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then cosine decay to min_lr_ratio at `steps`."""
    def f(step):
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def build_optimizer(model: DRESLCL, cfg: TrainConfig):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # matrices of layers decay; norms, biases, codewords, scales, embeddings and the logit scale do not
        (decay if p.ndim >= 2 and not name.startswith(("residual.", "head.token_embed")) else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def load_data(cfg: TrainConfig):
    from dre_slcl.data import TileDataset
    from dre_slcl.reports import load_report_embeddings

    ds = TileDataset.from_tile_dir(cfg.tile_dir, image_size=cfg.image_size, slide_dir=cfg.slide_dir)
    if ds.num_slides == 0:
        raise ValueError(f"tile_dir: {cfg.tile_dir} holds no slide with tiles")
    _, reports = load_report_embeddings(cfg.reports, ds.slide_ids)
    return ds, reports


def build_model(cfg: TrainConfig, out_dim: int) -> DRESLCL:
    return DRESLCL(encoder=cfg.encoder, image_size=cfg.image_size, weights=cfg.weights,
                   num_codewords=cfg.num_codewords, out_dim=out_dim, assignment=cfg.assignment,
                   learnable_codewords=cfg.learnable_codewords, layers=cfg.layers, heads=cfg.heads,
                   backend=cfg.backend)


def init_bank(model: DRESLCL, ds, cfg: TrainConfig, device, out: Path, rank: int, world: int) -> MemoryBank:
    """The no-grad encoder pass over every tile (rank 0, resumable), shared with the other ranks via the file."""
    path = out / BANK_INIT
    if rank == 0:
        bank = (MemoryBank.load(path, device=device) if path.is_file()
                else MemoryBank(ds.offsets, model.dim, dtype=bank_dtype(cfg, device), device=device,
                                slide_ids=ds.slide_ids))
        was_training = model.training
        model.eval()
        with autocast_context(cfg, device):
            bank.init_(model.encode_tiles, ds, batch_size=cfg.bank_init_batch_size, num_workers=cfg.num_workers,
                       progress=cfg.progress, checkpoint_path=path, device=device)
        model.train(was_training)
    if world > 1:
        dist.barrier()
    if rank != 0:
        bank = MemoryBank.load(path, device=device)
    return bank


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(out: Path, step: int, model, opt, sched, bank: MemoryBank, cfg: TrainConfig) -> None:
    """bank-<step>.safetensors first, then checkpoint.pt naming it; older banks are removed afterwards."""
    bank_file = f"bank-{step:08d}.safetensors"
    bank.save(out / bank_file)
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": _rng_state(), "bank_file": bank_file, "config": cfg.to_dict()}
    with atomic_path(out / CHECKPOINT) as tmp:
        torch.save(state, tmp)
    for old in out.glob("bank-*.safetensors"):
        if old.name != bank_file:
            old.unlink(missing_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """A killed run may have logged steps after its last checkpoint: drop them, they will be taken again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line
    write_text_atomic(path, "".join(x + "\n" for x in keep))


# ---------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary with the losses of the steps taken in this call."""
    cfg.validate()
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device.type)
    if cfg.slides_per_batch % world:
        raise ValueError(f"slides_per_batch: {cfg.slides_per_batch} must be divisible by the {world} ranks")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    ds, reports = load_data(cfg)
    model = build_model(cfg, reports.shape[1]).to(device)
    opt, sched = build_optimizer(model, cfg)
    ckpt_path = out / CHECKPOINT
    step = 0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        bank = MemoryBank.load(out / state["bank_file"], device=device)
        torch.set_rng_state(state["rng"]["torch"])
        if rank == 0:
            _truncate_metrics(out / METRICS, step)
    else:
        bank = init_bank(model, ds, cfg, device, out, rank, world)
        if rank == 0:
            model.residual.init_from_features_(bank.features, iters=cfg.kmeans_iters, seed=cfg.seed)
        if world > 1:
            for p in model.residual.parameters():
                dist.broadcast(p.data, 0)
    if bank.num_rows != len(ds) or bank.dim != model.dim:
        raise ValueError(f"out_dir: the bank in {out} ({bank.num_rows} x {bank.dim}) does not match the data set "
                         f"({len(ds)} tiles) and encoder (width {model.dim}); use a fresh out_dir")
    reports = reports.to(device)

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    from torch.utils.data import DataLoader

    from dre_slcl.data import SlideBatchSampler, collate_tiles

    local_b = cfg.slides_per_batch // world
    sampler = SlideBatchSampler(ds.offsets, local_b, cfg.fresh_per_slide, seed=cfg.seed, drop_last=True,
                                num_replicas=world, rank=rank)
    steps_per_epoch = len(sampler)
    if steps_per_epoch == 0:
        raise ValueError(f"slides_per_batch: {cfg.slides_per_batch} is more than the {ds.num_slides} slides with "
                         f"tiles (per rank: {local_b})")

    losses, t_run = [], time.perf_counter()
    stop_at = cfg.steps if cfg.max_steps_this_run is None else min(cfg.steps, step + cfg.max_steps_this_run)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not cfg.progress or rank != 0)
    metrics_file = open(out / METRICS, "a", encoding="utf-8") if rank == 0 else None
    try:
        while step < stop_at:
            epoch, skip = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, skip_batches=skip)
            loader = DataLoader(ds, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate_tiles,
                                pin_memory=device.type == "cuda")
            for batch in loader:
                t0 = time.perf_counter()
                loss = _train_step(net, model, batch, bank, reports, opt, sched, cfg, device, step, rank, world)
                step += 1
                losses.append(loss)
                dt = time.perf_counter() - t0
                tiles = batch["images"].shape[0] * world
                if metrics_file is not None and (step % cfg.log_every == 0 or step == stop_at):
                    rec = {"step": step, "epoch": epoch, "loss": loss, "lr": sched.get_last_lr()[0],
                           "logit_scale": float(model.logit_scale().detach()), "tiles_per_s": tiles / dt, "step_s": dt,
                           "time": time.time()}
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                bar.set_postfix(loss=f"{loss:.4f}", tiles_s=f"{tiles / dt:.1f}")
                bar.update(1)
                if step % cfg.ckpt_every == 0 or step == stop_at:
                    if rank == 0:
                        save_checkpoint(out, step, model, opt, sched, bank, cfg)
                    if world > 1:
                        dist.barrier()
                if step >= stop_at:
                    break
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return {"step": step, "losses": losses, "rank": rank, "world": world, "seconds": time.perf_counter() - t_run,
            "out_dir": str(out)}


def _train_step(net, model, batch, bank, reports, opt, sched, cfg, device, step, rank, world) -> float:
    # every random draw of a step comes from (seed, step, rank): resuming at a step replays it exactly
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
    torch.manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
    images = batch["images"].to(device, non_blocking=True)
    offsets, index, slides = batch["offsets"], batch["index"], batch["slides"]
    bank_index, bank_offsets = bank.sample_bank_rows(slides, index, offsets, max_rows=cfg.bank_rows_per_slide,
                                                     generator=gen)
    with autocast_context(cfg, device):
        z, fresh = net(images, offsets.to(device), bank.features, bank_index, bank_offsets)
    targets = reports[slides.to(device)]
    if world > 1:
        z = gather_with_grad(z.float().contiguous())
        targets = _all_gather_varlen(targets)
    loss = contrastive_loss(z.float(), targets, model.logit_scale(), normalize=True, backend=cfg.backend)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    fresh_index = index.to(device)
    fresh = fresh.detach().float()
    if world > 1:
        fresh_index = _all_gather_varlen(fresh_index)
        fresh = _all_gather_varlen(fresh)
    bank.update_(fresh_index, fresh, momentum=cfg.bank_momentum, backend=cfg.backend)
    return float(loss.detach())
