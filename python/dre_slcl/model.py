"""The DRE-SLCL model: timm tile encoder -> residual encoder over fresh + bank rows -> token Transformer -> projection.

    tile features  f_i = normalize(encoder(tile_i))                               (D, the bank's width)
    E_b            = residual_encode(fresh f of slide b, bank rows of slide b)    (K, D)
    tokens         = L2(intra-normalise(E_b)) * sqrt(K) + codeword embeddings     (K, D)   (VLAD normalisation)
    z_b            = Linear(LayerNorm(mean over tokens of Transformer(tokens)))   (P, the report embedding width)
    loss           = contrastive_loss(z, report embeddings, exp(log_scale), normalize=True)

Every hot op goes through dre_kernels with the model's `backend`, so the same model runs on `reference` to check.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dre_kernels import kmeans, residual_encode


def create_encoder(name: str = "vit_small_patch16_224", *, image_size: int = 256, weights: str | None = None):
    """A timm model without classifier head (num_classes=0), never downloaded: pretrained=False, then the local
    `weights` file (safetensors or a torch state dict) if given."""
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
    except TypeError:  # CNNs take any input size and have no img_size argument
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as e:
        raise ValueError(f"encoder: timm does not know the model {name!r} ({e})") from e
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights: {path} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if len(missing) == len(model.state_dict()):
            raise ValueError(f"encoder weights: {path} matches none of {name}'s parameters")
    return model


class ResidualEncoder(nn.Module):
    """K learnable (or fixed) codewords and smoothing factors; forward = dre_kernels.residual_encode."""

    def __init__(self, num_codewords: int, dim: int, *, assignment: str = "soft", learnable: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if assignment not in ("soft", "hard"):
            raise ValueError(f"assignment: expected 'soft' or 'hard'; got {assignment!r}")
        self.assignment, self.backend = assignment, backend
        self.codewords = nn.Parameter(0.1 * torch.randn(num_codewords, dim), requires_grad=learnable)
        self.scale = nn.Parameter(torch.ones(num_codewords), requires_grad=learnable and assignment == "soft")

    @torch.no_grad()
    def init_from_features_(self, features: torch.Tensor, *, iters: int = 20, seed: int = 0,
                            max_rows: int = 65536) -> None:
        """Codewords <- kmeans over (a seeded sample of) the rows; scale <- 1 / mean distance to the nearest one,
        so the soft assignment starts neither uniform nor one-hot."""
        X = features.float()
        if X.shape[0] > max_rows:
            g = torch.Generator().manual_seed(seed)
            X = X[torch.randperm(X.shape[0], generator=g)[:max_rows].to(X.device)]
        K = self.codewords.shape[0]
        if X.shape[0] < K:
            raise ValueError(f"features: need at least K = {K} rows to initialise the codewords; got {X.shape[0]}")
        c = kmeans(X, K, iters=iters, seed=seed, backend=self.backend).to(self.codewords.device)
        self.codewords.copy_(c.to(self.codewords.dtype))
        d = torch.cdist(X.to(c.device), c).pow(2).min(1).values.mean().clamp_min(1e-6)
        self.scale.fill_(float(1.0 / d))

    def forward(self, x, x_offsets, bank=None, bank_index=None, bank_offsets=None):
        return residual_encode(x, x_offsets, self.codewords, self.scale, bank=bank, bank_index=bank_index,
                               bank_offsets=bank_offsets, assignment=self.assignment, backend=self.backend)


class SlideHead(nn.Module):
    """VLAD normalisation, a small pre-norm Transformer over the K residual tokens, mean pool, projection to P."""

    def __init__(self, num_codewords: int, dim: int, out_dim: int, *, layers: int = 2, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: the feature width {dim} must be divisible by heads={heads}")
        self.token_embed = nn.Parameter(0.02 * torch.randn(num_codewords, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers > 0 else None
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, E):
        B, K, D = E.shape
        tokens = F.normalize(E.float(), dim=2)                                  # intra-normalisation
        tokens = F.normalize(tokens.flatten(1), dim=1).view(B, K, D) * math.sqrt(K)  # global L2, unit-scale tokens
        tokens = tokens + self.token_embed
        if self.transformer is not None:
            tokens = self.transformer(tokens)
        return self.proj(self.norm(tokens.mean(1)))


class DRESLCL(nn.Module):
    """Tile encoder + residual encoder + slide head + learnable logit scale."""

    def __init__(self, *, encoder: str = "vit_small_patch16_224", image_size: int = 256, weights: str | None = None,
                 num_codewords: int = 64, out_dim: int = 4096, assignment: str = "soft",
                 learnable_codewords: bool = True, layers: int = 2, heads: int = 4, backend: str = "auto",
                 init_logit_scale: float = 1 / 0.07):
        super().__init__()
        self.encoder = create_encoder(encoder, image_size=image_size, weights=weights)
        self.dim = int(self.encoder.num_features)
        self.backend = backend
        self.residual = ResidualEncoder(num_codewords, self.dim, assignment=assignment,
                                        learnable=learnable_codewords, backend=backend)
        self.head = SlideHead(num_codewords, self.dim, out_dim, layers=layers, heads=heads)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))

    def encode_tiles(self, images):
        """L2-normalised tile features (n, D), float32: what the memory bank stores."""
        return F.normalize(self.encoder(images).float(), dim=1)

    def slide_embeddings(self, fresh, fresh_offsets, bank=None, bank_index=None, bank_offsets=None):
        E = self.residual(fresh, fresh_offsets, bank, bank_index, bank_offsets)
        return self.head(E)

    def logit_scale(self):
        # clamp as CLIP does: a scale above 100 makes the loss unstable
        return self.log_logit_scale.exp().clamp(max=100.0)

    def forward(self, images, fresh_offsets, bank=None, bank_index=None, bank_offsets=None):
        """Slide embeddings (B, P) and the fresh tile features (n, D) (for the bank write-back)."""
        fresh = self.encode_tiles(images)
        return self.slide_embeddings(fresh, fresh_offsets, bank, bank_index, bank_offsets), fresh
