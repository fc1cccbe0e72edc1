"""Tissue classes of the phantom (internal: the segmentation only knows the tumour labels)."""

BG, WM, GM, DGM, CSF, CHOROID, VESSEL, ET, NECROSIS, SOLID, WMH = range(11)
N_CLASSES = 11
