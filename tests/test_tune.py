"""fastdino.tune, the timing cache, the first-use self-check and decisions kept per signature.

A test op (`probe`) with an injectable clock stands in for a kernel whose speed and correctness
the test chooses: its original module and its kernel backends advance a fake clock by set costs,
and tune's timer reads that clock, so what wins is decided by the test, not by CPU noise.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import requires_ext
from torch import nn

import fastdino
from fastdino import selfcheck, tuning
from fastdino.fused.common import decide, runs_original
from fastdino.ops import OPS
from fastdino.ops._dispatch import Like, Op, observe
from fastdino.patch import _fused_class


class Clock:
    now = 0.0
    cost = {"original": 10.0, "cpu": 5.0, "triton": 20.0}
    wrong = set()  # backends that compute a wrong result

    @classmethod
    def timer(cls, fn):
        start = cls.now
        fn()
        return cls.now - start


def _probe_kernel(backend, x):
    Clock.now += Clock.cost[backend] if backend != "ref" else 0.0
    return x * 3 + 1 if backend in Clock.wrong else x * 2 + 1


def _probe_reasons(backend, x):
    return [] if backend in ("cpu", "triton") else [f"no {backend} kernel"]


PROBE = Op("probe", {"cpu": ("ref",)}, lambda x: None, _probe_reasons, _probe_kernel,
           lambda device, dtype: (Like(device, dtype, (4, 8)),))


class Probe(nn.Module):
    """The user's module: x * 2 + 1, at the original's cost."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((8,), 2.0))

    def forward(self, x):
        Clock.now += Clock.cost["original"]
        return x * self.scale + 1


class FusedProbe:
    def forward(self, x):
        backend = decide(self, PROBE, x)
        return super().forward(x) if backend is None else PROBE.run(backend, x)


