"""Triton-specific cases: slides split across programs, padded K and D, K=256, the hard backward without a bank
pass, int32 offsets, several column tiles in the contrastive loss, strided banks. Under TRITON_INTERPRET=1 on CPU
(conftest sets it without a GPU) on tiny shapes; on CUDA when one is present."""

import pytest
import torch

import dre_kernels
from dre_kernels.contrastive_loss import contrastive_loss_reference
from dre_kernels.residual_encode import residual_encode_reference

from conftest import assert_close, make_offsets

DEVICES = [d for d in ("cpu", "cuda") if "triton" in dre_kernels.available_backends(d)]
pytestmark = pytest.mark.skipif(not DEVICES, reason="triton backend not available here")

if DEVICES:
    import triton
    import triton.language as tl

    from dre_kernels.triton_kernels import residual_encode as tre

    @triton.jit
    def _scaled_copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + i, 2.0 * tl.load(src_ptr + i, mask=i < n), mask=i < n)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _inputs(device, lens, blens, K, D, *, x_dtype=torch.float32, bank_dtype=torch.bfloat16, index_dtype=torch.int64,
            T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lens), D, generator=g).to(x_dtype).to(device)
    c = torch.randn(K, D, generator=g).to(device)
    s = (0.05 + 0.3 * torch.rand(K, generator=g)).to(device)
    bank = torch.randn(T, D, generator=g).to(bank_dtype).to(device)
    bi = torch.randint(0, T, (sum(blens),), generator=g).to(index_dtype).to(device)
    return (x, make_offsets(lens, index_dtype, device), c, s, bank, bi, make_offsets(blens, index_dtype, device))


