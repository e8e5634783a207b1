"""The one launch description (``sparse24.kernels.launch``): complete, checked, shared."""

from __future__ import annotations

import pytest

from sparse24.kernels import launch as L
from sparse24.kernels import planner

CALL = dict(
    q_shape=(37, 8, 64), dtype="bfloat16", cache_shape=(20, 16, 2, 64), num_seqs=3,
    n=2, m=4, dense_sink_tokens=4, dense_recent_tokens=16, sparse_decode=False,
    causal=True, softmax_scale=0.125, window=0, softcap=30.0,
    max_seqlen_q=30, max_seqlen_k=300, store_lse=True,
)


def _bound(launch: L.KernelLaunch) -> list[str]:
    return [p for p, _ in launch.inputs] + [o.param for o in launch.outputs] + list(launch.keywords)


@pytest.mark.parametrize("splits", [None, 4])
@pytest.mark.parametrize("store_lse", [True, False])
def test_every_kernel_parameter_bound_once(splits, store_lse):
    launches = L.unified_attention_launches(**dict(CALL, store_lse=store_lse, num_kv_splits=splits))
    assert len(launches) == (1 if splits is None else 2)
    for launch in launches:
        names = L.kernel_arg_names(launch.kernel)
        assert sorted(_bound(launch)) == sorted(names)
        arrays = len(launch.inputs) + len(launch.outputs)
        assert _bound(launch)[:arrays] == list(names[:arrays])  # jax-triton binds arrays by position
        assert launch.keywords["STORE_LSE"] is store_lse
    lse = [o for o in launches[-1].outputs if o.array == "lse"][0]
    assert lse.shape == ((37, 8) if store_lse else (1, 1)) and lse.dtype == "float32"


def test_flags_follow_the_options():
    k = L.unified_attention_launches(**CALL)[0].keywords
    assert (k["USE_WINDOW"], k["USE_SOFTCAP"], k["USE_SINK"], k["USE_RECENT"], k["SPARSE_DECODE"]) == (
        False, True, True, True, False)
    k = L.unified_attention_launches(**dict(CALL, window=8, softcap=0.0, dense_sink_tokens=0))[0].keywords
    assert (k["USE_WINDOW"], k["USE_SOFTCAP"], k["USE_SINK"], k["window"]) == (True, False, False, 8)
    d = L.unified_attention_launches(**dict(CALL, n=4, m=4))[0].keywords  # dense: no regions, no decode case
    assert (d["GROUP_M"], d["USE_SINK"], d["USE_RECENT"], d["SPARSE_DECODE"]) == (1, False, False, True)


def test_split_reduce_reads_the_main_partials():
    main, reduce = L.unified_attention_launches(**dict(CALL, num_kv_splits=4))
    assert reduce.input_arrays == ("segm_acc", "segm_max", "segm_sum", "segm_max", "segm_max")  # no fix-up: dummies
    assert set(reduce.input_arrays) <= set(main.output_arrays)
    assert reduce.output_arrays == ("out", "lse")
    assert not L.applies_row_fixup((main, reduce)) and not reduce.keywords["USE_ROW_FIXUP"]
    fixed = L.unified_attention_launches(**dict(CALL, num_kv_splits=4, row_fixup=True))
    assert fixed[1].input_arrays[3:] == ("row_keep", "row_fill") and L.applies_row_fixup(fixed)
    assert fixed[0] == main  # the main launch is the same
    assert not L.applies_row_fixup(L.unified_attention_launches(**dict(CALL, row_fixup=True)))  # no split, no reduce
    acc = [o for o in main.outputs if o.array == "segm_acc"][0]
    assert acc.shape[:3] == (37, 8, 4)
    assert (reduce.num_warps, reduce.num_stages) == (4, 1)  # from the planner, not a launcher


def test_strides_default_to_contiguous_and_are_passed_through():
    a = L.unified_attention_launches(**CALL)[0].keywords
    assert (a["stride_q_token"], a["stride_q_head"], a["stride_q_dim"]) == (8 * 64, 64, 1)
    assert (a["stride_kc_block"], a["stride_kc_slot"], a["stride_kc_head"]) == (16 * 2 * 64, 2 * 64, 64)
    b = L.unified_attention_launches(**CALL, v_cache_strides=(9999, 128, 1, 2), out_strides=(1, 37, 296))[0].keywords
    assert (b["stride_vc_block"], b["stride_vc_head"], b["stride_vc_dim"]) == (9999, 1, 2)
    assert b["stride_kc_block"] == a["stride_kc_block"]
    assert (b["stride_out_token"], b["stride_out_head"], b["stride_out_dim"]) == (1, 37, 296)


