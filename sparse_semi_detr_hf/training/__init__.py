"""Training side: data, views, synthetic set, evaluation, teacher and trainer (imports the model, never the reverse).

Import the submodules directly (``from sparse_semi_detr_hf.training.data import load_coco_folder``); this package
file stays empty so that importing it is cheap.
"""
