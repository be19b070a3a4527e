"""Models and image operations shared by the fieldkube trainer and the inference service.

Submodules are imported explicitly (``from fieldkube.vision.models import build_model``) so that
light users such as the image readers do not pay for importing torch.
"""