def test_description_is_memoised_and_follows_tuning():
    first = L.unified_attention_launches(**CALL)
    assert L.unified_attention_launches(**CALL) is first  # no per-call planning on the hot path
    with planner.tuning(tile_n=32):
        tuned = L.unified_attention_launches(**CALL)
    assert tuned[0].keywords["TILE_N"] == 32 and first[0].keywords["TILE_N"] != 32
    assert L.unified_attention_launches(**CALL) is first


def test_stale_description_is_an_error():
    (good,) = L.write_kv_cache_launches(kv_shape=(5, 2, 64), cache_shape=(4, 16, 2, 64), dtype="float16")
    missing = dict(good.keywords)
    missing.pop("stride_v_dim")
    with pytest.raises(RuntimeError, match="missing \\['stride_v_dim'\\]"):
        L._launch(good.kernel, good.grid, good.inputs, good.outputs, missing,
                  num_warps=good.num_warps, num_stages=good.num_stages)
    with pytest.raises(RuntimeError, match="array parameters"):
        L._launch(good.kernel, good.grid, good.inputs[::-1], good.outputs, good.keywords,
                  num_warps=good.num_warps, num_stages=good.num_stages)


def test_write_launch_aliases_the_caches():
    (w,) = L.write_kv_cache_launches(kv_shape=(5, 2, 64), cache_shape=(4, 16, 2, 64), dtype="float16")
    assert w.input_arrays == ("k", "v", "slot_mapping", "k_cache", "v_cache")
    assert w.output_arrays == ("k_cache", "v_cache") and w.input_output_aliases == ((3, 0), (4, 1))
    assert w.keywords["block_size"] == 16
    assert L.write_kv_cache_launches(kv_shape=(0, 2, 64), cache_shape=(4, 16, 2, 64), dtype="float16") == ()


