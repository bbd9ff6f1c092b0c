"""Applications built on the fxdit library: the demo and evaluation harness, the DDIM sampler, the quality metrics and
the shipped and tiny models.

The layering is one way: ``fxdit.commands`` (the CLI) and these applications use the library core (``fxdit.backend``,
``fxdit.config``, ``fxdit.runtime``, ``fxdit.calibration``, ``fxdit.cost``, ``fxdit.dump``, ``fxdit.passes``,
``fxdit.kernels``); the core never imports ``fxdit.apps`` (``tests/test_layering.py`` checks it).

- :mod:`fxdit.apps.models` — shipped model names (``dit-tiny``, the trained demo DiT, tiny diffusers models and
  pipelines) built offline;
- :mod:`fxdit.apps.sampler` — DDIM with classifier-free guidance and seeded noise, the shipped demo model;
- :mod:`fxdit.apps.flow_sampler` — flow-matching Euler sampling with batched CFG for the shipped Flux demo model
  (:mod:`fxdit.apps.models.flux`);
- :mod:`fxdit.apps.peers` — peer step caches (diffusers' hooks, cache-dit, para-attn) measured beside fxdit;
- :mod:`fxdit.apps.quality` — PSNR/SSIM gates, class accuracy and feature distances with the shipped classifier;
- :mod:`fxdit.apps.demo` — the comparison behind ``fxdit demo`` and ``fxdit eval``.
"""