class Net(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.layers = nn.ModuleList(Probe() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _patched(n=3) -> Net:
    net = Net(n)
    for m in net.layers:
        m.__class__ = _fused_class(FusedProbe, Probe)
        m._fastdino_backend, m._fastdino_tuned = None, None
    return net


@pytest.fixture(autouse=True)
def _clock():
    saved = dict(Clock.cost)
    yield
    Clock.cost.update(saved)
    Clock.wrong.clear()


def _tune(net, x, **kw):
    return fastdino.tune(net, x, timer=Clock.timer, warmup=1, rounds=3, cache=False, **kw)


def _ran(net, x) -> set:
    seen = set()
    with observe(lambda op, backend, args: seen.add(backend)), torch.no_grad():
        net(x)
    return seen


@pytest.mark.quick
def test_faster_correct_kernel_wins():
    net, x = _patched(), torch.randn(4, 8)
    report = _tune(net, x)
    (t,) = report.tuned
    assert (t.module, t.op, t.layers, t.winner) == ("Probe", "probe", 3, "cpu")
    times = {c.name: c.median_ms for c in t.candidates}
    assert times == {"original": 10.0, "cpu": 5.0, "triton": 20.0}
    assert _ran(net, x) == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(net(x), ((x * 2 + 1) * 2 + 1) * 2 + 1)


@pytest.mark.quick
def test_wrong_kernel_is_rejected_with_its_error():
    Clock.wrong.add("cpu")
    Clock.cost["cpu"] = 1.0  # the fastest, and wrong
    net, x = _patched(), torch.randn(4, 8)
    (t,) = _tune(net, x).tuned
    cpu = next(c for c in t.candidates if c.name == "cpu")
    assert cpu.rejected is not None and "rel. error" in cpu.rejected and cpu.median_ms is None
    assert cpu.rel_error > 0.1
    assert t.winner == "original"
    assert _ran(net, x) == set()  # the original modules run


@pytest.mark.quick
def test_slower_kernels_never_win():
    Clock.cost.update(cpu=12.0, triton=30.0)
    net, x = _patched(), torch.randn(4, 8)
    (t,) = _tune(net, x).tuned
    assert t.winner == "original"
    assert _ran(net, x) == set()


@pytest.mark.quick
@pytest.mark.parametrize("margin, winner", [(0.03, "original"), (0.01, "cpu")])
def test_margin(margin, winner):
    Clock.cost.update(cpu=9.8)  # 2% faster than the original
    net, x = _patched(), torch.randn(4, 8)
    (t,) = _tune(net, x, margin=margin).tuned
    assert t.winner == winner


@pytest.mark.quick
def test_each_signature_is_tuned_and_applied_on_its_own():
    net = _patched()
    _tune(net, torch.randn(4, 8))
    Clock.cost.update(cpu=50.0)  # another shape: here the kernel is slower
    report = _tune(net, torch.randn(6, 8))
    assert [t.winner for t in report.tuned] == ["original"]
    assert _ran(net, torch.randn(4, 8)) == {"cpu"}
    assert _ran(net, torch.randn(6, 8)) == set()


@pytest.mark.quick
def test_decisions_are_kept_per_signature(monkeypatch):
    """A steady-state call does no reasons work: the decision is made once per signature."""
    calls = []
    monkeypatch.setattr(PROBE, "reasons", lambda *a: calls.append(a) or _probe_reasons(*a))
    net, x = _patched(), torch.randn(4, 8)
    net._modules["layers"][0]._fastdino_backend = "cpu"
    with torch.no_grad():
        net(x)
        first = len(calls)
        for _ in range(5):
            net(x)
    assert first > 0 and len(calls) == first
    with torch.no_grad():
        net(torch.randn(5, 8))  # a new signature decides again
    assert len(calls) > first


@pytest.mark.quick
def test_an_op_that_only_has_its_reference_here_is_not_decided(monkeypatch):
    """Untuned, nothing pinned, on a device where the op's priority is the reference alone: a module
    that asks runs_original first (as the ViT seam, MLP and attention do) runs the original with no
    reasons work and no decision kept. Pinned, tuned or being tuned, it is decided as before."""

    class FusedAskingProbe:
        def forward(self, x):
            backend = None if runs_original(self, PROBE, x) else decide(self, PROBE, x)
            return super().forward(x) if backend is None else PROBE.run(backend, x)

    calls = []
    monkeypatch.setattr(PROBE, "reasons", lambda *a: calls.append(a) or _probe_reasons(*a))
    net, x = Net(1), torch.randn(4, 8)
    layer = net.layers[0]
    layer.__class__ = _fused_class(FusedAskingProbe, Probe)
    layer._fastdino_backend, layer._fastdino_tuned = None, None
    with torch.no_grad():
        assert _ran(net, x) == set() and not calls and "_fastdino_decisions" not in layer.__dict__
        layer._fastdino_backend = "cpu"
        assert _ran(net, x) == {"cpu"} and calls
        layer._fastdino_backend = None
    assert len(_tune(net, x).tuned) == 1 and layer.__dict__.get("_fastdino_tuned")
    with torch.no_grad():
        assert _ran(net, x) == {"cpu"}  # Clock: cpu 5 < original 10


@requires_ext
def test_a_public_call_on_its_cpp_fast_path_compiles_and_exports_to_the_op():
    """Once the C++ backend passed its self-check, a public call goes straight to the op's C++
    entry; torch.compile traces the registered overload there instead (fullgraph, the op in the
    graph), and torch.export, strict or not, records the op."""
    op = OPS["add_layer_norm"]
    x, branch = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    vecs = [torch.randn(64) for _ in range(3)]

    def fn(*a):
        return fastdino.ops.add_layer_norm(*a, eps=1e-5, backend="cpu")

    with torch.no_grad():
        want = fn(x, branch, *vecs)
        assert ("cpu", torch.float32, False, True) in op._fast
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        got = torch.compile(fn, fullgraph=True, backend=backend)(x, branch, *vecs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.fastdino.add_layer_norm.default]

    class Seam(nn.Module):
        def forward(self, x, branch, *vecs):
            return fn(x, branch, *vecs)

    for strict in (False, True):  # without Dynamo the C++ entry is called under export's fake tensors
        program = torch.export.export(Seam(), (x, branch, *vecs), strict=strict)
        assert [n for n in program.graph.nodes if n.target is torch.ops.fastdino.add_layer_norm.default]
        for g, w in zip(program.module()(x, branch, *vecs), want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.quick
def test_cache_roundtrip_and_report(tmp_path):
    net, x = _patched(), torch.randn(4, 8)
    path = tmp_path / "cache.json"
    report = fastdino.tune(net, x, timer=Clock.timer, warmup=1, rounds=3, cache=path)
    assert report.cache == str(path)
    entry = next(iter(json.loads(path.read_text())["entries"].values()))
    assert entry["winner"] == "cpu" and entry["candidates"]["original"]["median_ms"] == 10.0
    assert set(entry["env"]) >= {"device", "torch", "triton", "fastdino", "build"}
    cache = tuning.TimingCache.load(path)
    assert len(cache.choices()) == 1 and not cache.ignored


def _foreign(entry: dict, **env) -> dict:
    return {**entry, "env": {**entry["env"], **env}}


@pytest.mark.quick
def test_foreign_entries_are_ignored_with_the_reason(tmp_path):
    net, x = _patched(), torch.randn(4, 8)
    path = tmp_path / "cache.json"
    fastdino.tune(net, x, timer=Clock.timer, warmup=1, rounds=3, cache=path)
    data = json.loads(path.read_text())
    (key, entry), = data["entries"].items()
    data["entries"] = {key: _foreign(entry, torch="1.0.0", device="Imaginary GPU")}
    path.write_text(json.dumps(data))
    cache = tuning.TimingCache.load(path)
    assert cache.choices() == {}
    (_, why), = cache.ignored
    assert "torch '1.0.0'" in why and "Imaginary GPU" in why
    assert "ignored" in cache.explain() and "measured elsewhere" in cache.explain()


def test_corrupt_cache_warns_once_and_patching_works(tmp_path):
    from bench_dispatch import _vit

    path = tmp_path / "broken.json"
    path.write_text("{not json")
    model, pixels = _vit()
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fastdino.patch(model, cache=path)
        fastdino.patch(model, cache=path)
        with torch.no_grad():
            out = model(pixel_values=pixels).last_hidden_state
    assert len([w for w in caught if "timing cache" in str(w.message)]) == 1
    assert report.swapped and "not applied" in str(report) and "unreadable" in str(report)
    torch.testing.assert_close(out, ref)


_WRITER = """
import sys
from fastdino.tuning import TimingCache
cache = TimingCache(__import__("pathlib").Path(sys.argv[1]))
for i in range(25):
    entry = {"module": "M", "op": "o", "signature": str(i), "env": {}, "winner": "x"}
    cache.save({f"{sys.argv[2]}-{i}": entry})
"""


def test_concurrent_writers_leave_a_valid_file(tmp_path):
    path = tmp_path / "cache.json"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), name], cwd=tmp_path)
             for name in ("a", "b", "c")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 75
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