def test_torch_and_jax_launch_the_same_description():
    """Both launchers ask the one description; for contiguous arrays they get equal launches."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    from sparse24 import SparsityConfig
    from sparse24.jax_ops import _launch as jax_launch

    cfg = SparsityConfig(n=2, m=4, dense_sink_tokens=4, dense_recent_tokens=16, sparse_decode=False)
    q = torch.empty(CALL["q_shape"], dtype=torch.bfloat16)
    kc = torch.empty(CALL["cache_shape"], dtype=torch.bfloat16)
    bt = torch.empty((3, 19), dtype=torch.int32)
    from_torch = L.unified_attention_launches(
        **CALL, q_strides=q.stride(), k_cache_strides=kc.stride(), v_cache_strides=kc.stride(),
        block_table_strides=bt.stride(), out_strides=q.stride())
    from_jax = jax_launch.attention_calls(
        q_shape=CALL["q_shape"], dtype="bfloat16", cache_shape=CALL["cache_shape"], block_table_shape=(3, 19),
        num_seqs=3, config=cfg, causal=True, softmax_scale=0.125, window=0, softcap=30.0, max_seqlen_q=30,
        max_seqlen_k=300, num_kv_splits=None, num_sms=None, interpret=False, store_lse=True)
    assert from_torch == from_jax


def test_run_launches_threads_named_arrays():
    (main, reduce) = L.unified_attention_launches(**dict(CALL, num_kv_splits=2))
    seen = []

    def launch_fn(launch, inputs, env):
        seen.append((launch.kernel, tuple(inputs)))
        return [f"{launch.kernel.__name__}:{a}" for a in launch.output_arrays]

    names = ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")
    env = L.run_launches((main, reduce), {n: n for n in names}, launch_fn)
    assert seen[0][1] == names
    assert seen[1][1] == tuple(f"{main.kernel.__name__}:segm_{s}" for s in ("acc", "max", "sum", "max", "max"))
    assert env["out"] == f"{reduce.kernel.__name__}:out"


def test_a_plan_is_checked_once_and_runs_like_the_call():
    """plan_unified_attention raises what unified_attention raises (the one contract) and
    a plan, run again on new values of the same form, equals unified_attention."""
    import torch

    from sparse24.testing import make_paged_inputs
    from sparse24.torch_ops import plan_unified_attention, unified_attention

    inputs = make_paged_inputs([3, 1], [9, 20], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                               dtype=torch.float32, seed=0)
    args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.cu_seqlens_q, inputs.seq_lens)
    with pytest.raises(ValueError, match="window"):
        plan_unified_attention(*args, window=0, backend="reference")
    plan = plan_unified_attention(*args, max_seqlen_q=3, max_seqlen_k=20, backend="reference")
    for seed in (1, 2):
        q = torch.randn(inputs.q.shape, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(
            plan(q, *args[1:]), unified_attention(q, *args[1:], max_seqlen_q=3, max_seqlen_k=20, backend="reference")
        )


def test_fast_launch_keeps_the_compiled_kernel_per_alignment(monkeypatch):
    """The torch launcher's direct path: the first call of a (launch, dtypes, alignments,
    device) key goes through ``kernel[grid](...)`` and keeps what it returns; later calls hand
    that compiled kernel a 3-D grid and every argument in the kernel's order; a misaligned
    array is a new key. (A fake kernel: the real one is checked on the GPU,
    tests/test_gpu_decode.py.)"""
    import torch

    from sparse24.torch_ops import _launch as TL

    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("compiled", grid, args))

    class Kernel:
        arg_names = ["a_ptr", "b_ptr", "n", "BLOCK"]

        def __getitem__(self, grid):
            def run(*args, **kw):
                calls.append(("jit", grid, args, kw))
                return Compiled()
            return run

    launch = L.KernelLaunch(kernel=Kernel(), grid=(4,), inputs=(("a_ptr", "a"),),
                            outputs=(L.OutputSpec("b_ptr", "b", (8,), "float32"),),
                            keywords={"BLOCK": 16, "n": 8}, num_warps=4, num_stages=1)
    monkeypatch.setattr(TL, "INTERPRETED", False)
    monkeypatch.setattr(TL, "_COMPILED", {})
    device = torch.device("cpu")
    a, b = torch.zeros(9), torch.zeros(8)
    for x in (a, a, a[1:], a[1:]):
        TL._run_one(launch, [x[:8]], {"b": b}, direct=True, device=device)
    kinds = [c[0] for c in calls]
    assert kinds == ["jit", "compiled", "jit", "compiled"]
    assert calls[0][3] == {"BLOCK": 16, "n": 8, "num_warps": 4, "num_stages": 1}
    assert calls[1][1] == (4, 1, 1)
    assert calls[1][2] == (a.data_ptr(), b.data_ptr(), 8, 16)  # pointers as ints; n, BLOCK in the kernel's order
    monkeypatch.setattr(TL, "FAST_LAUNCH", False)
    TL._run_one(launch, [a[:8]], {"b": b}, direct=True, device=device)
    assert calls[-1][0] == "jit"


def test_fast_launch_reuses_the_compiled_kernel_of_the_same_specialization(monkeypatch):
    """A new launch description whose non-array arguments Triton specialises the same way (a
    growing cache's next decode step: new strides and lengths, both divisible by 16 or both
    not; the same constexprs, warps and stages) launches the kernel compiled for the first one
    without ``kernel[grid](...)``; a different specialisation (17 is not divisible by 16, 1 is
    a constant, another constexpr) goes through the JIT again. (A fake kernel with Triton's
    parameter attributes; the specialisation is Triton's own ``native_specialize_impl``.)"""
    import types

    import torch

    from sparse24.torch_ops import _launch as TL

    if TL._native_specialize is None:
        pytest.skip("this Triton does not expose native_specialize_impl")
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("compiled", args))

    class Kernel:
        arg_names = ["a_ptr", "n", "BLOCK"]
        params = [types.SimpleNamespace(name=n, is_constexpr=n == "BLOCK", is_const=False, do_not_specialize=False,
                                        do_not_specialize_on_alignment=False) for n in arg_names]

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append(("jit", kw["n"], kw["BLOCK"])) or Compiled()

    kernel = Kernel()

    def launch(n, block=16, warps=4):
        return L.KernelLaunch(kernel=kernel, grid=(2,), inputs=(("a_ptr", "a"),), outputs=(),
                              keywords={"n": n, "BLOCK": block}, num_warps=warps, num_stages=1)

    monkeypatch.setattr(TL, "INTERPRETED", False)
    monkeypatch.setattr(TL, "_COMPILED", {})
    monkeypatch.setattr(TL, "_BY_SPECIALIZATION", {})
    a, device = torch.zeros(8), torch.device("cpu")
    for description in (launch(32), launch(48), launch(17), launch(33), launch(1), launch(64, block=32),
                        launch(80, warps=8), launch(96)):
        TL._run_one(description, [a], {}, direct=True, device=device)
    assert calls == [("jit", 32, 16), ("compiled", (a.data_ptr(), 48, 16)), ("jit", 17, 16),
                     ("compiled", (a.data_ptr(), 33, 16)), ("jit", 1, 16), ("jit", 64, 32), ("jit", 80, 16),
                     ("compiled", (a.data_ptr(), 96, 16))]


