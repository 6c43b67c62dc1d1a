"""addclass: teach a matting-level semantic segmentation model a new class from a text prompt.

The installed distribution has this one top-level package; its sub-packages are the repository's folders
(``addclass.flows`` is ``flows/``, and so on for ``tasks``, ``models``, ``storage``, ``common`` and ``cli``),
linked here so that a checkout imports them under the same names as an installed wheel does:

- ``cli``: the ``addclass`` command (flags generated from ``flows.settings``)
- ``flows``: the Prefect flows (add-class, retrain, predict, demo) and their settings models
- ``tasks``: the stages, one package per role (data, labels, training, evaluation, prediction, model_files)
- ``models``: the networks (one package per architecture), losses, labelers and metrics
- ``storage``: the zarr label store, its schema, locks and registry
- ``common``: the user-error types every layer raises

Dependencies point one way: cli -> flows -> tasks -> models / storage -> common.
"""

__version__ = "0.2.0"
