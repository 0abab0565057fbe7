"""Speed paths, each equal to a reference kept beside it and tested against it: the LoRA branch (branch), one autocast
cast per input (shared_cast), the gated-MLP activation (swiglu), output layer + cross-entropy in chunks (fused_ce,
causal_lm_loss).

The device rule (devices.py): a fast path takes the device from its tensors and reads autocast for that device
(``torch.is_autocast_enabled(x.device.type)``, never ``"cpu"`` alone); it runs on the device types of
``devices.FAST_DEVICES`` (cpu, cuda, mps) and steps aside -- the reference path runs -- on any other (meta, xpu,
...), and where one of its ops has no kernel on the device (the dropout draw's float64 on MPS). The equality tests
take the ``device`` fixture (tests/conftest.py) and run on every device torch reports available."""