_TUNE_IN_A_SUBPROCESS = """
import sys, torch, fastdino
sys.path.insert(0, sys.argv[2])
from bench_dispatch import _vit
from fastdino.ops._dispatch import observe
model, pixels = _vit()
fastdino.patch(model, cache=False)

def timer(fn):  # deterministic: the cpu kernels are the fastest, the original the slowest
    ran = []
    with observe(lambda op, backend, args: ran.append(backend)):
        fn()
    return 1.0 if "cpu" in ran else 1.5 if ran else 2.0

print(fastdino.tune(model, {"pixel_values": pixels}, timer=timer, warmup=0, rounds=1, cache=sys.argv[1]))
"""


@requires_ext
def test_cache_roundtrip_across_processes(tmp_path):
    """One process tunes a tiny DINOv3 ViT and writes the cache; this one patches with it."""
    from bench_dispatch import _vit

    path = tmp_path / "cache.json"
    benchmarks = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    subprocess.run([sys.executable, "-c", _TUNE_IN_A_SUBPROCESS, str(path), benchmarks], check=True,
                   timeout=300, cwd=tmp_path)
    model, pixels = _vit()
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
    report = fastdino.patch(model, cache=path)
    assert "6 layers tuned from cache" in str(report)
    ran = []
    with observe(lambda op, backend, args: ran.append((op, backend))), torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    assert {op for op, _ in ran} == {"add_layer_norm", "rope_attention", "fused_linear"}
    assert {backend for _, backend in ran} == {"cpu"}
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    fastdino.unpatch(model)
    assert "tuned from cache" not in str(fastdino.patch(model, cache=False))


