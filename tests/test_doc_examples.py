"""The runnable examples in the docstrings run and print what they say (this process, gloo with
one rank: the examples set up and tear down their own process group)."""
import doctest

import torch.distributed as dist

import mxep


def test_buffer_docstring_examples():
    """Buffer's class example, with combine_input's example run before its teardown line."""
    assert not dist.is_initialized()
    parser = doctest.DocTestParser()
    setup = parser.get_examples(mxep.Buffer.__doc__)
    teardown = [e for e in setup if "destroy_process_group" in e.source]
    body = [e for e in setup if e not in teardown] + parser.get_examples(mxep.Buffer.combine_input.__doc__)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    try:
        runner.run(doctest.DocTest(body, {}, "mxep.Buffer examples", None, 0, None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert teardown and runner.summarize(verbose=False).failed == 0


def test_module_docstring_examples():
    """Every other runnable docstring example (format, layout and its oracle, routing, grouped GEMM,
SwiGLU, MoE, the bf16 baselines, the host-work counter)."""
    import mxep.ep.layout
    import mxep.ep.naive
    import mxep.testing
    import mxep.testing.host_cost
    import mxep.format.mxfp8
    import mxep.gemm.grouped_gemm
    import mxep.moe.layer
    import mxep.moe.naive
    import mxep.swiglu.swiglu

    failed = 0
    for mod in (mxep.format.mxfp8, mxep.ep.layout, mxep.ep.naive, mxep.testing, mxep.gemm.grouped_gemm,
                mxep.swiglu.swiglu, mxep.moe.layer, mxep.moe.naive, mxep.testing.host_cost):
        res = doctest.testmod(mod, extraglobs={"torch": __import__("torch"), "mxep": mxep},
                              optionflags=doctest.NORMALIZE_WHITESPACE)
        assert res.attempted > 0, mod.__name__
        failed += res.failed
    assert failed == 0
