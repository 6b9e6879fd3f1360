"""cervi_ray: CerviSegNet-DistillPlus cervical-cytology segmentation on Ray."""

__version__ = "0.1.0"