def _check_fwd_bwd(args, hard, chunk_rows=None, dtype=torch.float32):
    x, xo, c, s, bank, bi, bo = args
    s = None if hard else s
    E, mass = tre.residual_encode_fwd(x, xo, c, s, bank, bi, bo, hard, chunk_rows=chunk_rows)
    xr = x.detach().float().requires_grad_()
    cr = c.detach().clone().requires_grad_()
    sr = None if hard else s.detach().clone().requires_grad_()
    Er, mr = residual_encode_reference(xr, xo, cr, sr, bank, bi, bo, hard)
    assert_close(E, Er, dtype)
    assert_close(mass, mr, torch.float32)
    G = torch.randn(Er.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    grads = torch.autograd.grad((Er * G).sum(), [xr, cr] + ([] if hard else [sr]))
    gx, gc, gs = tre.residual_encode_bwd(G, x, xo, c, s, bank, bi, bo, hard, True, True, True, chunk_rows=chunk_rows)
    assert_close(gx.float(), grads[0], dtype, msg="grad x")
    assert_close(gc, grads[1], torch.float32, msg="grad codewords")
    if not hard:
        assert_close(gs, grads[2], torch.float32, msg="grad scale")
    return E, mass


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_long_slide_split_across_programs(device, hard):
    args = _inputs(device, [150, 0, 9], [3, 130, 0], K=6, D=24)
    # 16-row chunks: the 150-row and 130-row slides span ~10 programs each, added atomically; the chunk of rows
    # 144..159 holds the end of slide 0 and all of slide 2 (slide 1 is empty), the bank's first chunk slides 0 and 1
    E_split, _ = _check_fwd_bwd(args, hard, chunk_rows=16)
    E_whole, _ = _check_fwd_bwd(args, hard, chunk_rows=4096)
    assert_close(E_split, E_whole)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_many_slides_per_chunk(device, hard):
    """Chunks that span many slides, empty ones among them, at the start, the end and in a row: each program walks
    its slide segments (a binary search for the first) and adds each into its own slide."""
    lens = [0, 1, 0, 0, 2, 1, 0, 3, 5, 0, 1, 1, 1, 0]
    blens = [2, 0, 0, 1, 1, 0, 4, 0, 0, 2, 1, 3, 0, 1]
    args = _inputs(device, lens, blens, K=5, D=12)
    for chunk in (1, 3, 4, 7):
        _check_fwd_bwd(args, hard, chunk_rows=chunk)


@pytest.fixture
def float16_dots(device, monkeypatch):
    """On CPU, float16 rows through the GPU's 16-bit dot mode (MODE 1): the hi/lo splits of the float32 operand and
    exact 16-bit products, which the interpreter otherwise replaces by float32 dots (_common.dot_mode)."""
    if device != "cpu":
        pytest.skip("on GPU every 16-bit launch takes MODE 1 anyway")
    from dre_kernels.triton_kernels import _common

    monkeypatch.setattr(_common, "INTERPRET_FLOAT16_DOTS", True)
    assert _common.dot_mode(torch.float16) == 1 and _common.dot_mode(torch.bfloat16) == 0


def _max_rel_err(got, want):
    return float((got.detach().double() - want.detach().double()).abs().max() / want.detach().double().abs().max())


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_float16_rows_in_the_16bit_dot_mode(device, float16_dots, hard):
    """residual_encode with float16 fresh rows and bank in MODE 1: a long slide split across programs, K and D
    not powers of two, several column tiles (D=150) and D slices, against the float32 reference on the same
    float16 rows. The splits keep ~22 bits of the float32 operand and the 16-bit products are exact, so E and the
    codeword and scale gradients must be float32-accurate (here ~1e-7; dropping the assignments' lo part: 3e-5)."""
    x, xo, c, s, bank, bi, bo = _inputs(device, [70, 0, 9], [3, 60, 1], K=7, D=150, x_dtype=torch.float16,
                                        bank_dtype=torch.float16)
    s = None if hard else s / 100  # soft: assignments spread over K (at the usual scales they are one-hot)
    E, mass = tre.residual_encode_fwd(x, xo, c, s, bank, bi, bo, hard, chunk_rows=16)
    xr, cr = x.float().requires_grad_(), c.clone().requires_grad_()
    sr = None if hard else s.clone().requires_grad_()
    Er, mr = residual_encode_reference(xr, xo, cr, sr, bank, bi, bo, hard)
    assert _max_rel_err(E, Er) < 1e-6 and _max_rel_err(mass, mr) < 1e-6
    G = torch.randn(Er.shape, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad((Er * G).sum(), [xr, cr] + ([] if hard else [sr]))
    gx, gc, gs = tre.residual_encode_bwd(G, x, xo, c, s, bank, bi, bo, hard, True, True, True, chunk_rows=16)
    assert_close(gx.float(), want[0], torch.float16, msg="grad x")
    assert _max_rel_err(gc, want[1]) < 1e-5, "grad codewords"
    if not hard:
        assert _max_rel_err(gs, want[2]) < 1e-5, "grad scale"


def test_soft_backward_in_the_16bit_dot_mode(device, float16_dots, monkeypatch):
    """The soft backward's products with G in MODE 1, which on a GPU only bfloat16 rows take (float16 rows take
    float32 dots there: gradients below float16's normal range would lose bits in float16 parts), run here with
    float16 rows and gradients of ordinary size: G split into hi + lo float16 parts for x G_b^T, h split for
    h^T x. The codeword and scale gradients must stay float32-accurate, and grad x to float16's rounding."""
    from dre_kernels.triton_kernels import _common

    monkeypatch.setattr(tre, "dot_mode_backward", lambda dtype, hard=False: _common.dot_mode(dtype))
    x, xo, c, s, bank, bi, bo = _inputs(device, [70, 0, 9], [3, 60, 1], K=7, D=150, x_dtype=torch.float16,
                                        bank_dtype=torch.float16)
    s = s / 100
    xr, cr, sr = x.float().requires_grad_(), c.clone().requires_grad_(), s.clone().requires_grad_()
    Er, _ = residual_encode_reference(xr, xo, cr, sr, bank, bi, bo, False)
    G = torch.randn(Er.shape, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad((Er * G).sum(), [xr, cr, sr])
    gx, gc, gs = tre.residual_encode_bwd(G, x, xo, c, s, bank, bi, bo, False, True, True, True, chunk_rows=16)
    assert_close(gx.float(), want[0], torch.float16, msg="grad x")
    assert _max_rel_err(gc, want[1]) < 1e-5, "grad codewords"
    assert _max_rel_err(gs, want[2]) < 1e-5, "grad scale"


@pytest.mark.parametrize("normalize", [False, True])
def test_float16_contrastive_in_the_16bit_dot_mode(device, float16_dots, normalize):
    """contrastive_loss with float16 a and b in MODE 1 (exact 16-bit products over BLOCK_P_BY_MODE[1] slices, W
    multiplied in float32), labels, partial tiles, against the float64 reference; and a saturated loss, whose
    exact gradient 0 needs the backward's logits to be the forward's to the bit in this mode too."""
    from dre_kernels.triton_kernels import contrastive_loss as tcl

    g = torch.Generator().manual_seed(7)
    a, b = (torch.randn(45, 70, generator=g).half() for _ in range(2))
    labels = torch.randint(0, 12, (45,), generator=g)
    s = torch.tensor(3.0)
    w = torch.rand(45, generator=g)
    assert tcl._mode(a, b) == 1
    loss, *saved = tcl.contrastive_loss_fwd(a, b, s, labels, normalize)
    a64, b64, s64 = (t.double().requires_grad_() for t in (a, b, s))
    want = contrastive_loss_reference(a64, b64, s64, labels, normalize)
    assert_close(loss, want, torch.float32, scale=10.0)
    got = tcl.contrastive_loss_bwd(w, a, b, s, labels, normalize, *saved)
    for name, x, y in zip("abs", got, torch.autograd.grad((want * w.double()).sum(), [a64, b64, s64])):
        assert_close(x, y, torch.float16 if name != "s" else torch.float32, scale=10.0, msg=f"grad {name}")
    # saturated (test_ops_contrastive_loss.test_saturated_loss_has_exactly_zero_gradient's case): every logit 200
    # or more below its row's and column's own, so the loss and its gradient are exactly 0
    a = (3.0 * torch.randn(70, 33, generator=g)).half()
    b = (a.float() + 0.1 * torch.randn(70, 33, generator=g)).half()
    s = torch.tensor(3000.0 if normalize else 30.0)
    loss, *saved = tcl.contrastive_loss_fwd(a, b, s, None, normalize)
    assert torch.equal(loss, torch.zeros_like(loss))
    for x in tcl.contrastive_loss_bwd(w[:1].expand(70), a, b, s, None, normalize, *saved)[:2]:
        assert torch.equal(x, torch.zeros_like(x))


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_k_and_d_not_powers_of_two_mixed_dtypes(device, hard):
    args = _inputs(device, [7, 20], [11, 0], K=5, D=37, x_dtype=torch.float16, bank_dtype=torch.bfloat16)
    _check_fwd_bwd(args, hard, dtype=torch.float16)


def test_k_256(device):
    _check_fwd_bwd(_inputs(device, [9, 4], [6, 3], K=256, D=20), hard=False)
    _check_fwd_bwd(_inputs(device, [9, 4], [6, 3], K=256, D=20), hard=True)


def test_d_4096_tiles_over_d(device):
    _check_fwd_bwd(_inputs(device, [5, 3], [4, 2], K=3, D=4096, bank_dtype=torch.float32), hard=False)


@pytest.mark.parametrize("n_dt", [1, 2, 3, 4])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_several_column_tiles_per_program(device, hard, n_dt, monkeypatch):
    """N_DT column tiles per program (the distances once for all of them) in the forward and in the backward's
    passes that only sum (soft, no grad x: here the bank rows'): D=70 in 16-wide tiles is 5 tiles, so N_DT = 2, 3, 4
    leave idle tiles (past D) in the last program, which must add nothing; 8-row chunks split the slides across
    programs."""
    real_launch = tre.launch
    wide_launches = []

    def launch_with(kernel, tuned, grid, args, interp_meta, **options):
        named = dict(zip(kernel.arg_names, args))
        if kernel is tre._re_fwd_kernel:
            wide = tre._fwd_takes_sm90_configs(named.get)
        elif kernel is tre._re_bwd_kernel:
            wide = tre._bwd_takes_sm90_configs(named.get)
        else:
            return real_launch(kernel, tuned, grid, args, interp_meta, **options)
        # the plain and (where the launch may take it) the flattened loop, N_DT apart
        meta = dict(BLOCK_M=16, BLOCK_D=32, BLOCK_DO=16, N_DT=n_dt if wide else 1,
                    FLATTEN=n_dt % 2 == 0 and interp_meta["FLATTEN"])
        wide_launches.append((kernel.__name__, wide))
        kernel[grid(meta) if callable(grid) else grid](*args, **meta, **options)

    monkeypatch.setattr(tre, "launch", launch_with)
    args = _inputs(device, [13, 0, 6], [9, 20, 1], K=5, D=70)
    _check_fwd_bwd(args, hard, chunk_rows=8)
    assert ("_re_bwd_kernel", True) in wide_launches or hard
    assert ("_re_fwd_kernel", True) in wide_launches


def test_sm90_configs_pruned_by_columns_and_device(monkeypatch):
    """N_DT > 1 configs are tried where no column tile of theirs is idle (D=384: 64 x 3 and 128 x 3; D=33 none), for
    16-bit rows on sm_90 (a CPU tensor stands for any target), and never for the argmin-only launch; configs with
    deep pipelines (num_stages > DEEP_STAGES) for 16-bit rows on sm_90 only; the one-warpgroup ones
    (_SM90_WARPGROUP) for rows of any dtype on sm_90, in the same launches; none of them before triton 3.3."""
    monkeypatch.setattr(tre, "TRITON_VERSION", (3, 9))  # the rules on every stack, the floor's too
    prune = tre._fwd_tuned.kwargs["prune_configs_by"]["early_config_prune"]
    configs = tre._fwd_tuned.configs
    rows = torch.zeros(1, 1)

    def kept_configs(D, with_e=True, hard=False, k_pad=64, mode=1):
        kept = prune(configs, {"rows_ptr": rows, "D": D, "WITH_E": with_e, "HARD": hard, "K_PAD": k_pad,
                               "MODE": mode})
        assert kept
        return kept

    def wide(*args, **kwargs):
        return {(c.kwargs["BLOCK_DO"], c.kwargs["N_DT"]) for c in kept_configs(*args, **kwargs) if c.kwargs["N_DT"] > 1}

    def deep(*args, **kwargs):
        return {c.kwargs["BLOCK_D"] for c in kept_configs(*args, **kwargs) if c.num_stages > tre.DEEP_STAGES}

    assert deep(384) == {32, 64} and deep(384, hard=True) == {tre.HARD_BLOCK_D}
    assert deep(384, with_e=False) == set() and deep(384, mode=0) == set()

    assert wide(384) == {(64, 3), (128, 3)}
    assert wide(384, hard=True) == {(64, 3), (128, 3)}
    assert wide(192) == {(64, 3)}
    assert wide(33) == set() and wide(384, with_e=False) == set() and wide(384, k_pad=128) == set()
    assert wide(384, mode=0) == set()
    for c in configs:
        if c.kwargs["N_DT"] > 1:
            assert tre._idle_tiles(c, 384) == 0 and tre._idle_tiles(c, 100) > 0
    # the backward: only its soft passes that only sum (no grad x)
    bprune = tre._bwd_tuned.kwargs["prune_configs_by"]["early_config_prune"]

    def bwide(write_gx, hard=False, mode=1):
        kept = bprune(tre._bwd_tuned.configs, {"rows_ptr": rows, "D": 384, "WRITE_GX": write_gx, "HARD": hard,
                                               "K_PAD": 64, "MODE": mode, "NEED_C": True})
        assert kept
        return {(c.kwargs["BLOCK_DO"], c.kwargs["N_DT"]) for c in kept if c.kwargs["N_DT"] > 1}

    def bdeep(write_gx, mode=1):
        kept = bprune(tre._bwd_tuned.configs, {"rows_ptr": rows, "D": 384, "WRITE_GX": write_gx, "HARD": False,
                                               "K_PAD": 64, "MODE": mode, "NEED_C": True})
        return [c for c in kept if c.num_stages > tre.DEEP_STAGES]

    assert bwide(False) == {(64, 3)}
    assert bwide(True) == set() and bwide(False, hard=True) == set() and bwide(False, mode=0) == set()
    assert bdeep(False) and not bdeep(True) and not bdeep(False, mode=0)
    # one warpgroup (4 warps, 16-row blocks): rows of any dtype, in the same launches

    def warpgroup(kept):
        return {tre._config_tuple(c) for c in kept} & tre._SM90_WARPGROUP

    def bkept(write_gx, hard=False, mode=1):
        return bprune(tre._bwd_tuned.configs, {"rows_ptr": rows, "D": 384, "WRITE_GX": write_gx, "HARD": hard,
                                               "K_PAD": 64, "MODE": mode, "NEED_C": True})

    fwd_wg = {(16, 32, 64, 1, 4, 2)}
    for mode in (0, 1):
        assert warpgroup(kept_configs(384, mode=mode)) == fwd_wg
        assert warpgroup(kept_configs(384, hard=True, mode=mode)) == fwd_wg
        assert warpgroup(bkept(False, mode=mode)) == {(16, 32, 32, 1, 4, 2)}
        assert not warpgroup(kept_configs(384, with_e=False, mode=mode)) and not warpgroup(bkept(True, mode=mode))
    assert not warpgroup(kept_configs(384, k_pad=128))
    monkeypatch.setattr(tre, "_on_sm90", lambda rows: False)  # an sm_80 device
    assert wide(384) == set() and bwide(False) == set()
    assert deep(384) == set() and deep(384, hard=True) == set() and not bdeep(False)
    assert not warpgroup(kept_configs(384, mode=0)) and not warpgroup(bkept(False, mode=0))
    monkeypatch.setattr(tre, "_on_sm90", lambda rows: True)
    assert wide(384) and deep(384) and warpgroup(kept_configs(384, mode=0))
    monkeypatch.setattr(tre, "TRITON_VERSION", (3, 2))  # triton 3.2 converts layouts and spills in them
    for mode in (0, 1):
        for kept in (kept_configs(384, mode=mode), kept_configs(384, hard=True, mode=mode), bkept(False, mode=mode)):
            assert not [c for c in kept if tre.sm90_only(c)]


def test_configs_triton_3_3_cannot_compile_are_pruned(monkeypatch):
    """Triton 3.3 fails to compile 64-row, one-stage configs for 16-bit rows on sm_90 (refused_by_compiler): they are
    pruned there, for those rows and that device only, and kept with other versions."""
    rows = torch.zeros(1, 1)
    prune = tre._fwd_tuned.kwargs["prune_configs_by"]["early_config_prune"]

    def refused(mode, version, sm90=True):
        monkeypatch.setattr(tre, "TRITON_VERSION", version)
        monkeypatch.setattr(tre, "_on_sm90", lambda r: sm90)
        kept = {tre._config_tuple(c) for c in prune(tre._fwd_tuned.configs, {"rows_ptr": rows, "D": 384,
                                                                              "K_PAD": 64, "MODE": mode})}
        return {t for t in kept if t[0] == 64 and t[-1] == 1}

    assert refused(1, (3, 4)) and refused(0, (3, 3)) and refused(1, (3, 3), sm90=False)
    assert refused(1, (3, 3)) == set()


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_argmin_only_launch_tunes_no_column_tile_variants(hard):
    """The argmin-only forward (no E: the hard backward's bank rows) runs one program per chunk whatever BLOCK_DO and
    N_DT are, so its pruning keeps one config per (BLOCK_M, BLOCK_D, warps, stages): each other would be compiled
    and timed for nothing (a flattened twin, see _as_configs, is a launch of its own). The launch with E keeps its
    column-tile variants."""
    prune = tre._fwd_tuned.kwargs["prune_configs_by"]["early_config_prune"]

    def kept(with_e):
        return prune(tre._fwd_tuned.configs, {
            "rows_ptr": torch.zeros(1, 1), "D": 384, "WITH_E": with_e, "HARD": hard, "K_PAD": 64, "MODE": 1})

    def launch_shape(c):
        t = tre._config_tuple(c)
        return t[:2] + t[4:] + (c.kwargs["FLATTEN"],)

    argmin_only, with_e = kept(False), kept(True)
    assert len({launch_shape(c) for c in argmin_only}) == len(argmin_only)
    assert {launch_shape(c) for c in argmin_only} == {launch_shape(c) for c in with_e if not tre.sm90_only(c)}
    assert len({launch_shape(c) for c in with_e}) < len(with_e)
    assert any(c.kwargs["FLATTEN"] for c in argmin_only)
    # the default config (autotuning off, see _common.default_config) unchanged
    assert tre._config_tuple(argmin_only[0]) == tre._config_tuple(with_e[0])


def test_int32_offsets_and_index(device):
    a32 = _inputs(device, [5, 0, 12], [4, 9, 1], K=4, D=19, index_dtype=torch.int32)
    a64 = _inputs(device, [5, 0, 12], [4, 9, 1], K=4, D=19, index_dtype=torch.int64)
    for hard in (False, True):
        E32, m32 = _check_fwd_bwd(a32, hard, chunk_rows=4)
        E64, m64 = _check_fwd_bwd(a64, hard, chunk_rows=4)
        assert_close(E32, E64)
        assert torch.equal(m32, m64)


def test_hard_backward_needs_no_bank_rows_given_mass(device):
    x, xo, c, s, bank, bi, bo = _inputs(device, [6, 4], [30, 12], K=5, D=16)
    E, mass = tre.residual_encode_fwd(x, xo, c, None, bank, bi, bo, True)
    G = torch.randn(E.shape, generator=torch.Generator().manual_seed(3)).to(device)
    want = tre.residual_encode_bwd(G, x, xo, c, None, bank, bi, bo, True, True, True, False)
    # With the forward's mass the bank rows are never read: a NaN bank changes nothing.
    nan_bank = torch.full_like(bank, float("nan"))
    got = tre.residual_encode_bwd(G, x, xo, c, None, nan_bank, bi, bo, True, True, True, False, mass=mass)
    for u, v in zip(got, want):
        assert torch.isfinite(u).all()
        assert_close(u, v)
    # and grad codewords is -sum_b mass_bk G_bk, independent of which bank rows produced the mass
    assert_close(got[1], -torch.einsum("bk,bkd->kd", mass, G))


@pytest.mark.parametrize("labels", [None, "groups"])
@pytest.mark.parametrize("normalize", [False, True])
def test_contrastive_several_column_tiles(device, labels, normalize):
    B, P = 75, 40  # 3 row and 3 column tiles of 32 under the interpreter, P padded to 64
    g = torch.Generator().manual_seed(5)
    a = torch.randn(B, P, generator=g).to(device).requires_grad_()
    b = torch.randn(B, P, generator=g).to(device).requires_grad_()
    s = torch.tensor(3.0 if not normalize else 30.0, device=device, requires_grad=True)
    lab = None if labels is None else torch.randint(0, 9, (B,), generator=g).to(device)
    scale = 0.2 if not normalize else 1.0
    loss = dre_kernels.contrastive_loss(a * scale, b * scale, s, labels=lab, normalize=normalize,
                                        reduction="none", backend="triton")
    want = contrastive_loss_reference(a * scale, b * scale, s, lab, normalize)
    assert_close(loss, want)
    w = torch.randn(B, generator=g).to(device)
    for u, v in zip(torch.autograd.grad((loss * w).sum(), [a, b, s]), torch.autograd.grad((want * w).sum(), [a, b, s])):
        assert_close(u, v)


def test_contrastive_far_below_column_bound(device):
    """Normalised, s = 100, nearly orthogonal embeddings: every logit sits far below the bound |s|, where a float32
    rescale would underflow; the float64 column accumulator keeps the column log-sum-exp exact."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(40, 64, generator=g).to(device)
    b = torch.randn(40, 64, generator=g).to(device)
    b = b - (b @ a.t() @ torch.linalg.pinv(a.t()))  # b orthogonal to span(a): all logits ~0, bound 100
    loss = dre_kernels.contrastive_loss(a, b, 100.0, normalize=True, reduction="none", backend="triton")
    assert torch.isfinite(loss).all()
    assert_close(loss, contrastive_loss_reference(a, b, torch.tensor(100.0, device=device), None, True))


def test_bank_ops_on_strided_bank_int32(device):
    g = torch.Generator().manual_seed(2)
    storage = torch.randn(30, 2 * 33, generator=g).to(torch.bfloat16).to(device)
    bank = storage[:, ::2]  # non-contiguous rows and columns: updated in place through its strides
    ref = bank.clone()
    odd = storage[:, 1::2].clone()
    idx = torch.tensor([4, 0, 29, 7], dtype=torch.int32, device=device)
    vals = torch.randn(4, 33, generator=g).to(device)
    assert torch.equal(dre_kernels.bank_gather(bank, idx, backend="triton"), bank[idx.long()])
    dre_kernels.bank_update_(bank, idx, vals, momentum=0.3, normalize=True, backend="triton")
    dre_kernels.bank_update_(ref, idx, vals, momentum=0.3, normalize=True, backend="reference")
    assert_close(bank, ref)
    assert torch.equal(storage[:, 1::2], odd)  # the interleaved columns outside the view are untouched


def test_interpreter_launches_pass_only_the_kernels_own_arguments(device, monkeypatch):
    """Every launch names only its kernel's parameters and compile options. triton >= 3.3's interpreter drops other
    keywords silently; triton 3.2's (the oldest that torch 2.6 pins) raises TypeError for them, as the compiled
    path of any Triton does: a stray BLOCK_PO once broke every contrastive_loss call there."""
    if device != "cpu":
        pytest.skip("checks the interpreter's launches")
    from triton.runtime import interpreter

    options = {"num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "grid", "maxnreg", "warmup"}
    launched, stray = set(), []
    run = interpreter.GridExecutor.__call__

    def checked(self, *args, **kwargs):
        params = set(self.arg_names)
        launched.add(self.fn.__name__)
        stray.extend(f"{self.fn.__name__}({k}=)" for k in kwargs if k not in params | options)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", checked)
    g = torch.Generator().manual_seed(3)
    for hard in (False, True):
        x, xo, c, s, bank, bi, bo = _inputs(device, [5, 0, 3], [4, 2, 0], 5, 7, seed=3)
        x.requires_grad_()
        c.requires_grad_()
        E = dre_kernels.residual_encode(x, xo, c, None if hard else s.requires_grad_(), bank=bank, bank_index=bi,
                                        bank_offsets=bo, assignment="hard" if hard else "soft", backend="triton")
        E.sum().backward()
    a = torch.randn(6, 5, generator=g, requires_grad=True)
    b = torch.randn(6, 5, generator=g, requires_grad=True)
    dre_kernels.contrastive_loss(a, b, 2.0, normalize=True, backend="triton").backward()
    bank = torch.randn(9, 7, generator=g)
    idx = torch.tensor([1, 8])
    dre_kernels.bank_gather(bank, idx, backend="triton")
    dre_kernels.bank_update_(bank, idx, torch.randn(2, 7, generator=g), momentum=0.5, backend="triton")
    assert not stray, stray
    assert {"_re_fwd_kernel", "_re_bwd_kernel", "_cl_fwd_kernel", "_cl_finish_kernel", "_cl_bwd_kernel",
            "_cl_norms_kernel", "_cl_normalize_bwd_kernel", "_gather_kernel", "_update_kernel"} <= launched, launched


def test_first_call_autotuning_keeps_what_earlier_launches_added(device, monkeypatch):
    """On GPU the first call of each shape autotunes: the autotuner runs every config on the real buffers, then the
    chosen one. The residual_encode fresh-row and bank-row launches add into the same E and mass, and the
    contrastive backward's two calls share a grad-scale buffer sized for the narrowest row block: an autotuner that
    zeroed them (reset_to_zero) lost the fresh rows, one that left the benchmark runs' sums behind doubled them (both
    seen on an H100 at the first call only). Here Triton's own autotuner runs the kernels under the interpreter, with
    the library's restore/reset settings, two configs per launch and a timer that runs each twice."""
    if device != "cpu":
        pytest.skip("the GPU runs the real autotuner at every first call")
    from dre_kernels.triton_kernels._common import TRITON_VERSION
    if TRITON_VERSION < (3, 3):
        pytest.skip("triton < 3.3 builds an autotuner only where a GPU driver is active")
    import itertools

    from dre_kernels.triton_kernels import contrastive_loss as tcl

    order = itertools.count()

    def bench(kernel_call, quantiles):
        kernel_call()
        kernel_call()
        return [100.0 - next(order)] * len(quantiles)  # the config benchmarked last wins

    def autotuned_launch(kernel, tuned, grid, args, interp_meta, **options):
        # a narrower row block first, then a wider one (BLOCK_I >= 32: the grad-scale buffer's row blocks)
        first, second = dict(interp_meta), dict(interp_meta)
        if "BLOCK_M" in first:
            first["BLOCK_M"] //= 2
        if "BLOCK_I" in second:
            second["BLOCK_I"] *= 2
        settings = {k: tuned.kwargs[k] for k in ("reset_to_zero", "restore_value") if k in tuned.kwargs}
        at = triton.autotune([triton.Config(first), triton.Config(second)], key=tuned.kwargs["key"],
                             do_bench=bench, **settings)(kernel)
        at[grid](*args, **options)

    monkeypatch.setattr(tre, "launch", autotuned_launch)
    monkeypatch.setattr(tcl, "launch", autotuned_launch)
    for hard in (False, True):
        _check_fwd_bwd(_inputs(device, [7, 0, 3], [5, 4, 0], K=5, D=7, seed=5), hard)
    g = torch.Generator().manual_seed(6)
    B = 80  # three row blocks of 32 (the config benchmarked first), two of 64 (the one chosen)
    a = torch.randn(B, 9, generator=g, dtype=torch.float64).float().requires_grad_()
    b = torch.randn(B, 9, generator=g, dtype=torch.float64).float().requires_grad_()
    s = torch.tensor(1.7, requires_grad=True)
    got = dre_kernels.contrastive_loss(a, b, s, normalize=True, backend="triton")
    want = contrastive_loss_reference(a.double(), b.double(), s.double(), None, True).mean()
    assert_close(got, want.float())
    for name, x, y in zip("abs", torch.autograd.grad(got, [a, b, s]), torch.autograd.grad(want, [a, b, s])):
        assert_close(x, y.float(), msg=f"grad {name}")
    assert next(order) > 0, "the autotuner never benchmarked"


@pytest.mark.parametrize("error", ["PassManager::run failed", "CUDA error: an illegal memory access"])
def test_autotuning_passes_over_a_config_that_does_not_compile(device, error):
    """Triton's autotuner skips configs that run out of resources, not those its compiler refuses: triton 3.3 fails
    on sm_90 with "PassManager::run failed" for configs 3.2 and 3.4 compile (tests/triton_aot.py), which made the
    first call of a shape raise. The library's autotuners time such a config as the slowest, with a warning, and
    raise any other error as it was. Triton's own autotuner, under the interpreter, with a timer that runs the
    kernel; the 16-wide config refuses to compile."""
    if device != "cpu":
        pytest.skip("under the interpreter only: a GPU compiles both configs")
    from dre_kernels.triton_kernels._common import TRITON_VERSION, LazyAutotune
    if TRITON_VERSION < (3, 3):
        pytest.skip("triton < 3.3 builds an autotuner only where a GPU driver is active")

    def bench(kernel_call, quantiles):
        kernel_call()
        return [1.0] * len(quantiles)

    lazy = LazyAutotune(_scaled_copy_kernel, [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 64})],
                        key=["n"], do_bench=bench)
    tuned = lazy.get()
    run = tuned.fn.run

    def refusing(*args, **kwargs):
        if kwargs["BLOCK"] == 16:
            raise RuntimeError(error)
        return run(*args, **kwargs)

    tuned.fn.run = refusing
    src, dst = torch.randn(100), torch.zeros(100)
    grid = lambda meta: (triton.cdiv(100, meta["BLOCK"]),)  # noqa: E731
    if error.startswith("CUDA"):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            tuned[grid](src, dst, 100)
        return
    with pytest.warns(RuntimeWarning, match="a config of _scaled_copy_kernel does not compile .*PassManager"):
        tuned[grid](src, dst, 100)
    assert tuned.best_config.kwargs["BLOCK"] == 64
    assert torch.equal(dst, 2 * src)


