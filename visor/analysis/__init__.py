"""The paper's analysis tools (``visor analyze``), on any LLaVA-OV or VISOR checkpoint and dataset:

* ``attention``: per-layer share of attention from question and answer tokens to image tokens;
* ``cka``: linear CKA of the visual states between layers, per task family;
* ``layer_drop``: accuracy when the image is removed from groups of layers.

Each writes a CSV and a PNG. ``common.walk_layers`` runs the model's own prefill one layer at a time so a
tool reads the streams exactly as each layer sees them.
"""