def test_direct_launches_pass_user_arrays_and_fixed_buffers_in_kernel_order(monkeypatch):
    """``DirectLaunches`` (a plan's compiled kernels, launched without the launch machinery):
    each kernel gets the data pointers of the seven user arrays and of the plan's fixed buffers
    where the description puts them, then the trailing arguments; a misaligned array launches
    nothing (False). (Fake
    kernels: the real ones are compared on the GPU, tests/test_hf.py.)"""
    import torch

    from sparse24.torch_ops import _launch as TL

    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append((grid, args))

    class Kernel:
        arg_names = ["q_ptr", "bt_ptr", "scratch_ptr", "n"]

        def __getitem__(self, grid):
            return lambda *args, **kw: Compiled()

    launch = L.KernelLaunch(kernel=Kernel(), grid=(2, 3), inputs=(("q_ptr", "q"), ("bt_ptr", "block_table")),
                            outputs=(L.OutputSpec("scratch_ptr", "segm_acc", (4,), "float32"),),
                            keywords={"n": 7}, num_warps=4, num_stages=1)
    monkeypatch.setattr(TL, "INTERPRETED", False)
    monkeypatch.setattr(TL, "_COMPILED", {})
    device = torch.device("cpu")
    q, bt, scratch = torch.zeros(8), torch.zeros(8, dtype=torch.int32), torch.zeros(4)
    assert TL.DirectLaunches.build([launch], {"segm_acc": scratch}, device, {"q": q.dtype, "block_table": bt.dtype}) \
        is None  # nothing compiled yet
    TL._run_one(launch, [q, bt], {"segm_acc": scratch}, direct=True, device=device)
    direct = TL.DirectLaunches.build([launch], {"segm_acc": scratch}, device, {"q": q.dtype, "block_table": bt.dtype})
    other = torch.zeros(8)
    assert direct(q, other, other, bt, other, other, other)
    grid, args = calls[-1]
    assert grid == (2, 3, 1) and args == (q.data_ptr(), bt.data_ptr(), scratch.data_ptr(), 7)  # pointers as ints
    count = len(calls)
    assert not direct(q[1:], other, other, bt, other, other, other)  # misaligned: the caller takes the plan
    assert len(calls) == count


