"""Benchmark helpers for ``mopo bench step``.

* :mod:`mopo_jax.bench.peak` -- this machine's measured dense matmul throughput with JAX, and a table of published
  accelerator peaks, for model-FLOPs-utilisation (MFU) figures.
* :mod:`mopo_jax.bench.torch_reference` -- a PyTorch / ``transformers`` reference DPO training step on the same small
  Llama configuration, to compare the JAX step against. ``torch`` is imported only inside its functions, so importing
  this package never imports torch.
"""