@requires_ext
def test_selfcheck_disables_a_broken_backend(monkeypatch):
    """A kernel that computes garbage is disabled at its first use with one warning; the patched
    model then runs the original code for that op and its output still matches."""
    from bench_dispatch import _vit

    op = OPS["add_layer_norm"]
    real = op.launch

    def broken(backend, *args):
        y, z = real(backend, *args)
        return (y, z * 0 + 7) if backend == "cpu" else (y, z)

    monkeypatch.setattr(op, "launch", broken)
    monkeypatch.setattr(selfcheck, "RESULTS", {})
    monkeypatch.setattr(selfcheck, "PASSED", set())
    model, pixels = _vit()
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastdino.patch(model, backend="cpu", cache=False)  # checks ahead the backends it pins
        with torch.no_grad():
            out = model(pixel_values=pixels).last_hidden_state
            model(pixel_values=pixels)
    messages = [str(w.message) for w in caught if "self-check" in str(w.message)]
    assert len(messages) == 1 and "add_layer_norm" in messages[0] and "'cpu'" in messages[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    rows = {(r[0], r[1], r[3]): r[4] for r in selfcheck.table()}
    assert rows[("add_layer_norm", "cpu", "float32")].startswith("DISABLED")
    assert rows[("rope_attention", "cpu", "float32")].startswith("passed")


@pytest.mark.quick
@requires_ext
def test_selfcheck_passes_every_op_on_cpu(monkeypatch):
    monkeypatch.setattr(selfcheck, "RESULTS", {})
    monkeypatch.setattr(selfcheck, "PASSED", set())
    for name, op in OPS.items():
        assert op.sample is not None, name
        for dtype in (torch.float32, torch.bfloat16):
            assert selfcheck.reasons(op, "cpu", torch.device("cpu"), dtype) == [], (name, dtype)


def test_tune_real_model_end_to_end(tmp_path):
    """The cpu backend against the original on a tiny DINOv3 ViT: every decision tuned, outputs
    unchanged within fp32 tolerance, the cache applied by a later patch."""
    from bench_dispatch import _vit

    model, pixels = _vit()
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
    path = tmp_path / "cache.json"
    report = fastdino.tune(model, {"pixel_values": pixels}, warmup=1, rounds=3, cache=path)
    assert {t.op for t in report.tuned} == {"add_layer_norm", "rope_attention", "fused_linear"}
    assert all(c.rejected is None for t in report.tuned for c in t.candidates if c.name == "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, ref, rtol=1e-4, atol=1e-4)
    fastdino.unpatch(model)
    assert "layers tuned from cache" in str(fastdino.patch(model, cache=path))


def test_patched_model_pickles_without_its_decisions(tmp_path):
    import copy

    net, x = _patched(), torch.randn(4, 8)
    _tune(net, x)
    clone = copy.deepcopy(net)
    assert all("_fastdino_decisions" not in m.__dict__ and "_fastdino_tuned" not in m.__dict__
               for m in clone.layers)


def _identity_kernel(backend, y):
    Clock.now += Clock.cost[backend] / 5 if backend != "ref" else 0.0
    return y.clone()


PROBE2 = Op("probe2", {"cpu": ("ref",)}, lambda x: None, _probe_reasons, _identity_kernel,
            lambda device, dtype: (Like(device, dtype, (4, 8)),))


class FusedTwoStage:
    """A second decision that is made only where the first runs a kernel (a ConvNeXt block's MLP
    after its depthwise conv)."""

    def forward(self, x):
        first = decide(self, PROBE, x)
        if first is None:
            return super().forward(x)
        y = PROBE.run(first, x)
        second = decide(self, PROBE2, y)
        if second is None:
            Clock.now += Clock.cost["original"] / 5
            return y
        return PROBE2.run(second, y)


def test_decisions_behind_tuned_ones_are_tuned_in_a_second_pass():
    net, x = Net(1), torch.randn(4, 8)
    net.layers[0].__class__ = _fused_class(FusedTwoStage, Probe)
    net.layers[0]._fastdino_backend, net.layers[0]._fastdino_tuned = None, None
    report = _tune(net, x)
    assert [(t.op, t.winner) for t in report.tuned] == [("probe", "cpu"), ("probe2", "cpu")]


@requires_ext
def test_info_shows_the_selfcheck_and_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache.json"
    fastdino.tune(_patched(), torch.randn(4, 8), timer=Clock.timer, warmup=1, rounds=3, cache=path)
    monkeypatch.setenv("FASTDINO_CACHE", str(path))
    text = fastdino.info(device="cpu", dtype="float32", explain=True)
    assert "self-check on cpu, float32" in text
    assert all(f"{name}" in text.split("self-check on cpu")[1] for name in OPS)
    assert f"timing cache: {path} (1 entries, 1 for this machine)" in text
    assert "applies  Probe probe" in text


def _cpu_fastest(fn):
    """A deterministic timer: a call that runs the cpu kernels is the fastest."""
    ran = []
    with observe(lambda op, backend, args: ran.append(backend)):
        fn()
    return 1.0 if "cpu" in ran else 2.0


@pytest.mark.slow
@requires_ext
def test_tuned_model_compiles_fullgraph_with_its_choices():
    from bench_dispatch import _vit

    model, pixels = _vit()
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state
    fastdino.patch(model, cache=False)
    report = fastdino.tune(model, {"pixel_values": pixels}, timer=_cpu_fastest, warmup=0, rounds=1,
                           cache=False)
    assert report.summary() == "3 decisions: 3 cpu"
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.quick
def test_output_comparison_holds_nan_and_inf_to_the_original():
    ref = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    assert selfcheck.rel_error([ref.clone()], [ref]) == 0.0
    assert selfcheck.rel_error([torch.tensor([1.0, 0.0, float("inf"), -2.0])], [ref]) == float("inf")
    assert selfcheck.rel_error([torch.tensor([1.0, float("nan"), 5.0, -2.0])], [ref]) == float("inf")
    err = selfcheck.rel_error([torch.tensor([1.0, float("nan"), float("inf"), -2.5])], [ref])
    assert err == pytest.approx(0.5 / 5 ** 0.5)
    assert selfcheck.rel_error([torch.tensor([1, 2])], [torch.tensor([1, 3])]) == float("inf")


@pytest.mark.quick
def test_a_raising_kernel_is_rejected_and_leaves_tune_consistent():
    """A candidate whose kernel raises is rejected with its error; the hook stack stays balanced,
    so the next layers' decisions are still replayed (and checked) through their own modules."""
    net, x = _patched(), torch.randn(4, 8)

    def boom(backend, y):
        if backend == "cpu":
            raise RuntimeError("kernel launch failed")
        return _probe_kernel(backend, y)

    PROBE.launch = boom
    try:
        (t,) = _tune(net, x).tuned
    finally:
        PROBE.launch = _probe_kernel
    cpu = next(c for c in t.candidates if c.name == "cpu")
    assert cpu.rejected == "RuntimeError: kernel launch failed"
    assert t.winner == "triton" if Clock.cost["triton"] < Clock.cost["original"] else t.winner == "original"
    from fastdino.fused import common

    assert common.TUNING is None


@pytest.mark.quick
def test_malformed_and_newer_caches_are_ignored_not_overwritten(tmp_path):
    env = tuning.environment(torch.device("cpu"))
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"format": 1, "entries": {
        "a": "junk", "b": {"env": env, "winner": "cpu"},
        "c": {"module": "Probe", "op": "add_layer_norm", "signature": "s", "winner": "cutlass", "env": env},
        "d": {"module": "Probe", "op": "add_layer_norm", "signature": "s", "winner": "cpu",
              "env": {"device_type": "xpu9"}}}}))
    cache = tuning.TimingCache.load(path)
    assert cache.choices() == {}
    reasons = sorted(why for _, why in cache.ignored)
    assert reasons == ["malformed entry: env.device_type must be cuda or cpu",
                       "malformed entry: no module, op, signature", "malformed entry: not a JSON object",
                       "unknown winner 'cutlass'"]
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"format": 99, "entries": {"keep": {}}}))
    with pytest.warns(RuntimeWarning, match="newer than this fastdino"):
        report = fastdino.tune(_patched(), torch.randn(4, 8), timer=Clock.timer, warmup=0, rounds=1,
                               cache=newer)
    assert report.cache is None and json.loads(newer.read_text())["format"] == 99


@pytest.mark.quick
def test_an_unhashable_argument_is_decided_per_call():
    class FusedListProbe:
        def forward(self, x):
            backend = decide(self, PROBE, x, [1, 2])
            return super().forward(x) if backend is None else PROBE.run(backend, x)

    PROBE_REASONS = PROBE.reasons
    PROBE.reasons = lambda backend, x, extra=None: PROBE_REASONS(backend, x)
    try:
        net = Net(1)
        net.layers[0].__class__ = _fused_class(FusedListProbe, Probe)
        net.layers[0]._fastdino_backend, net.layers[0]._fastdino_tuned = "cpu", None
        with torch.no_grad():
            net(torch.randn(4, 8))
            net(torch.randn(4, 8))
    finally:
        PROBE.reasons = PROBE_REASONS
    assert "_fastdino_decisions" not in net.layers[0].__dict__
