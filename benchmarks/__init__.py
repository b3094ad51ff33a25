"""fxfuse's benchmark harness: ``python -m benchmarks --help``. Not part of the test suite.

- :mod:`.latency`: each model's latency as eager, fxfuse, timm's converter, fx's ``fuse``,
  ``torch.jit.freeze``, Inductor and the fxfuse backend, in one process, interleaved;
- :mod:`.scaling`: fxfuse's pass time on synthetic networks of 10 … 10,000 blocks;
- :mod:`.memory`: the peak memory of ``fxfuse.optimize`` against the model's parameters;
- :mod:`.plots`: the PNG.

Results go to ``benchmarks/out/results.json`` (one section per measurement, so separate
commands add up to one file); ``benchmarks/RESULTS.md`` records them with the machine.
"""
