"""Semantic label values shared by readers, losses, metrics and reports."""

from typing import Literal

BACKGROUND = 0
CYTOPLASM = 1  # cell area minus its nuclei
NUCLEUS = 2

CLASS_NAMES = ("background", "cytoplasm", "nucleus")
NUM_CLASSES = len(CLASS_NAMES)

# "full": background, cytoplasm and nucleus are all annotated.
# "nucleus": only nuclei are annotated, so cytoplasm and background cannot be told apart
# in the ground truth (label 0 means "not nucleus").
Annotation = Literal["full", "nucleus"]
ANNOTATIONS = ("full", "nucleus")