def test_direct_launches_call_the_c_launcher_on_the_current_stream(monkeypatch):
    """On a CUDA device with Triton 3.6's launcher, ``DirectLaunches`` (and every eager direct
    launch after a kernel's first, ``_fast_launch``) calls the compiled
    kernel's C launcher itself: grid, the device's current stream, the kernel handle, its
    flags, no scratch, the packed metadata, no launch metadata or hooks, then the arguments
    the runner would get. A set launch hook (a profiler) or a kernel that needs scratch memory
    takes Triton's runner instead. (Fake launcher; the real one runs in tests/test_hf.py's
    GPU comparison of direct launches with the plan.)"""
    import torch

    from sparse24.torch_ops import _launch as TL

    assert TL.BARE_LAUNCH  # the pinned Triton's launcher layout (constraints-cpu.txt); else runners only
    calls = []

    class Launcher:
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid, launch_pdl = False, True

        def launch(self, *args):
            calls.append(("bare", args))

    class Compiled:
        function, packed_metadata = 1234, (4, 1, 0)

        def __init__(self):
            self.run = Launcher()

        def __getitem__(self, grid):
            return lambda *args: calls.append(("runner", grid, args))

    class Kernel:
        arg_names = ["q_ptr", "bt_ptr", "n"]

        def __getitem__(self, grid):
            return lambda *args, **kw: compiled

    compiled = Compiled()
    launch = L.KernelLaunch(kernel=Kernel(), grid=(2, 3), inputs=(("q_ptr", "q"), ("bt_ptr", "block_table")),
                            outputs=(), keywords={"n": 7}, num_warps=4, num_stages=1)
    monkeypatch.setattr(TL, "INTERPRETED", False)
    monkeypatch.setattr(TL, "_COMPILED", {})
    monkeypatch.setattr(TL, "_BARE", {})
    monkeypatch.setattr(TL, "_current_raw_stream", lambda index: 1000 + index)
    device = torch.device("cuda", 1)  # never touched: the fake kernel gets integers only
    q, bt = torch.zeros(8), torch.zeros(8, dtype=torch.int32)
    TL._run_one(launch, [q, bt], {}, direct=True, device=device)
    dtypes = {"q": q.dtype, "block_table": bt.dtype}
    direct = TL.DirectLaunches.build([launch], {}, device, dtypes)
    other = torch.zeros(8)
    calls.clear()
    assert direct(q, other, other, bt, other, other, other)
    bare_call = ("bare", (2, 3, 1, 1001, 1234, False, True, None, None, (4, 1, 0), None, None, None,
                          q.data_ptr(), bt.data_ptr(), 7))
    assert calls == [bare_call]
    calls.clear()  # an eager direct launch after the first (the compile) takes the C launcher too
    TL._run_one(launch, [q, bt], {}, direct=True, device=device)
    assert calls == [bare_call]
    hook = object()
    from triton import knobs

    monkeypatch.setattr(knobs.runtime.launch_enter_hook, "calls", [hook])
    calls.clear()
    assert direct(q, other, other, bt, other, other, other)
    assert calls == [("runner", (2, 3, 1), (q.data_ptr(), bt.data_ptr(), 7))]
    calls.clear()
    TL._run_one(launch, [q, bt], {}, direct=True, device=device)
    assert calls == [("runner", (2, 3, 1), (q.data_ptr(), bt.data_ptr(), 7))]
    monkeypatch.setattr(knobs.runtime.launch_enter_hook, "calls", [])
    monkeypatch.setattr(Launcher, "global_scratch_size", 256)
    monkeypatch.setattr(TL, "_COMPILED", {})
    monkeypatch.setattr(TL, "_BARE", {})
    TL._run_one(launch, [q, bt], {}, direct=True, device=device)
    direct = TL.DirectLaunches.build([launch], {}, device, dtypes)
    calls.clear()
    assert direct(q, other, other, bt, other, other, other) and calls[0][0] == "runner"
    calls.clear()
    TL._run_one(launch, [q, bt], {}, direct=True, device=device)
    assert [c[0] for c in calls] == ["runner"]


def _fake_kernel(names, constexprs, calls: list):
    """A stand-in for a compiled Triton kernel with Triton's parameter attributes: launching
    it (``kernel[grid](...)``) returns a compiled kernel whose launches append
    ``(grid, arguments)`` to ``calls``."""
    import types

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append((grid, args))

    class Kernel:
        arg_names = list(names)
        params = [types.SimpleNamespace(name=n, is_constexpr=n in constexprs, is_const=False, do_not_specialize=False,
                                        do_not_specialize_on_alignment=False) for n in names]

        def __getitem__(self, grid):
            return lambda *args, **kw: Compiled()

    return Kernel()


def test_direct_launches_rebind_scalars_that_keep_their_specialization(monkeypatch):
    """``DirectLaunches.rebind``: a description that differs in run-time scalars only, each
    specialised by Triton as before (48 and 32 are both divisible by 16), launches the same
    compiled kernel with the new trailing arguments and the replaced fixed buffer; a scalar
    that Triton specialises otherwise (17, 1), another constexpr, another grid or warps, or an
    unknown buffer name refuses (None). The object rebound from is unchanged. (A fake kernel
    with Triton's parameter attributes; the real kernels: the subprocess test below, and
    tests/test_hf.py's GPU comparison.)"""
    import torch

    from sparse24.torch_ops import _launch as TL

    if TL._native_specialize is None:
        pytest.skip("this Triton does not expose native_specialize_impl")
    calls = []

    def launch(n, block=16, grid=(2, 3), warps=4):
        return L.KernelLaunch(kernel=kernel, grid=grid, inputs=(("q_ptr", "q"), ("row_keep_ptr", "row_keep")),
                              outputs=(), keywords={"n": n, "BLOCK": block}, num_warps=warps, num_stages=1)

    kernel = _fake_kernel(["q_ptr", "row_keep_ptr", "n", "BLOCK"], {"BLOCK"}, calls)
    monkeypatch.setattr(TL, "INTERPRETED", False)
    monkeypatch.setattr(TL, "_COMPILED", {})
    monkeypatch.setattr(TL, "_KEYWORDS", {})
    device = torch.device("cpu")
    q, keep, keep2 = torch.zeros(8), torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool)
    first = launch(32)
    TL._run_one(first, [q, keep], {}, direct=True, device=device)
    direct = TL.DirectLaunches.build([first], {"row_keep": keep}, device, {"q": q.dtype})
    assert direct.fixed_names == ("row_keep",) and direct.launches == (first,)
    rebound = direct.rebind([launch(48)], {"row_keep": keep2})
    other = torch.zeros(8)
    assert rebound(q, other, other, other, other, other, other)
    assert calls[-1] == ((2, 3, 1), (q.data_ptr(), keep2.data_ptr(), 48, 16))
    assert direct(q, other, other, other, other, other, other)  # unchanged
    assert calls[-1] == ((2, 3, 1), (q.data_ptr(), keep.data_ptr(), 32, 16))
    assert rebound.rebind([launch(64)], {}) is not None  # a rebound object rebinds again
    for refused in (launch(17), launch(1), launch(48, block=32), launch(48, grid=(4, 3)), launch(48, warps=8)):
        assert direct.rebind([refused], {}) is None
    assert direct.rebind([launch(48)], {"segm_acc": keep2}) is None
    assert direct.rebind([launch(48), launch(48)], {}) is None


