"""EVA-style masked image modeling: model library (ViT, masking, loss, teacher, export).

Kept import-free on purpose: `import eva` must stay cheap for Ray workers and CLI entry points.
Import the submodules you need (`eva.vit`, `eva.mim`, `eva.masking`, `eva.loss`, ...).
"""
