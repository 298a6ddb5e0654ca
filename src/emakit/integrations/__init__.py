"""Integrations with the trainers people already use. Each is an optional extra, imported only on request.

- :mod:`emakit.integrations.lightning` — ``EMACallback`` for PyTorch Lightning (``pip install emakit[lightning]``).
- :mod:`emakit.integrations.transformers` — the Hugging Face ``Trainer`` (``pip install emakit[transformers]``).

``import emakit`` never imports these packages.
"""