def test_rebind_keywords_replaces_named_scalars_that_keep_their_specialization(monkeypatch):
    """``DirectLaunches.rebind_keywords`` and ``DirectLaunch.rebind_keywords``: named run-time
    scalars replaced in the compiled kernel's trailing arguments, each checked against the
    described launch's value (48 keeps 32's divisibility by 16; 17 and 1 do not; a constexpr
    never rebinds), buffers replaced by name as in ``rebind``; the source is unchanged and a
    result rebinds again. ``DirectLaunch`` allocates its outputs from the description and
    refuses (launches nothing) an input of another dtype. A fake kernel (``_fake_kernel``)."""
    import torch

    from sparse24.torch_ops import _launch as TL

    if TL._native_specialize is None:
        pytest.skip("this Triton does not expose native_specialize_impl")
    calls = []

    monkeypatch.setattr(TL, "INTERPRETED", False)
    monkeypatch.setattr(TL, "_COMPILED", {})
    monkeypatch.setattr(TL, "_KEYWORDS", {})
    device = torch.device("cpu")
    # DirectLaunches: the attention launches of a plan
    kernel = _fake_kernel(["q_ptr", "row_keep_ptr", "n", "BLOCK"], {"BLOCK"}, calls)
    first = L.KernelLaunch(kernel=kernel, grid=(2, 3), inputs=(("q_ptr", "q"), ("row_keep_ptr", "row_keep")),
                           outputs=(), keywords={"n": 32, "BLOCK": 16}, num_warps=4, num_stages=1)
    q, keep, keep2, other = torch.zeros(8), torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool), torch.zeros(8)
    TL._run_one(first, [q, keep], {}, direct=True, device=device)
    direct = TL.DirectLaunches.build([first], {"row_keep": keep}, device, {"q": q.dtype})
    rebound = direct.rebind_keywords([{"n": 48}], {"row_keep": keep2})
    assert rebound(q, other, other, other, other, other, other)
    assert calls[-1] == ((2, 3, 1), (q.data_ptr(), keep2.data_ptr(), 48, 16))
    assert direct(q, other, other, other, other, other, other)  # unchanged
    assert calls[-1] == ((2, 3, 1), (q.data_ptr(), keep.data_ptr(), 32, 16))
    assert rebound.rebind_keywords([{"n": 64}], {}) is not None and rebound.launches == (first,)
    for refused in ({"n": 17}, {"n": 1}, {"BLOCK": 32}):
        assert direct.rebind_keywords([refused], {}) is None
    assert direct.rebind_keywords([{}, {}], {}) is None
    assert direct.rebind_keywords([{"n": 48}], {"segm_acc": keep2}) is None
    # DirectLaunch: one launch with outputs (the decode mask layout)
    layout = _fake_kernel(["mask_ptr", "out_ptr", "mask_len", "BLOCK_L"], {"BLOCK_L"}, calls)
    launch = L.KernelLaunch(kernel=layout, grid=(4,), inputs=(("mask_ptr", "mask"),),
                            outputs=(L.OutputSpec("out_ptr", "out", (4, 16), "int32"),),
                            keywords={"mask_len": 32, "BLOCK_L": 64}, num_warps=1, num_stages=1)
    mask = torch.zeros(4, 32, dtype=torch.bool)
    (out,) = TL._run_one(launch, [mask], {}, direct=True, device=device)
    one = TL.DirectLaunch.of(launch, (mask,), (out,), device)
    assert TL.DirectLaunch.of(launch, (mask.float(),), (out,), device) is None  # not compiled for these dtypes
    again = one.rebind_keywords({"mask_len": 48})
    (fresh,) = again(mask)
    assert fresh.shape == (4, 16) and fresh.dtype == torch.int32 and fresh.data_ptr() != out.data_ptr()
    assert calls[-1] == ((4, 1, 1), (mask.data_ptr(), fresh.data_ptr(), 48, 64))
    assert one.rebind_keywords({"mask_len": 47}) is None and one.rebind_keywords({"BLOCK_L": 128}) is None
    assert again(mask.int()) is None and calls[-1][1][2] == 48  # another dtype: nothing launched