def _float64_case():
    g = torch.Generator().manual_seed(11)
    B, P = 37, 21
    a = torch.randn(B, P, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(B, P, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    return a, b, s, torch.randint(0, 6, (B,), generator=g), torch.randn(B, generator=g, dtype=torch.float64)


def test_contrastive_float64_raw_kernels(device):
    """The kernels' float64 path (MODE 2, reached through the raw ops, for checking) against the float64
    reference."""
    from dre_kernels.triton_kernels import contrastive_loss as tcl

    if not tcl.F64_DOT:
        pytest.skip("this triton's tl.dot takes no float64 (test_contrastive_float64_needs_triton_3_3)")
    a, b, s, labels, w = (t.to(device) for t in _float64_case())
    loss, *saved = tcl.contrastive_loss_fwd(a, b, s, labels, True)
    want = contrastive_loss_reference(a, b, s, labels, True)
    assert loss.dtype == torch.float64
    assert_close(loss, want, torch.float64)
    got = tcl.contrastive_loss_bwd(w, a, b, s, labels, True, *saved)
    for u, v in zip(got, torch.autograd.grad((want * w).sum(), [a, b, s])):
        assert_close(u, v, torch.float64)


def test_contrastive_float16_backward_keeps_tiny_weights(device, float16_dots, monkeypatch):
    """float16 rows on GPU take the 16-bit dot mode (MODE 1). There W_ij = dL/dl_ij ~ g p_ij sits far below
    float16's range at large B (g = 1/B under a mean, p_ij ~ 1/B: 2e-10 at B = 65536) while the gradient, a sum of
    B such terms, does not: split into float16 parts (the smallest 6e-8) they would flush to zero and drop the
    negatives' pull g sum_j p_ij v_j, so float16 multiplies W in float32. In MODE 1 on CPU (float16_dots), at
    B = 48 with g = 1e-6 (W ~ 2e-8) and embeddings that share a mean (so that pull is as large as the positive's),
    the float32 gradient the kernels accumulate (before its cast to float16) must be the float64 reference's
    (0.98 off with the float16 split)."""
    from dre_kernels.triton_kernels import contrastive_loss as tcl

    monkeypatch.setattr(tcl, "_normalize_backward", lambda gu, t, norms, side, normalize: gu)  # keep float32
    g = torch.Generator().manual_seed(11)
    a = (0.2 * torch.randn(48, 24, generator=g) + 1.0).half()
    b = (0.2 * torch.randn(48, 24, generator=g) + 1.0).half()
    s = torch.tensor(0.5)
    w = torch.full((48,), 1e-6)
    assert tcl._mode(a, b) == 1
    loss, *saved = tcl.contrastive_loss_fwd(a, b, s, None, False)
    got = tcl.contrastive_loss_bwd(w, a, b, s, None, False, *saved)
    a64, b64, s64 = (t.double().requires_grad_() for t in (a, b, s))
    want = torch.autograd.grad((contrastive_loss_reference(a64, b64, s64, None, False) * w.double()).sum(),
                               [a64, b64, s64])
    for name, x, y in zip("abs", got, want):
        assert x.dtype == torch.float32, name
        assert _max_rel_err(x, y) < 1e-4, (name, _max_rel_err(x, y))


def test_contrastive_float64_needs_triton_3_3(device, monkeypatch):
    """Before triton 3.3 tl.dot takes no float64: the raw ops say so (a TypeError naming the version) instead of
    failing to compile."""
    from dre_kernels.triton_kernels import contrastive_loss as tcl

    monkeypatch.setattr(tcl, "F64_DOT", False)
    a, b, s, labels, w = (t.to(device) for t in _float64_case())
    with pytest.raises(TypeError, match="from triton 3.3 on"):
        tcl.contrastive_loss_fwd(a, b, s, labels, True)
    with pytest.raises(TypeError, match="from triton 3.3 on"):
        tcl.contrastive_loss_bwd(w, a, b, s, labels, True, *[torch.zeros_like(w)] * 4)


def test_backward_configs_that_abort_old_compilers_are_never_tried(monkeypatch):
    """triton 3.2's compiler aborts the process (an assertion, not an exception) on two of the contrastive
    backward's 16-bit configs on sm_90 (tests/triton_aot.py): under triton < 3.3 the pruner drops them, and a
    config is left for every mode; newer triton keeps them all."""
    from dre_kernels.triton_kernels import contrastive_loss as tcl

    configs = tcl._bwd_tuned.configs
    monkeypatch.setattr(tcl, "TRITON_VERSION", (3, 3))
    kept = {m: [tcl._config_tuple(c) for c in tcl._keep_mode_block_p(configs, {"MODE": m})] for m in (0, 1, 2)}
    assert set(tcl._BWD_ABORTS_BEFORE_TRITON_3_3) <= set(kept[1])
    monkeypatch.setattr(tcl, "TRITON_VERSION", (3, 2))
    for mode in (0, 1, 2):
        old = [tcl._config_tuple(c) for c in tcl._keep_mode_block_p(configs, {"MODE": mode})]
        assert old and not set(old) & tcl._BWD_ABORTS_BEFORE_TRITON_3_3
        assert set(old) == set(kept[mode]) - tcl._BWD_ABORTS_BEFORE_TRITON_3_3


def test_autotune_off_takes_each_launchs_first_pruned_config(monkeypatch):
    """DRE_KERNELS_TRITON_AUTOTUNE=0 on GPU: every residual_encode launch runs the plain kernel with the first config
    of its table that the autotuner's pruning keeps (hard: BLOCK_D = HARD_BLOCK_D), grid sized by that config. The
    GPU path is taken on CPU with the interpreter flag off and the kernels replaced by recorders."""
    from dre_kernels.triton_kernels import _common

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.arg_names, self.name = kernel.arg_names, kernel.__name__

        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((self.name, grid, meta))

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setenv(_common.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(tre, "_re_fwd_kernel", Recorder(tre._re_fwd_kernel))
    monkeypatch.setattr(tre, "_re_bwd_kernel", Recorder(tre._re_bwd_kernel))
    x, xo, c, s, bank, bi, bo = _inputs("cpu", [5, 3], [40, 24], K=64, D=384, x_dtype=torch.bfloat16)
    G = torch.zeros(2, 64, 384)
    for hard in (False, True):
        launches.clear()
        tre.residual_encode_fwd(x, xo, c, None if hard else s, bank, bi, bo, hard, chunk_rows=16)
        tre.residual_encode_bwd(G, x, xo, c, None if hard else s, bank, bi, bo, hard, True, True, True,
                                chunk_rows=16)
        assert [name for name, _, _ in launches] == ["_re_fwd_kernel"] * 2 + ["_re_bwd_kernel"] + (
            ["_re_fwd_kernel"] if hard else ["_re_bwd_kernel"])
        for name, grid, meta in launches:
            table = tre._FWD_CONFIGS if name == "_re_fwd_kernel" else tre._BWD_CONFIGS
            first = next(c for c in table["small_k"] if not hard or c[1] == tre.HARD_BLOCK_D)
            blocks = [meta[n] for n in ("BLOCK_M", "BLOCK_D", "BLOCK_DO", "N_DT") if n in meta]
            assert (*blocks, meta["num_warps"], meta["num_stages"]) == first
            assert not meta.get("FLATTEN")  # untimed, a launch keeps the plain loops (see _as_configs)
        rows = [8, 64, 8, 64]  # fresh fwd, bank fwd, fresh bwd, bank bwd (hard: the mass pass)
        col_tiles = [-(-384 // (launches[i][2]["BLOCK_DO"] * launches[i][2].get("N_DT", 1))) for i in range(4)]
        if hard:
            col_tiles[3] = 1  # the bank rows' argmin-only pass has no column tiles
        assert [g[0] for _, g, _ in launches] == [-(-n // 16) * t for n, t in zip(rows, col_tiles)]
    monkeypatch.delenv(_common.AUTOTUNE_ENV)
    assert _common.autotuning()


def test_contrastive_backward_configs_by_width():
    """The backward's autotune candidates: the mode's BLOCK_P only, and no output tile wider than P needs; at
    P=512 with 16-bit rows, tiles as wide as P (each logit tile computed once per side) from triton 3.3 on."""
    from dre_kernels.triton_kernels import contrastive_loss as tcl

    def pruned(P, mode):
        return tcl._keep_mode_block_p(tcl._bwd_tuned.configs, {"P": P, "MODE": mode})

    for P, mode in [(33, 0), (33, 1), (512, 0), (512, 1), (4096, 1)]:
        kept = pruned(P, mode)
        assert kept and all(c.kwargs["BLOCK_P"] == tcl.BLOCK_P_BY_MODE[mode] for c in kept)
        assert all(c.kwargs["BLOCK_PO"] <= max(128, 1 << (P - 1).bit_length()) for c in kept)
    widths = {c.kwargs["BLOCK_PO"] for c in pruned(512, 1)}
    assert (512 in widths) == (tcl.TRITON_VERSION >= (3, 3))
    # the wide tiles are in the table (triton >= 3.3) and dropped at P = 33
    assert any(c.kwargs["BLOCK_PO"] > 128 for c in tcl._bwd_tuned.configs) == (tcl.TRITON_VERSION >= (3, 3))
    assert max(c.kwargs["BLOCK_PO"] for c in pruned(33, 1)) <= 128
    # float16 rows multiply W in float32 (its parts would flush W ~ g p_ij to zero): no tile wider than 256, and
    # one 256 wide from triton 3.3 on
    fp16 = tcl._keep_mode_block_p(tcl._bwd_tuned.configs, {"P": 512, "MODE": 1,
                                                           "y_ptr": torch.empty(1, dtype=torch.float16)})
    fp16_widths = {c.kwargs["BLOCK_PO"] for c in fp16}
    assert fp16_widths and max(fp16_widths) <= 256 and (256 in fp16_widths) == (tcl.TRITON_VERSION >= (3, 3))


def test_autotune_log_records_each_tuning(monkeypatch, tmp_path):
    """On GPU, launch() logs each autotuning (a launch whose key is new and that had configs to time): the kernel,
    the key's arguments and dtype, every config's median and the chosen one; the benchmarks write it as a CSV.
    Taken on CPU with the interpreter flag off and a stand-in autotuner."""
    import csv
    from types import SimpleNamespace

    from benchmarks.common import write_autotune_csv
    from dre_kernels.triton_kernels import _common

    slow, fast = triton.Config({"BLOCK": 16}, num_warps=4), triton.Config({"BLOCK": 32}, num_warps=8)

    class StandIn:  # what launch() reads of triton's Autotuner: keys, configs_timings (replaced at each tuning)
        keys = ["D"]
        configs_timings = None
        seen = set()

        def __getitem__(self, grid):
            def run(x, D):
                if D not in self.seen:
                    self.seen.add(D)
                    self.configs_timings = {slow: [0.5, 0.4, 0.6], fast: [0.25, 0.2, 0.3]}
            return run

    tuner = StandIn()
    kernel = SimpleNamespace(arg_names=["x", "D"], __name__="_some_kernel")
    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setenv(_common.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(_common, "AUTOTUNE_LOG", [])
    x = torch.zeros(2, dtype=torch.bfloat16)
    for D in (384, 384, 33):
        _common.launch(kernel, SimpleNamespace(get=lambda: tuner), (1,), (x, D), {})
    log = _common.AUTOTUNE_LOG
    assert [t["key"] for t in log] == [{"D": 384, "dtype": "bfloat16"}, {"D": 33, "dtype": "bfloat16"}]
    assert all(t["best"] is fast and t["timings"][slow] == 0.5 for t in log)
    path = write_autotune_csv(str(tmp_path / "tune.csv"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["tuning"], r["rank"], r["BLOCK"], r["num_warps"], r["chosen"]) for r in rows] == [
        ("0", "0", "32", "8", "True"), ("0", "1", "16", "4", "False"),
        ("1", "0", "32", "8", "True"), ("1", "1", "16", "4", "False")]
    monkeypatch.setattr(_common, "AUTOTUNE_LOG", [])
    assert write_autotune_csv(str(tmp_path / "none.csv")) is None


if DEVICES:
    from dre_kernels.triton_kernels._common import dot_pair

    @triton.jit
    def _dot_pair_kernel(p1_ptr, q1_ptr, p2_ptr, q2_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                         TF32X3: tl.constexpr):
        m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        mk, kn = m[:, None] * K + k[None, :], k[:, None] * N + n[None, :]
        acc = tl.load(out_ptr + m[:, None] * N + n[None, :])
        p1, q1 = tl.load(p1_ptr + mk), tl.load(q1_ptr + kn)
        p2, q2 = tl.load(p2_ptr + mk), tl.load(q2_ptr + kn)
        if TF32X3:
            acc = dot_pair(p1, q1, p2, q2, acc, "tf32x3")
        else:
            acc = dot_pair(p1, q1, p2, q2, acc)
        tl.store(out_ptr + m[:, None] * N + n[None, :], acc)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dot_pair_interleaves_the_two_products(device, dtype):
    """dot_pair(p1, q1, p2, q2, acc) = acc + p1 q1 + p2 q2 with four different operands: column 2k + j of the joined
    left operand must meet row 2k + j of the joined right one (a wrong interleave would pair p1 with q2, or row k
    with row k + 1, and still pass where p1 = p2 or q1 = q2, as in the residual kernels' uses)."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bfloat16 tl.dot is wrong (see _common)")
    M, K, N = 32, 16, 32
    g = torch.Generator().manual_seed(0)
    p1, p2 = (torch.randn(M, K, generator=g).to(dtype) for _ in range(2))
    q1, q2 = (torch.randn(K, N, generator=g).to(dtype) for _ in range(2))
    acc = torch.randn(M, N, generator=g)
    want = acc.double() + p1.double() @ q1.double() + p2.double() @ q2.double()
    out = acc.clone().to(device)
    _dot_pair_kernel[(1,)](*(t.to(device) for t in (p1, q1, p2, q2)), out, M, K, N, dtype == torch.float32)
    # 16-bit operands: exact products, float32 sums; float32 ones: three TF32 products (~float32)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-5)


class _EveryConfig:
    """A stand-in for `launch` that runs each autotuned launch with the i-th of the configs its autotuner would
    time (the table after the launch's own pruning; a CPU tensor passes the sm_90 gate), round robin, configs that
    differ only in warps and stages (which the interpreter does not have) counted once, a FLATTEN twin apart from
    its plain config (its loop is another). `rounds` is how many values of i it takes for every launch to have run
    each of its configs."""

    def __init__(self):
        self.i, self.rounds, self.ran = 0, 1, set()

    def __call__(self, kernel, tuned, grid, args, interp_meta, **options):
        prune = tuned.kwargs["prune_configs_by"]["early_config_prune"]
        configs = prune(tuned.configs, dict(zip(kernel.arg_names, args)), **options)
        blocks = {}
        for c in configs:
            blocks.setdefault(tuple(sorted(c.kwargs.items())), c.kwargs)
        blocks = list(blocks.values())
        self.rounds = max(self.rounds, len(blocks))
        meta = dict(blocks[self.i % len(blocks)])
        self.ran.add((kernel.__name__, tuple(meta.items())))
        kernel[grid(meta) if callable(grid) else grid](*args, **meta, **options)


@pytest.mark.parametrize("K,D", [(5, 384), (130, 40)], ids=["small_k", "large_k"])
def test_every_residual_autotune_config_matches_the_reference(device, float16_dots, monkeypatch, K, D):
    """The GPU's autotuner times every config of the tables (after pruning) on the first call of a shape; the other
    tests run one fixed config per launch. Here every config the step shape's D=384 (small codebooks: several column
    tiles per program, 64..128-wide tiles, 32..128-wide D slices, 16..64-row blocks) or a large codebook prunes to
    runs in the interpreter, forward and backward, soft and hard, float16 rows in the GPU's 16-bit dot mode (the
    soft backward's too, as bfloat16 rows take it there), against the float32 reference; 32-row chunks split the
    bank's 30-row slide across programs."""
    if device != "cpu":
        pytest.skip("on GPU the autotuner itself runs every config at each new shape")
    from dre_kernels.triton_kernels import _common

    monkeypatch.setattr(tre, "dot_mode_backward", lambda dtype, hard=False: _common.dot_mode(dtype))
    every = _EveryConfig()
    monkeypatch.setattr(tre, "launch", every)
    x, xo, c, s, bank, bi, bo = _inputs(device, [21, 0, 6], [3, 30, 1], K=K, D=D, x_dtype=torch.float16,
                                        bank_dtype=torch.float16)
    G = torch.randn(3, K, D, generator=torch.Generator().manual_seed(1))
    for hard in (False, True):
        sh = None if hard else s / 100
        xr, cr = x.float().requires_grad_(), c.clone().requires_grad_()
        sr = None if hard else sh.clone().requires_grad_()
        Er, mr = residual_encode_reference(xr, xo, cr, sr, bank, bi, bo, hard)
        want = torch.autograd.grad((Er * G).sum(), [xr, cr] + ([] if hard else [sr]))
        every.i, every.rounds = 0, 1
        while every.i < every.rounds:
            E, mass = tre.residual_encode_fwd(x, xo, c, sh, bank, bi, bo, hard, chunk_rows=32)
            assert _max_rel_err(E, Er) < 1e-5 and _max_rel_err(mass, mr) < 1e-6, (hard, every.i)
            gx, gc, gs = tre.residual_encode_bwd(G, x, xo, c, sh, bank, bi, bo, hard, True, True, True,
                                                 chunk_rows=32)
            assert_close(gx.float(), want[0], torch.float16, msg=f"grad x ({hard}, {every.i})")
            assert _max_rel_err(gc, want[1]) < 1e-5, ("grad codewords", hard, every.i)
            if not hard:
                assert _max_rel_err(gs, want[2]) < 1e-5, ("grad scale", every.i)
            every.i += 1
    ran = {meta for name, meta in every.ran}
    # the configs of several column tiles (N_DT > 1) at the small codebook's D, where this triton gets them
    wide = any(dict(m)["N_DT"] == 3 for m in ran)
    assert wide == (K <= 64 and tre.TRITON_VERSION >= tre.SM90_CONFIGS_MIN_TRITON), sorted(ran)
    for kernel in ("_re_fwd_kernel", "_re_bwd_kernel"):  # both loops of each kernel
        assert {dict(m)["FLATTEN"] for name, m in every.ran if name == kernel} == {False, True}, kernel


def test_every_contrastive_autotune_config_matches_the_reference(device, float16_dots, monkeypatch):
    """As the residual_encode test: every forward and backward config (row, column, P-slice and output tile sizes)
    that P=200 prunes to, float16 rows in the GPU's 16-bit mode, labels, against the float64 reference."""
    if device != "cpu":
        pytest.skip("on GPU the autotuner itself runs every config at each new shape")
    from dre_kernels.triton_kernels import contrastive_loss as tcl

    every = _EveryConfig()
    monkeypatch.setattr(tcl, "launch", every)
    g = torch.Generator().manual_seed(8)
    B, P = 70, 200
    a, b = (torch.randn(B, P, generator=g).half() for _ in range(2))
    labels = torch.randint(0, 12, (B,), generator=g)
    s, w = torch.tensor(3.0), torch.rand(B, generator=g)
    a64, b64, s64 = (t.double().requires_grad_() for t in (a, b, s))
    want = contrastive_loss_reference(a64, b64, s64, labels, True)
    want_grads = torch.autograd.grad((want * w.double()).sum(), [a64, b64, s64])
    while every.i < every.rounds:
        loss, *saved = tcl.contrastive_loss_fwd(a, b, s, labels, True)
        assert_close(loss, want, torch.float32, scale=10.0, msg=f"loss ({every.i})")
        got = tcl.contrastive_loss_bwd(w, a, b, s, labels, True, *saved)
        for name, x, y in zip("abs", got, want_grads):
            assert_close(x, y, torch.float16 if name != "s" else torch.float32, scale=10.0,
                         msg=f"grad {name} ({every.i})")
        every.i += 1
    backward_configs = len({m for name, m in every.ran if name == "_cl_bwd_kernel"})
    # before triton 3.3 the 16-bit backward keeps one (its other configs abort that compiler or are not surveyed)
    assert backward_configs > 1 if tcl.TRITON_VERSION >= (3, 3) else backward_configs == 1
