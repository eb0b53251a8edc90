"""One loaded model shared by threads, long generations and many calls in a row."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import edgegen.runtime


def calls(n):
    prompts = ["The ", "Return the ", "Pack", "a"]
    return [dict(prompt=prompts[i % 4], seed=i, max_new_tokens=12 + i % 5) for i in range(n)]


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", ["gpt", "gru"])
def test_threads_share_one_model_and_get_the_serial_outputs(trained_bundles, name, backend):
    gen = edgegen.runtime.load(trained_bundles[name][1], backend=backend)
    work = calls(8 * 20)

    def one(kw):
        result = gen.generate(kw["prompt"], seed=kw["seed"], max_new_tokens=kw["max_new_tokens"])
        return result.token_ids

    serial = [one(kw) for kw in work]
    start = threading.Barrier(8)

    def worker(chunk):
        start.wait()  # all eight threads run at once
        return [one(kw) for kw in chunk]

    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(worker, [work[i::8] for i in range(8)]))
    threaded = [None] * len(work)
    for i, part in enumerate(parts):
        threaded[i::8] = part
    assert threaded == serial
    assert len({tuple(t) for t in serial}) > 4  # the calls really differ


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_a_long_generation_keeps_memory_flat(trained_bundles):
    gen = edgegen.runtime.load(trained_bundles["gru"][1])
    gen.generate("The ", max_new_tokens=500, seed=0, ignore_eos=True)
    before = resident_mb()
    result = gen.generate("The ", max_new_tokens=5000, seed=0, ignore_eos=True)
    grown = resident_mb() - before
    assert len(result.token_ids) == 5000
    assert grown < 16, f"resident memory grew {grown:.1f} MB over 5000 tokens"


@pytest.mark.parametrize("name", ["gpt", "gru"])
def test_a_thousand_calls_keep_memory_flat(trained_bundles, name):
    gen = edgegen.runtime.load(trained_bundles[name][1])
    for i in range(100):
        gen.generate("The ", max_new_tokens=8, seed=i)
    before = resident_mb()
    for i in range(1000):
        gen.generate("The ", max_new_tokens=8, seed=i)
    grown = resident_mb() - before
    assert grown < 8, f"resident memory grew {grown:.1f} MB over 1000 calls"


def test_a_finished_generation_leaves_no_kv_buffer_bound(trained_bundles):
    """The ONNX backend binds the Decoder's KV buffers across steps; when a generation
    ends (or a stream is dropped) it lets go of them, and the next one binds afresh."""
    gen = edgegen.runtime.load(trained_bundles["gpt"][1])
    first = gen.generate("The ", max_new_tokens=8, seed=0).token_ids
    assert gen.runner._local.binding is None
    stream = gen.stream("The ", max_new_tokens=8, seed=0)
    next(stream)
    assert gen.runner._local.binding is not None  # mid-generation: bound
    stream.close()
    assert gen.runner._local.binding is None
    assert gen.generate("The ", max_new_tokens=8, seed=0).token_ids == first