def test_decode_steps_of_a_growing_cache_rebind_on_the_compiled_kernels():
    """The real kernels' descriptions of consecutive decode steps of a transformers dynamic
    cache (one-slot pages of a [B, H_kv, L, D] tensor, a [B, L] block table) differ in strides
    only, which Triton specialises alike for L = 4100 -> 4101 (``_rebound_keywords`` accepts,
    with the new description's values in the kernel's order), and not for a block-table width
    that turns divisible by 16 (4111 -> 4112: refused). A subprocess without the interpreter:
    the JIT kernels' parameter attributes, no GPU needed."""
    import os
    import subprocess
    import sys

    code = """
from sparse24.torch_ops import _launch as TL
from sparse24.kernels.launch import unified_attention_launches
assert not TL.INTERPRETED and TL._native_specialize is not None
B, H, HKV, D = 8, 32, 8, 64
def describe(L):
    return unified_attention_launches(
        q_shape=(B, H, D), dtype="bfloat16", cache_shape=((B - 1) * HKV * L + L, 1, HKV, D), num_seqs=B, n=2, m=4,
        dense_sink_tokens=0, dense_recent_tokens=0, sparse_decode=True, causal=True, softmax_scale=0.125, window=0,
        softcap=0.0, max_seqlen_q=1, max_seqlen_k=L, store_lse=False, num_sms=132, row_fixup=True,
        q_strides=(H * D, D, 1), k_cache_strides=(D, D, L * D, 1), v_cache_strides=(D, D, L * D, 1),
        block_table_strides=(L, 1), out_strides=(H * D, D, 1))
old, new = describe(4100), describe(4101)
assert len(old) == 2 and [o.kernel for o in old] == [n.kernel for n in new]
main = TL._rebound_keywords(old[0], new[0])
names = new[0].kernel.arg_names[len(new[0].inputs) + len(new[0].outputs):]
assert main == tuple(new[0].keywords[n] for n in names) and main != tuple(old[0].keywords[n] for n in names)
assert TL._rebound_keywords(old[1], new[1]) == tuple(new[1].keywords[n] for n in new[1].kernel.arg_names[7:])
assert TL._rebound_keywords(describe(4111)[0], describe(4112)[0]) is None
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def _decode_call(L, *, heads=(32, 8), head_dim=64, n=2, m=4, batch=8, splits=None, row_fixup=True, **over):
    """unified_attention_launches' arguments for one decode step of a transformers dynamic
    cache at key length L (one-slot pages of [batch, H_kv, L, D], a block table padded to a
    multiple of 16 columns), as sparse24.hf makes them."""
    hq, hkv = heads
    width = -(-L // 16) * 16
    call = dict(q_shape=(batch, hq, head_dim), dtype="bfloat16", cache_shape=((batch - 1) * hkv * L + L, 1, hkv, head_dim),
                num_seqs=batch, n=n, m=m, dense_sink_tokens=0, dense_recent_tokens=0, sparse_decode=True, causal=True,
                softmax_scale=0.125, window=0, softcap=0.0, max_seqlen_q=1, max_seqlen_k=L, store_lse=False,
                store_stats=False, num_kv_splits=splits, num_sms=132, interpret=False, row_fixup=row_fixup,
                q_strides=(hq * head_dim, head_dim, 1), k_cache_strides=(head_dim, head_dim, L * head_dim, 1),
                v_cache_strides=(head_dim, head_dim, L * head_dim, 1), block_table_strides=(width, 1),
                out_strides=(hq * head_dim, head_dim, 1))
    call.update(over)
    return call


@pytest.mark.parametrize("shape", [dict(), dict(heads=(32, 32), head_dim=128, n=4, m=4), dict(n=4, m=8, batch=3),
                                   dict(splits=4, row_fixup=False)], ids=["2:4-gqa4-d64", "dense-d128", "4:8-b3", "split4"])
def test_key_side_rebound_equals_the_description(shape):
    """``rebound_unified_attention_launches`` from the launches of key length L gives exactly
    ``unified_attention_launches`` of the next lengths (every field: kernel, grid, arrays,
    output shapes, every keyword, warps, stages) where the planner plans alike, and refuses
    (None) exactly where it does not (another split count at short lengths) or where anything
    but the key side changed."""
    refused = 0
    for start in (5, 60, 250, 1000, 4100):
        launches = L.unified_attention_launches(**_decode_call(start, **shape))
        for length in (start + 1, start + 3, start + 17, 2 * start + 7):
            want = L.unified_attention_launches(**_decode_call(length, **shape))
            got = L.rebound_unified_attention_launches(launches, **_decode_call(length, **shape))
            same_plan = L._plan_of(_decode_call(start, **shape)) == L._plan_of(_decode_call(length, **shape))
            assert (got is not None) == same_plan
            if got is None:
                refused += 1
                continue
            assert got == want and [dict(g.keywords) for g in got] == [dict(w.keywords) for w in want]
            assert got[0].described_by[0] == _decode_call(length, **shape)
            # the strides alone (what UnifiedAttentionPlan.rebind puts into the compiled launches)
            strides = L.key_side_parameters(launches, **_decode_call(length, **shape))
            assert set(strides) == set(L.KEY_SIDE_PARAMETERS)
            assert {**launches[0].keywords, **strides} == dict(want[0].keywords)
            launches = got  # rebinds chain, as decode steps do
    assert refused < 10  # long contexts keep their plan
    launches = L.unified_attention_launches(**_decode_call(300, **shape))
    for other in (dict(q_strides=(4096, 64, 1)), dict(softmax_scale=0.1), dict(cache_shape=(100, 2, 8, 64)),
                  dict(num_seqs=9), dict(row_fixup=not shape.get("row_fixup", True))):
        assert L.rebound_unified_attention_launches(launches, **_decode_call(301, **{**shape, **other})) is None
    assert L.rebound_unified_attention_launches(L.write_kv_cache_launches(
        kv_shape=(1, 8, 64), cache_shape=(10, 16, 8, 64), dtype="bfloat16"), **_decode_call(301, **shape)) is None
    for other in (dict(q_strides=(4096, 64, 1)), dict(num_seqs=9)):
        assert L.key_side_parameters(launches, **_decode_call(301, **{**shape, **other})) is None


def _mask_call(length, *, batch=8, width=None, signed_mask=False, out_dtype="bfloat16"):
    """decode_mask_layout_launches' arguments for one decode step of a transformers dynamic
    cache: a [batch, L] slot mask of a growing cache, its table padded to ``width`` columns."""
    width = -(-length // 16) * 16 if width is None else width
    return dict(mask_shape=(batch, length), mask_strides=(length, 1), signed_mask=signed_mask, kv_len=length,
                pages_per_row=length, out_dtype=out_dtype, width=width)


def test_mask_layout_parameters_equal_the_description():
    """``mask_layout_parameters`` from the decode mask layout's launch of length L gives the
    run-time scalars of the description of the next lengths exactly (the description is the
    old one with those keywords replaced: the same kernel, grid, arrays, outputs, constexprs,
    warps, stages) while the block table's width and the plan stay, and refuses (None) where
    the width, batch, mask kind or output dtype changes."""
    import dataclasses

    checked = 0
    for start in (1, 17, 1000, 4097):
        launches = L.decode_mask_layout_launches(**_mask_call(start))
        width = _mask_call(start)["width"]
        for length in range(start + 1, start + 20):
            call = _mask_call(length)
            params = L.mask_layout_parameters(launches, **call)
            want = L.decode_mask_layout_launches(**call)[0]
            same = call["width"] == width and want.keywords["BLOCK_L"] == launches[0].keywords["BLOCK_L"]
            assert (params is not None) == same, (start, length)
            if params is None:
                continue
            checked += 1
            got = dataclasses.replace(launches[0], keywords={**launches[0].keywords, **params})
            assert got == want and dict(got.keywords) == dict(want.keywords)
    assert checked > 30
    launches = L.decode_mask_layout_launches(**_mask_call(20))
    for other in (dict(width=48), dict(batch=9), dict(signed_mask=True), dict(out_dtype="float32")):
        assert L.mask_layout_parameters(launches, **_mask_call(21, **other)) is None
    assert L.mask_layout_parameters(L.write_kv_cache_launches(
        kv_shape=(1, 8, 64), cache_shape=(10, 16, 8, 64), dtype="bfloat16"), **_mask_call(21)) is None
